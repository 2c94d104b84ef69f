"""``rwkvsam train distill|joint|finetune`` and ``rwkvsam eval`` (plugged into the core CLI through the
``rwkvsam.commands`` entry-point group) and ``python -m training ...`` for local runs."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["register", "register_train", "register_eval", "main"]


def _wrap(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            result = fn(args)
        except Exception as exc:
            logger.debug("command failed", exc_info=True)
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        if hasattr(result, "checkpoint"):
            last = result.history[-1]["loss"] if result.history else float("nan")
            print(
                f"done: {result.steps} steps, last loss {last:.4f}, skipped {result.skipped}, checkpoint {result.checkpoint}"
            )
        return 0

    return run


def register_train(subparsers: Any) -> None:
    """Add ``train`` with its ``distill``, ``joint`` and ``finetune`` recipes."""
    from . import distill, finetune, joint

    train = subparsers.add_parser(
        "train", help="train: stage 1 distillation, stage 2 joint training, fine-tuning"
    )
    sub = train.add_subparsers(dest="recipe", required=True)
    p = sub.add_parser("distill", help="stage 1: distil a SAM ViT teacher into the RWKV-SAM encoder")
    distill.add_distill_args(p)
    p.set_defaults(func=_wrap(distill.distill_from_args))
    p = sub.add_parser("joint", help="stage 2: joint high-quality training on mixed datasets (2:1:1)")
    joint.add_joint_args(p)
    p.set_defaults(func=_wrap(joint.joint_from_args))
    p = sub.add_parser("finetune", help="fine-tune decoder + refine on your own annotations")
    finetune.add_args(p)
    p.set_defaults(func=_wrap(finetune.from_args))


def register_eval(subparsers: Any) -> None:
    """Add ``eval``: mIoU / boundary IoU with GT boxes, or COCO mask AP + boundary AP from detections."""
    from . import evaluate

    p = subparsers.add_parser("eval", help="evaluate: mIoU + boundary IoU (GT boxes), COCO mask/boundary AP")
    evaluate.add_eval_args(p)
    p.set_defaults(func=_wrap(evaluate.eval_from_args))


def register(subparsers: Any) -> None:
    """Entry point of the ``rwkvsam.commands`` group: adds both ``train`` and ``eval``."""
    register_train(subparsers)
    register_eval(subparsers)


def main(argv: list[str] | None = None) -> int:
    """``python -m training {train ...,eval ...}`` (also accepts the recipe name first: ``distill ...``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("distill", "joint", "finetune"):
        argv = ["train", *argv]
    parser = argparse.ArgumentParser(prog="python -m training")
    parser.add_argument("--log-level", default="WARNING")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))
