"""Classical box -> mask baselines and the shared evaluation loop of the starter-weights benchmark.

Baselines, all given the same tight ground-truth box (XYXY, inclusive pixel extremes as in SAM, see
``training.data_sources.boxes_from_masks``):

- ``box``: the box filled;
- ``ellipse``: the ellipse inscribed in the box (pixel centres inside it);
- ``grabcut``: OpenCV's GrabCut (5 iterations, ``GC_INIT_WITH_RECT``) run on a crop of the image around
  the box (margin: half the box's longer side, at least 16 px), foreground = definite + probable
  foreground. When GrabCut returns no foreground (frequent on small nuclei) or raises, its mask is
  empty and scores IoU 0; the number of such objects is reported.

Metrics: ``rwkvsam_core.metrics.mask_iou`` / ``boundary_iou`` (ARCHITECTURE.md definition).

Run ``python benchmarks/classical_baselines.py`` for the baselines alone on the held-out sets (same as
``python benchmarks/eval_starter.py --no-model``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "box_mask",
    "ellipse_mask",
    "grabcut_mask",
    "BASELINES",
    "evaluate_method",
    "summarize",
    "format_table",
]

MaskFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _box_pixels(box: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """Inclusive XYXY box -> slice bounds ``(x0, y0, x1 + 1, y1 + 1)`` clipped to the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return (
        max(0, int(np.floor(x0))),
        max(0, int(np.floor(y0))),
        min(w, int(np.floor(x1)) + 1),
        min(h, int(np.floor(y1)) + 1),
    )


def box_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The box (4,) XYXY (inclusive pixel extremes) filled: (H, W) bool."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = _box_pixels(box, h, w)
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def ellipse_mask(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The ellipse inscribed in the box (4,) XYXY (inclusive pixel extremes, so the box covers
    ``x0 .. x1 + 1`` in continuous coordinates): (H, W) bool of pixel centres inside it."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    x1, y1 = x1 + 1.0, y1 + 1.0
    cx, cy, ax, ay = (x0 + x1) / 2, (y0 + y1) / 2, max((x1 - x0) / 2, 0.5), max((y1 - y0) / 2, 0.5)
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx + 0.5 - cx) / ax) ** 2 + ((yy + 0.5 - cy) / ay) ** 2 <= 1.0


def grabcut_mask(image: np.ndarray, box: np.ndarray, iterations: int = 5, seed: int = 0) -> np.ndarray:
    """OpenCV GrabCut initialised with the box (4,) XYXY on a crop around it -> (H, W) bool.

    Returns an all-False mask when GrabCut finds no foreground or fails (e.g. a box with no
    background around it).
    """
    import cv2

    h, w = image.shape[:2]
    x0, y0, x1, y1 = _box_pixels(box, h, w)
    out = np.zeros((h, w), bool)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return out
    margin = max(16, int(0.5 * max(x1 - x0, y1 - y0)))
    cx0, cy0, cx1, cy1 = max(0, x0 - margin), max(0, y0 - margin), min(w, x1 + margin), min(h, y1 + margin)
    crop = np.ascontiguousarray(image[cy0:cy1, cx0:cx1, ::-1])  # BGR for OpenCV
    rect = (x0 - cx0, y0 - cy0, x1 - x0, y1 - y0)
    gc = np.zeros(crop.shape[:2], np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    try:
        cv2.grabCut(crop, gc, rect, bgd, fgd, iterations, cv2.GC_INIT_WITH_RECT)
    except cv2.error as exc:
        logger.debug("GrabCut failed on box %s: %s", box, exc)
        return out
    out[cy0:cy1, cx0:cx1] = (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)
    return out


BASELINES: dict[str, MaskFn] = {"box": box_mask, "ellipse": ellipse_mask, "grabcut": grabcut_mask}


def evaluate_method(
    items: list[Any], predict: Callable[[np.ndarray, np.ndarray], np.ndarray], method: str
) -> list[dict[str, Any]]:
    """Run ``predict(image (H,W,3), boxes (N,4)) -> masks (N,H,W) bool`` on every object of ``items``.

    ``items`` have ``name``, ``image``, ``masks`` (M,H,W) bool and ``kind``. Returns one record per
    object: image name, kind, object index, IoU, boundary IoU, predicted area (0 = empty), seconds.
    """
    from rwkvsam_core.metrics import boundary_iou, mask_iou
    from training.data_sources.loaders import boxes_from_masks

    records = []
    for it in items:
        boxes = boxes_from_masks(it.masks)
        t0 = time.perf_counter()
        preds = np.asarray(predict(it.image, boxes), dtype=bool)
        dt = (time.perf_counter() - t0) / max(1, len(boxes))
        if preds.shape != it.masks.shape:
            raise ValueError(f"{method} on {it.name}: predicted {preds.shape}, expected {it.masks.shape}")
        for k, (p, g) in enumerate(zip(preds, it.masks, strict=True)):
            records.append(
                {
                    "method": method,
                    "image": it.name,
                    "kind": it.kind,
                    "object": k,
                    "iou": mask_iou(p, g),
                    "biou": boundary_iou(p, g),
                    "area": int(p.sum()),
                    "gt_area": int(g.sum()),
                    "seconds": dt,
                }
            )
    return records


def baseline_predictor(fn: MaskFn) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Wrap a one-box baseline into the ``predict(image, boxes) -> (N,H,W)`` form."""

    def predict(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if len(boxes) == 0:
            return np.zeros((0, *image.shape[:2]), bool)
        return np.stack([fn(image, b) for b in boxes])

    return predict


def _group(record: dict[str, Any], by: str) -> str:
    if by == "kind":
        return record["kind"]
    if by == "source":  # image name up to its first "_": arc2017, napari-nuclei, ndev-scratch, ...
        return record["image"].split("_")[0]
    raise ValueError(f"unknown grouping {by!r}")


def summarize(records: list[dict[str, Any]], by: str = "kind") -> dict[str, dict[str, dict[str, float]]]:
    """``{group: {method: {mIoU, mBIoU, objects, images, empty, empty_pct, ms_per_object}}}``.

    ``by="kind"`` groups by kind of image (photo / microscopy), ``by="source"`` by source image set.
    IoUs are percentages; ``empty`` counts objects whose predicted mask is empty (scored IoU 0).
    """
    out: dict[str, dict[str, dict[str, float]]] = {}
    keys = sorted({(_group(r, by), r["method"]) for r in records})
    for kind, method in keys:
        rs = [r for r in records if _group(r, by) == kind and r["method"] == method]
        empty = sum(1 for r in rs if r["area"] == 0)
        out.setdefault(kind, {})[method] = {
            "mIoU": 100.0 * float(np.mean([r["iou"] for r in rs])),
            "mBIoU": 100.0 * float(np.mean([r["biou"] for r in rs])),
            "objects": len(rs),
            "images": len({r["image"] for r in rs}),
            "empty": empty,
            "empty_pct": 100.0 * empty / len(rs),
            "ms_per_object": 1000.0 * float(np.mean([r["seconds"] for r in rs])),
        }
    return out


def format_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one row per (kind, method)."""
    lines = [
        "| images | method | objects | mIoU | boundary IoU | empty masks | ms/object |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in sorted(summary):
        for method, s in summary[kind].items():
            lines.append(
                f"| {kind} ({s['images']} img) | {method} | {s['objects']} | {s['mIoU']:.1f} | "
                f"{s['mBIoU']:.1f} | {s['empty']} ({s['empty_pct']:.0f} %) | {s['ms_per_object']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script use: repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_starter import main

    sys.exit(main(["--no-model", *sys.argv[1:]]))
