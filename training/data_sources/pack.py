"""A compact "source pack": everything the synthetic generator needs, in one small folder.

The GPU machine reaches no registry, so the generator runs there from a pack built here (about
20 MB: photographs re-encoded as JPEG at a bounded size, real objects as compressed NPZ):

    pack/manifest.json          provenance + licence of every source file (manifest.py)
    pack/pictures/NNN_<source>_<name>.jpg and pictures.json (role, source, member of each)
    pack/objects/<source>.npz   image (H,W,3) uint8, masks (M,H,W) packed bits, labels, kind, ids
    pack/shapes/<label>.png     binary silhouettes
    pack/protocol.json          the 20-nuclei split; its evaluation nuclei are NOT in the pack

Held-out files never enter a pack.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .loaders import load_mask_shapes, load_pictures, load_real_objects, nuclei_protocol, protocol_to_json
from .manifest import build_manifest, check_manifest, write_manifest

logger = logging.getLogger(__name__)

__all__ = ["build_pack", "save_objects_npz", "load_objects_npz"]


def save_objects_npz(
    path: Path,
    image: np.ndarray,
    masks: np.ndarray,
    labels: list[str],
    kind: str,
    instance_ids: list[int],
    cutout_only: bool = False,
) -> None:
    """Write one real image with its masks (M, H, W) bool as a compressed NPZ (masks bit-packed)."""
    masks = np.asarray(masks, dtype=bool)
    np.savez_compressed(
        path,
        image=np.asarray(image, dtype=np.uint8),
        masks=np.packbits(masks.reshape(len(masks), -1), axis=1),
        shape=np.array(masks.shape, dtype=np.int64),
        labels=np.array(json.dumps(labels)),
        kind=np.array(kind),
        instance_ids=np.asarray(instance_ids, dtype=np.int64),
        cutout_only=np.array(cutout_only),
    )


def load_objects_npz(path: Path) -> dict:
    """Read an NPZ written by ``save_objects_npz``: dict(image, masks (M,H,W) bool, labels, kind, ...)."""
    with np.load(path, allow_pickle=False) as z:
        m, h, w = (int(v) for v in z["shape"])
        masks = np.unpackbits(z["masks"], axis=1, count=h * w).reshape(m, h, w).astype(bool)
        return {
            "image": z["image"],
            "masks": masks,
            "labels": json.loads(str(z["labels"])),
            "kind": str(z["kind"]),
            "instance_ids": [int(i) for i in z["instance_ids"]],
            "cutout_only": bool(z["cutout_only"]),
            "name": Path(path).stem,
        }


def build_pack(
    out_dir: Path,
    cache: Path | None = None,
    max_side: int = 1280,
    jpeg_quality: int = 90,
    protocol_seed: int = 0,
) -> Path:
    """Fetch all training sources and write the pack described in the module docstring.

    The protocol image's evaluation nuclei are removed (their masks are dropped and the image is
    marked ``cutout_only`` so the generator never shows it whole), so the 20-nuclei fine-tuning
    experiment later measures nuclei the starter weights never saw.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("pictures", "objects", "shapes"):
        (tmp / sub).mkdir(parents=True)
    manifest = build_manifest(cache)
    problems = check_manifest(manifest)
    if problems:
        raise RuntimeError("manifest incomplete: " + "; ".join(problems[:5]))
    write_manifest(tmp / "manifest.json", manifest)

    pics = []
    for i, p in enumerate(load_pictures(cache, max_side=max_side)):
        name = f"{i:03d}_{p.source}_{Path(p.member).parent.parent.parent.name if 'wallpapers' in p.member else Path(p.member).stem}.jpg"
        Image.fromarray(p.image).save(tmp / "pictures" / name, quality=jpeg_quality)
        pics.append({"file": name, "role": p.role, "source": p.source, "member": p.member})
    (tmp / "pictures.json").write_text(json.dumps(pics, indent=1))

    proto = nuclei_protocol(cache, seed=protocol_seed)
    (tmp / "protocol.json").write_text(protocol_to_json(proto))
    for obj in load_real_objects(cache):
        keep = list(range(len(obj.masks)))
        cutout_only = False
        if obj.source == proto.provenance["source"] and obj.member == proto.provenance["member"]:
            excluded = set(proto.eval_ids)
            keep = [k for k, i in enumerate(obj.instance_ids) if i not in excluded]
            cutout_only = True
        save_objects_npz(
            tmp / "objects" / f"{obj.source}.npz",
            obj.image,
            obj.masks[keep],
            [obj.labels[k] for k in keep],
            obj.kind,
            [obj.instance_ids[k] for k in keep],
            cutout_only,
        )
    for mask, label in load_mask_shapes(cache):
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp / "shapes" / f"{label}.png")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    logger.info("source pack written to %s (%d pictures)", out_dir, len(pics))
    return out_dir
