import math

import numpy as np
import pytest
import torch

from rwkvsam_core.finetune.losses import LossConfig, dice_loss, segmentation_loss, sigmoid_bce
from rwkvsam_core.finetune.schedule import lr_factor


def test_bce_and_dice_hand_values() -> None:
    logits = torch.tensor([[0.0, 2.0]])
    target = torch.tensor([[1.0, 0.0]])
    expected_bce = (math.log(2.0) + math.log(1.0 + math.exp(2.0))) / 2
    assert sigmoid_bce(logits, target).item() == pytest.approx(expected_bce, rel=1e-6)
    p1 = 1.0 / (1.0 + math.exp(-2.0))
    expected_dice = 1.0 - (2 * 0.5 + 1.0) / (0.5 + p1 + 1.0 + 1.0)
    assert dice_loss(logits, target).item() == pytest.approx(expected_dice, rel=1e-6)


def test_segmentation_loss_takes_min_over_k_and_iou_mse() -> None:
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, :2, :2] = True
    good = torch.where(gt[0], 8.0, -8.0)
    bad = -good
    logits = torch.stack([bad, good])[None]  # (1, K=2, 4, 4), same resolution as gt
    iou_pred = torch.tensor([[0.5, 0.25]])
    cfg = LossConfig(num_points=None)
    total, parts = segmentation_loss(logits, iou_pred, gt, cfg=cfg)
    t = gt[0].float().flatten()
    g = good.flatten()
    exp_mask = 5 * sigmoid_bce(g, t) + 5 * dice_loss(g, t)
    # true IoUs: bad candidate 0, good candidate 1 -> MSE = ((0.5-0)^2 + (0.25-1)^2) / 2
    exp_iou = (0.5**2 + 0.75**2) / 2
    assert total.item() == pytest.approx(exp_mask.item() + exp_iou, rel=1e-5)
    assert parts["iou"].item() == 1.0 and parts["iou_mse"].item() == pytest.approx(exp_iou)


def test_low_res_logits_upsampled_and_point_sampled_agree_roughly() -> None:
    torch.manual_seed(0)
    gt = torch.zeros(3, 32, 32, dtype=torch.bool)
    gt[:, 8:24, 4:20] = True
    logits = torch.randn(3, 3, 8, 8)
    iou = torch.rand(3, 3)
    dense, _ = segmentation_loss(logits, iou, gt, cfg=LossConfig(num_points=None))
    seeds = torch.arange(3, dtype=torch.int64)
    sampled, _ = segmentation_loss(logits, iou, gt, seeds, LossConfig(num_points=600, importance_ratio=0.0))
    assert dense.shape == sampled.shape == (3,)
    assert torch.allclose(dense, sampled, rtol=0.15)  # random points estimate the dense mean
    again, _ = segmentation_loss(logits, iou, gt, seeds, LossConfig(num_points=600))
    again2, _ = segmentation_loss(logits, iou, gt, seeds, LossConfig(num_points=600))
    assert torch.equal(again, again2)  # seeded: deterministic


def test_loss_gradient_flows() -> None:
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    logits = torch.zeros(2, 3, 4, 4, requires_grad=True)
    iou = torch.full((2, 3), 0.5, requires_grad=True)
    total, _ = segmentation_loss(logits, iou, gt, torch.arange(2), LossConfig(num_points=100))
    total.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0 and iou.grad.abs().sum() > 0


def test_warmup_cosine_schedule() -> None:
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5, abs=1e-9)
    assert np.all(np.diff(f[10:]) <= 1e-12) and f[99] < 0.01
