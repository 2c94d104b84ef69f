"""Common pieces of the dataset readers: the item dict, image loading, the corrupt-sample error."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class Sample(TypedDict):
    """One item of every reader: ``image (H, W, 3) uint8``, ``masks (M, H, W) bool``, labels, name."""

    image: np.ndarray
    masks: np.ndarray
    labels: list[str]
    name: str


class CorruptSampleError(RuntimeError):
    """An image that cannot be decoded or an item whose annotations are all unusable."""


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB (grayscale, RGBA, 16-bit and float are converted).

    Raises :class:`CorruptSampleError` when the file is missing or cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
                arr = np.repeat(arr.round().astype(np.uint8)[:, :, None], 3, axis=2)
            else:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptSampleError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise CorruptSampleError(f"image {path} has unusable shape {arr.shape}")
    return np.ascontiguousarray(arr)


def make_sample(image: np.ndarray, masks: list[np.ndarray], labels: list[str], name: str) -> Sample:
    """Stack masks into ``(M, H, W)`` bool (``M`` may be 0) and build the item dict."""
    h, w = image.shape[:2]
    arr = np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), dtype=bool)
    return Sample(image=image, masks=arr, labels=list(labels), name=name)


class SkipCounter:
    """Counts skipped items/annotations per reason; readers expose it as ``.skipped``."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, reason: str, n: int = 1, detail: Any = None) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        logger.debug("skipped (%s): %s", reason, detail)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __repr__(self) -> str:
        return f"SkipCounter({self.counts})"
