"""The "instance folder" dataset: ``root/<name>/{image.png, masks.npz, meta.json}``, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .base import CorruptSampleError, Sample, SkipCounter, load_rgb

__all__ = ["write_instance_sample", "InstanceFolderDataset"]

_FORMAT_VERSION = 1


def write_instance_sample(
    root: str | Path,
    name: str,
    image: np.ndarray,
    masks: np.ndarray,
    labels: list[str] | None = None,
) -> Path:
    """Write one sample atomically into an instance-folder dataset and return its folder.

    Args:
        root: dataset folder (created if needed).
        name: sample name; becomes the folder name (no path separators, must not start with '.').
        image: ``(H, W, 3)`` uint8 RGB.
        masks: ``(M, H, W)`` bool instance masks (``M`` may be 0).
        labels: ``M`` class names (default ``"object"``).

    The sample is assembled in a hidden temporary folder and renamed into place, so readers never
    see a half-written sample; an existing sample of the same name is replaced.
    """
    if not name or "/" in name or "\\" in name or name.startswith(".") or name in ("..",):
        raise ValueError(f"invalid sample name {name!r}")
    image = np.asarray(image)
    masks = np.asarray(masks).astype(bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if masks.ndim != 3 or masks.shape[1:] != image.shape[:2]:
        raise ValueError(f"masks must be (M, H, W) matching the image {image.shape[:2]}, got {masks.shape}")
    labels = list(labels) if labels is not None else ["object"] * len(masks)
    if len(labels) != len(masks):
        raise ValueError(f"{len(labels)} labels for {len(masks)} masks")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        Image.fromarray(image).save(tmp / "image.png")
        h, w = image.shape[:2]
        packed = np.packbits(masks.reshape(len(masks), -1), axis=1)
        with open(tmp / "masks.npz", "wb") as fh:
            np.savez_compressed(fh, packed=packed, shape=np.asarray([len(masks), h, w], dtype=np.int64))
        meta = {
            "version": _FORMAT_VERSION,
            "height": h,
            "width": w,
            "num_masks": len(masks),
            "labels": labels,
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        final = root / name
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


class InstanceFolderDataset:
    """Reads an instance-folder dataset lazily (one sample per ``__getitem__``).

    Items: ``dict(image=(H, W, 3) uint8, masks=(M, H, W) bool, labels=list[str], name=str)``.
    Corrupt samples raise :class:`CorruptSampleError` (training skips and counts them).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"instance folder dataset {self.root} does not exist")
        self.skipped = SkipCounter()
        self.names = sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / "meta.json").exists()
        )

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        folder = self.root / name
        image = load_rgb(folder / "image.png")
        try:
            meta = json.loads((folder / "meta.json").read_text())
            with np.load(folder / "masks.npz") as z:
                m, h, w = (int(v) for v in z["shape"])
                packed = z["packed"]
            if (h, w) != image.shape[:2]:
                raise ValueError(f"masks are {h}x{w} but the image is {image.shape[:2]}")
            masks = (
                np.unpackbits(packed, axis=1, count=h * w).reshape(m, h, w).astype(bool)
                if m
                else np.zeros((0, h, w), bool)
            )
            labels = list(meta.get("labels") or ["object"] * m)
            if len(labels) != m:
                raise ValueError(f"{len(labels)} labels for {m} masks")
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise CorruptSampleError(f"sample {folder}: {exc}") from exc
        return Sample(image=image, masks=masks, labels=labels, name=name)
