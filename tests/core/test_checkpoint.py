"""Checkpoints: our format, the authors' layout, official SAM parts, strict errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkvsam_core import CheckpointError, Predictor, build_model, load_checkpoint, save_checkpoint
from rwkvsam_core.checkpoint import LAYOUT_AUTHORS, LAYOUT_AUTHORS_STAGE1, read_config

S = 128


def _outputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, S, S, generator=g) * 255
    with torch.no_grad():
        feats = model.encode_image(model.preprocess(x))
        box_logits, box_iou = model.decode(feats, boxes=torch.tensor([[5.0, 8.0, 90.0, 100.0]]))
        pt_logits, _ = model.decode(
            feats, point_coords=torch.tensor([[[40.0, 50.0]]]), point_labels=torch.tensor([[1]])
        )
    return feats["embedding"], box_logits, box_iou, pt_logits


def _randomise(model):
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_our_format_round_trip(tmp_path):
    model = _randomise(build_model("rwkvsam_t", device="cpu", image_size=S))
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"trained_on": "unit test"})
    ckpt = load_checkpoint(path)
    assert ckpt.config["name"] == "rwkvsam_t" and ckpt.config["image_size"] == S
    assert ckpt.config["trained_on"] == "unit test" and ckpt.config["format_version"] == 1
    loaded = build_model("rwkvsam_t", checkpoint=path, device="cpu")
    assert loaded.image_size == S  # taken from the checkpoint
    for a, b in zip(_outputs(model), _outputs(loaded), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="rwkvsam_t model, not rwkvsam_s"):
        build_model("rwkvsam_s", checkpoint=path, device="cpu")
    assert not list(tmp_path.glob(".tmp-*")), "temporary files must not remain"
    assert read_config(path) == ckpt.config  # the config alone, without the tensors


def test_read_config_of_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    assert read_config(tmp_path / "plain.safetensors") is None  # not our format: no config
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_config(tmp_path / "junk.safetensors")


def _to_authors_layout(model) -> dict:
    """Our state dict renamed to the authors' module structure (ARCHITECTURE.md section 4)."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("prompt_encoder."):
            key = "pe." + key[len("prompt_encoder.") :]
        elif key.startswith("mask_decoder."):
            key = "mask_decoder.mask_decoder." + key[len("mask_decoder.") :]
        elif key.startswith("refine."):
            key = "mask_decoder." + key[len("refine.") :]
        if ".spatial_mix_" in key:
            value = value.reshape(1, 1, -1)
        out[key] = value.clone()
    return {"meta": {"mmengine": "x"}, "state_dict": out}


@pytest.mark.parametrize("image_size", [S, 256])
def test_authors_layout_loads_single_token(tmp_path, image_size):
    src = _randomise(build_model("rwkvsam_s", device="cpu", image_size=image_size, decoder_mode="single"))
    raw = _to_authors_layout(src)
    assert "mask_decoder.mask_decoder.output_hypernetworks_mlps.0.layers.0.weight" in raw["state_dict"]
    assert "mask_decoder.hr_feat_proj.0.weight" in raw["state_dict"]
    assert raw["state_dict"]["backbone.layers.0.attn.spatial_mix_k"].shape == (1, 1, 384)
    path = tmp_path / "iter_10000.pth"
    torch.save(raw, path)
    assert load_checkpoint(path).layout == LAYOUT_AUTHORS
    model = build_model("rwkvsam_s", checkpoint=path, device="cpu", image_size=image_size)
    assert model.decoder_mode == "single"
    if image_size == S:
        for a, b in zip(_outputs(src), _outputs(model), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_authors_layout_errors_name_keys(tmp_path):
    raw = _to_authors_layout(
        build_model("rwkvsam_t", device="cpu", image_size=S, decoder_mode="single", pretrained=False)
    )
    sd = raw["state_dict"]
    del sd["backbone.layers.3.attn.key.weight"]
    sd["backbone.pos_embed"] = torch.zeros(1, 64, 192)
    sd["neck.out_proj.0.weight"] = torch.zeros(256, 100, 1, 1)
    torch.save(raw, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        build_model("rwkvsam_t", checkpoint=tmp_path / "bad.pth", device="cpu")
    msg = str(err.value)
    assert "missing keys: backbone.layers.3.attn.key.weight" in msg
    assert "unexpected keys: backbone.pos_embed" in msg
    assert (
        "mis-shaped keys: neck.out_proj.0.weight: checkpoint (256, 100, 1, 1) vs model (256, 192, 1, 1)"
        in msg
    )


def test_authors_stage1_loads_backbone_and_neck(tmp_path):
    src = _randomise(build_model("rwkvsam_t", device="cpu", image_size=S))
    sd = {
        ("backbone_student." + k[len("backbone.") :])
        if k.startswith("backbone.")
        else ("neck_student." + k[len("neck.") :]): v
        for k, v in src.state_dict().items()
        if k.startswith(("backbone.", "neck."))
    }
    sd["backbone_teacher.patch_embed.proj.weight"] = torch.zeros(3)
    torch.save({"state_dict": sd}, tmp_path / "stage1.pth")
    assert load_checkpoint(tmp_path / "stage1.pth").layout == LAYOUT_AUTHORS_STAGE1
    model = build_model("rwkvsam_t", checkpoint=tmp_path / "stage1.pth", device="cpu", image_size=S)
    torch.testing.assert_close(_outputs(model)[0], _outputs(src)[0], rtol=0, atol=0)


def test_official_sam_parts_into_rwkvsam(tmp_path):
    sam = _randomise(build_model("sam_vit_b", device="cpu", image_size=64))
    torch.save(sam.state_dict(), tmp_path / "sam_vit_b.pth")
    model = build_model("rwkvsam_t", checkpoint=tmp_path / "sam_vit_b.pth", device="cpu", image_size=64)
    for key, value in sam.state_dict().items():
        if key.startswith(("prompt_encoder.", "mask_decoder.")):
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_model("rwkvsam_t", checkpoint=tmp_path / "junk.pth", device="cpu")
    with pytest.raises(CheckpointError, match="not found"):
        build_model("rwkvsam_t", checkpoint=tmp_path / "missing.pth", device="cpu")
    torch.save({"foo.bar": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="unrecognised"):
        build_model("rwkvsam_t", checkpoint=tmp_path / "other.pth", device="cpu")


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        build_model("rwkvsam_t", device="cpu", image_size=64, pretrained=False)


def test_predictor_on_loaded_checkpoint(tmp_path):
    model = _randomise(build_model("rwkvsam_t", device="cpu", image_size=S))
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    img = np.random.default_rng(0).integers(0, 255, (100, 80, 3), dtype=np.uint8)
    p1, p2 = Predictor(model), Predictor(build_model("rwkvsam_t", checkpoint=path, device="cpu"))
    p1.set_image(img)
    p2.set_image(img)
    np.testing.assert_array_equal(
        p1.predict(box=np.array([3, 4, 60, 90]))[2], p2.predict(box=np.array([3, 4, 60, 90]))[2]
    )
