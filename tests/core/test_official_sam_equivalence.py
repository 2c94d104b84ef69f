"""Acceptance: an official SAM ViT-B checkpoint runs through our build_model + Predictor and gives
the official SamPredictor's results.

A randomly initialised official ``sam_vit_b`` (segment-anything==1.0 from PyPI; its zero-initialised
position tables filled with random values so they are exercised) is saved the way the official
checkpoints are (``torch.save(state_dict)``), loaded with ``rwkvsam_core.build_model("sam_vit_b",
checkpoint=path)``, and both predictors are run on a real photo (scikit-image's astronaut) at
1024x1024 and at 700x500 (resize + pad path) with a box, positive + negative points and a mask
prompt (the low-res logits of the first call fed back), in single and multimask mode.

Slow: the official ViT-B encoder alone takes over a minute per image on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    from . import official_sam
except ImportError:
    import official_sam

pytestmark = pytest.mark.slow

LOGIT_TOL = 1e-4


def rel_err(ours: np.ndarray | torch.Tensor, ref: np.ndarray | torch.Tensor) -> float:
    ours_t, ref_t = (
        torch.as_tensor(np.asarray(ours), dtype=torch.float64),
        torch.as_tensor(np.asarray(ref), dtype=torch.float64),
    )
    assert ours_t.shape == ref_t.shape, (ours_t.shape, ref_t.shape)
    return ((ours_t - ref_t).norm() / ref_t.norm().clamp_min(1e-30)).item()


def photo(height: int, width: int) -> np.ndarray:
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    img = Image.fromarray(skdata.astronaut()).resize((width, height), Image.BICUBIC)
    out = np.asarray(img)
    assert out.shape == (height, width, 3) and out.dtype == np.uint8
    return out


@pytest.fixture(scope="module")
def predictors(tmp_path_factory):
    sa = official_sam.load()
    rwkvsam_core = pytest.importorskip("rwkvsam_core")
    torch.manual_seed(0)
    official = sa.build_sam_vit_b(checkpoint=None)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in official.image_encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(official.state_dict(), path)

    model = rwkvsam_core.build_model("sam_vit_b", checkpoint=str(path), device="cpu")
    model.eval()
    # Every official tensor arrived unchanged.
    ours_sd = model.state_dict()
    for key, value in official.state_dict().items():
        assert key in ours_sd, f"official key {key} missing from our model"
        assert torch.equal(ours_sd[key], value), key
    # Same normalisation epsilons everywhere (1e-6 in the encoder and LayerNorm2d, 1e-5 in the
    # two-way transformer): a wrong eps moves the logits by only ~1e-5, below LOGIT_TOL.
    ours_modules = dict(model.named_modules())
    for name, module in official.named_modules():
        if hasattr(module, "eps"):
            assert name in ours_modules, f"official module {name} missing from our model"
            assert ours_modules[name].eps == module.eps, (name, ours_modules[name].eps, module.eps)
    return sa.SamPredictor(official), rwkvsam_core.Predictor(model)


def compare(off_pred, our_pred, **prompt) -> np.ndarray:
    """Run one prompt through both predictors; returns our low-res logits of the best mask."""
    m_off, s_off, lr_off = off_pred.predict(**prompt)
    m_ours, s_ours, lr_ours = our_pred.predict(**prompt)
    assert m_ours.shape == m_off.shape and m_ours.dtype == np.bool_
    assert lr_ours.shape == lr_off.shape == (m_off.shape[0], 256, 256)
    assert rel_err(lr_ours, lr_off) < LOGIT_TOL
    assert rel_err(s_ours, s_off) < LOGIT_TOL

    logits_off, _, _ = off_pred.predict(**prompt, return_logits=True)
    logits_ours, _, _ = our_pred.predict(**prompt, return_logits=True)
    assert rel_err(logits_ours, logits_off) < LOGIT_TOL
    # Same masks; a pixel may only differ where the official logit is zero up to rounding.
    differ = m_ours != m_off
    near_zero = np.abs(logits_off) <= 1e-4 * np.abs(logits_off).max()
    assert not (differ & ~near_zero).any(), f"{int((differ & ~near_zero).sum())} mask pixels differ"
    assert m_off.any() and not m_off.all(), "degenerate official mask: the comparison would be empty"
    return lr_ours[int(np.argmax(s_ours))]


@pytest.mark.parametrize("size", [(1024, 1024), (500, 700)], ids=["1024x1024", "700x500"])
def test_official_sam_vit_b_through_our_predictor(predictors, size):
    off_pred, our_pred = predictors
    h, w = size
    image = photo(h, w)
    off_pred.set_image(image)
    our_pred.set_image(image)
    assert tuple(our_pred.input_size) == tuple(off_pred.input_size)
    assert tuple(our_pred.original_size) == tuple(off_pred.original_size) == (h, w)
    assert rel_err(our_pred.get_image_embedding(), off_pred.get_image_embedding()) < LOGIT_TOL

    box = np.array([0.2 * w, 0.1 * h, 0.7 * w, 0.8 * h])
    points = np.array([[0.45 * w, 0.35 * h], [0.6 * w, 0.7 * h], [0.1 * w, 0.9 * h]])
    labels = np.array([1, 1, 0])
    for multimask in (False, True):
        first = compare(off_pred, our_pred, box=box, multimask_output=multimask)
        compare(off_pred, our_pred, point_coords=points, point_labels=labels, multimask_output=multimask)
        compare(
            off_pred,
            our_pred,
            box=box,
            point_coords=points[2:],
            point_labels=labels[2:],
            multimask_output=multimask,
        )
        # Mask prompt: the low-res logits of the first call fed back (same array to both).
        compare(
            off_pred,
            our_pred,
            point_coords=points[:1],
            point_labels=labels[:1],
            mask_input=first[None],
            multimask_output=multimask,
        )
