"""Stage 1: distil the SAM ViT image encoder (after its neck) into the RWKV-SAM backbone + neck.

Paper defaults: teacher SAM ViT-H, per-pixel MSE on the 256 x S/16 x S/16 embedding, AdamW lr 1e-4,
weight decay 0.05, grad clip 5, 500 warm-up steps, cosine schedule, batch 32, input 1024, 24 epochs
over 1% of SA-1B. Teacher embeddings can be cached on disk (keyed by the exact input pixels and the
teacher), so later epochs without augmentation skip the teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from rwkvsam_core.data import TrainTransform
from rwkvsam_core.finetune import FinetuneConfig, FinetuneResult, model_input, set_trainable, train
from rwkvsam_core.finetune.distributed import DistInfo, init_distributed

logger = logging.getLogger(__name__)

__all__ = [
    "DISTILL_DEFAULTS",
    "DistillTask",
    "TeacherCache",
    "run_distill",
    "add_distill_args",
    "distill_from_args",
]

DISTILL_DEFAULTS = FinetuneConfig(
    steps=10000,
    batch_size=32,
    lr=1e-4,
    weight_decay=0.05,
    warmup_steps=500,
    grad_clip=5.0,
    train_parts=("backbone", "neck"),
    augment=True,
    scale_range=(1.0, 1.0),
    flip_prob=0.5,
    color_jitter=0.0,
    correction_rounds=0,
    save_every=500,
)


class TeacherCache:
    """On-disk cache of teacher embeddings: ``dir/<sha256>.pt`` (float16), written atomically."""

    def __init__(self, root: str | Path, teacher_key: str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.teacher_key = teacher_key
        self.hits = 0
        self.misses = 0

    def key(self, image: np.ndarray) -> str:
        h = hashlib.sha256()
        h.update(self.teacher_key.encode())
        h.update(str(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        path = self.root / f"{key}.pt"
        if not path.is_file():
            self.misses += 1
            return None
        try:
            t = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt entry is recomputed
            self.misses += 1
            return None
        self.hits += 1
        return t

    def put(self, key: str, emb: torch.Tensor) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=self.root)
        os.close(fd)
        try:
            torch.save(emb.detach().to("cpu", torch.float16).clone(), tmp)
            os.replace(tmp, self.root / f"{key}.pt")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class DistillTask(nn.Module):
    """``forward(samples) -> (sum of per-image MSE, images, [mse sum])``; the teacher is not a sub-module
    (so DDP neither syncs nor reduces it)."""

    stat_names = ("mse",)

    def __init__(self, student: nn.Module, teacher: nn.Module, cache: TeacherCache | None = None) -> None:
        super().__init__()
        self.student = student
        self.__dict__["teacher"] = teacher.eval()
        self.cache = cache

    @torch.no_grad()
    def teacher_embeddings(self, samples: list[dict[str, Any]], device: torch.device) -> torch.Tensor:
        teacher = self.__dict__["teacher"]
        out: list[torch.Tensor | None] = [None] * len(samples)
        keys = [self.cache.key(s["image"]) if self.cache else "" for s in samples]
        todo = []
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache else None
            if hit is not None:
                out[i] = hit.to(device, torch.float32)
            else:
                todo.append(i)
        if todo:
            x = torch.cat([model_input(teacher, samples[i]["image"], device) for i in todo])
            emb = teacher.encode_image(x)["embedding"].float()
            for j, i in enumerate(todo):
                out[i] = emb[j : j + 1]
                if self.cache:
                    self.cache.put(keys[i], emb[j : j + 1])
        return torch.cat([t.reshape(1, *t.shape[-3:]) for t in out if t is not None])

    def forward(self, samples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.student.pixel_mean.device
        if not samples:
            z = sum(
                (p.sum() * 0.0 for p in self.student.parameters() if p.requires_grad),
                torch.zeros((), device=device),
            )
            return z, torch.zeros((), device=device), torch.zeros(1, device=device)
        target = self.teacher_embeddings(samples, device)
        x = torch.cat([model_input(self.student, s["image"], device) for s in samples])
        pred = self.student.encode_image(x)["embedding"].float()
        if pred.shape != target.shape:
            raise ValueError(
                f"student embedding {tuple(pred.shape)} != teacher embedding {tuple(target.shape)}"
            )
        per_image = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        loss_sum = per_image.sum()
        return loss_sum, torch.tensor(float(len(samples)), device=device), loss_sum.detach().reshape(1)


class _ImagesOnly:
    """Drop the masks before augmenting (distillation needs pixels only)."""

    def __init__(self, transform: TrainTransform) -> None:
        self.transform = transform

    def __call__(self, sample: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        h, w = sample["image"].shape[:2]
        slim = {
            "image": sample["image"],
            "masks": np.zeros((0, h, w), bool),
            "labels": [],
            "name": sample["name"],
        }
        return self.transform(slim, rng)


def run_distill(
    student: nn.Module,
    teacher: nn.Module,
    datasets: list[Any],
    cfg: FinetuneConfig,
    output_dir: str | Path,
    resume: bool = True,
    cache_dir: str | Path | None = None,
    teacher_key: str = "teacher",
    log_fn: Any = None,
    dist_info: DistInfo | None = None,
) -> FinetuneResult:
    """Distil ``teacher``'s embedding into ``student`` (both from ``build_model`` at the same image size).

    Returns the :class:`FinetuneResult`; ``output_dir/model.safetensors`` is the whole student model.
    """
    if int(student.image_size) != int(teacher.image_size):
        raise ValueError(f"student input {student.image_size} != teacher input {teacher.image_size}")
    info = dist_info or init_distributed(cfg.device)
    student.to(info.device)
    teacher.to(info.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    set_trainable(student, cfg.train_parts)
    cache = TeacherCache(cache_dir, teacher_key) if cache_dir else None
    transform = _ImagesOnly(
        TrainTransform(
            int(student.image_size),
            cfg.scale_range,
            cfg.flip_prob if cfg.augment else 0.0,
            cfg.color_jitter if cfg.augment else 0.0,
            0,
            0,
            augment=cfg.augment,
        )
    )
    task = DistillTask(student, teacher, cache)
    return train(
        task,
        student,
        datasets,
        transform,
        cfg,
        output_dir,
        resume,
        log_fn,
        info,
        metadata={"stage": "distill", "teacher": teacher_key},
    )


def add_distill_args(p: argparse.ArgumentParser) -> None:
    """Options of ``rwkvsam train distill``."""
    from rwkvsam_core.finetune.cli import add_finetune_args

    add_finetune_args(p, DISTILL_DEFAULTS)
    p.add_argument("--teacher", default="sam_vit_h", help="teacher model name (sam_vit_h/l/b)")
    p.add_argument("--teacher-checkpoint", default=None, help="official SAM checkpoint of the teacher")
    p.add_argument(
        "--random-teacher", action="store_true", help="allow a random-init teacher (tests, mechanics)"
    )
    p.add_argument("--teacher-cache", default=None, help="folder for cached teacher embeddings")
    p.set_defaults(model="rwkvsam_t", image_size=1024)


def distill_from_args(args: argparse.Namespace) -> FinetuneResult:
    """Run stage 1 as parsed options say."""
    import warnings

    from rwkvsam_core import build_model
    from rwkvsam_core.finetune.cli import config_from_args, open_datasets

    cfg = config_from_args(args, DISTILL_DEFAULTS)
    if args.teacher_checkpoint is None and not args.random_teacher:
        raise ValueError("--teacher-checkpoint is required (or --random-teacher to test the mechanics)")
    info = init_distributed(cfg.device)
    torch.manual_seed(cfg.seed)  # identical random teacher/student on every process
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if args.random_teacher else "default")
        teacher = build_model(
            args.teacher,
            checkpoint=args.teacher_checkpoint,
            device=info.device,
            image_size=cfg.image_size,
            pretrained=False,
        )
        student = build_model(
            args.model,
            checkpoint=args.checkpoint,
            device=info.device,
            image_size=cfg.image_size,
            pretrained=False,
        )
    key = f"{args.teacher}:{args.teacher_checkpoint or f'random-seed{cfg.seed}'}:{cfg.image_size}"
    return run_distill(
        student,
        teacher,
        open_datasets(args.data, args.images),
        cfg,
        args.out,
        resume=not args.no_resume,
        cache_dir=args.teacher_cache,
        teacher_key=key,
        dist_info=info,
    )
