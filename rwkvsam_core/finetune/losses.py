"""Losses: 5 * BCE + 5 * Dice on mask logits (dense or point-sampled), min over K candidates, IoU-head MSE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .prompts import hash_uniform

__all__ = ["LossConfig", "sigmoid_bce", "dice_loss", "mask_iou_torch", "segmentation_loss", "point_sample"]


@dataclass
class LossConfig:
    """Loss weights and point sampling (``num_points=None``: dense loss at the ground-truth resolution)."""

    bce_weight: float = 5.0
    dice_weight: float = 5.0
    iou_weight: float = 1.0
    num_points: int | None = 12544
    oversample_ratio: float = 3.0
    importance_ratio: float = 0.75


def sigmoid_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the last dim: ``(..., P)`` logits and 0/1 targets -> ``(...)``."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s)`` with ``p = sigmoid(logits)``, over the last dim."""
    p = logits.sigmoid()
    return 1.0 - (2.0 * (p * target).sum(-1) + smooth) / (p.sum(-1) + target.sum(-1) + smooth)


def mask_iou_torch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of bool masks over the last dim ``(..., P)`` -> ``(...)`` (1.0 when both are empty)."""
    inter = (pred & target).sum(-1).float()
    union = (pred | target).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def point_sample(x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``x (N, C, h, w)`` at ``coords (N, P, 2)`` in [0, 1] (x, y) -> ``(N, C, P)``."""
    return F.grid_sample(x, (2.0 * coords - 1.0).unsqueeze(2), mode="bilinear", align_corners=False).squeeze(
        3
    )


def _gt_at(gt: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel ground truth of ``gt (N, H, W)`` bool at ``coords (N, P, 2)`` -> ``(N, P)`` float."""
    n, hh, ww = gt.shape
    xi = (coords[..., 0] * ww).long().clamp(0, ww - 1)
    yi = (coords[..., 1] * hh).long().clamp(0, hh - 1)
    return gt.flatten(1).gather(1, yi * ww + xi).float()


def _sample_coords(logits: torch.Tensor, seeds: torch.Tensor, cfg: LossConfig, salt: int) -> torch.Tensor:
    """Mask2Former-style importance sampling: the most uncertain of ``oversample * P`` random points + random ones."""
    n, k = logits.shape[:2]
    p = int(cfg.num_points)
    m = int(p * cfg.oversample_ratio)
    n_imp = int(p * cfg.importance_ratio)
    u = hash_uniform(seeds, 2 * (m + p - n_imp), salt)
    over = u[:, : 2 * m].view(n, m, 2)
    rand = u[:, 2 * m :].view(n, p - n_imp, 2)
    with torch.no_grad():
        vals = point_sample(logits.detach().float(), over)  # (N, K, m)
        uncertainty = -vals.abs().min(1).values  # most uncertain over the K candidates
        idx = uncertainty.topk(n_imp, dim=1).indices
    imp = over.gather(1, idx[..., None].expand(-1, -1, 2))
    return torch.cat([imp, rand], 1)


def segmentation_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    gt: torch.Tensor,
    seeds: torch.Tensor | None = None,
    cfg: LossConfig | None = None,
    salt: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-instance loss of K candidate masks against one ground truth each.

    Args:
        logits: ``(N, K, h, w)`` low-res mask logits. iou_pred: ``(N, K)`` predicted IoU.
        gt: ``(N, H, W)`` bool ground truth at the input resolution (H = 4 h for RWKV-SAM/SAM).
        seeds: ``(N,)`` int64 per-instance seeds for point sampling (required when ``cfg.num_points``).
        cfg: :class:`LossConfig`.
    Returns:
        ``(N,)`` loss = ``bce_w * BCE + dice_w * Dice`` of the best of the K candidates (SAM's min over
        K) ``+ iou_w * mean_K (iou_pred - IoU(logits > 0, gt))^2``, and a dict of ``(N,)`` parts
        (``bce``, ``dice``, ``iou_mse``, ``iou`` = IoU of the chosen candidate).
    """
    cfg = cfg or LossConfig()
    n, k, h, w = logits.shape
    logits = logits.float()
    hh, ww = gt.shape[-2:]
    if cfg.num_points is not None and cfg.num_points < hh * ww:
        if seeds is None:
            raise ValueError("point-sampled loss needs per-instance seeds")
        coords = _sample_coords(logits, seeds, cfg, salt)
        pl = point_sample(logits, coords)  # (N, K, P)
        pt = _gt_at(gt, coords)[:, None].expand_as(pl)
    else:
        pl = F.interpolate(logits, size=(hh, ww), mode="bilinear", align_corners=False).flatten(2)
        pt = gt.flatten(1).float()[:, None].expand_as(pl)
    bce = sigmoid_bce(pl, pt)
    dice = dice_loss(pl, pt)
    mask_loss = cfg.bce_weight * bce + cfg.dice_weight * dice  # (N, K)
    best = mask_loss.argmin(1)
    pick = best[:, None]
    with torch.no_grad():
        gt_low = F.adaptive_avg_pool2d(gt[:, None].float(), (h, w))[:, 0] >= 0.5 if (hh, ww) != (h, w) else gt
        true_iou = mask_iou_torch((logits > 0).flatten(2), gt_low.flatten(1)[:, None].expand(n, k, -1))
    iou_mse = ((iou_pred.float() - true_iou) ** 2).mean(1)
    total = mask_loss.gather(1, pick)[:, 0] + cfg.iou_weight * iou_mse
    parts = {
        "bce": bce.gather(1, pick)[:, 0].detach(),
        "dice": dice.gather(1, pick)[:, 0].detach(),
        "iou_mse": iou_mse.detach(),
        "iou": true_iou.gather(1, pick)[:, 0],
    }
    return total, parts
