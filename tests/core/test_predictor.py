"""Predictor: SamPredictor contract, image normalisation, feature save/restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvsam_core import ImageFeatures, Predictor, build_model, postprocess_masks, to_rgb_uint8

S = 128


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_model("rwkvsam_t", device="cpu", image_size=S))


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)


def test_predict_shapes(predictor, image):
    predictor.set_image(image)
    assert predictor.original_size == (90, 150) and predictor.input_size == (77, 128)
    masks, scores, low = predictor.predict(box=np.array([10, 10, 80, 60]))
    assert masks.shape == (3, 90, 150) and masks.dtype == bool
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert low.shape == (3, S // 4, S // 4)
    masks, scores, low = predictor.predict(
        point_coords=np.array([[20, 30], [100, 50]]), point_labels=np.array([1, 0]), multimask_output=False
    )
    assert masks.shape == (1, 90, 150) and scores.shape == (1,)
    logits, _, _ = predictor.predict(box=np.array([10, 10, 80, 60]), return_logits=True)
    assert logits.dtype == np.float32
    assert np.array_equal(logits > 0, predictor.predict(box=np.array([10, 10, 80, 60]))[0])


def test_mask_prompt_and_several_boxes(predictor, image):
    predictor.set_image(image)
    _, _, low = predictor.predict(box=np.array([10, 10, 80, 60]), multimask_output=False)
    masks, scores, low2 = predictor.predict(box=np.array([10, 10, 80, 60]), mask_input=low)
    assert masks.shape == (3, 90, 150)
    boxes = np.array([[10, 10, 80, 60], [50, 5, 140, 85]])
    masks, scores, low = predictor.predict(box=boxes)
    assert masks.shape == (2, 3, 90, 150) and scores.shape == (2, 3) and low.shape == (2, 3, S // 4, S // 4)
    one, s1, _ = predictor.predict(box=boxes[1])
    np.testing.assert_allclose(s1, scores[1], rtol=1e-4, atol=1e-5)
    assert (one != masks[1]).mean() < 1e-3


def test_several_point_sets(predictor, image):
    predictor.set_image(image)
    coords = np.array([[[20, 30], [60, 40]], [[100, 50], [120, 70]]])
    labels = np.array([[1, 0], [1, 1]])
    masks, scores, low = predictor.predict(point_coords=coords, point_labels=labels)
    assert masks.shape == (2, 3, 90, 150) and scores.shape == (2, 3)
    second, s2, _ = predictor.predict(point_coords=coords[1], point_labels=labels[1])
    np.testing.assert_allclose(s2, scores[1], rtol=1e-4, atol=1e-5)


def test_predict_torch_matches_predict(predictor, image):
    predictor.set_image(image)
    box = np.array([10, 10, 80, 60])
    masks, scores, low = predictor.predict(box=box)
    tbox = predictor.transform.apply_boxes_torch(
        torch.tensor(box[None], dtype=torch.float), predictor.original_size
    )
    tm, ts, tl = predictor.predict_torch(None, None, tbox)
    assert np.array_equal(tm[0].numpy(), masks)
    np.testing.assert_allclose(ts[0].numpy(), scores, rtol=1e-6)


def test_features_save_restore_without_encoding(predictor, image, monkeypatch):
    predictor.set_image(image)
    feats = predictor.get_features()
    expected = predictor.predict(box=np.array([5, 5, 60, 60]))[2]
    predictor.reset_image()
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict(box=np.array([5, 5, 60, 60]))

    def boom(*a, **k):
        raise AssertionError("the encoder must not run")

    monkeypatch.setattr(predictor.model, "encode_image", boom)
    predictor.set_features(feats)
    np.testing.assert_array_equal(predictor.predict(box=np.array([5, 5, 60, 60]))[2], expected)
    assert predictor.get_image_embedding().shape == (1, 256, S // 16, S // 16)
    wrong = ImageFeatures(feats.tensors, feats.original_size, feats.input_size, 256)
    with pytest.raises(ValueError, match="input size"):
        predictor.set_features(wrong)


def test_bad_prompts(predictor, image):
    predictor.set_image(image)
    with pytest.raises(ValueError, match="point_labels"):
        predictor.predict(point_coords=np.array([[1, 2]]))
    with pytest.raises(ValueError, match="box must be"):
        predictor.predict(box=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(box=np.array([1, 2, np.nan, 4]))
    with pytest.raises(ValueError, match="mask_input"):
        predictor.predict(box=np.array([1, 2, 30, 40]), mask_input=np.zeros((1, 64, 64)))


@pytest.mark.parametrize(
    "make",
    [
        lambda rgb: rgb.mean(-1).astype(np.uint8),  # grayscale
        lambda rgb: rgb.mean(-1, keepdims=True).astype(np.uint8),  # H x W x 1
        lambda rgb: np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], -1),  # RGBA
        lambda rgb: rgb.astype(np.uint16) * 257,  # 16 bit
        lambda rgb: rgb.astype(np.float32) / 255.0,  # float in [0, 1]
    ],
)
def test_other_image_types(predictor, image, make):
    predictor.set_image(make(image))
    masks, _, _ = predictor.predict(box=np.array([10, 10, 80, 60]))
    assert masks.shape == (3, 90, 150)


def test_to_rgb_uint8_normalisation():
    u16 = np.array([[100, 200], [300, 1100]], dtype=np.uint16)
    out = to_rgb_uint8(u16)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[1, 1, 0] == 255 and out[0, 1, 1] == round(100 / 1000 * 255)
    f = np.array([[0.0, 0.5], [np.nan, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb_uint8(f)[..., 0], [[0, 128], [0, 255]])
    np.testing.assert_array_equal(to_rgb_uint8(u16, contrast_limits=(200, 300))[..., 0], [[0, 0], [255, 255]])
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert to_rgb_uint8(rgb) is not None and np.array_equal(to_rgb_uint8(rgb), rgb)
    with pytest.raises(ValueError, match="shape"):
        to_rgb_uint8(np.zeros((2, 2, 5)))
    with pytest.raises(ValueError, match="empty"):
        to_rgb_uint8(np.zeros((0, 3)))


def test_postprocess_crops_padding():
    low = torch.full((1, 1, 16, 16), -10.0)
    low[..., :, 8:] = 10.0  # right half of the padded input is "inside"
    # the valid input region is the left half: nothing of the mask survives the crop
    out = postprocess_masks(low, (64, 30), (128, 60), 64)
    assert out.shape == (1, 1, 128, 60)
    assert (out < 0).all()


def test_bgr(predictor, image):
    predictor.set_image(image)
    a = predictor.get_image_embedding().clone()
    predictor.set_image(np.ascontiguousarray(image[..., ::-1]), image_format="BGR")
    torch.testing.assert_close(predictor.get_image_embedding(), a)


def test_allocator_tuning_switch():
    import subprocess
    import sys

    code = "import rwkvsam_core as r; print(r.tune_allocator())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "RWKVSAM_TUNE_ALLOCATOR": "0"},
    )
    assert on.stdout.strip() == ("True" if sys.platform.startswith("linux") else "False")
    assert off.stdout.strip() == "False"


def test_clip_to_box_keeps_only_pixels_inside_the_box(predictor, image):
    from rwkvsam_core.predictor import clip_masks_to_boxes

    predictor.set_image(image)
    box = np.array([10.0, 12.0, 80.0, 60.0])
    raw, s_raw, low_raw = predictor.predict(box=box)
    clipped, s_clip, low_clip = predictor.predict(box=box, clip_to_box=True)
    inside = np.zeros((90, 150), bool)
    inside[12:61, 10:81] = True  # rows 12..60, columns 10..80 inclusive
    assert not clipped[:, ~inside].any()
    assert np.array_equal(clipped[:, inside], raw[:, inside])
    assert np.array_equal(s_raw, s_clip) and np.array_equal(low_raw, low_clip)
    # several boxes: each mask is clipped by its own box; logits get the lowest float outside
    boxes = np.array([[10, 10, 40, 40], [60.5, 20.2, 120.7, 80.1]])
    logits, _, _ = predictor.predict(box=boxes, return_logits=True, clip_to_box=True)
    assert (logits[0][:, :, 41:] == np.finfo(np.float32).min).all()
    assert (logits[1][:, :, :60] == np.finfo(np.float32).min).all()
    assert (logits[1][:, 20:82, 60:122] > np.finfo(np.float32).min).all()
    # a mask that fills the image keeps exactly the box's pixels, inverted corners included
    full = np.ones((1, 1, 9, 9), bool)
    out = clip_masks_to_boxes(full, np.array([6, 5, 2, 1]))
    assert out[0, 0].sum() == 5 * 5 and out[0, 0, 1:6, 2:7].all()
    with pytest.raises(ValueError):
        clip_masks_to_boxes(full, np.zeros((2, 4)))


def test_wants_candidates_is_sams_rule():
    from rwkvsam_core.predictor import wants_candidates

    assert wants_candidates(np.array([1]), has_box=False)
    assert wants_candidates(np.array([0]), has_box=False)  # one negative click alone is a click too
    assert wants_candidates(np.array([1, -1, -1]), has_box=False)  # padding does not count
    assert not wants_candidates(np.array([1, 0]), has_box=False)
    assert not wants_candidates(np.array([1]), has_box=True)
    assert not wants_candidates(None, has_box=True)
    assert not wants_candidates(None, has_box=False)
