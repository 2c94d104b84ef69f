"""Model structure: variants, shapes, gradients, checkpointing, decoder modes."""

from __future__ import annotations

import pytest
import torch

from rwkvsam_core import MODEL_NAMES, build_model
from rwkvsam_core.build import MODEL_BUILDERS
from rwkvsam_core.modeling.backbone import q_shift

RWKV_VARIANTS = ["rwkvsam_t", "rwkvsam_s", "rwkvsam_b"]
PAPER_BACKBONE_PARAMS = {"rwkvsam_t": 5.0e6, "rwkvsam_s": 19.7e6, "rwkvsam_b": 78.7e6}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", RWKV_VARIANTS)
def test_backbone_parameter_count_matches_paper(name):
    with torch.device("meta"):
        model = MODEL_BUILDERS[name](name, 1024, "multimask")
    n = _count(model.backbone)
    assert abs(n - PAPER_BACKBONE_PARAMS[name]) / PAPER_BACKBONE_PARAMS[name] < 0.03, n


def test_model_names():
    assert set(MODEL_NAMES) == {"rwkvsam_t", "rwkvsam_s", "rwkvsam_b", "sam_vit_b", "sam_vit_l", "sam_vit_h"}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("rwkvsam_xl")


@pytest.mark.parametrize("image_size", [64, 256, 272, 512])
def test_shapes_follow_image_size(image_size):
    model = build_model("rwkvsam_t", device="cpu", image_size=image_size)
    x = model.preprocess(torch.rand(1, 3, image_size, image_size // 2) * 255)
    assert x.shape == (1, 3, image_size, image_size)
    assert (x[..., image_size // 2 :] == 0).all(), "padding must be zero after normalisation"
    with torch.no_grad():
        feats = model.encode_image(x)
        assert feats["embedding"].shape == (1, 256, image_size // 16, image_size // 16)
        assert feats["refine"].shape == (1, 64, image_size // 4, image_size // 4)
        boxes = torch.tensor([[4.0, 4.0, image_size / 2, image_size / 2]])
        logits, iou = model.decode(feats, boxes=boxes, multimask_output=True)
    assert logits.shape == (1, 3, image_size // 4, image_size // 4) and iou.shape == (1, 3)


def test_bad_image_size():
    with pytest.raises(ValueError, match="multiple of 16"):
        build_model("rwkvsam_t", device="cpu", image_size=1000)


def _prompts(s: int, n: int = 2):
    g = torch.Generator().manual_seed(1)
    coords = torch.rand(n, 3, 2, generator=g) * s
    labels = torch.tensor([[1, 0, 1]] * n)
    boxes = torch.tensor([[2.0, 3.0, s * 0.6, s * 0.7]] * n)
    masks = torch.randn(n, 1, s // 4, s // 4, generator=g)
    return dict(point_coords=coords, point_labels=labels, boxes=boxes, mask_input=masks)


@pytest.mark.parametrize("name", RWKV_VARIANTS + ["sam_vit_b"])
def test_forward_gradients_and_checkpointing(name):
    s = 128 if name.startswith("rwkvsam") else 64
    model = build_model(name, device="cpu", image_size=s).train()
    x = model.preprocess(torch.rand(2, 3, s, s) * 255)
    prompts = _prompts(s)
    index = torch.tensor([0, 1])
    logits, iou = model.decode(model.encode_image(x), image_index=index, multimask_output=True, **prompts)
    assert torch.isfinite(logits).all() and torch.isfinite(iou).all()
    # the second call uses mask token 0, the point padding and the no-mask embedding, so that
    # together the two calls reach every parameter
    points_only = {k: prompts[k] for k in ("point_coords", "point_labels")}
    logits_single, iou_single = model.decode(
        model.encode_image(x), image_index=index, multimask_output=False, **points_only
    )
    loss = (
        logits.square().mean()
        + iou.square().mean()
        + logits_single.square().mean()
        + iou_single.square().mean()
    )
    loss.backward()
    no_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not no_grad, f"parameters without gradient: {no_grad[:10]}"
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    model.set_grad_checkpointing(True)
    logits2, iou2 = model.decode(model.encode_image(x), image_index=index, multimask_output=True, **prompts)
    l1, i1 = model.decode(model.encode_image(x), image_index=index, multimask_output=False, **points_only)
    (logits2.square().mean() + iou2.square().mean() + l1.square().mean() + i1.square().mean()).backward()
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_single_token_mode():
    model = build_model("rwkvsam_t", device="cpu", image_size=128, decoder_mode="single", pretrained=False)
    keys = model.state_dict().keys()
    assert any(k.startswith("mask_decoder.output_hypernetworks_mlps.0.") for k in keys)
    assert not any(k.startswith("mask_decoder.output_hypernetworks_mlps.1.") for k in keys)
    assert model.mask_decoder.mask_tokens.weight.shape[0] == 4
    with torch.no_grad():
        feats = model.encode_image(model.preprocess(torch.rand(1, 3, 128, 128) * 255))
        logits, iou = model.decode(feats, boxes=torch.tensor([[1.0, 1.0, 60.0, 60.0]]), multimask_output=True)
    assert logits.shape == (1, 1, 32, 32) and iou.shape == (1, 1)


def test_single_token_ignores_other_mask_tokens():
    """In single-token mode the transformer sees only [iou, mask_0, prompts]: tokens 1-3 have no effect."""
    model = build_model("rwkvsam_t", device="cpu", image_size=64, decoder_mode="single", pretrained=False)
    with torch.no_grad():
        feats = model.encode_image(model.preprocess(torch.rand(1, 3, 64, 64) * 255))
        box = torch.tensor([[1.0, 1.0, 40.0, 40.0]])
        a, _ = model.decode(feats, boxes=box)
        model.mask_decoder.mask_tokens.weight[1:].normal_()
        b, _ = model.decode(feats, boxes=box)
        model.mask_decoder.mask_tokens.weight[0].normal_()
        c, _ = model.decode(feats, boxes=box)
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-4


def test_batched_prompts_equal_one_by_one():
    model = build_model("rwkvsam_t", device="cpu", image_size=128)
    with torch.no_grad():
        feats = model.encode_image(model.preprocess(torch.rand(1, 3, 128, 96) * 255))
        boxes = torch.tensor([[1.0, 2.0, 50.0, 60.0], [30.0, 20.0, 90.0, 120.0], [0.0, 0.0, 95.0, 127.0]])
        batched, iou = model.decode(feats, boxes=boxes)
        for i in range(3):
            one, iou1 = model.decode(feats, boxes=boxes[i : i + 1])
            torch.testing.assert_close(one, batched[i : i + 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(iou1, iou[i : i + 1], rtol=1e-4, atol=1e-5)


def test_refine_split_equals_concatenated_convolution():
    """The per-image/per-prompt split of the refine module is the concatenated conv of the spec."""
    model = build_model("rwkvsam_s", device="cpu", image_size=64)
    r = model.refine
    x_hr, x_mr = torch.randn(1, 64, 16, 16), torch.randn(1, 128, 8, 8)
    f_sam = torch.randn(3, 32, 16, 16)
    with torch.no_grad():
        for p in r.parameters():
            p.normal_(0, 0.2)
        fused = r.fuse(f_sam, r.image_term(x_hr, x_mr))
        hr, mr = r.hr_feat_proj(x_hr), r.mr_feat_proj(x_mr)
        cat = torch.cat([f_sam, mr.expand(3, -1, -1, -1), hr.expand(3, -1, -1, -1)], dim=1)
        expected = r.mix_feat_proj(cat) + f_sam
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_q_shift_directions():
    h, w, c = 3, 4, 8
    grid = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1).expand(1, h, w, c).clone()
    out = q_shift(grid.view(1, h * w, c), h, w).view(h, w, c)
    g = grid[0, :, :, 0]
    assert torch.equal(out[:, 1:, 0], g[:, :-1]) and (out[:, 0, 0] == 0).all()  # left neighbour
    assert torch.equal(out[:, :-1, 2], g[:, 1:]) and (out[:, -1, 2] == 0).all()  # right neighbour
    assert torch.equal(out[1:, :, 4], g[:-1, :]) and (out[0, :, 4] == 0).all()  # above
    assert torch.equal(out[:-1, :, 6], g[1:, :]) and (out[-1, :, 6] == 0).all()  # below


def test_fancy_init_values():
    model = build_model("rwkvsam_t", device="cpu", image_size=64, pretrained=False)
    c = 192
    i = torch.arange(c, dtype=torch.float64)
    for layer_id in (0, 5, 13):
        attn = model.backbone.layers[layer_id].attn
        r01, r10 = layer_id / 13, 1 - layer_id / 14
        decay = -5 + 8 * (i / (c - 1)) ** (0.7 + 1.3 * r01)
        torch.testing.assert_close(attn.spatial_decay.double(), decay, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(
            attn.spatial_mix_v.double(), (i / c) ** r10 + 0.3 * r01, rtol=1e-6, atol=1e-6
        )
        torch.testing.assert_close(attn.spatial_mix_r.double(), (i / c) ** (0.5 * r10), rtol=1e-6, atol=1e-6)
    first = model.backbone.layers[0].attn.spatial_first
    assert torch.allclose(
        first[:3].double(),
        torch.log(torch.tensor(0.3, dtype=torch.float64))
        + torch.tensor([0.0, 0.5, -0.5], dtype=torch.float64),
    )
    assert torch.equal(model.backbone.layers[3].layer_scale_1, torch.full((c,), 1e-2))


def test_patch_upsample_equals_transposed_convolution():
    import torch.nn.functional as F

    from rwkvsam_core.modeling.common import PatchUpsample2d

    m = PatchUpsample2d(7, 5)
    x = torch.randn(2, 7, 3, 4, requires_grad=True)
    ref = F.conv_transpose2d(x, m.weight, m.bias, stride=2)
    out = m(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    assert set(m.state_dict()) == {"weight", "bias"}


@pytest.mark.parametrize("name", RWKV_VARIANTS)
def test_padded_input_gives_finite_gradients(name):
    """Zero padding of a non-square image must not blow up LayerNorm2d gradients (regression)."""
    model = build_model(name, device="cpu", image_size=128).train()
    x = model.preprocess(torch.rand(1, 3, 80, 128) * 255)  # 48 padded rows
    emb = model.encode_image(x)["embedding"]
    ((emb - torch.randn_like(emb)) ** 2).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], float("inf"))
    assert torch.isfinite(norm) and norm < 1e3, norm
