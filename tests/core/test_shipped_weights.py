"""The starter weights shipped in the package: loaded by default, and they really segment.

Their measured quality on held-out real images is in BENCHMARKS.md ("Starter weights"); the check
here is a fast one that random weights cannot pass: nuclei-like ellipses, boxed, at input 1024.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from rwkvsam_core import CheckpointError, Predictor, build_model, default_checkpoint, model_fingerprint
from rwkvsam_core.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def shipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "RANDOM weights" warning
        return build_model("rwkvsam_t", device="cpu")


def test_default_model_loads_the_shipped_file(shipped):
    path = default_checkpoint("rwkvsam_t")
    assert path is not None and path.stat().st_size < 40 * 2**20
    ckpt = load_checkpoint(path)
    assert ckpt.config["name"] == "rwkvsam_t" and ckpt.config["dtype"] == "float16"
    assert shipped.config["checkpoint"] == str(path) and shipped.image_size == 1024
    assert shipped.decoder_mode == "multimask"
    random = build_model("rwkvsam_t", device="cpu", image_size=1024, pretrained=False)
    assert model_fingerprint(random) != model_fingerprint(shipped)


def test_single_token_decoder_refuses_the_multimask_weights():
    with pytest.raises(CheckpointError, match="'multimask' mask decoder.*pretrained=False"):
        build_model("rwkvsam_t", device="cpu", image_size=64, decoder_mode="single")


def _ellipses(seed: int = 0):
    """A 384 x 512 fluorescence-like image of 6 blurred, noisy ellipses and their masks."""
    rng = np.random.default_rng(seed)
    h, w = 384, 512
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w), 30.0)
    masks = []
    for cy, cx in [(90, 100), (200, 300), (300, 120), (120, 400), (280, 420), (80, 250)]:
        a, b, t = rng.uniform(18, 40), rng.uniform(14, 30), rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)) / a
        v = (-(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)) / b
        m = u**2 + v**2 <= 1
        masks.append(m)
        img[m] = rng.uniform(150, 230)
    img = np.clip(gaussian_filter(img, 1.0) + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return np.stack([img] * 3, -1), masks


def test_shipped_weights_segment_boxed_nuclei(shipped):
    image, masks = _ellipses()
    p = Predictor(shipped)
    p.set_image(image)
    ious, box_ious = [], []
    for m in masks:
        r, c = np.nonzero(m)
        box = np.array([c.min(), r.min(), c.max() + 1, r.max() + 1])
        pred = p.predict(box=box, multimask_output=False)[0][0]
        ious.append((pred & m).sum() / (pred | m).sum())
        filled = np.zeros_like(m)
        filled[r.min() : r.max() + 1, c.min() : c.max() + 1] = True
        box_ious.append(m.sum() / filled.sum())
    # measured 0.97-0.99 per object (mean 0.978); the filled box gets 0.73; random weights give noise
    assert min(ious) > 0.9 and np.mean(ious) > np.mean(box_ious) + 0.15
