"""Shared helpers of the Label Studio backend tests: labeling configs, test images, result items."""

from __future__ import annotations

import hashlib

import numpy as np

CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image"><Label value="cat"/><Label value="dog"/></BrushLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></RectangleLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/><Label value="dog"/></KeyPointLabels>
</View>"""

POLYGON_CONFIG = CONFIG.replace(
    "</View>",
    '  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="dog"/></PolygonLabels>\n</View>',
)

IMAGE_W, IMAGE_H = 160, 120


def scene(w: int = IMAGE_W, h: int = IMAGE_H, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test image (H, W, 3) uint8: gradient background with two blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 80)], -1)
    img[(xx - w // 3) ** 2 + (yy - h // 2) ** 2 < (h // 5) ** 2] = (230, 40, 40)
    img[(abs(xx - 3 * w // 4) < w // 10) & (abs(yy - h // 3) < h // 6)] = (30, 200, 60)
    return (img + rng.integers(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def rect(x, y, w, h, label="cat", name="rect", ow=IMAGE_W, oh=IMAGE_H, rotation=0.0) -> dict:
    """A rectanglelabels result item in percent."""
    return {
        "type": "rectanglelabels",
        "from_name": name,
        "to_name": "image",
        "original_width": ow,
        "original_height": oh,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": [label]},
    }


def keypoint(x, y, positive=True, label="cat", ow=IMAGE_W, oh=IMAGE_H) -> dict:
    """A keypointlabels result item in percent (``positive=None`` leaves is_positive out)."""
    item = {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "original_width": ow,
        "original_height": oh,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": [label]},
    }
    if positive is not None:
        item["is_positive"] = positive
    return item


def local(name: str) -> str:
    """The /data/local-files URL of an image in the test document root."""
    return f"/data/local-files/?d=imgs/{name}"


def shipped_version(size: int = 256) -> str:
    """The backend's base model version with the rwkvsam_t weights shipped in the package."""
    from rwkvsam_core import default_checkpoint

    path = default_checkpoint("rwkvsam_t")
    assert path is not None, "rwkvsam_t's starter weights are missing from rwkvsam_core/weights"
    return f"rwkvsam_t-{size}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}"
