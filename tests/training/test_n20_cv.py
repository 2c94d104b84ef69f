"""The 20-nuclei cross-validation helper: folds partition the training nuclei, each fold's training
folder lacks exactly its validation nuclei, and the summary pools per-object IoUs per config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvsam_core.data import InstanceFolderDataset, write_instance_sample
from training.heldout import load_heldout_pack
from training.n20_cv import fold_indices, main, make_folds, summarize


def test_fold_indices_partition():
    folds = fold_indices(20, 4, seed=0)
    allv = np.concatenate(folds)
    assert sorted(allv.tolist()) == list(range(20))
    assert [len(f) for f in folds] == [5, 5, 5, 5]
    assert [f.tolist() for f in folds] == [f.tolist() for f in fold_indices(20, 4, seed=0)]
    assert [f.tolist() for f in folds] != [f.tolist() for f in fold_indices(20, 4, seed=1)]
    with pytest.raises(ValueError):
        fold_indices(3, 4)


def test_make_folds_holds_out_each_mask_once(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    masks = np.zeros((6, 40, 48), bool)
    for i in range(6):  # distinct masks so that they can be told apart
        masks[i, 5 * i : 5 * i + 4, 2 + i : 10 + 2 * i] = True
    write_instance_sample(tmp_path / "data", "img", image, masks, ["nucleus"] * 6)
    dirs = make_folds(tmp_path / "data", tmp_path / "cv", k=3, seed=0)
    seen = []
    for d in dirs:
        val = load_heldout_pack(d / "val.npz")[0]
        train = InstanceFolderDataset(d / "train")[0]
        assert np.array_equal(val.image, image) and np.array_equal(train["image"], image)
        assert len(val.masks) + len(train["masks"]) == 6
        for m in val.masks:  # a validation mask is never in its fold's training folder
            assert not any(np.array_equal(m, t) for t in train["masks"])
            seen.append(int(np.flatnonzero([np.array_equal(m, x) for x in masks])[0]))
    assert sorted(seen) == list(range(6))


def test_summarize_pools_folds(tmp_path, capsys):
    def write(cfg, fold, ious):
        d = tmp_path / "res" / cfg
        d.mkdir(parents=True, exist_ok=True)
        objs = [{"method": "m", "iou": x} for x in ious] + [
            {"method": "m clipped to box", "iou": 1.0} for _ in ious
        ]
        (d / f"fold{fold}.json").write_text(json.dumps({"objects": objs}))

    write("a", 0, [0.5, 0.7])
    write("a", 1, [0.9])
    write("b", 0, [0.95, 0.95])
    rows = summarize(tmp_path / "res")
    assert [r["config"] for r in rows] == ["b", "a"]
    a = rows[1]
    assert a["folds"] == 2 and a["objects"] == 3
    assert a["mIoU"] == pytest.approx(100 * (0.5 + 0.7 + 0.9) / 3)
    assert a["mIoU_clipped"] == pytest.approx(100.0)
    assert main(["summary", str(tmp_path / "res")]) == 0
    assert "| b | 1 | 2 | 95.0 | 100.0 |" in capsys.readouterr().out
