"""The ``rwkvsam`` command: segment, embed, info (+ subcommands registered by other packages).

Other packages add subcommands through the entry-point group ``rwkvsam.commands``: each entry
point names a function ``register(subparsers)`` that adds its parsers and sets ``func`` (called with
the parsed arguments, returning an exit code).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np

from .zoom import DEFAULT_ZOOM_TARGET

logger = logging.getLogger("rwkvsam")

EXIT_ERROR = 2


class CLIError(Exception):
    """An error reported to the user as one line."""


def _model_args(p: argparse.ArgumentParser) -> None:
    from .build import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", help="checkpoint file (ours, official SAM or the authors' layout)")
    p.add_argument("--image-size", type=int, help="model input side, a multiple of 16 (default 1024)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _build(args):
    from .build import MODEL_NAMES, build_model

    if args.model not in MODEL_NAMES:
        raise CLIError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise CLIError(f"checkpoint not found: {args.checkpoint}")
    return build_model(args.model, checkpoint=args.checkpoint, device=args.device, image_size=args.image_size)


def _check_box(box: list[float], w: int, h: int) -> None:
    x0, y0, x1, y1 = box
    if not np.isfinite(box).all():
        raise CLIError(f"box {box} has non-finite coordinates")
    if x1 <= x0 or y1 <= y0:
        raise CLIError(f"box {x0:g} {y0:g} {x1:g} {y1:g} is empty: need X0 < X1 and Y0 < Y1")
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise CLIError(f"box {x0:g} {y0:g} {x1:g} {y1:g} lies outside the {w}x{h} image")


def _check_point(pt: list[float], w: int, h: int) -> None:
    x, y = pt
    if not (0 <= x < w and 0 <= y < h):
        raise CLIError(f"point {x:g} {y:g} lies outside the {w}x{h} image")


def cmd_segment(args) -> int:
    from .io import read_image, write_mask_png
    from .predictor import Predictor, wants_candidates

    if not args.box and not args.point:
        raise CLIError("give at least one --box X0 Y0 X1 Y1 or --point X Y")
    if args.point and args.box and len(args.box) > 1:
        raise CLIError("points can be combined with a single box only")
    if args.zoom and (args.point or args.negative or not args.box):
        raise CLIError("--zoom works on boxes alone (no --point / --negative)")
    if not args.zoom_target > 0:
        raise CLIError(f"--zoom-target wants a positive number of input pixels, got {args.zoom_target}")
    image = read_image(args.image)
    h, w = image.shape[:2]
    for box in args.box or []:
        _check_box(box, w, h)
    for pt in (args.point or []) + (args.negative or []):
        _check_point(pt, w, h)
    predictor = Predictor(_build(args))
    boxes = np.array(args.box, dtype=np.float64) if args.box else None
    if args.zoom:  # the whole image is encoded only if some box needs no zoom
        from .zoom import predict_boxes_zoomed

        masks, scores = predict_boxes_zoomed(predictor, image, boxes, target=args.zoom_target)
        masks, scores = masks[:, None], scores[:, None]
    else:
        predictor.set_image(image)
        coords = labels = None
        if args.point or args.negative:
            pts = [*(args.point or []), *(args.negative or [])]
            coords = np.array(pts, dtype=np.float64)
            labels = np.array([1] * len(args.point or []) + [0] * len(args.negative or []))
        if args.candidates == "auto":
            multimask = wants_candidates(labels, boxes is not None)
        else:
            multimask = args.candidates == "best"
        masks, scores, _ = predictor.predict(coords, labels, boxes, multimask_output=multimask)
        if boxes is None or len(boxes) == 1:
            masks, scores = masks[None], scores[None]
    best = scores.argmax(axis=1)
    chosen = masks[np.arange(len(masks)), best]
    out = Path(args.out)
    if len(chosen) == 1:
        write_mask_png(out, chosen[0])
        logger.info("wrote %s (score %.3f)", out, scores[0, best[0]])
    elif args.separate:
        for i, mask in enumerate(chosen):
            write_mask_png(out.with_name(f"{out.stem}_{i}{out.suffix}"), mask)
        logger.info("wrote %d masks next to %s", len(chosen), out)
    else:
        labels_img = np.zeros(chosen.shape[1:], dtype=np.uint16)
        for i, mask in enumerate(chosen, start=1):  # later boxes are drawn over earlier ones
            labels_img[mask] = i
        write_mask_png(out, labels_img)
        logger.info("wrote label image %s with %d objects", out, len(chosen))
    return 0


def cmd_embed(args) -> int:
    from tqdm import tqdm

    from .cache import EmbeddingCache
    from .io import IMAGE_SUFFIXES, read_image
    from .predictor import Predictor

    folder = Path(args.folder)
    if not folder.is_dir():
        raise CLIError(f"not a folder: {folder}")
    pattern = "**/*" if args.recursive else "*"
    files = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    cache = EmbeddingCache(max_items=0, cache_dir=args.cache)
    predictor = Predictor(_build(args), cache=cache)
    failed = 0
    for path in tqdm(files, desc="embedding", unit="img"):
        try:
            predictor.set_image(read_image(path))
        except (ValueError, OSError) as err:
            failed += 1
            logger.warning("skipped %s: %s", path, err)
    done = len(files) - failed
    logger.info(
        "%d images embedded (%d computed, %d already cached), %d skipped; cache: %s",
        done,
        cache.misses,
        done - cache.misses,
        failed,
        args.cache,
    )
    return 0 if done else EXIT_ERROR


def cmd_info(args) -> int:
    import torch

    from . import __version__
    from .build import MODEL_BUILDERS, default_checkpoint
    from .ops import bi_wkv_backend_info

    print(f"rwkvsam {__version__}")
    print(f"python {platform.python_version()} ({sys.executable})")
    print(f"torch {torch.__version__}, numpy {np.__version__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print(f"device cuda:{i}: {torch.cuda.get_device_name(i)}")
    else:
        print("device: cpu only (no CUDA device visible to torch)")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        info = bi_wkv_backend_info(dev)
        print(f"bi_wkv on {dev}: {info['backend']} ({info['reason']})")
    from .ops import fused

    print(f"encoder fused path (Triton kernels): {fused.status()}")
    print("models (parameters: backbone/image encoder, total; shipped weights):")
    for name, builder in MODEL_BUILDERS.items():
        with torch.device("meta"):
            model = builder(name, 1024, "multimask")
        enc = model.backbone if hasattr(model, "backbone") else model.image_encoder
        n_enc = sum(p.numel() for p in enc.parameters())
        n_all = sum(p.numel() for p in model.parameters())
        weights = default_checkpoint(name)
        print(
            f"  {name:10s} {n_enc / 1e6:7.2f}M {n_all / 1e6:7.2f}M  {weights if weights else 'none (random)'}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rwkvsam", description="RWKV-SAM promptable segmentation")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("segment", help="segment objects in an image from boxes or points")
    p.add_argument("image", help="input image (PNG, JPEG, TIFF, ... or .npy)")
    p.add_argument(
        "--box",
        nargs=4,
        type=float,
        action="append",
        metavar=("X0", "Y0", "X1", "Y1"),
        help="box prompt in pixels (repeat for several objects)",
    )
    p.add_argument("--point", nargs=2, type=float, action="append", metavar=("X", "Y"), help="positive point")
    p.add_argument(
        "--negative", nargs=2, type=float, action="append", metavar=("X", "Y"), help="negative point"
    )
    p.add_argument("--out", required=True, help="output PNG (mask, or label image for several boxes)")
    p.add_argument("--separate", action="store_true", help="several boxes: one mask file each (OUT_i.png)")
    p.add_argument(
        "--candidates",
        choices=("auto", "best", "single"),
        default="auto",
        help="best: the best-scored of 3 candidate masks; single: the decoder's single mask; auto "
        "(default, SAM's rule): best for one click alone, single for a box or several points",
    )
    p.add_argument(
        "--zoom",
        action="store_true",
        help="decode each small box in a window around it, zoomed so the box spans --zoom-target input "
        "pixels: sharper masks of small objects (nuclei); one more encoder pass per zoomed box; boxes only",
    )
    p.add_argument(
        "--zoom-target",
        type=float,
        default=float(DEFAULT_ZOOM_TARGET),
        metavar="PIXELS",
        help=f"input pixels a zoomed box's long side spans (default {DEFAULT_ZOOM_TARGET})",
    )
    p.add_argument(
        "--single-mask", dest="candidates", action="store_const", const="single", help=argparse.SUPPRESS
    )
    _model_args(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("embed", help="precompute image embeddings of a folder into a cache")
    p.add_argument("folder")
    p.add_argument("--cache", required=True, help="cache directory")
    p.add_argument("--recursive", action="store_true")
    _model_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("info", help="versions, devices, Bi-WKV implementation, model sizes")
    p.set_defaults(func=cmd_info)

    for ep in metadata.entry_points(group="rwkvsam.commands"):
        try:
            ep.load()(sub)
        except Exception as err:  # a broken plug-in must not break the core commands
            logger.warning("could not load subcommand %s: %s", ep.name, err)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"rwkvsam: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="rwkvsam: %(message)s")
    warnings.showwarning = _one_line_warnings
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except (CLIError, CheckpointError, ValueError, FileNotFoundError, OSError) as err:
        print(f"rwkvsam: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("rwkvsam: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
