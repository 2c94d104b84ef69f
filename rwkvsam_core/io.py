"""Reading images from files and writing masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".npy")

# Decompression-bomb guard: refuse images above this many pixels (about 32k x 32k).
MAX_PIXELS = 1 << 30


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as an array: (H, W) or (H, W, C), keeping 16-bit data as uint16.

    Raises FileNotFoundError for a missing file and ValueError for anything that is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as err:
            raise ValueError(f"{path} is not a readable .npy array: {err}") from err
        if arr.ndim not in (2, 3):
            raise ValueError(f"{path}: expected a 2-D or 3-D array, got shape {arr.shape}")
        return arr
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"{path}: image of {img.width}x{img.height} pixels is too large")
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L"):
                return np.asarray(img, dtype=np.uint16)
            if img.mode in ("I", "F", "L", "RGB", "RGBA"):
                return np.asarray(img)
            if img.mode == "LA":
                return np.asarray(img.convert("L"))
            return np.asarray(img.convert("RGBA" if "A" in img.getbands() else "RGB"))
    except UnidentifiedImageError as err:
        raise ValueError(f"{path} is not an image file PIL can read") from err
    except (OSError, SyntaxError) as err:
        raise ValueError(f"{path} could not be decoded: {err}") from err


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write a boolean (H, W) mask as an 8-bit PNG (0 / 255) or an integer label image as 8/16-bit PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mask.dtype == bool:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path)
    elif mask.max(initial=0) < 256:
        Image.fromarray(mask.astype(np.uint8)).save(path)
    elif mask.max() < 65536:
        Image.fromarray(mask.astype(np.uint16)).save(path)
    else:
        raise ValueError("label images with more than 65535 labels cannot be written as PNG")
    return path
