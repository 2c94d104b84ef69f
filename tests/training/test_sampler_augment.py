import sys

import numpy as np
import pytest

from rwkvsam_core.data import MixedDataset, MixingSchedule, StepSampler, TrainTransform
from rwkvsam_core.data.codecs import coco_rle_encode, coco_segmentation_to_mask


def test_mixing_ratios_exact_per_block_and_epochs_cover_all() -> None:
    sched = MixingSchedule([10, 3, 5], [2, 1, 1], seed=3)
    picks = [sched(p) for p in range(400)]
    for b in range(100):
        block = [d for d, _ in picks[4 * b : 4 * b + 4]]
        assert sorted(block) == [0, 0, 1, 2]
    firsts = [i for d, i in picks if d == 0][:10]
    assert sorted(firsts) == list(range(10))  # one epoch of dataset 0 is a permutation
    seconds = [i for d, i in picks if d == 0][10:20]
    assert sorted(seconds) == list(range(10)) and seconds != firsts
    assert MixingSchedule([10, 3, 5], [2, 1, 1], seed=3)(123) == picks[123]
    with pytest.raises(ValueError):
        MixingSchedule([4, 0])
    with pytest.raises(ValueError):
        MixingSchedule([4, 4], [1])


def test_step_sampler_ranks_partition_the_global_stream() -> None:
    sched = MixingSchedule([7, 5], [1, 1], seed=0)
    single = list(StepSampler(sched, 4, steps=5))
    r0 = list(StepSampler(sched, 4, steps=5, rank=0, world=2))
    r1 = list(StepSampler(sched, 4, steps=5, rank=1, world=2))
    merged = [x for s in range(5) for x in r0[2 * s : 2 * s + 2] + r1[2 * s : 2 * s + 2]]
    assert merged == single
    resumed = list(StepSampler(sched, 4, steps=5, start_step=3))
    assert resumed == single[12:]
    with pytest.raises(ValueError):
        StepSampler(sched, 3, steps=2, world=2)


def test_train_transform_geometry(make_shapes) -> None:
    rng = np.random.default_rng(0)
    img, masks = make_shapes(rng, 60, 90)
    sample = {"image": img, "masks": masks, "labels": ["box", "disc"], "name": "x"}
    t = TrainTransform(image_size=64, color_jitter=0.0, min_mask_pixels=1)
    for seed in range(25):
        out = t(sample, np.random.default_rng(seed))
        h, w = out["image"].shape[:2]
        assert h <= 64 and w <= 64 and out["masks"].shape[1:] == (h, w)
        assert len(out["labels"]) == len(out["masks"])
        for m, colour in zip(
            out["masks"],
            [(230, 220, 40) if lab == "box" else (20, 30, 160) for lab in out["labels"]],
            strict=True,
        ):
            if m.sum() > 30:  # nearest-resized masks sit on their colour (bilinear edges aside)
                close = np.abs(out["image"][m].astype(int) - colour).max(1) < 40
                assert close.mean() > 0.6
    plain = TrainTransform(image_size=64, augment=False)(sample, np.random.default_rng(0))
    assert plain["image"].shape == (43, 64, 3)


def test_train_transform_drops_small_and_caps_instances() -> None:
    img = np.zeros((64, 64, 3), np.uint8)
    masks = np.zeros((30, 64, 64), bool)
    for i in range(30):
        masks[i, i : i + 6, 10:16] = True  # 36 px each
    masks[0] = False
    masks[0, 0, :10] = True  # 10 px: dropped
    sample = {"image": img, "masks": masks, "labels": [str(i) for i in range(30)], "name": "x"}
    out = TrainTransform(image_size=64, augment=False, min_mask_pixels=32, max_instances=20)(
        sample, np.random.default_rng(0)
    )
    assert len(out["masks"]) == 20 and "0" not in out["labels"]
    assert all(m.sum() >= 32 for m in out["masks"])


def test_mixed_dataset_skips_corrupt_and_is_deterministic(mask_folder) -> None:
    from rwkvsam_core.data import MaskFolderDataset

    ds = MaskFolderDataset(mask_folder)
    mixed = MixedDataset([ds], TrainTransform(image_size=32))
    broken = [i for i in range(len(ds)) if ds.pairs[i][0].stem == "broken"][0]
    assert mixed[(0, broken, 1)] is None
    ok = (broken + 1) % len(ds)
    a, b = mixed[(0, ok, 42)], mixed[(0, ok, 42)]
    assert np.array_equal(a["image"], b["image"]) and a["seed"] == 42


def test_coco_decode_without_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    m = np.zeros((7, 9), bool)
    m[1:5, 2:8] = True
    for compress in (False, True):
        assert np.array_equal(coco_segmentation_to_mask(coco_rle_encode(m, compress), 7, 9), m)
    poly = coco_segmentation_to_mask([[2, 1, 7, 1, 7, 4, 2, 4]], 7, 9)
    assert np.array_equal(poly, m)


def test_rot90_turns_image_and_masks_together_and_draws_nothing_when_off() -> None:
    img = np.zeros((40, 64, 3), np.uint8)
    img[5:15, 40:60] = (200, 10, 10)  # a red block in the top-right corner
    masks = np.zeros((1, 40, 64), bool)
    masks[0, 5:15, 40:60] = True
    sample = {"image": img, "masks": masks, "labels": ["a"], "name": "x"}
    common = dict(image_size=64, scale_range=(1.0, 1.0), flip_prob=0.0, color_jitter=0.0, min_mask_pixels=1)
    off = TrainTransform(**common)
    on = TrainTransform(**common, rot90=True)
    shapes = set()
    for seed in range(16):
        out = on(sample, np.random.default_rng(seed))
        shapes.add(out["image"].shape[:2])
        red = (out["image"][..., 0] > 100) & (out["image"][..., 1] < 50)
        np.testing.assert_array_equal(out["masks"][0], red)  # the mask still covers exactly the block
        assert out["masks"][0].sum() == 200
    assert shapes == {(40, 64), (64, 40)}  # quarter turns happened, and no turn
    # off: the same random stream as before the option existed (nothing drawn for it)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    off(sample, rng_a)
    TrainTransform(**common, rot90=False)(sample, rng_b)
    assert rng_a.random() == rng_b.random()
    plain = off(sample, np.random.default_rng(0))
    np.testing.assert_array_equal(plain["image"], img)
