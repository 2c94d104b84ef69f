"""Evaluation: mIoU / boundary IoU with ground-truth box prompts; COCO mask AP and boundary AP from
detector boxes (a COCO detections JSON: ``[{image_id, category_id, bbox: [x, y, w, h], score}]``)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from rwkvsam_core.metrics import boundary_iou, coco_mask_ap, mask_iou, summarize_ious

logger = logging.getLogger(__name__)

__all__ = ["evaluate_box_prompts", "evaluate_detections", "format_table", "add_eval_args", "eval_from_args"]


def _gt_boxes(masks: np.ndarray) -> np.ndarray:
    boxes = []
    for m in masks:
        ys, xs = np.nonzero(m)
        boxes.append([xs.min(), ys.min(), xs.max(), ys.max()])
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def _predict_boxes(predictor: Any, boxes: np.ndarray, multimask: bool) -> np.ndarray:
    """``(N, 4)`` XYXY boxes -> ``(N, H, W)`` bool masks (best-scored candidate when multimask)."""
    masks, scores, _ = predictor.predict(box=boxes, multimask_output=multimask)
    if masks.ndim == 3:  # one box: (K, H, W)
        masks, scores = masks[None], np.asarray(scores)[None]
    best = np.asarray(scores).argmax(1)
    return masks[np.arange(len(masks)), best]


def evaluate_box_prompts(
    model: Any,
    dataset: Any,
    max_items: int | None = None,
    multimask: bool = False,
    dilation_ratio: float = 0.02,
) -> dict[str, Any]:
    """mIoU and mean boundary IoU over every instance of ``dataset`` with its GT box as the prompt.

    Returns dict(mIoU, mBIoU (percent), instances, images, skipped, seconds, per_image=[...]).
    """
    from rwkvsam_core import Predictor
    from rwkvsam_core.data import CorruptSampleError

    predictor = Predictor(model)
    ious: list[float] = []
    bious: list[float] = []
    per_image = []
    skipped = 0
    t0 = time.perf_counter()
    n = len(dataset) if max_items is None else min(max_items, len(dataset))
    for i in range(n):
        try:
            item = dataset[i]
        except CorruptSampleError as exc:
            logger.warning("skipping: %s", exc)
            skipped += 1
            continue
        masks = item["masks"]
        keep = masks.reshape(len(masks), -1).any(1) if len(masks) else np.zeros(0, bool)
        masks = masks[keep]
        if len(masks) == 0:
            continue
        predictor.set_image(item["image"])
        pred = _predict_boxes(predictor, _gt_boxes(masks), multimask)
        img_ious = [mask_iou(p, g) for p, g in zip(pred, masks, strict=True)]
        img_bious = [boundary_iou(p, g, dilation_ratio) for p, g in zip(pred, masks, strict=True)]
        ious += img_ious
        bious += img_bious
        per_image.append({"name": item["name"], "iou": img_ious, "boundary_iou": img_bious})
    out: dict[str, Any] = summarize_ious(ious, bious)
    out.update(images=len(per_image), skipped=skipped, seconds=time.perf_counter() - t0, per_image=per_image)
    return out


def _clean_coco(gt: dict[str, Any], source: str) -> dict[str, Any]:
    """Keep well-formed images/annotations (pycocotools crashes on others); fill area, bbox, iscrowd, id."""
    from rwkvsam_core.data.codecs import coco_segmentation_to_mask

    images = [
        im
        for im in gt.get("images", [])
        if isinstance(im, dict) and {"id", "file_name", "height", "width"} <= im.keys()
    ]
    sizes = {int(im["id"]): (int(im["height"]), int(im["width"])) for im in images}
    anns = []
    for k, a in enumerate(gt.get("annotations", [])):
        if (
            not isinstance(a, dict)
            or not {"image_id", "segmentation"} <= a.keys()
            or int(a["image_id"]) not in sizes
        ):
            continue
        a = dict(a, image_id=int(a["image_id"]))
        a.setdefault("iscrowd", 0)
        a.setdefault("id", 10**9 + k)
        if "area" not in a or "bbox" not in a:
            try:
                m = coco_segmentation_to_mask(a["segmentation"], *sizes[a["image_id"]])
            except ValueError:
                continue
            ys, xs = np.nonzero(m)
            if not len(xs):
                continue
            a.setdefault("area", float(m.sum()))
            a.setdefault(
                "bbox", [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]
            )
        anns.append(a)
    dropped = len(gt.get("annotations", [])) - len(anns) + len(gt.get("images", [])) - len(images)
    if dropped:
        logger.warning("ignoring %d malformed image/annotation entries of %s", dropped, source)
    return dict(gt, images=images, annotations=anns)


def evaluate_detections(
    model: Any,
    coco_json: str | Path,
    image_dir: str | Path,
    detections: str | Path | list[dict[str, Any]],
    max_images: int | None = None,
    score_threshold: float = 0.0,
) -> dict[str, float]:
    """COCO mask AP and boundary AP of masks predicted from detector boxes.

    Each detection's box (XYWH) prompts the model; the mask is RLE-encoded with the detector's score
    and category and scored with pycocotools against ``coco_json``.
    """
    from pycocotools import mask as mask_utils

    from rwkvsam_core import Predictor
    from rwkvsam_core.data import CorruptSampleError, load_rgb

    gt = json.loads(Path(coco_json).read_text())
    dets = json.loads(Path(detections).read_text()) if not isinstance(detections, list) else detections
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in dets:
        if float(d.get("score", 1.0)) >= score_threshold:
            by_image.setdefault(int(d["image_id"]), []).append(d)
    gt = _clean_coco(gt, str(coco_json))
    images = {int(im["id"]): im for im in gt["images"]}
    ids = sorted(i for i in by_image if i in images)
    if max_images is not None:
        ids = ids[:max_images]
    keep = set(ids)
    gt = dict(
        gt,
        images=[images[i] for i in ids],
        annotations=[a for a in gt["annotations"] if a["image_id"] in keep],
    )
    predictor = Predictor(model)
    results = []
    for img_id in ids:
        info = images[img_id]
        try:
            image = load_rgb(Path(image_dir) / info["file_name"])
        except CorruptSampleError as exc:
            logger.warning("skipping: %s", exc)
            continue
        predictor.set_image(image)
        ds = by_image[img_id]
        boxes = np.array(
            [
                [d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                for d in ds
            ]
        )
        masks = _predict_boxes(predictor, boxes, multimask=False)
        for d, m in zip(ds, masks, strict=True):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": img_id,
                    "category_id": d["category_id"],
                    "segmentation": rle,
                    "score": float(d.get("score", 1.0)),
                }
            )
    return coco_mask_ap(gt, results, boundary=True)


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown table of ``{dataset: {metric: value}}`` (scalar metrics only)."""
    cols: list[str] = []
    for r in rows.values():
        cols += [k for k, v in r.items() if isinstance(v, (int, float)) and k not in cols]
    lines = ["| dataset | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in rows.items():
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) and not math.isnan(v) else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """Options of ``rwkvsam eval``."""
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="mask folder (im/+gt/), COCO JSON, instance folder, Label Studio export; repeat for several",
    )
    p.add_argument(
        "--images", action="append", default=None, help="image folder of a COCO / LS --data (in order)"
    )
    p.add_argument(
        "--detections",
        default=None,
        help="COCO detections JSON: mask AP + boundary AP on the (single) COCO --data",
    )
    p.add_argument("--model", default="rwkvsam_t")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--max-items", type=int, default=None, help="evaluate only the first N images of each set")
    p.add_argument(
        "--multimask",
        action="store_true",
        help="take the best-scored of 3 candidates instead of the single mask",
    )
    p.add_argument("--out", default=None, help="write the results JSON here (default: print only)")


def eval_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate as the options say; prints a table, writes ``--out`` JSON; returns the results."""
    from rwkvsam_core import build_model
    from rwkvsam_core.data import open_dataset

    model = build_model(
        args.model, checkpoint=args.checkpoint, device=args.device, image_size=args.image_size
    )
    images = args.images or []
    rows: dict[str, dict[str, Any]] = {}
    for i, path in enumerate(args.data):
        img_dir = images[i] if i < len(images) else None
        name = Path(path).stem if Path(path).is_file() else Path(path).name
        if args.detections:
            ds = open_dataset(path, img_dir, kind="coco")
            rows[f"{name} (detections)"] = evaluate_detections(
                model, path, ds.image_dir, args.detections, args.max_items
            )
        else:
            rows[name] = evaluate_box_prompts(
                model, open_dataset(path, img_dir), args.max_items, args.multimask
            )
    print(format_table(rows))
    result = {"model": args.model, "checkpoint": args.checkpoint, "results": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result
