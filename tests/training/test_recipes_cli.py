"""Stage-1 distillation, evaluation and the CLI plug-in on tiny data."""

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from rwkvsam_core import build_model
from rwkvsam_core.data import InstanceFolderDataset
from rwkvsam_core.finetune import FinetuneConfig
from training import cli
from training.distill import DISTILL_DEFAULTS, run_distill
from training.evaluate import format_table

SIZE = 64


def _models():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = build_model("rwkvsam_t", device="cpu", image_size=SIZE, pretrained=False)
        teacher = build_model("sam_vit_b", device="cpu", image_size=SIZE, pretrained=False)
    return student, teacher


def test_distill_trains_encoder_only_and_caches_teacher(instance_dir: Path, tmp_path: Path) -> None:
    student, teacher = _models()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    cfg = FinetuneConfig.from_dict(DISTILL_DEFAULTS.to_dict())
    cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.lr = 4, 2, 1, 1e-3
    cfg.augment, cfg.progress, cfg.tensorboard, cfg.device, cfg.save_every = False, False, False, "cpu", 2
    res = run_distill(
        student,
        teacher,
        [InstanceFolderDataset(instance_dir)],
        cfg,
        tmp_path / "run",
        cache_dir=tmp_path / "cache",
        teacher_key="t",
    )
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]  # MSE to a fixed target falls at lr 1e-3
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], student.state_dict()[k])}
    assert changed == {"backbone", "neck"}
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items())
    # 4 images, no augmentation: the second epoch reads the teacher from the cache
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def _eval_args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    argv = ["eval", "--model", "rwkvsam_t", "--image-size", str(SIZE), "--device", "cpu"]
    for k, v in kw.items():
        for item in v if isinstance(v, list) else [v]:
            argv += [f"--{k.replace('_', '-')}", str(item)]
    return parser.parse_args(argv)


def test_eval_mask_folder_and_coco_with_detections(
    mask_folder: Path, coco_set, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("pycocotools")
    out = tmp_path / "res.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            _eval_args(data=str(mask_folder), out=str(out)).func(
                _eval_args(data=str(mask_folder), out=str(out))
            )
            == 0
        )
    res = json.loads(out.read_text())["results"][mask_folder.name]
    assert (
        res["instances"] == 3 and res["skipped"] == 1 and 0 <= res["mIoU"] <= 100 and 0 <= res["mBIoU"] <= 100
    )
    assert "| dataset |" in capsys.readouterr().out
    path, root, gts = coco_set
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 15], "score": 0.8},
        {"image_id": 2, "category_id": 2, "bbox": [30, 20, 15, 15], "score": 0.6},
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    args = _eval_args(data=str(path), images=str(root), detections=str(tmp_path / "dets.json"), out=str(out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert args.func(args) == 0
    row = next(iter(json.loads(out.read_text())["results"].values()))
    assert {"AP", "AP50", "boundary_AP"} <= row.keys() and 0 <= row["AP"] <= 100


def test_box_prompt_eval_scores_a_perfect_predictor_100(
    instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a predictor that returns the GT mask, mIoU and boundary IoU are exactly 100."""
    import training.evaluate as ev

    ds = InstanceFolderDataset(instance_dir)
    lookup = {}
    for i in range(len(ds)):
        it = ds[i]
        for m in it["masks"]:
            ys, xs = np.nonzero(m)
            lookup[(i, xs.min(), ys.min(), xs.max(), ys.max())] = m
    state = {"i": -1}

    class Oracle:
        def __init__(self, model):
            pass

        def set_image(self, image):
            state["i"] += 1

        def predict(self, box, multimask_output):
            masks = np.stack(
                [lookup[(state["i"], *[int(v) for v in b])] for b in np.asarray(box).reshape(-1, 4)]
            )
            return masks[:, None], np.ones((len(masks), 1)), None

    import rwkvsam_core

    monkeypatch.setattr(rwkvsam_core, "Predictor", Oracle)
    res = ev.evaluate_box_prompts(object(), ds)
    assert res["mIoU"] == 100.0 and res["mBIoU"] == 100.0 and res["instances"] == 8
    assert "100.00" in format_table({"x": res})


def test_cli_registers_train_and_eval() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    a = parser.parse_args(["train", "distill", "--data", "d", "--out", "o", "--random-teacher"])
    assert a.recipe == "distill" and a.lr == 1e-4 and a.batch_size == 32 and a.warmup_steps == 500
    assert a.train_parts == "backbone,neck" and a.image_size == 1024 and callable(a.func)
    j = parser.parse_args(["train", "joint", "--data", "a", "--data", "b", "--data", "c", "--out", "o"])
    assert j.ratios == "2:1:1" and j.scale_range == "0.1:2.0" and j.max_instances == 20
    f = parser.parse_args(["train", "finetune", "--data", "d", "--out", "o"])
    assert f.train_parts == "mask_decoder,refine"


def test_distill_requires_teacher_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["distill", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert code == 1 and "--teacher-checkpoint is required" in capsys.readouterr().err
