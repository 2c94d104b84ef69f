"""The backend's fine-tuning run: the core's engine, with the annotators' boxes as box prompts.

    python -m labelstudio_backend.finetune --data MODEL_DIR/dataset --out DIR ...

takes the options of ``python -m rwkvsam_core.finetune`` and answers like it.

The webhook handler stores, with each mask, the rectangle that prompted it (``"boxes"`` in the
sample's meta.json, Label Studio's continuous XYXY pixels, ``null`` for masks without one). The
engine draws every box prompt from the mask (its tight box, jittered); here a mask that has a stored
box is prompted with that box instead, the prompt annotators really give, presented as at
inference (continuous pixel edges). Everything else (prompt kinds, points, negatives, augmentation,
losses, schedule, checkpoints, resuming) is the engine's:

- :class:`StoredBoxDataset` reads the boxes with the samples;
- :class:`StoredBoxTransform` follows each box through the engine's augmentation (resize, crop,
  flip: the box's pixels are resampled like a mask's, in a second run of the same transform with a
  copy of the sample's generator) and pairs it with the masks the augmentation kept;
- :class:`StoredBoxPrompts` puts it in place of the drawn box after the engine drew the prompts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rwkvsam_core.data import InstanceFolderDataset, TrainTransform, open_dataset

logger = logging.getLogger(__name__)


def read_boxes(meta: dict[str, Any], num_masks: int) -> list[np.ndarray | None]:
    """The stored box of each mask from a sample's meta.json (None where there is none).

    Boxes that are not 4 finite numbers with x1 > x0 and y1 > y0 count as absent; a "boxes" list
    of the wrong length is ignored as a whole.
    """
    raw = meta.get("boxes")
    if not isinstance(raw, list) or len(raw) != num_masks:
        return [None] * num_masks
    out: list[np.ndarray | None] = []
    for b in raw:
        try:
            box = np.asarray(b, dtype=np.float64).reshape(4)
        except (TypeError, ValueError):
            out.append(None)
            continue
        ok = np.isfinite(box).all() and box[2] > box[0] and box[3] > box[1]
        out.append(box if ok else None)
    return out


def box_raster(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool: the pixels an XYXY box touches (columns floor(x0) .. ceil(x1) - 1, rows alike)."""
    out = np.zeros((height, width), dtype=bool)
    x0, y0 = int(np.clip(np.floor(box[0]), 0, width)), int(np.clip(np.floor(box[1]), 0, height))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, width)), int(np.clip(np.ceil(box[3]), 0, height))
    out[y0:y1, x0:x1] = True
    return out


def raster_box(raster: np.ndarray) -> np.ndarray | None:
    """The continuous XYXY box (4,) float32 of a box raster's pixels, None when it has none."""
    rows, cols = np.flatnonzero(raster.any(1)), np.flatnonzero(raster.any(0))
    if rows.size == 0:
        return None
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float32)


class StoredBoxDataset(InstanceFolderDataset):
    """An instance-folder dataset whose items also hold ``boxes``: the stored box of each mask or None."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(super().__getitem__(index))
        try:
            meta = json.loads((self.root / item["name"] / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {}
        item["boxes"] = read_boxes(meta, len(item["masks"]))
        return item


@dataclasses.dataclass
class StoredBoxTransform:
    """The engine's ``TrainTransform``, carrying each sample's stored boxes along.

    The output is exactly ``transform(sample, rng)``'s, plus ``boxes``: per kept mask, its stored
    box in the augmented frame (the extent of the box's resampled pixels, cut by the crop), or None.
    """

    transform: TrainTransform

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        boxes = sample.get("boxes") or []
        if not any(b is not None for b in boxes):
            return self.transform(sample, rng)
        probe_rng = copy.deepcopy(rng)
        out = self.transform(sample, rng)
        masks = sample["masks"]
        m, (h, w) = len(masks), masks.shape[1:]
        rasters = np.stack([box_raster(b, h, w) if b is not None else np.zeros((h, w), bool) for b in boxes])
        # the same draws (scale, crop, flip, jitter) on the masks and the box rasters together; nothing
        # dropped, so no draw of its own after them
        keep_all = dataclasses.replace(self.transform, min_mask_pixels=0, max_instances=2 * m)
        probe = keep_all(
            {**sample, "masks": np.concatenate([masks, rasters]), "labels": [""] * (2 * m)}, probe_rng
        )
        moved, moved_boxes = probe["masks"][:m], probe["masks"][m:]
        out["boxes"] = []
        i = 0
        for kept in out["masks"]:  # the kept masks, in their original order
            while i < m and not np.array_equal(moved[i], kept):
                i += 1
            if i == m:  # cannot happen with the engine's transform; be safe rather than wrong
                logger.warning("%s: kept masks do not match: stored boxes not used", sample.get("name"))
                out["boxes"] = [None] * len(out["masks"])
                break
            out["boxes"].append(raster_box(moved_boxes[i]) if boxes[i] is not None else None)
            i += 1
        return out


class StoredBoxPrompts:
    """Wraps the engine's prompt drawing: a mask with a stored box is prompted with that box."""

    def __init__(self, draw: Callable[[dict[str, Any]], None]) -> None:
        self.draw = draw

    def __call__(self, smp: dict[str, Any]) -> None:
        self.draw(smp)
        for prompt, box in zip(smp["prompts"], smp.get("boxes") or [], strict=False):
            if box is not None and "box" in prompt["mode"]:
                prompt["box"] = np.asarray(box, dtype=np.float32)


# the engine's hooks that make stored boxes the box prompts
BOX_HOOKS: dict[str, Any] = {"transform_wrapper": StoredBoxTransform, "prompt_wrapper": StoredBoxPrompts}


def run_finetune_with_boxes(
    model: Any,
    dataset: Any,
    config: Any,
    output_dir: str | Path,
    resume: bool = True,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """``rwkvsam_core.finetune.run_finetune`` with stored boxes as box prompts (same arguments)."""
    from rwkvsam_core.finetune import run_finetune

    return run_finetune(model, dataset, config, output_dir, resume, metadata=metadata, **BOX_HOOKS)


def open_data(path: str, images: str | None = None) -> Any:
    """``rwkvsam_core.data.open_dataset``, with instance folders read by :class:`StoredBoxDataset`."""
    dataset = open_dataset(path, images)
    return StoredBoxDataset(path) if isinstance(dataset, InstanceFolderDataset) else dataset


def main(argv: list[str] | None = None) -> int:
    """Same options, output and exit codes as ``python -m rwkvsam_core.finetune`` (it is that entry,
    with :func:`open_data` and the stored-box hooks)."""
    from rwkvsam_core.finetune.__main__ import main as core_main

    return core_main(
        argv,
        prog="python -m labelstudio_backend.finetune",
        description=__doc__.splitlines()[0],
        opener=open_data,
        **BOX_HOOKS,
    )


if __name__ == "__main__":
    sys.exit(main())
