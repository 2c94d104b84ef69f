"""Datasets for training and evaluation (streaming readers, augmentations, mixing sampler).

Every reader yields ``dict(image=(H, W, 3) uint8, masks=(M, H, W) bool, labels=list[str], name=str)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .augment import TrainTransform, resize_longest
from .base import CorruptSampleError, Sample, SkipCounter, load_rgb
from .instance_folder import InstanceFolderDataset, write_instance_sample
from .readers import (
    CocoInstanceDataset,
    ImageFolderDataset,
    LabelStudioExportDataset,
    MaskFolderDataset,
    SA1BDataset,
)
from .sampler import MixedDataset, MixingSchedule, StepSampler, sample_seed

__all__ = [
    "Sample",
    "CorruptSampleError",
    "SkipCounter",
    "load_rgb",
    "write_instance_sample",
    "InstanceFolderDataset",
    "CocoInstanceDataset",
    "MaskFolderDataset",
    "LabelStudioExportDataset",
    "SA1BDataset",
    "ImageFolderDataset",
    "TrainTransform",
    "resize_longest",
    "MixingSchedule",
    "StepSampler",
    "MixedDataset",
    "sample_seed",
    "open_dataset",
]


def open_dataset(path: str | Path, images: str | Path | None = None, kind: str = "auto") -> Any:
    """Open a dataset by guessing its format from ``path``.

    - a folder with ``im/`` and ``gt/``: :class:`MaskFolderDataset` (kind ``"maskfolder"``);
    - a folder whose sub-folders hold ``meta.json``: :class:`InstanceFolderDataset` (``"instances"``);
    - a folder of ``sa_*.json`` + images: :class:`SA1BDataset` (``"sa1b"``);
    - any other folder: :class:`ImageFolderDataset` (``"images"``, no masks; for distillation);
    - a JSON file with ``images`` + ``annotations``: :class:`CocoInstanceDataset` (``"coco"``), images
      from ``images`` (default: the JSON's folder, or its ``images/`` sibling);
    - a JSON list of tasks: :class:`LabelStudioExportDataset` (``"labelstudio"``), images from ``images``.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {p} does not exist")
    if kind == "auto":
        if p.is_dir():
            if (p / "im").is_dir() and (p / "gt").is_dir():
                kind = "maskfolder"
            elif any((c / "meta.json").exists() for c in p.iterdir() if c.is_dir()):
                kind = "instances"
            elif any(p.glob("*.json")):
                kind = "sa1b"
            else:
                kind = "images"
        else:
            with open(p, encoding="utf-8") as fh:
                head = json.load(fh)
            kind = "coco" if isinstance(head, dict) and "annotations" in head else "labelstudio"
    if kind == "maskfolder":
        return MaskFolderDataset(p)
    if kind == "instances":
        return InstanceFolderDataset(p)
    if kind == "sa1b":
        return SA1BDataset(p)
    if kind == "images":
        return ImageFolderDataset(p)
    if kind == "coco":
        img_dir = (
            Path(images) if images else (p.parent / "images" if (p.parent / "images").is_dir() else p.parent)
        )
        return CocoInstanceDataset(p, img_dir)
    if kind == "labelstudio":
        return LabelStudioExportDataset(p, Path(images) if images else p.parent)
    raise ValueError(f"unknown dataset kind {kind!r}")
