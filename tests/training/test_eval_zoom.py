"""``benchmarks/eval_starter.py --zoom``: the evaluation decodes boxes exactly as rwkvsam_core.zoom does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from eval_starter import model_predictor  # noqa: E402


def test_zoomed_evaluation_masks_are_the_core_zoom_masks():
    from rwkvsam_core import Predictor, build_model
    from rwkvsam_core.zoom import predict_boxes_zoomed, zoom_window

    rng = np.random.default_rng(0)
    img = rng.integers(10, 50, (200, 240, 3)).astype(np.uint8)
    img[40:62, 30:55] = 230  # two small bright objects
    img[120:150, 160:185] = 180
    boxes = np.array([[30, 40, 54, 61], [160, 120, 184, 149]], dtype=np.float64)
    assert all(zoom_window(b, img.shape[:2]) is not None for b in boxes)  # both are zoomed
    raw, clipped = model_predictor("rwkvsam_t", None, "cpu", zoom=384.0)
    got = raw(img, boxes)
    expect, _ = predict_boxes_zoomed(Predictor(build_model("rwkvsam_t", device="cpu").eval()), img, boxes)
    np.testing.assert_array_equal(got, expect)
    clip = clipped(img, boxes)
    assert not (clip[0][:, 56:].any() or clip[0][63:].any()) and (clip <= got).all()
