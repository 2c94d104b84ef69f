"""Training augmentations of the paper: flip, random resize 0.1-2.0, crop to the input size, drop small
masks, plus colour jitter. Every random choice comes from the ``numpy.random.Generator`` passed in, so a
sample is a pure function of (item, seed): resuming a run replays exactly the same data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from .base import Sample

__all__ = ["TrainTransform", "resize_longest"]


def resize_longest(image: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize so the longest side is ``size`` (bilinear image, nearest masks).

    Args:
        image: ``(H, W, 3)`` uint8. masks: ``(M, H, W)`` bool.
    Returns:
        ``(h, w, 3)`` uint8 and ``(M, h, w)`` bool with ``max(h, w) == size``.
    """
    h, w = image.shape[:2]
    scale = size / max(h, w)
    return _resize_crop(image, masks, scale, 0, 0, max(1, round(h * scale)), max(1, round(w * scale)))


def _resize_crop(
    image: np.ndarray, masks: np.ndarray, scale: float, y0: int, x0: int, ch: int, cw: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scale by ``scale`` then take the window ``[y0:y0+ch, x0:x0+cw]`` of the scaled frame."""
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = image
    if (nh, nw) != (h, w):
        img = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    img = img[y0 : y0 + ch, x0 : x0 + cw]
    ys = np.minimum(((np.arange(y0, y0 + ch) + 0.5) * h / nh).astype(np.int64), h - 1)
    xs = np.minimum(((np.arange(x0, x0 + cw) + 0.5) * w / nw).astype(np.int64), w - 1)
    m = masks[:, ys][:, :, xs] if len(masks) else np.zeros((0, len(ys), len(xs)), dtype=bool)
    return np.ascontiguousarray(img), np.ascontiguousarray(m)


@dataclass
class TrainTransform:
    """Augment one sample for training at a square input of ``image_size``.

    The image is first resized so its longest side is ``image_size`` (the model's frame), then scaled
    by a random factor in ``scale_range`` (paper: 0.1-2.0), randomly cropped to at most
    ``image_size`` square, flipped with probability ``flip_prob``, turned by a random multiple of 90
    degrees when ``rot90`` (for images without an "up", such as microscopy: off by default, and no random
    draw is made when off), colour-jittered, and masks with fewer than ``min_mask_pixels`` pixels left
    are dropped (paper: 32). At most ``max_instances`` masks are
    kept (a random subset; paper: 20). Output image ``(h, w, 3)`` uint8 with ``h, w <= image_size``;
    the model pads it bottom/right.
    """

    image_size: int
    scale_range: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    rot90: bool = False
    color_jitter: float = 0.2
    min_mask_pixels: int = 32
    max_instances: int = 20
    augment: bool = True

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        image, masks = sample["image"], sample["masks"]
        labels = list(sample["labels"])
        h, w = image.shape[:2]
        base = self.image_size / max(h, w)
        if self.augment:
            lo, hi = self.scale_range
            scale = base * float(rng.uniform(lo, hi))
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            ch, cw = min(nh, self.image_size), min(nw, self.image_size)
            y0 = int(rng.integers(0, nh - ch + 1))
            x0 = int(rng.integers(0, nw - cw + 1))
            image, masks = _resize_crop(image, masks, scale, y0, x0, ch, cw)
            if rng.random() < self.flip_prob:
                image = np.ascontiguousarray(image[:, ::-1])
                masks = np.ascontiguousarray(masks[:, :, ::-1])
            if self.rot90:
                k = int(rng.integers(0, 4))
                if k:
                    image = np.ascontiguousarray(np.rot90(image, k, axes=(0, 1)))
                    masks = np.ascontiguousarray(np.rot90(masks, k, axes=(1, 2)))
            if self.color_jitter > 0:
                image = self._jitter(image, rng)
        else:
            image, masks = resize_longest(image, masks, self.image_size)
        if len(masks):
            keep = np.flatnonzero(masks.reshape(len(masks), -1).sum(1) >= self.min_mask_pixels)
            if len(keep) > self.max_instances:
                keep = np.sort(rng.choice(keep, self.max_instances, replace=False))
            masks = masks[keep]
            labels = [labels[i] for i in keep]
        return {"image": image, "masks": masks, "labels": labels, "name": sample["name"]}

    def _jitter(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        j = self.color_jitter
        x = image.astype(np.float32)
        b, c, s = (float(rng.uniform(1 - j, 1 + j)) for _ in range(3))
        x = x * b
        mean = x.mean()
        x = (x - mean) * c + mean
        gray = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        x = (x - gray[..., None]) * s + gray[..., None]
        return np.clip(x, 0, 255).round().astype(np.uint8)
