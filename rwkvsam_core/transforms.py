"""Image normalisation and the resize-longest-side transform (SAM's conventions)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def to_rgb_uint8(image: np.ndarray, contrast_limits: Sequence[float] | None = None) -> np.ndarray:
    """Convert an image of any common layout and dtype to (H, W, 3) uint8 RGB.

    Accepts (H, W) and (H, W, 1) grayscale, (H, W, 3) RGB and (H, W, 4) RGBA (alpha dropped), in
    uint8, other integer types (uint16, int32...), bool and floats. uint8 passes through unchanged
    unless ``contrast_limits`` is given. Other types are mapped linearly from ``contrast_limits``
    (lo, hi) to 0..255 and clipped; without limits, floats already in [0, 1] use (0, 1) and
    everything else uses the finite data range. NaN and inf become 0.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif not (arr.ndim == 3 and arr.shape[-1] == 3):
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty: shape {arr.shape}")
    if arr.dtype == np.uint8 and contrast_limits is None:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool:
        return np.where(arr, 255, 0).astype(np.uint8)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ValueError(f"unsupported image dtype {arr.dtype}")
    data = arr.astype(np.float64)
    finite = np.isfinite(data)
    if contrast_limits is not None:
        lo, hi = float(contrast_limits[0]), float(contrast_limits[1])
    elif not finite.any():
        lo, hi = 0.0, 1.0
    else:
        lo, hi = float(data[finite].min()), float(data[finite].max())
        if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.where(finite, (data - lo) * scale, 0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class ResizeLongestSide:
    """Resize so the longest side equals ``target_length``; transform coordinates and boxes alike."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> tuple[int, int]:
        scale = long_side / max(old_h, old_w)
        return int(old_h * scale + 0.5), int(old_w * scale + 0.5)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (h, w, 3) uint8 with max(h, w) == target_length (bilinear, PIL)."""
        h, w = self.get_preprocess_shape(image.shape[0], image.shape[1], self.target_length)
        if (h, w) == image.shape[:2]:
            return image
        return np.array(Image.fromarray(image).resize((w, h), Image.BILINEAR))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 2) x, y in original pixels -> input-frame pixels."""
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] *= new_w / old_w
        coords[..., 1] *= new_h / old_h
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """(..., 4) XYXY in original pixels -> (N, 4) in the input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(self, coords: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        old_h, old_w = original_size
        new_h, new_w = self.get_preprocess_shape(old_h, old_w, self.target_length)
        coords = coords.clone().to(torch.float32)
        coords[..., 0] = coords[..., 0] * (new_w / old_w)
        coords[..., 1] = coords[..., 1] * (new_h / old_h)
        return coords

    def apply_boxes_torch(self, boxes: torch.Tensor, original_size: tuple[int, int]) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)
