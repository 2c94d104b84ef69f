"""Deterministic, resumable, distributed sampling over one or several datasets mixed by ratio.

The stream is a pure function of (seed, position): position ``p`` maps to ``(dataset, index,
sample_seed)`` in O(1), so resuming at step ``s`` needs only ``s`` (no sampler state), and 1 GPU or N
GPUs with the same global batch see exactly the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["MixingSchedule", "StepSampler", "MixedDataset", "sample_seed"]


def sample_seed(seed: int, position: int) -> int:
    """Seed of the augmentation/prompt randomness of the sample at global stream ``position``."""
    return int(np.random.SeedSequence([seed, 0x5A3, position]).generate_state(1)[0])


class MixingSchedule:
    """Maps stream positions to ``(dataset_id, index)`` with datasets drawn in the given ``ratios``.

    Positions are grouped in blocks of ``sum(ratios)`` slots; every block holds exactly ``ratios[d]``
    slots of dataset ``d`` in a per-block random order. Each dataset is walked through per-epoch
    random permutations, so every item is seen once before any repeats.
    """

    def __init__(self, lengths: Sequence[int], ratios: Sequence[int] | None = None, seed: int = 0) -> None:
        if not lengths or any(n <= 0 for n in lengths):
            raise ValueError(f"every dataset must be non-empty, got lengths {list(lengths)}")
        ratios = list(ratios) if ratios is not None else [1] * len(lengths)
        if len(ratios) != len(lengths) or any(int(r) != r or r <= 0 for r in ratios):
            raise ValueError(f"ratios must be positive integers, one per dataset; got {ratios}")
        self.lengths = [int(n) for n in lengths]
        self.ratios = [int(r) for r in ratios]
        self.block = sum(self.ratios)
        self.seed = int(seed)
        self._slots = np.repeat(np.arange(len(self.ratios)), self.ratios)
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    def _block_order(self, b: int) -> np.ndarray:
        if len(self.ratios) == 1:
            return self._slots
        return np.random.default_rng([self.seed, 1, b]).permutation(self._slots)

    def _perm(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perm_cache:
            if len(self._perm_cache) > 8:
                self._perm_cache.clear()
            self._perm_cache[key] = np.random.default_rng([self.seed, 2, d, epoch]).permutation(
                self.lengths[d]
            )
        return self._perm_cache[key]

    def __call__(self, position: int) -> tuple[int, int]:
        b, r = divmod(int(position), self.block)
        order = self._block_order(b)
        d = int(order[r])
        k = b * self.ratios[d] + int((order[:r] == d).sum())  # draws of dataset d before this position
        epoch, j = divmod(k, self.lengths[d])
        return d, int(self._perm(d, epoch)[j])


class StepSampler:
    """Yields ``(dataset_id, index, sample_seed)`` for steps ``start_step .. steps-1`` of one rank.

    Global step ``s`` covers positions ``[s * G, (s + 1) * G)`` with ``G = global_batch``; rank ``r`` of
    ``world`` takes the ``r``-th contiguous slice of ``G / world`` positions.
    """

    def __init__(
        self,
        schedule: MixingSchedule,
        global_batch: int,
        steps: int,
        start_step: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if global_batch % world:
            raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}")
        self.schedule = schedule
        self.global_batch = global_batch
        self.local_batch = global_batch // world
        self.steps = steps
        self.start_step = start_step
        self.rank = rank

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step) * self.local_batch

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        for s in range(self.start_step, self.steps):
            base = s * self.global_batch + self.rank * self.local_batch
            for p in range(base, base + self.local_batch):
                d, i = self.schedule(p)
                yield d, i, sample_seed(self.schedule.seed, p)


class MixedDataset:
    """Map-style dataset indexed by ``(dataset_id, index, sample_seed)`` tuples from :class:`StepSampler`.

    Applies ``transform(sample, rng)`` with ``rng = default_rng(sample_seed)``; a corrupt item comes
    back as ``None`` (the collate function drops and counts it).
    """

    def __init__(self, datasets: Sequence[Any], transform: Any = None) -> None:
        self.datasets = list(datasets)
        self.transform = transform

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        from .base import CorruptSampleError

        d, i, seed = key
        try:
            sample = self.datasets[d][i]
        except CorruptSampleError as exc:
            import logging

            logging.getLogger(__name__).warning("skipping corrupt sample: %s", exc)
            return None
        rng = np.random.default_rng(seed)
        out = self.transform(sample, rng) if self.transform is not None else dict(sample)
        out["seed"] = seed
        return out
