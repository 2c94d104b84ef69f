"""The cheap decision decode of the click-grouping rule gives the decisions and masks of the full one.

The reference is the previous implementation, kept here: every click alone went through
``model.decode`` (the whole mask head) and the membership test read the full low-res mask.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from ls_helpers import IMAGE_H, IMAGE_W, scene

from labelstudio_backend import click_decode
from labelstudio_backend.convert import Click, object_start


def _predictor(name="rwkvsam_t", decoder_mode=None, size=256):
    from rwkvsam_core import Predictor, build_model

    # rwkvsam_t: the shipped weights; the single-token decoder and sam_vit_b: seeded random weights
    shipped = name == "rwkvsam_t" and decoder_mode is None
    with contextlib.nullcontext() if shipped else pytest.warns(UserWarning, match="RANDOM weights"):
        torch.manual_seed(0)
        model = build_model(
            name, image_size=size, device="cpu", decoder_mode=decoder_mode, pretrained=shipped
        )
    predictor = Predictor(model)
    predictor.set_image(scene())
    return predictor


@pytest.fixture(scope="module")
def rwkvsam():
    return _predictor()


def _coords(predictor, x, y):
    xy = predictor.transform.apply_coords(np.array([[[x, y]]]), predictor.original_size)
    return torch.as_tensor(xy, dtype=torch.float32)


def _reference_decode(predictor, x, y):
    """The previous decode of a click alone: model.decode, best of the candidates."""
    with torch.no_grad():
        low_res, iou = predictor.model.decode(
            predictor.get_features().tensors,
            point_coords=_coords(predictor, x, y),
            point_labels=torch.ones((1, 1), dtype=torch.int),
            multimask_output=True,
        )
    best = int(torch.argmax(iou[0]))
    return low_res[:, best : best + 1], float(iou[0, best])


def _reference_contains(predictor, low_res, clicks):
    """The previous membership test on the full low-res mask."""
    low = low_res[0, 0]
    side = low.shape[-1]
    xy = predictor.transform.apply_coords(
        np.array([[c.x, c.y] for c in clicks], dtype=np.float64), predictor.original_size
    ) * (side / predictor.model.image_size)
    return any(
        bool(low[min(max(int(y), 0), low.shape[-2] - 1), min(max(int(x), 0), side - 1)] > 0) for x, y in xy
    )


@pytest.mark.parametrize(
    "name, mode", [("rwkvsam_t", None), ("rwkvsam_t", "single"), ("sam_vit_b", None)], ids=str
)
def test_windowed_decisions_and_full_masks_match_model_decode(name, mode, rwkvsam):
    predictor = rwkvsam if (name, mode) == ("rwkvsam_t", None) else _predictor(name, mode)
    side = predictor.model.image_size // 4
    rng = np.random.default_rng(1)
    positive = 0
    for _ in range(12):
        x, y = rng.uniform(0, IMAGE_W), rng.uniform(0, IMAGE_H)
        ref_low, ref_score = _reference_decode(predictor, x, y)
        dec = click_decode.decode_click(
            predictor.model, predictor.get_features().tensors, _coords(predictor, x, y)
        )
        assert dec.score == ref_score
        # pixels all over the grid, the four corners (zero padding of the windows) included
        pixels = np.concatenate(
            [[[0, 0], [0, side - 1], [side - 1, 0], [side - 1, side - 1]], rng.integers(0, side, (40, 2))]
        )
        for r, c in pixels:
            assert dec.contains(np.array([[r, c]])) == bool(ref_low[0, 0, r, c] > 0)
            positive += bool(ref_low[0, 0, r, c] > 0)
        assert dec.full_decodes == 0  # decided from windows only
        assert torch.equal(dec.low_res(), ref_low)  # the whole mask: bit for bit model.decode's
        assert dec.full_decodes == 1
    assert 0 < positive < 12 * len(pixels)  # both answers occurred


def test_a_sign_too_close_to_call_is_settled_by_the_full_mask(rwkvsam, monkeypatch):
    monkeypatch.setattr(click_decode, "SIGN_TOLERANCE", 1e9)  # every windowed value is "too close"
    ref_low, _ = _reference_decode(rwkvsam, 40, 60)
    dec = click_decode.decode_click(rwkvsam.model, rwkvsam.get_features().tensors, _coords(rwkvsam, 40, 60))
    pixels = np.argwhere(ref_low[0, 0].numpy() > 0)[:1] if (ref_low > 0).any() else np.array([[0, 0]])
    assert dec.contains(pixels) == bool(ref_low[0, 0, pixels[0][0], pixels[0][1]] > 0)
    assert dec.full_decodes == 1


def test_grouping_decisions_and_answers_are_those_of_the_full_decode(settings, rwkvsam):
    """Click sequences on the real model: same objects, same single-click answers as before."""
    from labelstudio_backend.model import ModelManager

    rng = np.random.default_rng(7)
    starts = []
    for seq in range(8):
        n = int(rng.integers(2, 7))
        clicks = [
            Click(
                float(rng.uniform(0, IMAGE_W)),
                float(rng.uniform(0, IMAGE_H)),
                bool(i == 0 or rng.random() < 0.8),
                "x",
            )
            for i in range(n)
        ]
        decoded = {}

        def joins(i, owners, clicks=clicks, decoded=decoded):
            decoded[i] = _reference_decode(rwkvsam, clicks[i].x, clicks[i].y)
            return _reference_contains(rwkvsam, decoded[i][0], owners)

        expect = object_start(clicks, joins)
        manager = ModelManager(settings)
        kept, single = manager.object_clicks(rwkvsam, clicks, f"img{seq}")
        assert kept == clicks[expect:]
        if expect in decoded:  # the newest click starting the object: its own mask is the answer
            assert single is not None and torch.equal(single.low_res(), decoded[expect][0])
            assert single.score == decoded[expect][1]
        else:
            assert single is None
        # every request of the sequence as Label Studio sends them, one click more each time
        warm = ModelManager(settings)
        for k in range(1, n + 1):
            warm_kept, _ = warm.object_clicks(rwkvsam, clicks[:k], f"img{seq}")
        assert warm_kept == kept
        starts.append(expect)
    assert any(s == 0 for s in starts) and any(s > 0 for s in starts)  # joins and new objects both seen
