"""Prompt sampling from ground-truth masks: boxes with jitter, interior points, negatives, correction clicks.

Box and point sampling run in numpy on each sample's own generator (seeded from the data stream), so
the prompts of a sample do not depend on how a batch is split across GPUs. Correction clicks run on
the device with a counter-based hash for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "PromptConfig",
    "mask_to_box",
    "sample_instance_prompts",
    "hash_uniform",
    "sample_correction_points",
]


@dataclass
class PromptConfig:
    """How prompts are drawn for one instance (defaults follow SAM's training recipe).

    ``mode_probs``: probabilities of the prompt kinds ("box", "points", "box+points").
    ``box_noise``: jitter std as a fraction of the box side, capped at ``box_noise_max`` pixels.
    ``max_points``: positive interior points drawn uniformly from 1..max_points.
    ``negative_prob``/``max_negatives``: chance of adding 1..max_negatives background points (inside the
    jittered box when there is one, anywhere in the valid image otherwise).
    """

    mode_probs: tuple[float, float, float] = (0.4, 0.3, 0.3)
    box_noise: float = 0.1
    box_noise_max: float = 20.0
    max_points: int = 5
    negative_prob: float = 0.3
    max_negatives: int = 2

    @property
    def num_point_slots(self) -> int:
        """Fixed number of point slots (padding label -1), so prompts never depend on batch composition."""
        return self.max_points + self.max_negatives


MODES = ("box", "points", "box+points")


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool mask -> XYXY box ``[x0, y0, x1, y1]`` (inclusive pixel extremes, as SAM). Empty -> zeros."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return np.zeros(4, dtype=np.float32)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _jitter_box(box: np.ndarray, cfg: PromptConfig, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
    std = np.array([bw, bh, bw, bh], dtype=np.float64) * cfg.box_noise
    noise = np.clip(rng.normal(0.0, 1.0, 4) * std, -cfg.box_noise_max, cfg.box_noise_max)
    out = box + noise
    x0, x1 = sorted((out[0], out[2]))
    y0, y1 = sorted((out[1], out[3]))
    return np.array(
        [np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1), np.clip(x1, 0, w - 1), np.clip(y1, 0, h - 1)],
        dtype=np.float32,
    )


def sample_instance_prompts(
    mask: np.ndarray, cfg: PromptConfig, rng: np.random.Generator, mode: str | None = None
) -> dict[str, np.ndarray | str]:
    """Draw the prompts of one instance.

    Args:
        mask: ``(h, w)`` bool ground truth (non-empty) in the model's input frame.
        cfg: :class:`PromptConfig`. rng: the sample's generator. mode: force "box"/"points"/"box+points".
    Returns:
        dict(mode=str, box=(4,) float32 XYXY (zeros when unused), point_coords=(P, 2) float32 x, y,
        point_labels=(P,) int64 with 1 positive, 0 negative, -1 padding; ``P = cfg.num_point_slots``).
        Positive points lie inside the mask, negatives outside it.
    """
    h, w = mask.shape
    if mode is None:
        mode = MODES[int(rng.choice(3, p=np.asarray(cfg.mode_probs) / np.sum(cfg.mode_probs)))]
    if mode not in MODES:
        raise ValueError(f"unknown prompt mode {mode!r}")
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        raise ValueError("cannot draw prompts from an empty mask")
    box = np.zeros(4, dtype=np.float32)
    if "box" in mode:
        box = _jitter_box(mask_to_box(mask), cfg, rng, h, w)
    slots = cfg.num_point_slots
    coords = np.zeros((slots, 2), dtype=np.float32)
    labels = np.full(slots, -1, dtype=np.int64)
    if "points" in mode:
        n_pos = int(rng.integers(1, cfg.max_points + 1))
        pick = rng.choice(ys.size, size=n_pos, replace=ys.size < n_pos)
        coords[:n_pos, 0], coords[:n_pos, 1] = xs[pick], ys[pick]
        labels[:n_pos] = 1
        if cfg.max_negatives > 0 and rng.random() < cfg.negative_prob:
            region = np.zeros_like(mask)
            if "box" in mode:
                bx = box.round().astype(int)
                region[bx[1] : bx[3] + 1, bx[0] : bx[2] + 1] = True
            else:
                region[:] = True
            nys, nxs = np.nonzero(region & ~mask)
            if nys.size:
                n_neg = int(rng.integers(1, cfg.max_negatives + 1))
                pick = rng.choice(nys.size, size=n_neg, replace=nys.size < n_neg)
                coords[n_pos : n_pos + n_neg, 0], coords[n_pos : n_pos + n_neg, 1] = nxs[pick], nys[pick]
                labels[n_pos : n_pos + n_neg] = 0
    return {"mode": mode, "box": box, "point_coords": coords, "point_labels": labels}


_M1 = 0x5851F42D4C957F2D  # 64-bit mixing multipliers (both < 2**63: valid int64)
_M2 = 0x14057B7EF767814F


def hash_uniform(seeds: torch.Tensor, n: int, salt: int = 0) -> torch.Tensor:
    """Counter-based uniform noise in [0, 1): ``(N,)`` int64 seeds -> ``(N, n)`` float32.

    Each row depends only on its own seed (and ``salt``), never on the batch it sits in.
    """
    idx = torch.arange(n, device=seeds.device, dtype=torch.int64)
    x = seeds.to(torch.int64)[:, None] * 0x9E3779B1 + idx[None, :] + salt * 0x632BE5AB
    m1 = torch.tensor(_M1, dtype=torch.int64, device=seeds.device)
    m2 = torch.tensor(_M2, dtype=torch.int64, device=seeds.device)
    for _ in range(2):
        x = (x ^ ((x >> 31) & 0x1FFFFFFFF)) * m1
        x = (x ^ ((x >> 29) & 0x7FFFFFFFF)) * m2
    x = x ^ ((x >> 32) & 0xFFFFFFFF)
    return ((x & 0xFFFFFF).to(torch.float32)) / float(1 << 24)


def sample_correction_points(
    logits: torch.Tensor,
    gt_low: torch.Tensor,
    valid_low: torch.Tensor,
    seeds: torch.Tensor,
    stride: int,
    salt: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One corrective click per instance from the error of the current prediction (SAM's iterative training).

    Args:
        logits: ``(N, h, w)`` low-res logits of the chosen mask. gt_low: ``(N, h, w)`` bool ground truth at
            the same resolution. valid_low: ``(N, h, w)`` bool, the un-padded image area.
        seeds: ``(N,)`` int64 per-instance seeds. stride: input pixels per low-res pixel (4).
    Returns:
        coords ``(N, 2)`` float32 x, y in the input frame and labels ``(N,)`` int64: 1 on a missed
        foreground pixel, 0 on a false-positive pixel; an instance with no error gets a positive click
        on its ground truth (or label -1 if it has none).
    """
    n, h, w = logits.shape
    pred = logits > 0
    err = (pred ^ gt_low) & valid_low
    fallback = gt_low & valid_low
    region = torch.where(err.flatten(1).any(1)[:, None, None], err, fallback)
    u = hash_uniform(seeds, h * w, salt).view(n, h, w)
    score = torch.where(region, u + 1.0, torch.zeros_like(u))
    flat = score.flatten(1).argmax(1)
    r, c = flat // w, flat % w
    coords = torch.stack([c * stride + stride // 2, r * stride + stride // 2], 1).to(torch.float32)
    has = region.flatten(1).any(1)
    hit_gt = gt_low.flatten(1).gather(1, flat[:, None])[:, 0]
    labels = torch.where(has, hit_gt.to(torch.int64), torch.full_like(flat, -1))
    return coords, labels
