"""Starter-weights plumbing: shards that fit the device tool's file limit, and the float16 export."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from rwkvsam_core import build_model, load_checkpoint
from training.starter import build_starter_model, load_shards, main, save_shards


def _model(size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("rwkvsam_t", device="cpu", image_size=size, pretrained=False)


def test_shards_round_trip_and_respect_the_size_limit(tmp_path: Path) -> None:
    sd = _model().state_dict()
    limit = 4 * 1024 * 1024
    paths = save_shards(sd, tmp_path / "s", max_bytes=limit)
    assert len(paths) > 1 and all(p.stat().st_size <= limit + 64 * 1024 for p in paths)  # + header
    back = load_shards(tmp_path / "s")
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_missing_shard_content_is_an_error(tmp_path: Path) -> None:
    save_shards({"a": torch.zeros(4), "b": torch.ones(4)}, tmp_path / "s", max_bytes=16)
    idx = json.loads((tmp_path / "s" / "index.json").read_text())
    idx["tensors"] = 3
    (tmp_path / "s" / "index.json").write_text(json.dumps(idx))
    with pytest.raises(ValueError, match="index says 3"):
        load_shards(tmp_path / "s")
    with pytest.raises(ValueError, match="larger than one shard"):
        save_shards({"big": torch.zeros(100)}, tmp_path / "t", max_bytes=16)


def test_export_writes_float16_weights_that_build_model_loads(tmp_path: Path) -> None:
    model = _model()
    save_shards(model.state_dict(), tmp_path / "s")
    again = build_starter_model(str(tmp_path / "s"), 64, "cpu")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )
    out = tmp_path / "rwkvsam_t.safetensors"
    assert main(["export", "--init", str(tmp_path / "s"), "--out", str(out), "--image-size", "64"]) == 0
    ck = load_checkpoint(out)
    assert {t.dtype for k, t in ck.state_dict.items() if t.is_floating_point()} == {torch.float16}
    loaded = build_model("rwkvsam_t", checkpoint=str(out), device="cpu")
    assert loaded.image_size == 64
    ref = model.state_dict()
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v.float(), ref[k].float(), atol=1e-2, rtol=1e-3)


def test_synth_options_parse_and_reject_unknown_keys() -> None:
    from training.starter import set_synth_option
    from training.synth import SynthConfig

    cfg = SynthConfig()
    set_synth_option(cfg, "parts_prob=0.5")
    set_synth_option(cfg, "object_scale=0.06:0.95")
    set_synth_option(cfg, "max_objects=4")
    assert cfg.parts_prob == 0.5 and cfg.object_scale == (0.06, 0.95) and cfg.max_objects == 4
    for bad in ("nope=1", "parts_prob", "object_scale=0.5", "max_objects=x"):
        with pytest.raises(SystemExit):
            set_synth_option(cfg, bad)


def test_distill_only_run_trains_the_encoder_towards_the_teacher(instance_dir: Path, tmp_path: Path) -> None:
    """``train --teacher ... --init-decoder --distill-only``: the decoder is LiteMedSAM's and stays put,
    only backbone + neck move, and the logged loss is the embedding MSE."""
    from argparse import Namespace

    from rwkvsam_core.data import InstanceFolderDataset
    from training.starter import _fit, _model, _teacher, starter_config

    args = Namespace(
        teacher="lite-medsam",
        init=None,
        image_size=1024,
        init_decoder=True,
        distill_only=True,
        distill_weight=0.0,
        batch_size=1,
        lr=1e-4,
        warmup_steps=1,
        scale_range="1:1",
        save_every=10,
        num_workers=0,
        seed=0,
        minutes=None,
    )
    teacher, state = _teacher(args, "cpu")
    torch.manual_seed(0)
    model = _model(args, "cpu", state)
    assert torch.equal(
        model.state_dict()["mask_decoder.iou_token.weight"], state["mask_decoder.iou_token.weight"]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = starter_config(args, 1)
    cfg.progress, cfg.tensorboard, cfg.device = False, False, "cpu"
    res = _fit(args, model, InstanceFolderDataset(instance_dir), cfg, tmp_path / "run", teacher)
    assert res.steps == 1 and res.history[0]["mse"] > 0
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"backbone", "neck"}
    args.distill_only = False
    with pytest.raises(SystemExit, match="needs --teacher"):
        _model(Namespace(**{**vars(args), "teacher": None}), "cpu", None)
