"""The training loop on a real (tiny, random-init) RWKV-SAM at 64 px."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rwkvsam_core import build_model, load_checkpoint
from rwkvsam_core.data import InstanceFolderDataset, MaskFolderDataset
from rwkvsam_core.finetune import FinetuneConfig, run_finetune, set_trainable

SIZE = 64


def tiny_model(name: str = "rwkvsam_t") -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(name, device="cpu", image_size=SIZE, pretrained=False)


def small_cfg(**kw) -> FinetuneConfig:
    base = dict(
        steps=2,
        batch_size=2,
        warmup_steps=1,
        save_every=1,
        progress=False,
        tensorboard=False,
        loss_points=None,
        device="cpu",
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_set_trainable_parts() -> None:
    model = tiny_model()
    params = set_trainable(model, ("mask_decoder", "refine"))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("mask_decoder.", "refine.")) for n in names)
    assert len(params) == len(names)
    set_trainable(model, ("image_encoder",))
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"backbone", "neck"}
    with pytest.raises(ValueError, match="unknown train part"):
        set_trainable(model, ("decoder_typo",))


def test_run_finetune_trains_only_chosen_parts(instance_dir: Path, tmp_path: Path) -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    records = []
    res = run_finetune(
        model,
        InstanceFolderDataset(instance_dir),
        small_cfg(correction_rounds=1),
        tmp_path,
        log_fn=records.append,
        metadata={"trained_on": "shapes"},
    )
    assert res.steps == 2 and len(res.history) == 2 and records == res.history
    assert all(np.isfinite(h["loss"]) and h["count"] > 0 for h in res.history)
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed <= {"mask_decoder", "refine"} and "mask_decoder" in changed
    ck = load_checkpoint(res.checkpoint)
    assert ck.config["steps"] == 2 and ck.config["trained_on"] == "shapes"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = build_model("rwkvsam_t", checkpoint=res.checkpoint, device="cpu")
    assert reloaded.image_size == SIZE
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, after[k])
    hist = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in hist] == [1, 2]
    # resume=True on a finished run does no more steps and keeps the history
    again = run_finetune(model, InstanceFolderDataset(instance_dir), small_cfg(), tmp_path)
    assert again.steps == 2 and len(again.history) == 2


def test_corrupt_samples_are_skipped_and_counted(mask_folder: Path, tmp_path: Path) -> None:
    model = tiny_model()
    ds = MaskFolderDataset(mask_folder)  # 4 pairs, one corrupt image
    res = run_finetune(model, ds, small_cfg(steps=2, batch_size=2, correction_rounds=0), tmp_path)
    assert res.skipped == 1  # 4 draws = one epoch of the 4 items: the broken one once
    assert res.history[-1]["skipped"] == 1


def test_sam_vit_model_finetunes_without_refine(instance_dir: Path, tmp_path: Path) -> None:
    model = tiny_model("sam_vit_b")
    res = run_finetune(
        model,
        InstanceFolderDataset(instance_dir),
        small_cfg(steps=1, batch_size=1, correction_rounds=0),
        tmp_path,
    )
    assert res.steps == 1 and np.isfinite(res.history[0]["loss"])


def test_image_size_mismatch_is_a_clear_error(instance_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        run_finetune(
            SimpleNamespace(image_size=SIZE),
            InstanceFolderDataset(instance_dir),
            small_cfg(image_size=128),
            tmp_path,
        )


def test_nonfinite_gradients_skip_the_update_then_stop(instance_dir: Path, tmp_path: Path) -> None:
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param = model.mask_decoder.iou_token.weight
    param.register_hook(lambda g: torch.full_like(g, float("inf")))
    seen = []
    with pytest.raises(RuntimeError, match="not finite for 2 steps"):
        run_finetune(
            model,
            InstanceFolderDataset(instance_dir),
            small_cfg(steps=3, max_nonfinite_steps=2, batch_size=1, correction_rounds=0),
            tmp_path,
            log_fn=seen.append,
        )
    assert [r["nonfinite_steps"] for r in seen] == [1]  # the second record is never logged: it raised first
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although every update was skipped"


def test_time_limit_stops_with_state_saved_and_resume_finishes(instance_dir: Path, tmp_path: Path) -> None:
    ds = InstanceFolderDataset(instance_dir)
    out = tmp_path / "run"
    # a zero budget runs out after the first step: that step is saved, the run returns early
    res = run_finetune(tiny_model(), ds, small_cfg(steps=3, save_every=100, time_limit_s=0.0), out)
    assert res.steps == 1 and not res.finished
    assert load_checkpoint(res.checkpoint).config["finished"] is False
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 1
    # the same config without the limit resumes at step 1 and ends where an uninterrupted run ends
    res2 = run_finetune(tiny_model(), ds, small_cfg(steps=3, save_every=100), out)
    assert res2.steps == 3 and [h["step"] for h in res2.history] == [1, 2, 3] and res2.finished
    assert load_checkpoint(res2.checkpoint).config["finished"] is True
    ref = run_finetune(tiny_model(), ds, small_cfg(steps=3, save_every=100), tmp_path / "ref")
    assert [h["loss"] for h in res2.history] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)


def test_prompts_drawn_in_loader_workers_give_the_same_run(instance_dir: Path, tmp_path: Path) -> None:
    ds = InstanceFolderDataset(instance_dir)
    a = run_finetune(tiny_model(), ds, small_cfg(steps=2, num_workers=0), tmp_path / "a")
    b = run_finetune(tiny_model(), ds, small_cfg(steps=2, num_workers=2), tmp_path / "b")
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-5)


def test_decoder_checkpointing_gives_the_same_gradients() -> None:
    model = tiny_model()
    model.train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, SIZE, SIZE)
    boxes = torch.tensor(
        [[4.0, 4, 40, 40], [10, 20, 60, 50], [0, 0, 63, 63], [30, 5, 50, 25], [8, 8, 20, 30]]
    )
    index = torch.tensor([0, 1, 0, 1, 1])
    grads = []
    for chunk in (0, 2):
        model.zero_grad()
        model.set_decoder_checkpointing(chunk)
        logits, iou = model.decode(model.encode_image(x), boxes=boxes, image_index=index)
        (logits.square().mean() + iou.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("refine.") for k in grads[0])
    # same maths; chunked sums round differently in the last bits (some gradients are pure rounding
    # noise around 0), so the tolerance is relative to the largest gradient of the model
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-4, atol=1e-5 * scale)
    with pytest.raises(ValueError):
        model.set_decoder_checkpointing(-1)


def test_feature_loss_adds_its_mean_to_the_loss(instance_dir: Path, tmp_path: Path) -> None:
    """The optional image-feature term (stage 2 with distillation) adds its value to the step's loss,
    is reported as "feature" and trains what it touches."""
    seen = []

    def feature_loss(samples, feats):
        seen.append(len(samples))
        return 0.25 + 0.0 * feats["embedding"].sum()

    plain = run_finetune(
        tiny_model(), InstanceFolderDataset(instance_dir), small_cfg(steps=1), tmp_path / "a"
    )
    extra = run_finetune(
        tiny_model(),
        InstanceFolderDataset(instance_dir),
        small_cfg(steps=1),
        tmp_path / "b",
        feature_loss=feature_loss,
    )
    assert seen == [2]
    assert extra.history[0]["feature"] == pytest.approx(0.25)
    assert "feature" not in plain.history[0]
    assert extra.history[0]["loss"] == pytest.approx(plain.history[0]["loss"] + 0.25, rel=1e-5)
    # a term on the embedding alone moves the encoder even when only the encoder trains
    model = tiny_model()
    before = {k: v.clone() for k, v in model.neck.state_dict().items()}
    run_finetune(
        model,
        InstanceFolderDataset(instance_dir),
        small_cfg(steps=1, train_parts=("neck",), bce_weight=0.0, dice_weight=0.0, iou_weight=0.0),
        tmp_path / "c",
        feature_loss=lambda s, f: (f["embedding"] ** 2).mean(),
    )
    assert any(not torch.equal(before[k], v) for k, v in model.neck.state_dict().items())
