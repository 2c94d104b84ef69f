import numpy as np
import torch

from rwkvsam_core.finetune.prompts import (
    PromptConfig,
    hash_uniform,
    mask_to_box,
    sample_correction_points,
    sample_instance_prompts,
)


def blob(h: int = 40, w: int = 50) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - 20) ** 2 / 100 + (xx - 22) ** 2 / 225) <= 1.0


def test_mask_to_box() -> None:
    m = np.zeros((10, 10), bool)
    m[2:5, 3:9] = True
    assert mask_to_box(m).tolist() == [3, 2, 8, 4]


def test_points_inside_negatives_outside_box_near_mask() -> None:
    m = blob()
    cfg = PromptConfig(negative_prob=1.0)
    x0, y0, x1, y1 = mask_to_box(m)
    for seed in range(40):
        p = sample_instance_prompts(m, cfg, np.random.default_rng(seed))
        lab, xy = p["point_labels"], p["point_coords"].astype(int)
        assert lab.shape == (cfg.num_point_slots,)
        assert set(np.unique(lab)) <= {-1, 0, 1}
        pos, neg = xy[lab == 1], xy[lab == 0]
        assert m[pos[:, 1], pos[:, 0]].all()
        assert not m[neg[:, 1], neg[:, 0]].any()
        if "points" in p["mode"]:
            assert 1 <= (lab == 1).sum() <= cfg.max_points
        else:
            assert (lab == -1).all()
        if "box" in p["mode"]:
            b = p["box"]
            assert b[0] <= b[2] and b[1] <= b[3]
            cap = cfg.box_noise_max
            assert np.all(np.abs(b - [x0, y0, x1, y1]) <= cap + 1e-5)
        else:
            assert not p["box"].any()


def test_prompts_deterministic_per_seed() -> None:
    m = blob()
    a = sample_instance_prompts(m, PromptConfig(), np.random.default_rng(7))
    b = sample_instance_prompts(m, PromptConfig(), np.random.default_rng(7))
    assert a["mode"] == b["mode"] and np.array_equal(a["point_coords"], b["point_coords"])


def test_correction_point_lands_on_error_with_right_label() -> None:
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[:, 2:6, 2:6] = True
    logits = torch.full((3, 8, 8), -5.0)
    logits[0][gt[0]] = 5.0
    logits[0, 0, 0] = 5.0  # instance 0: one false positive at (0, 0) -> negative click there
    logits[1, 2:6, 2:4] = 5.0  # instance 1: right half missed -> positive click inside it
    logits[2][gt[2]] = 5.0  # instance 2: perfect -> positive click on the object
    valid = torch.ones_like(gt)
    coords, labels = sample_correction_points(logits, gt, valid, torch.tensor([1, 2, 3]), stride=4)
    assert labels.tolist() == [0, 1, 1]
    assert coords[0].tolist() == [2.0, 2.0]  # centre of low-res pixel (0, 0) in the input frame
    c1 = (coords[1] // 4).long()
    assert gt[1, c1[1], c1[0]] and c1[0] >= 4
    c2 = (coords[2] // 4).long()
    assert gt[2, c2[1], c2[0]]


def test_hash_uniform_rows_independent_of_batch() -> None:
    a = hash_uniform(torch.tensor([5, 9]), 1000)
    b = hash_uniform(torch.tensor([9]), 1000)
    assert torch.equal(a[1], b[0])
    assert 0.45 < a.mean().item() < 0.55 and a.min() >= 0 and a.max() < 1
