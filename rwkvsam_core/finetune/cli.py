"""Command-line plumbing of the fine-tuning engine (used by ``python -m rwkvsam_core.finetune`` and the
``rwkvsam train finetune`` subcommand)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from .engine import FinetuneConfig, FinetuneResult, run_finetune

logger = logging.getLogger(__name__)

__all__ = ["add_finetune_args", "config_from_args", "open_datasets", "finetune_from_args"]


def add_finetune_args(p: argparse.ArgumentParser, defaults: FinetuneConfig | None = None) -> None:
    """Add the fine-tuning options to ``p`` (defaults from ``defaults``)."""
    d = defaults or FinetuneConfig()
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="dataset: instance folder, im/+gt/ folder, COCO JSON, Label Studio export JSON or SA-1B folder; repeat to mix",
    )
    p.add_argument(
        "--images",
        action="append",
        default=None,
        metavar="DIR",
        help="image folder of a COCO / Label Studio --data (one per --data, in order)",
    )
    p.add_argument("--ratios", default=None, help="mixing ratios of several --data, e.g. 2:1:1")
    p.add_argument("--model", default="rwkvsam_t", help="model name (rwkvsam_t/s/b, sam_vit_b/l/h)")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="starting weights (our safetensors, official SAM .pth, authors' layout)",
    )
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, final model.safetensors)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="global batch (split over DDP processes)"
    )
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument(
        "--train-parts", default=",".join(d.train_parts), help="comma-separated sub-modules to train"
    )
    p.add_argument("--image-size", type=int, default=d.image_size, help="model input side (multiple of 16)")
    p.add_argument("--max-instances", type=int, default=d.max_instances)
    p.add_argument("--amp", default=d.amp, choices=["auto", "bf16", "fp16", "none"])
    p.add_argument("--grad-checkpointing", action="store_true", default=d.grad_checkpointing)
    p.add_argument(
        "--decoder-checkpointing",
        default=d.decoder_checkpointing,
        choices=["auto", "on", "off"],
        help="recompute per-prompt decoder/refine activations in backward (auto: on the CPU)",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument(
        "--no-augment", action="store_true", help="only resize to the input size (no flip/scale/crop/jitter)"
    )
    p.add_argument(
        "--scale-range",
        default=f"{d.scale_range[0]}:{d.scale_range[1]}",
        help="random resize range, e.g. 0.1:2.0",
    )
    p.add_argument(
        "--rot90",
        action="store_true",
        default=d.rot90,
        help="also turn training images by random multiples of 90 degrees (images without an 'up': microscopy)",
    )
    p.add_argument(
        "--prompt-mix",
        default=":".join(f"{v:g}" for v in d.prompt.mode_probs),
        metavar="BOX:POINTS:BOTH",
        help="relative frequency of box, points and box+points prompts, e.g. 1:0:0 for boxes only",
    )
    p.add_argument(
        "--box-noise",
        type=float,
        default=d.prompt.box_noise,
        help="box prompt jitter: standard deviation as a fraction of the box side",
    )
    p.add_argument(
        "--loss-points",
        type=int,
        default=d.loss_points if d.loss_points is not None else 0,
        help="points of the point-sampled loss (0: dense loss)",
    )
    p.add_argument("--correction-rounds", type=int, default=d.correction_rounds)
    p.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 (default: cuda if available; torchrun: one GPU a process)",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="start afresh even if the run folder holds a training state"
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long with the state saved (run again to resume)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, base: FinetuneConfig | None = None) -> FinetuneConfig:
    """Build a :class:`FinetuneConfig` from parsed options (other fields from ``base``)."""
    cfg = FinetuneConfig.from_dict((base or FinetuneConfig()).to_dict())
    lo, hi = (float(v) for v in str(args.scale_range).split(":"))
    cfg.steps, cfg.batch_size, cfg.lr = args.steps, args.batch_size, args.lr
    cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip = args.weight_decay, args.warmup_steps, args.grad_clip
    cfg.train_parts = tuple(s.strip() for s in args.train_parts.split(",") if s.strip())
    cfg.image_size, cfg.max_instances, cfg.amp = args.image_size, args.max_instances, args.amp
    cfg.grad_checkpointing, cfg.seed, cfg.save_every = args.grad_checkpointing, args.seed, args.save_every
    cfg.num_workers, cfg.augment, cfg.scale_range = args.num_workers, not args.no_augment, (lo, hi)
    cfg.loss_points = args.loss_points or None
    cfg.correction_rounds, cfg.device, cfg.progress = args.correction_rounds, args.device, not args.quiet
    cfg.time_limit_s = getattr(args, "time_limit", None)
    cfg.decoder_checkpointing = getattr(args, "decoder_checkpointing", cfg.decoder_checkpointing)
    cfg.ratios = tuple(int(r) for r in args.ratios.split(":")) if args.ratios else None
    cfg.rot90 = bool(getattr(args, "rot90", cfg.rot90))
    mix = getattr(args, "prompt_mix", None)
    if mix is not None:
        cfg.prompt.mode_probs = _parse_prompt_mix(mix)
    box_noise = getattr(args, "box_noise", None)
    if box_noise is not None:
        if not box_noise >= 0:
            raise ValueError(f"--box-noise must be >= 0, got {box_noise}")
        cfg.prompt.box_noise = float(box_noise)
    return cfg


def _parse_prompt_mix(text: str) -> tuple[float, float, float]:
    """``"BOX:POINTS:BOTH"`` -> three non-negative weights, not all zero."""
    parts = str(text).split(":")
    try:
        values = tuple(float(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 0 or sum(values) <= 0 or not all(v < float("inf") for v in values):
        raise ValueError(
            f"--prompt-mix wants three non-negative weights BOX:POINTS:BOTH, not all zero (e.g. 1:0:0), got {text!r}"
        )
    return values  # type: ignore[return-value]


def open_datasets(paths: list[str], images: list[str] | None, opener: Any = None) -> list[Any]:
    """Open every ``--data`` with ``opener(path, images)`` (default :func:`rwkvsam_core.data.open_dataset`)."""
    if opener is None:
        from ..data import open_dataset as opener

    images = images or []
    return [opener(p, images[i] if i < len(images) else None) for i, p in enumerate(paths)]


def finetune_from_args(
    args: argparse.Namespace, base: FinetuneConfig | None = None, opener: Any = None, **run_kwargs: Any
) -> FinetuneResult:
    """Open the data (with ``opener``, see :func:`open_datasets`), build the model and run
    :func:`run_finetune` as the options say; ``run_kwargs`` go to :func:`run_finetune` (its hooks)."""
    from ..build import build_model
    from .distributed import init_distributed

    cfg = config_from_args(args, base)
    datasets = open_datasets(args.data, args.images, opener)
    info = init_distributed(cfg.device)
    import torch

    torch.manual_seed(cfg.seed)  # same random init on every process and every run of the same seed
    model = build_model(args.model, checkpoint=args.checkpoint, device=info.device, image_size=cfg.image_size)
    meta = {"trained_on": [str(Path(p).name) for p in args.data]}
    return run_finetune(
        model,
        datasets if len(datasets) > 1 else datasets[0],
        cfg,
        args.out,
        resume=not args.no_resume,
        metadata=meta,
        **run_kwargs,
    )
