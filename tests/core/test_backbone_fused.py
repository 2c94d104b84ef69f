"""The backbone's fused forward (issue 3: fewer kernels) computes what the plain formulation did.

The reference below is the VRWKV code as it was before the fusion (Q-Shift as zero-fill + four
slice copies, one addcmul per token mix, one linear per projection, layer scale as mul + add),
run on the same modules' parameters.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from rwkvsam_core import build_model
from rwkvsam_core.modeling.backbone import VRWKVBlock, q_shift, q_shift_plan
from rwkvsam_core.ops import bi_wkv


def ref_q_shift(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    b, t, c = x.shape
    q = c // 4
    grid = x.view(b, height, width, c)
    out = torch.zeros_like(grid)
    out[:, :, 1:, 0:q] = grid[:, :, :-1, 0:q]
    out[:, :, :-1, q : 2 * q] = grid[:, :, 1:, q : 2 * q]
    out[:, 1:, :, 2 * q : 3 * q] = grid[:, :-1, :, 2 * q : 3 * q]
    out[:, :-1, :, 3 * q : 4 * q] = grid[:, 1:, :, 3 * q : 4 * q]
    if 4 * q < c:
        out[..., 4 * q :] = grid[..., 4 * q :]
    return out.view(b, t, c)


def ref_spatial_mix(m, x, height, width):
    t = x.shape[1]
    xx = ref_q_shift(x, height, width)
    diff = x - xx
    k = m.key(torch.addcmul(xx, diff, m.spatial_mix_k))
    v = m.value(torch.addcmul(xx, diff, m.spatial_mix_v))
    r = m.receptance(torch.addcmul(xx, diff, m.spatial_mix_r))
    y = bi_wkv(m.spatial_decay / t, m.spatial_first / t, k, v)
    return m.output(torch.sigmoid(r) * y)


def ref_channel_mix(m, x, height, width):
    xx = ref_q_shift(x, height, width)
    diff = x - xx
    k = torch.relu(m.key(torch.addcmul(xx, diff, m.spatial_mix_k))).square()
    r = m.receptance(torch.addcmul(xx, diff, m.spatial_mix_r))
    return torch.sigmoid(r) * m.value(k)


def ref_block(blk, x, height, width):
    x = x + blk.layer_scale_1 * ref_spatial_mix(blk.attn, blk.norm1(x), height, width)
    return x + blk.layer_scale_2 * ref_channel_mix(blk.mlp, blk.norm2(x), height, width)


def ref_backbone(bb, x):
    x = bb.stem(x.contiguous(memory_format=torch.channels_last))
    x_hr = bb.conv_stages[0](x)
    x_mr = bb.conv_stages[1](x_hr)
    x = bb.conv_final_pool(x_mr)
    b, c, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    for layer in bb.layers:
        tokens = ref_block(layer, tokens, h, w)
    tokens = bb.final_norm(tokens)
    return x_hr, x_mr, tokens.view(b, h, w, c).permute(0, 3, 1, 2)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Generic values for the mixes and layer scales (their inits are structured: 0, 1, 1e-2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "mix" in name:
                p.copy_(torch.rand(p.shape, generator=g))
            elif "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)


@pytest.mark.parametrize(
    "h,w,c", [(1, 1, 8), (1, 7, 12), (5, 1, 16), (3, 4, 8), (7, 9, 10), (6, 13, 3), (4, 5, 2), (11, 17, 384)]
)
def test_q_shift_matches_slice_copies(h, w, c):
    x = torch.randn(2, h * w, c)
    expected = ref_q_shift(x, h, w)
    assert torch.equal(q_shift(x, h, w), expected)
    # the row gather (what GPUs run), with and without a shared plan, and its gradient
    assert torch.equal(q_shift(x, h, w, gather=True), expected)
    if c % 4 == 0:
        assert torch.equal(q_shift(x, h, w, q_shift_plan(h, w, x.device), gather=True), expected)
    xg = x.double().requires_grad_()
    xs = x.double().requires_grad_()
    g = torch.randn(2, h * w, c, dtype=torch.float64)
    (q_shift(xg, h, w, gather=True) * g).sum().backward()
    (ref_q_shift(xs, h, w) * g).sum().backward()
    assert torch.equal(xg.grad, xs.grad)


@pytest.mark.parametrize("h,w", [(1, 1), (1, 6), (5, 3), (8, 8), (7, 11)])
def test_block_forward_and_gradients_match(h, w):
    torch.manual_seed(0)
    blk = VRWKVBlock(16, layer_id=3, num_layers=14).double()
    _randomise(blk, 1)
    x = torch.randn(2, h * w, 16, dtype=torch.float64, requires_grad=True)
    out = blk(x, h, w)
    ref = ref_block(blk, x, h, w)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    params = [x, *blk.parameters()]
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(ref, params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "name,size",
    [
        ("rwkvsam_t", (64, 64)),
        ("rwkvsam_t", (100, 130)),  # not a multiple of 16: grids 7 x 9
        ("rwkvsam_t", (224, 160)),  # non-square grid 14 x 10
        ("rwkvsam_s", (96, 208)),  # 6 x 13 tokens at the S widths
        ("rwkvsam_s", (256, 256)),
    ],
)
def test_backbone_matches_reference_float32(name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model(name, device="cpu", image_size=256, pretrained=False).eval()
    _randomise(model.backbone, 2)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.backbone(x)
        want = ref_backbone(model.backbone, x)
        emb_got, emb_want = model.neck(got[2]), model.neck(want[2])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])  # conv stages untouched
    assert (got[2] - want[2]).abs().max().item() < 1e-5
    assert (emb_got - emb_want).abs().max().item() < 1e-5


def test_grad_checkpointing_passes_the_plan():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model("rwkvsam_t", device="cpu", image_size=64, pretrained=False)
    x = torch.randn(1, 3, 80, 48)
    plain = model.backbone(x)[2]
    model.backbone.set_grad_checkpointing(True)
    ckpt = model.backbone(x)[2]
    ckpt.sum().backward()
    assert torch.equal(plain, ckpt)
    assert all(p.grad is not None for p in model.backbone.layers.parameters())
