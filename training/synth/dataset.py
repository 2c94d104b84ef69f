"""Write a synthetic dataset in the instance-folder format, reproducibly and in parallel."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .generator import SourcePool, SynthConfig, compose

logger = logging.getLogger(__name__)

__all__ = ["generate_dataset", "sample_name", "SynthDataset"]

Writer = Callable[..., Any]

_WORKER: dict[str, Any] = {}


def sample_name(index: int) -> str:
    """Folder name of sample ``index``."""
    return f"synth_{index:07d}"


class SynthDataset:
    """Map-style dataset that composes sample ``i`` on the fly (no disk), same items as the readers.

    Items: ``dict(image=(H, W, 3) uint8, masks=(M, H, W) bool, labels=list[str], name=str)``; item
    ``i`` equals what ``generate_dataset`` writes for index ``i`` with the same seed and config.
    Cheap to pickle into DataLoader workers (the pool is shared copy-on-write under fork).
    """

    def __init__(self, pool: SourcePool, n: int, seed: int = 0, cfg: SynthConfig | None = None) -> None:
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        self.pool, self.n, self.seed, self.cfg = pool, int(n), int(seed), cfg or SynthConfig()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(index)
        comp = compose(np.random.default_rng([self.seed, int(index)]), self.pool, self.cfg)
        return {
            "image": comp.image,
            "masks": comp.masks,
            "labels": comp.labels,
            "name": sample_name(int(index)),
        }


def _default_writer() -> Writer:
    from rwkvsam_core.data import write_instance_sample

    return write_instance_sample


def _write_range(indices: list[int]) -> dict[str, int]:
    pool: SourcePool = _WORKER["pool"]
    cfg: SynthConfig = _WORKER["cfg"]
    out: Path = _WORKER["out"]
    writer: Writer = _WORKER["writer"]
    seed: int = _WORKER["seed"]
    counts: dict[str, int] = {}
    for i in indices:
        name = sample_name(i)
        if (out / name / "meta.json").exists():
            counts["skipped_existing"] = counts.get("skipped_existing", 0) + 1
            continue
        comp = compose(np.random.default_rng([seed, i]), pool, cfg)
        writer(out, name, comp.image, comp.masks, comp.labels)
        counts[comp.style] = counts.get(comp.style, 0) + 1
        counts["masks"] = counts.get("masks", 0) + len(comp.masks)
    return counts


def generate_dataset(
    pool: SourcePool,
    out_dir: Path,
    n: int,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    workers: int = 1,
    writer: Writer | None = None,
    start: int = 0,
) -> dict[str, int]:
    """Generate samples ``start .. n-1`` into ``out_dir`` (instance-folder layout).

    Sample ``i`` depends only on ``(seed, i)``; samples already on disk are kept (resumable).
    ``writer`` defaults to ``rwkvsam_core.data.write_instance_sample``; with ``workers > 1`` it must
    be picklable (a module-level function). Returns counts per style, masks written and skipped.
    Also writes ``out_dir/synth_config.json`` (seed, config, count).
    """
    cfg = cfg or SynthConfig()
    writer = writer or _default_writer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "synth_config.json").write_text(
        json.dumps({"seed": seed, "n": n, "config": asdict(cfg)}, indent=1)
    )
    _WORKER.update(pool=pool, cfg=cfg, out=out_dir, writer=writer, seed=seed)
    indices = list(range(start, n))
    total: dict[str, int] = {}
    if workers <= 1:
        chunks_out = [_write_range(indices)]
    else:
        chunks = [indices[k :: workers * 4] for k in range(workers * 4)]
        ctx = mp.get_context("fork")
        with ctx.Pool(workers) as p:
            chunks_out = p.map(_write_range, chunks)
    for c in chunks_out:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    logger.info("synthetic dataset %s: %s", out_dir, total)
    return total
