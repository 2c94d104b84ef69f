"""Segmentation metrics: mask IoU, boundary IoU (ARCHITECTURE.md definition), COCO mask/boundary AP.

All single-mask functions take ``(H, W)`` boolean arrays. ``coco_mask_ap`` needs pycocotools
(optional dependency, ``pip install rwkvsam[train]``); everything else is pure numpy.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "mask_iou",
    "boundary_iou",
    "mask_boundary",
    "boundary_dilation",
    "mask_iou_matrix",
    "boundary_iou_matrix",
    "coco_mask_ap",
    "summarize_ious",
]


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool)
    gt = np.asarray(gt).astype(bool)
    if pred.ndim != 2 or pred.shape != gt.shape:
        raise ValueError(f"expected two (H, W) masks of the same shape, got {pred.shape} and {gt.shape}")
    return pred, gt


def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two ``(H, W)`` boolean masks.

    Two empty masks give 1.0 (nothing to find and nothing found).
    """
    pred, gt = _check_pair(pred, gt)
    union = np.logical_or(pred, gt).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(pred, gt).sum() / union)


def boundary_dilation(shape: tuple[int, int], dilation_ratio: float = 0.02) -> int:
    """Number of 3x3 erosions: ``d = max(1, round(dilation_ratio * image diagonal))``."""
    h, w = shape
    return max(1, int(round(dilation_ratio * float(np.sqrt(h * h + w * w)))))


def _erode3x3(mask: np.ndarray, iterations: int) -> np.ndarray:
    """Binary erosion by a 3x3 square, ``iterations`` times; pixels outside the image count as background."""
    out = mask.copy()
    for _ in range(iterations):
        if not out.any():
            break
        p = np.pad(out, 1, mode="constant", constant_values=False)
        acc = p[1:-1, 1:-1].copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                if dy == 1 and dx == 1:
                    continue
                acc &= p[dy : dy + out.shape[0], dx : dx + out.shape[1]]
        out = acc
    return out


def mask_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Inner boundary band of a ``(H, W)`` mask: the mask minus its erosion (3x3 kernel, ``d`` times)."""
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    d = boundary_dilation(mask.shape, dilation_ratio)
    return mask & ~_erode3x3(mask, d)


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU (Cheng et al. 2021) of two ``(H, W)`` boolean masks.

    Boundary = mask minus its erosion by a 3x3 kernel repeated ``d = max(1, round(dilation_ratio *
    diagonal))`` times. Two empty boundaries give 1.0.
    """
    pred, gt = _check_pair(pred, gt)
    bp = mask_boundary(pred, dilation_ratio)
    bg = mask_boundary(gt, dilation_ratio)
    union = np.logical_or(bp, bg).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(bp, bg).sum() / union)


def mask_iou_matrix(preds: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``preds (P, H, W)`` and ``gts (G, H, W)`` boolean masks -> ``(P, G)`` float64."""
    p = np.asarray(preds).astype(bool).reshape(len(preds), -1).astype(np.float64)
    g = np.asarray(gts).astype(bool).reshape(len(gts), -1).astype(np.float64)
    inter = p @ g.T
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def boundary_iou_matrix(preds: np.ndarray, gts: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Pairwise boundary IoU of ``preds (P, H, W)`` and ``gts (G, H, W)`` -> ``(P, G)`` float64."""
    bp = np.stack([mask_boundary(m, dilation_ratio) for m in preds]) if len(preds) else np.asarray(preds)
    bg = np.stack([mask_boundary(m, dilation_ratio) for m in gts]) if len(gts) else np.asarray(gts)
    if len(preds) == 0 or len(gts) == 0:
        return np.zeros((len(preds), len(gts)))
    return mask_iou_matrix(bp, bg)


def summarize_ious(ious: list[float] | np.ndarray, biou: list[float] | np.ndarray) -> dict[str, float]:
    """Mean IoU and mean boundary IoU of per-instance lists (as percentages), with the instance count."""
    ious = np.asarray(ious, dtype=np.float64)
    biou = np.asarray(biou, dtype=np.float64)
    return {
        "mIoU": float(ious.mean() * 100) if ious.size else float("nan"),
        "mBIoU": float(biou.mean() * 100) if biou.size else float("nan"),
        "instances": int(ious.size),
    }


def coco_mask_ap(
    gt_json: str | dict[str, Any],
    detections: list[dict[str, Any]],
    boundary: bool = True,
    dilation_ratio: float = 0.02,
) -> dict[str, float]:
    """COCO mask AP (and boundary AP) of ``detections`` (COCO result dicts with RLE ``segmentation``).

    Boundary AP follows the Boundary IoU paper: the matching IoU is ``min(mask IoU, boundary IoU)``.
    Needs pycocotools. Returns percentages: ``AP, AP50, AP75, APs, APm, APl`` and ``boundary_AP`` etc.
    """
    try:
        from pycocotools import mask as mask_utils
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("COCO AP needs pycocotools: pip install pycocotools") from exc
    import contextlib
    import io

    coco = COCO()
    if isinstance(gt_json, dict):
        coco.dataset = gt_json
    else:
        import json

        with open(gt_json) as fh:
            coco.dataset = json.load(fh)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
    if not detections:
        out = dict.fromkeys(names, 0.0)
        if boundary:
            out.update({f"boundary_{k}": 0.0 for k in names})
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes(detections)
    results: dict[str, float] = {}
    variants = [("", False)] + ([("boundary_", True)] if boundary else [])
    for prefix, use_boundary in variants:
        ev = COCOeval(coco, dt, "segm")
        if use_boundary:

            def compute_iou(img_id: int, cat_id: int, _ev: COCOeval = ev) -> Any:
                p = _ev.params
                gts = (
                    _ev._gts[img_id, cat_id]
                    if p.useCats
                    else [g for c in p.catIds for g in _ev._gts[img_id, c]]
                )
                dts = (
                    _ev._dts[img_id, cat_id]
                    if p.useCats
                    else [d for c in p.catIds for d in _ev._dts[img_id, c]]
                )
                if len(gts) == 0 or len(dts) == 0:
                    return []
                order = np.argsort([-d["score"] for d in dts], kind="mergesort")
                dts = [dts[i] for i in order[: p.maxDets[-1]]]
                gm = np.stack([mask_utils.decode(coco.annToRLE(g)) for g in gts]).astype(bool)
                dm = np.stack([mask_utils.decode(d["segmentation"]) for d in dts]).astype(bool)
                miou = mask_iou_matrix(dm, gm)
                biou = boundary_iou_matrix(dm, gm, dilation_ratio)
                iou = np.minimum(miou, biou)
                crowd = np.array([g.get("iscrowd", 0) for g in gts], dtype=bool)
                if crowd.any():  # crowd regions: intersection over detection area, as COCO does
                    inter = dm.reshape(len(dm), -1).astype(np.float64) @ gm.reshape(len(gm), -1).T.astype(
                        np.float64
                    )
                    area = np.maximum(dm.reshape(len(dm), -1).sum(1, keepdims=True), 1)
                    iou[:, crowd] = (inter / area)[:, crowd]
                return iou

            ev.computeIoU = compute_iou  # type: ignore[method-assign]
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        for i, n in enumerate(names):
            results[prefix + n] = float(max(ev.stats[i], 0.0) * 100)
    return results
