"""The training loop shared by fine-tuning, joint training and distillation.

``run_finetune`` trains a promptable model on instance masks (prompts sampled from the masks, 5 BCE +
5 Dice + IoU-head loss). :func:`train` is the generic loop underneath: deterministic data stream,
AdamW + warm-up/cosine, gradient clipping, autocast, DDP under torchrun, atomic checkpoints every
``save_every`` steps and exact resume (model, optimizer, scheduler, RNG and data position).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..data.augment import TrainTransform
from ..data.sampler import MixedDataset, MixingSchedule, StepSampler
from .distributed import DistInfo, all_reduce_sum, barrier, init_distributed
from .losses import LossConfig, segmentation_loss
from .prompts import PromptConfig, sample_correction_points, sample_instance_prompts
from .schedule import cosine_with_warmup
from .state import STATE_NAME, load_train_state, rng_state, save_train_state, set_rng_state

logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FinetuneResult", "SegmentationTask", "run_finetune", "train", "set_trainable"]

FINAL_NAME = "model.safetensors"

# Aliases accepted in ``train_parts``: "image_encoder" means the whole image encoder of either family.
_PART_ALIASES = {
    "image_encoder": ("image_encoder", "backbone", "neck"),
    "encoder": ("image_encoder", "backbone", "neck"),
}


@dataclass
class FinetuneConfig:
    """Settings of a training run (defaults: fine-tuning the decoder + refine on a user's data).

    ``batch_size`` is the global batch (split evenly over DDP processes). ``train_parts`` names
    top-level sub-modules of the model (``mask_decoder``, ``refine``, ``prompt_encoder``, ``backbone``,
    ``neck``, ``image_encoder``); the rest is frozen. ``amp``: "auto" (bf16 on CUDA when supported,
    else off), "bf16", "fp16" (with a grad scaler) or "none". ``loss_points=None`` gives a dense loss.
    ``ratios`` mixes several datasets (paper's stage 2: 2:1:1). ``correction_rounds``: extra decoder
    passes per step with a corrective click and the previous mask as mask prompt (SAM's iterative
    training). ``multimask``: points-only prompts of the first pass are supervised on the best of the
    3 candidates; box prompts and corrective passes train the single-mask output. ``schedule_steps`` is the length of the warm-up + cosine schedule (default ``steps``;
    larger values stop a run part-way along its schedule, to resume later). A step whose gradient norm is not finite is skipped (counted in ``nonfinite_steps``);
    ``max_nonfinite_steps`` such steps in a row stop the run with an error.
    ``decoder_checkpointing``: recompute the per-prompt decoder activations (two-way transformer,
    upscaling, refine) in the backward pass, 16 prompts at a time ("on", "off", or "auto": on when training on the CPU, where a batch of
    4 images with 20 instances each would otherwise keep ~20 GB of them).
    ``rot90``: also turn training images by random quarter turns (see ``TrainTransform``).
    ``prompt``: how prompts are drawn (:class:`PromptConfig`: the box / points / box+points mix, box jitter).
    ``time_limit_s``: wall-clock budget of this call; when it runs out the run saves its state and
    returns early (resume later with the same config to finish it).
    """

    steps: int = 1000
    schedule_steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    grad_clip: float = 5.0
    train_parts: tuple[str, ...] = ("mask_decoder", "refine")
    max_instances: int = 20
    amp: str = "auto"
    grad_checkpointing: bool = False
    decoder_checkpointing: str = "auto"
    seed: int = 0
    save_every: int = 100
    num_workers: int = 0
    image_size: int | None = None
    augment: bool = True
    scale_range: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    rot90: bool = False
    color_jitter: float = 0.2
    min_mask_pixels: int = 32
    ratios: tuple[int, ...] | None = None
    multimask: bool = True
    correction_rounds: int = 1
    loss_points: int | None = 12544
    bce_weight: float = 5.0
    dice_weight: float = 5.0
    iou_weight: float = 1.0
    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_nonfinite_steps: int = 20
    time_limit_s: float | None = None
    log_every: int = 10
    tensorboard: bool = True
    progress: bool = True
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (stored in checkpoints and the run folder)."""
        d = asdict(self)
        d["train_parts"] = list(self.train_parts)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        d = dict(d)
        if "prompt" in d and isinstance(d["prompt"], dict):
            d["prompt"] = PromptConfig(**d["prompt"])
        for k in ("train_parts", "scale_range", "ratios"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class FinetuneResult:
    """What a run produced: the final safetensors ``checkpoint``, ``steps`` done, per-step ``history``
    (dicts with step, loss, lr, ...), the number of ``skipped`` corrupt samples, and whether the run
    ``finished`` (False when its time limit stopped it; the checkpoint's config says the same)."""

    checkpoint: Path
    steps: int
    history: list[dict[str, Any]]
    skipped: int = 0
    output_dir: Path | None = None
    finished: bool = True


def set_trainable(model: nn.Module, parts: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything but the named top-level sub-modules; return the trainable parameters.

    Unknown names raise ``ValueError``; a known part the model lacks (e.g. ``refine`` on a SAM ViT
    model) is skipped with a warning.
    """
    known = {n for n, _ in model.named_children()}
    for p in model.parameters():
        p.requires_grad_(False)
    chosen: list[str] = []
    all_parts = {"mask_decoder", "prompt_encoder", "refine", "backbone", "neck", "image_encoder", "encoder"}
    for part in parts:
        if part not in all_parts and part not in known:
            raise ValueError(f"unknown train part {part!r}; the model has {sorted(known)}")
        names = [n for n in _PART_ALIASES.get(part, (part,)) if n in known]
        if not names:
            logger.warning("model has no %r part; it is not trained", part)
        chosen.extend(names)
    params: list[nn.Parameter] = []
    for name in dict.fromkeys(chosen):
        for p in getattr(model, name).parameters():
            p.requires_grad_(True)
            params.append(p)
    if not params:
        raise ValueError(f"nothing to train: train_parts={list(parts)} matches no parameters")
    return params


def _instance_prompts(smp: dict[str, Any], cfg: PromptConfig) -> list[dict[str, Any]]:
    """Prompts of every instance of one sample (a pure function of the sample's seed)."""
    rng = np.random.default_rng([int(smp["seed"]), 17])
    return [sample_instance_prompts(m, cfg, rng) for m in smp["masks"]]


class _PromptPrep:
    """Draws a sample's prompts where the batch is collated (in the DataLoader workers when there are
    any): finding boxes and points in full-size masks is CPU work that would otherwise stall the GPU."""

    def __init__(self, cfg: PromptConfig) -> None:
        self.cfg = cfg

    def __call__(self, smp: dict[str, Any]) -> None:
        smp["prompts"] = _instance_prompts(smp, self.cfg)


class _Collate:
    def __init__(self, prep: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.prep = prep

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        samples = [it for it in items if it is not None]
        if self.prep is not None:
            for smp in samples:
                self.prep(smp)
        return {"samples": samples, "skipped": len(items) - len(samples)}


def model_input(model: nn.Module, image: np.ndarray, device: torch.device) -> torch.Tensor:
    """``(h, w, 3)`` uint8 -> ``(1, 3, S, S)`` input of ``model`` (its ``preprocess``: normalised, padded).
    Any module with a ``preprocess`` of the same contract works, e.g. a distillation teacher."""
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).float()[None]
    return model.preprocess(x)


class SegmentationTask(nn.Module):
    """One training step's forward for promptable segmentation (what DDP wraps).

    ``forward(samples)`` encodes the batch, samples prompts for every instance, decodes (grouped by
    prompt kind), runs ``correction_rounds`` corrective passes and returns ``(loss_sum, count, stats)``:
    the summed per-instance loss (a scalar with a graph), the number of terms, and a vector of summed
    statistics named by :attr:`stat_names`.
    """

    stat_names: tuple[str, ...] = ("bce", "dice", "iou_mse", "iou_first", "iou_last")

    def __init__(
        self,
        model: nn.Module,
        cfg: FinetuneConfig,
        feature_loss: Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.loss_cfg = LossConfig(cfg.bce_weight, cfg.dice_weight, cfg.iou_weight, cfg.loss_points)
        self.sample_prep = _PromptPrep(cfg.prompt)
        # optional extra term on the image features (e.g. distillation from a teacher during stage 2):
        # ``feature_loss(samples, feats)`` returns the mean over the batch's images; it is added to the
        # mean per-instance loss with weight 1 and reported as the statistic "feature"
        self.feature_loss = feature_loss
        if feature_loss is not None:
            self.stat_names = (*type(self).stat_names, "feature")

    def _dummy(self, device: torch.device) -> torch.Tensor:
        return sum(
            (p.sum() * 0.0 for p in self.model.parameters() if p.requires_grad),
            torch.zeros((), device=device),
        )

    def forward(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model, cfg = self.model, self.cfg
        device = model.pixel_mean.device
        s = int(model.image_size)
        stats = torch.zeros(len(self.stat_names), device=device)
        if not samples:
            return self._dummy(device), torch.zeros((), device=device), stats
        x = torch.cat([model_input(model, smp["image"], device) for smp in samples])
        feats = model.encode_image(x)
        # ---- instances and prompts (numpy, per-sample generators) ----
        inst: list[dict[str, Any]] = []
        for b, smp in enumerate(samples):
            prompts = smp.get("prompts")
            if prompts is None:  # not drawn at collation (e.g. a caller's own loop)
                prompts = _instance_prompts(smp, cfg.prompt)
            for j, pr in enumerate(prompts):
                inst.append({"b": b, "seed": (int(smp["seed"]) * 131 + j) % (1 << 62), **pr})
        if not inst:
            return self._dummy(device), torch.zeros((), device=device), stats
        n = len(inst)
        slots = cfg.prompt.num_point_slots + cfg.correction_rounds
        gt = torch.zeros(n, s, s, dtype=torch.bool, device=device)
        valid = torch.zeros(n, s, s, dtype=torch.bool, device=device)
        i = 0
        for smp in samples:  # one copy per sample, not per instance
            m = len(smp["masks"])
            if m:
                h, w = smp["image"].shape[:2]
                gt[i : i + m, :h, :w] = torch.from_numpy(np.ascontiguousarray(smp["masks"])).to(device)
                valid[i : i + m, :h, :w] = True
                i += m
        p = cfg.prompt.num_point_slots
        coords_np = np.zeros((n, slots, 2), dtype=np.float32)
        labels_np = np.full((n, slots), -1, dtype=np.int64)
        for i, it in enumerate(inst):
            coords_np[i, :p] = it["point_coords"]
            labels_np[i, :p] = it["point_labels"]
        coords = torch.from_numpy(coords_np).to(device)
        labels = torch.from_numpy(labels_np).to(device)
        boxes = torch.from_numpy(np.stack([it["box"] for it in inst])).to(device)
        index = torch.tensor([it["b"] for it in inst], device=device)
        seeds = torch.tensor([it["seed"] for it in inst], dtype=torch.int64, device=device)
        modes = [it["mode"] for it in inst]
        groups = {
            m: torch.tensor([i for i, mm in enumerate(modes) if mm == m], device=device)
            for m in dict.fromkeys(modes)
        }
        low = s // 4
        gt_low = torch.nn.functional.adaptive_avg_pool2d(gt[:, None].float(), (low, low))[:, 0] >= 0.5
        valid_low = torch.nn.functional.adaptive_avg_pool2d(valid[:, None].float(), (low, low))[:, 0] >= 0.5
        mask_input: torch.Tensor | None = None
        total = torch.zeros((), device=device)
        for rnd in range(cfg.correction_rounds + 1):
            chosen = None
            for mode, idx in groups.items():
                # SAM's rule: 3 candidates (min loss over K) only for the ambiguous points-only prompts
                # of the first pass; boxes and corrective passes train the single-mask output
                multimask = cfg.multimask and rnd == 0 and mode == "points"
                use_box = "box" in mode
                use_pts = "points" in mode or rnd > 0
                logits, iou_pred = model.decode(
                    feats,
                    point_coords=coords[idx] if use_pts else None,
                    point_labels=labels[idx] if use_pts else None,
                    boxes=boxes[idx] if use_box else None,
                    mask_input=mask_input[idx] if mask_input is not None else None,
                    multimask_output=multimask,
                    image_index=index[idx],
                )
                loss, parts = segmentation_loss(
                    logits, iou_pred, gt[idx], seeds[idx], self.loss_cfg, salt=rnd
                )
                total = total + loss.sum()
                stats[0] += parts["bce"].sum()
                stats[1] += parts["dice"].sum()
                stats[2] += parts["iou_mse"].sum()
                if rnd == 0:
                    stats[3] += parts["iou"].sum() * (cfg.correction_rounds + 1)
                if rnd == cfg.correction_rounds:
                    stats[4] += parts["iou"].sum() * (cfg.correction_rounds + 1)
                if rnd < cfg.correction_rounds:
                    if chosen is None:
                        chosen = torch.zeros(n, low, low, device=device)
                    best = iou_pred.detach().argmax(1)
                    sel = logits.detach().float()[torch.arange(len(idx), device=device), best]
                    if sel.shape[-1] != low:
                        sel = torch.nn.functional.interpolate(sel[:, None], size=(low, low), mode="bilinear")[
                            :, 0
                        ]
                    chosen[idx] = sel
            if rnd < cfg.correction_rounds and chosen is not None:
                pc, pl = sample_correction_points(chosen, gt_low, valid_low, seeds, s // low, salt=100 + rnd)
                slot = cfg.prompt.num_point_slots + rnd
                coords[:, slot] = pc
                labels[:, slot] = pl
                mask_input = chosen[:, None]
        count = torch.tensor(float(n * (cfg.correction_rounds + 1)), device=device)
        if self.feature_loss is not None:
            # the engine divides the summed loss by the instance count: scale so the term stays a mean
            aux = self.feature_loss(samples, feats) * count
            total = total + aux
            stats[-1] += aux.detach()
        return total, count, stats


class _TensorBoard:
    """SummaryWriter when tensorboard is installed, else nothing (one info line)."""

    def __init__(self, log_dir: Path, enabled: bool, purge_step: int) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard is not installed: TensorBoard logs are off (history.json still written)")
            return
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step or None)

    def log(self, rec: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)):
                self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _autocast(device: torch.device, amp: str) -> tuple[Any, torch.amp.GradScaler | None]:
    if amp not in ("auto", "bf16", "fp16", "none"):
        raise ValueError(f"amp must be auto, bf16, fp16 or none, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), scaler


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def train(
    task: nn.Module,
    model: nn.Module,
    datasets: Sequence[Any],
    transform: Callable[..., Any] | None,
    cfg: FinetuneConfig,
    output_dir: str | Path,
    resume: bool = True,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    dist_info: DistInfo | None = None,
    metadata: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Generic loop: ``task(samples) -> (loss_sum, count, stats)`` is minimised on the global mean.

    The loss of a step is ``sum over all processes of loss_sum / sum of count``, so one process and N
    processes with the same global batch follow the same curve. ``model`` (inside ``task``) is what
    gets checkpointed; its parameters with ``requires_grad`` are optimised.
    """
    out = Path(output_dir)
    info = dist_info or init_distributed(cfg.device)
    device = info.device
    task.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameter")
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    if cfg.decoder_checkpointing not in ("auto", "on", "off"):
        raise ValueError(f"decoder_checkpointing must be auto, on or off, got {cfg.decoder_checkpointing!r}")
    if hasattr(model, "set_decoder_checkpointing"):
        on = cfg.decoder_checkpointing == "on" or (
            cfg.decoder_checkpointing == "auto" and device.type == "cpu"
        )
        model.set_decoder_checkpointing(16 if on else 0)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
    )
    scheduler = cosine_with_warmup(
        optimizer, cfg.schedule_steps or cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio
    )
    autocast, scaler = _autocast(device, cfg.amp)
    if cfg.batch_size % info.world:
        raise ValueError(
            f"batch_size {cfg.batch_size} must be divisible by the number of processes {info.world}"
        )

    start, history, skipped, nonfinite, bad_run = 0, [], 0, 0, 0
    state_path = out / STATE_NAME
    state = load_train_state(state_path) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][min(info.rank, len(state["rng"]) - 1)])
        start, history, skipped = int(state["step"]), list(state["history"]), int(state.get("skipped", 0))
        nonfinite = int(state.get("nonfinite_steps", 0))
        if info.is_main:
            logger.info("resuming %s at step %d of %d", out, start, cfg.steps)
    else:
        torch.manual_seed(cfg.seed + info.rank)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(out / "config.json", cfg.to_dict())

    ddp_task: nn.Module = task
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp_task = DDP(
            task, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    task.train()

    schedule = MixingSchedule([len(d) for d in datasets], cfg.ratios, seed=cfg.seed)
    sampler = StepSampler(schedule, cfg.batch_size, cfg.steps, start, info.rank, info.world)
    loader = torch.utils.data.DataLoader(
        MixedDataset(datasets, transform),
        batch_size=sampler.local_batch,
        sampler=sampler,
        collate_fn=_Collate(getattr(task, "sample_prep", None)),
        num_workers=cfg.num_workers,
        persistent_workers=False,
    )
    tb = _TensorBoard(out / "tb", cfg.tensorboard and info.is_main, start)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps, initial=start, disable=not (cfg.progress and info.is_main), desc="train", unit="step"
    )
    t_last = t_begin = time.perf_counter()
    step = start
    try:
        for batch in loader:
            if step >= cfg.steps:
                break
            with autocast():
                loss_sum, count, stats = ddp_task(batch["samples"])
            red = all_reduce_sum(
                torch.cat(
                    [
                        torch.stack(
                            [
                                loss_sum.detach().float(),
                                count.float(),
                                torch.tensor(float(batch["skipped"]), device=device),
                            ]
                        ),
                        stats.float(),
                    ]
                )
            )
            g_count = red[1].clamp(min=1.0)
            loss = loss_sum * (info.world / g_count)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            )
            finite = bool(torch.isfinite(grad_norm))  # same on every rank: grads are all-reduced
            if scaler is not None:
                scaler.step(optimizer)  # skips the update itself when the grads overflowed
                scaler.update()
            elif finite:
                optimizer.step()
            if finite:
                bad_run = 0
            else:
                nonfinite += 1
                bad_run += 1
                if info.is_main:
                    logger.warning("step %d: gradient norm is %s: update skipped", step + 1, float(grad_norm))
                if bad_run >= cfg.max_nonfinite_steps:
                    raise RuntimeError(
                        f"gradients were not finite for {bad_run} steps in a row (amp={cfg.amp!r}): the model is "
                        "not learning; try --amp none, a lower --lr, or check the Bi-WKV backend"
                    )
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            skipped += int(red[2].item())
            now = time.perf_counter()
            rec: dict[str, Any] = {
                "step": step,
                "loss": float(red[0] / g_count),
                "lr": lr,
                "grad_norm": float(grad_norm),
                "count": int(red[1].item()),
                "skipped": skipped,
                "nonfinite_steps": nonfinite,
                "sec": now - t_last,
            }
            t_last = now
            names = getattr(task, "stat_names", ())
            for i, name in enumerate(names):
                rec[name] = float(red[3 + i] / g_count)
            history.append(rec)
            if info.is_main:
                bar.update(1)
                if step % max(1, cfg.log_every) == 0 or step == cfg.steps:
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                    tb.log(rec)
                if log_fn is not None:
                    log_fn(rec)
            out_of_time = False
            if cfg.time_limit_s is not None:
                # every process must stop at the same step: the slowest clock decides
                late = torch.tensor(float(now - t_begin >= cfg.time_limit_s), device=device)
                out_of_time = bool(all_reduce_sum(late).item() > 0)
            if step % max(1, cfg.save_every) == 0 or step == cfg.steps or out_of_time:
                rngs = [rng_state()]
                if info.enabled:
                    gathered: list[Any] = [None] * info.world
                    torch.distributed.all_gather_object(gathered, rngs[0])
                    rngs = gathered
                if info.is_main:
                    save_train_state(
                        state_path,
                        {
                            "step": step,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(),
                            "scaler": scaler.state_dict() if scaler is not None else None,
                            "rng": rngs,
                            "history": history,
                            "skipped": skipped,
                            "nonfinite_steps": nonfinite,
                            "config": cfg.to_dict(),
                        },
                    )
                    _write_json_atomic(out / "history.json", history)
                barrier()
            if out_of_time:
                if info.is_main:
                    logger.info(
                        "time limit of %.0f s reached at step %d of %d: state saved",
                        cfg.time_limit_s,
                        step,
                        cfg.steps,
                    )
                break
    finally:
        bar.close()
        tb.close()
    final = out / FINAL_NAME
    if info.is_main:
        from ..checkpoint import save_checkpoint

        # a run stopped by its time limit still writes its weights, marked unfinished
        meta = {"steps": step, "train_parts": list(cfg.train_parts), "finished": step >= cfg.steps}
        meta.update(metadata or {})
        save_checkpoint(model, final, metadata=meta)
        _write_json_atomic(out / "history.json", history)
    barrier()
    return FinetuneResult(
        checkpoint=final,
        steps=step,
        history=history,
        skipped=skipped,
        output_dir=out,
        finished=step >= cfg.steps,
    )


def run_finetune(
    model: nn.Module,
    dataset: Any,
    config: FinetuneConfig,
    output_dir: str | Path,
    resume: bool = True,
    log_fn: Callable[[dict[str, Any]], None] | None = None,
    metadata: dict[str, Any] | None = None,
    feature_loss: Callable[[list[dict[str, Any]], dict[str, torch.Tensor]], torch.Tensor] | None = None,
    transform_wrapper: Callable[[TrainTransform], Any] | None = None,
    prompt_wrapper: Callable[[Callable[[dict[str, Any]], None]], Callable[[dict[str, Any]], None]]
    | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` on instance masks and write ``output_dir/model.safetensors``.

    Args:
        model: a model from ``build_model`` (RWKV-SAM or SAM). Trained in place.
        dataset: a reader (items with ``image`` and ``masks``) or a list of readers mixed by
            ``config.ratios``.
        config: :class:`FinetuneConfig`. output_dir: run folder (train_state.pt, history.json, tb/,
            config.json, model.safetensors). resume: continue from ``train_state.pt`` when present.
        log_fn: called on the main process with every step's record.
        feature_loss: optional ``f(samples, feats) -> scalar`` (mean over the batch's images) added to
            the loss, e.g. :class:`training.teacher.TeacherFeatureLoss` (stage 2 with distillation).
        transform_wrapper: optional ``f(transform) -> transform`` around the engine's augmentation
            (``transform(sample, rng) -> sample``), e.g. to carry per-mask data through it.
        prompt_wrapper: optional ``f(draw) -> draw`` around the engine's prompt drawing (``draw(sample)``
            sets ``sample["prompts"]``), e.g. to replace drawn boxes with boxes a dataset provides.
            Both wrappers run where the batch is collated (DataLoader workers): they must pickle.
    Returns:
        :class:`FinetuneResult` (checkpoint written atomically with ``rwkvsam_core.save_checkpoint``).
    """
    if config.image_size is not None and int(config.image_size) != int(model.image_size):
        raise ValueError(
            f"config.image_size={config.image_size} but the model was built for {model.image_size}: "
            "build the model with build_model(..., image_size=...)"
        )
    datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    for d in datasets:
        if len(d) == 0:
            raise ValueError(f"dataset {d!r} is empty")
    info = init_distributed(config.device)
    model.to(info.device)
    set_trainable(model, config.train_parts)
    transform = TrainTransform(
        image_size=int(model.image_size),
        scale_range=config.scale_range,
        flip_prob=config.flip_prob,
        rot90=config.rot90,
        color_jitter=config.color_jitter,
        min_mask_pixels=config.min_mask_pixels,
        max_instances=config.max_instances,
        augment=config.augment,
    )
    if transform_wrapper is not None:
        transform = transform_wrapper(transform)
    task = SegmentationTask(model, config, feature_loss)
    if prompt_wrapper is not None:
        task.sample_prep = prompt_wrapper(task.sample_prep)
    return train(task, model, datasets, transform, config, output_dir, resume, log_fn, info, metadata)
