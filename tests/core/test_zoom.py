"""Zoomed box decoding: the window rule, and masks equal to decoding the window by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rwkvsam_core import Predictor, build_model, to_rgb_uint8
from rwkvsam_core.zoom import MIN_WINDOW, predict_boxes_zoomed, zoom_window


def test_no_zoom_when_the_whole_image_already_shows_the_box_large_enough():
    # 512-px image at 1024 input: a 200-px box spans 400 input pixels >= 384
    assert zoom_window(np.array([100, 100, 299, 150]), (512, 512), 384, 1024) is None
    # a window as large as the image is no zoom either
    assert zoom_window(np.array([0, 0, 150, 20]), (300, 200), 384, 1024) is None


def test_small_box_gets_a_square_window_of_the_target_scale_around_it():
    box = np.array([200.0, 300.0, 227.0, 319.0])  # long side 28 px
    x0, y0, x1, y1 = zoom_window(box, (512, 640), 384, 1024)
    side = int(np.ceil(28 * 1024 / 384))
    assert (x1 - x0, y1 - y0) == (side, side)
    assert x0 <= 200 and x1 > 227 and y0 <= 300 and y1 > 319  # contains the box
    assert abs((x0 + x1) / 2 - 213.5) <= 1 and abs((y0 + y1) / 2 - 309.5) <= 1  # centred on it


def test_window_is_shifted_inside_the_image_at_borders_and_never_below_the_minimum():
    x0, y0, x1, y1 = zoom_window(np.array([0, 490, 9, 511]), (512, 512), 384, 1024)
    assert x0 == 0 and y1 == 512 and x1 - x0 == y1 - y0 == int(np.ceil(22 * 1024 / 384))
    x0, y0, x1, y1 = zoom_window(np.array([50, 50, 51, 51]), (512, 512), 384, 1024)
    assert x1 - x0 == MIN_WINDOW and x0 <= 50 and x1 > 51
    # a long thin image: the window is clipped to the short side, still containing the box
    x0, y0, x1, y1 = zoom_window(np.array([500, 2, 530, 20]), (24, 4000), 384, 1024)
    assert (y0, y1) == (0, 24) and x0 <= 500 and x1 > 530


def test_window_always_contains_the_box_even_for_a_target_above_the_input_size():
    box = np.array([100.0, 100.0, 139.0, 119.0])  # 40 px long; target 2048 at 1024 would give 20 px
    x0, y0, x1, y1 = zoom_window(box, (512, 512), 2048, 1024)
    assert x0 <= 100 and x1 > 139 and y0 <= 100 and y1 > 119 and x1 - x0 == 40


@pytest.mark.parametrize("target", [0, -5, float("nan")])
def test_bad_target_is_a_clear_error(target):
    with pytest.raises(ValueError, match="zoom target"):
        zoom_window(np.array([0, 0, 5, 5]), (64, 64), target)


@pytest.fixture(scope="module")
def model():
    return build_model("rwkvsam_t", image_size=128).eval()


def _scene(dtype=np.uint8):
    rng = np.random.default_rng(0)
    img = rng.integers(20, 60, (160, 200, 3)).astype(dtype)
    img[100:118, 30:52] = 220  # a small bright object
    img[10:90, 80:190] = 150  # a large one
    return img


def test_masks_equal_decoding_the_window_by_hand_and_unzoomed_boxes_the_whole_image(model):
    img = _scene()  # at a 128-px input the large box spans 70 input pixels: zoom target 48
    boxes = np.array([[30, 100, 51, 117], [80, 10, 189, 89]], dtype=np.float64)
    pred = Predictor(model)
    masks, scores = predict_boxes_zoomed(pred, img, boxes, target=48)
    assert masks.shape == (2, 160, 200) and masks.dtype == bool and scores.shape == (2,)
    win = zoom_window(boxes[0], (160, 200), 48, 128)
    assert win is not None and zoom_window(boxes[1], (160, 200), 48, 128) is None
    x0, y0, x1, y1 = win
    by_hand = Predictor(model)
    by_hand.set_image(np.ascontiguousarray(img[y0:y1, x0:x1]))
    m, s, _ = by_hand.predict(box=boxes[0] - [x0, y0, x0, y0], multimask_output=False)
    expect = np.zeros((160, 200), bool)
    expect[y0:y1, x0:x1] = m[0]
    np.testing.assert_array_equal(masks[0], expect)
    assert scores[0] == pytest.approx(float(s[0]))
    whole = Predictor(model)
    whole.set_image(img)
    m, s, _ = whole.predict(box=boxes[1], multimask_output=False)
    np.testing.assert_array_equal(masks[1], m[0])
    # the predictor given holds the whole image afterwards (the windows went to another one)
    assert pred.original_size == (160, 200)


def test_windows_keep_the_whole_images_contrast(model):
    img16 = _scene(np.uint16) * 200  # a 16-bit image: each window must not be re-normalised alone
    box = np.array([30, 100, 51, 117], dtype=np.float64)
    masks, _ = predict_boxes_zoomed(Predictor(model), img16, box[None], target=384)
    x0, y0, x1, y1 = zoom_window(box, (160, 200), 384, 128)
    rgb = to_rgb_uint8(img16)
    by_hand = Predictor(model)
    by_hand.set_image(np.ascontiguousarray(rgb[y0:y1, x0:x1]))
    m, _, _ = by_hand.predict(box=box - [x0, y0, x0, y0], multimask_output=False)
    np.testing.assert_array_equal(masks[0, y0:y1, x0:x1], m[0])
    assert not masks[0, :y0].any() and not masks[0, y1:].any()


def test_nan_box_is_a_clear_error(model):
    with pytest.raises(ValueError, match="NaN"):
        predict_boxes_zoomed(Predictor(model), _scene(), np.array([[0, 0, np.nan, 5]]))


def test_unzoomed_boxes_in_several_decoder_passes_give_the_same_masks(model):
    img = _scene()
    boxes = np.array([[80, 10, 189, 89], [5, 5, 150, 120], [0, 0, 199, 159], [30, 100, 51, 117]], float)
    one, s_one = predict_boxes_zoomed(Predictor(model), img, boxes, target=48)
    many, s_many = predict_boxes_zoomed(Predictor(model), img, boxes, target=48, max_boxes=1)
    np.testing.assert_array_equal(one, many)
    np.testing.assert_allclose(s_one, s_many, atol=1e-5)
