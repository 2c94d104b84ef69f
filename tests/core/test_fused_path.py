"""The fused inference path of the encoder (rwkvsam_core.ops.fused, modeling/fused_path) computes what
the module-by-module path computes.

The kernels are Triton kernels: on a CPU machine with Triton installed they run through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before they are decorated); without Triton
the module is skipped (CPU CI has none). Tests marked cuda run the real kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from rwkvsam_core.modeling import fused_path  # noqa: E402
from rwkvsam_core.modeling.backbone import Neck, RWKVSAMBackbone, q_shift  # noqa: E402
from rwkvsam_core.ops import fused  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _randomise(module: torch.nn.Module) -> None:
    """Random LayerNorm affines, token mixes and layer scales of order one, so that every term of
    the residual updates and every mix matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "mix" in name or "layer_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 - 0.25)


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("c", [3, 20, 64, 130])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_rows_matches_torch(c, dtype):
    x = torch.randn(3, 7, c, device=DEV).to(dtype)
    w, b = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
    y, same = fused.layer_norm_rows(x, w, b, 1e-6, out_dtype=torch.float32)
    assert same is x
    ref = F.layer_norm(x.float(), (c,), w, b, 1e-6)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    y, _ = fused.layer_norm_rows(x, w, b, 1e-6, gelu=True)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y, F.gelu(ref).to(dtype), atol=1e-2 if dtype == torch.bfloat16 else 2e-5, rtol=1e-2
    )


@pytest.mark.parametrize("gated", [False, True])
def test_layer_norm_rows_residual_update(gated):
    c = 24
    x = torch.randn(2, 9, c, device=DEV)
    d = torch.randn(2, 9, c, device=DEV).bfloat16()
    g = torch.randn(2, 9, c, device=DEV).bfloat16() if gated else None
    s = torch.randn(c, device=DEV)
    w, b = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
    y, x_new = fused.layer_norm_rows(x, w, b, 1e-6, delta=d, gate=g, scale=s)
    upd = d.float() * (torch.sigmoid(g.float()) if gated else 1.0)
    ref_x = x + s * upd
    torch.testing.assert_close(x_new, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, F.layer_norm(ref_x, (c,), w, b, 1e-6), atol=3e-5, rtol=3e-5)
    assert x_new.dtype == torch.float32 and y.dtype == torch.float32


@pytest.mark.parametrize(("c", "h", "w"), [(20, 5, 7), (22, 4, 3), (3, 3, 3), (64, 1, 6), (12, 6, 1)])
def test_vrwkv_prep_matches_shift_and_mix(c, h, w):
    b = 2
    x = torch.randn(b, h * w, c, device=DEV)
    d = torch.randn(b, h * w, c, device=DEV)
    s = torch.randn(c, device=DEV)
    lw, lb = torch.randn(c, device=DEV), torch.randn(c, device=DEV)
    mixes = torch.rand(3, c, device=DEV)
    out, x_new = fused.vrwkv_prep(x, lw, lb, 1e-6, mixes, h, w, delta=d, scale=s)
    ref_x = x + s * d
    z = F.layer_norm(ref_x, (c,), lw, lb, 1e-6)
    zz = q_shift(z.cpu(), h, w).to(DEV)
    ref = torch.stack([torch.lerp(zz, z, m) for m in mixes]).view(3, b * h * w, c)
    torch.testing.assert_close(x_new, ref_x, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=3e-5)


def test_vrwkv_prep_bf16_output_and_no_delta():
    c, h, w = 16, 4, 4
    x = torch.randn(1, h * w, c, device=DEV).bfloat16()
    lw, lb = torch.ones(c, device=DEV), torch.zeros(c, device=DEV)
    mixes = torch.rand(2, c, device=DEV)
    out, same = fused.vrwkv_prep(x, lw, lb, 1e-6, mixes, h, w, out_dtype=torch.bfloat16)
    assert same is x and out.dtype == torch.bfloat16 and out.shape == (2, h * w, c)
    z = F.layer_norm(x.float(), (c,), lw, lb, 1e-6)
    zz = q_shift(z.cpu(), h, w).to(DEV)
    ref = torch.stack([torch.lerp(zz, z, m) for m in mixes]).view(2, h * w, c)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=1e-2)


def test_bad_inputs_raise():
    x = torch.randn(1, 12, 8, device=DEV)
    w = torch.ones(8, device=DEV)
    with pytest.raises(ValueError, match="grid"):
        fused.vrwkv_prep(x, w, w, 1e-6, torch.rand(3, 8, device=DEV), 5, 5)
    with pytest.raises(ValueError, match="mixes"):
        fused.vrwkv_prep(x, w, w, 1e-6, torch.rand(3, 7, device=DEV), 3, 4)
    with pytest.raises(ValueError, match="scale"):
        fused.layer_norm_rows(x, w, w, 1e-6, delta=x)
    with pytest.raises(ValueError, match="need a delta"):
        fused.layer_norm_rows(x, w, w, 1e-6, scale=w)
    with pytest.raises(ValueError, match="contiguous"):
        fused.layer_norm_rows(torch.randn(8, 12, device=DEV).t(), w, w, 1e-6)


# --------------------------------------------------------------------------- the model's path


def _backbone_and_neck(dims=(8, 16, 32), depth=3):
    torch.manual_seed(0)
    bb = RWKVSAMBackbone(dims, depth=depth).to(DEV).eval()
    neck = Neck(dims[2], 32).to(DEV).eval()
    _randomise(bb)
    _randomise(neck)
    return bb, neck


def _forward(bb, neck, x, fast: bool, monkeypatch):
    # TF32 convolutions would turn the paths' 1e-7 differences into 1e-3 ones on a GPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(fused, "fast_path", lambda t: fast and not torch.is_grad_enabled())
    with torch.no_grad():
        x_hr, x_mr, feat = bb(x)
        return x_hr, x_mr, feat, neck(feat)


@pytest.mark.parametrize("size", [(96, 80), (64, 64)])
def test_encoder_fused_matches_module_path_fp32(size, monkeypatch):
    bb, neck = _backbone_and_neck()
    x = torch.randn(2, 3, *size, device=DEV)
    ref = _forward(bb, neck, x, False, monkeypatch)
    out = _forward(bb, neck, x, True, monkeypatch)
    for name, a, r in zip(("x_hr", "x_mr", "x", "embedding"), out, ref, strict=True):
        assert a.shape == r.shape and a.dtype == r.dtype, name
        torch.testing.assert_close(a, r, atol=5e-5, rtol=5e-5, msg=name)


@pytest.mark.parametrize(
    ("cin", "cout", "stride", "size"),
    [(8, 8, 2, (13, 10)), (8, 16, 2, (12, 9)), (16, 16, 1, (11, 6)), (8, 12, 1, (7, 7))],
)
def test_mbconv_strips_match_whole(cin, cout, stride, size, monkeypatch):
    """Large images run the MBConv in horizontal strips (bounded memory): same result as whole."""
    from rwkvsam_core.modeling.backbone import MBConv

    block = MBConv(cin, cout, stride=stride).to(DEV).eval()
    _randomise(block)
    x = torch.randn(2, cin, *size, device=DEV).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    with torch.no_grad():
        ref = block(x)
        whole = fused_path.mbconv(block, x)
        monkeypatch.setattr(fused_path, "MBCONV_STRIP_BYTES", 2 * 4 * size[1] * 4 * cout)  # ~2 input rows
        strips = fused_path.mbconv(block, x)
    assert whole.shape == strips.shape == ref.shape
    torch.testing.assert_close(strips, whole, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(whole, ref, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("channels_last", [True, False])
def test_layer_norm_2d_module_fused_on_channels_last(channels_last, monkeypatch):
    """LayerNorm2d anywhere in the model (refine module, mask decoder) takes the fused pass on
    channels-last inputs and the module path otherwise; same result and dtype either way."""
    from rwkvsam_core.modeling.common import LayerNorm2d

    norm = LayerNorm2d(24).to(DEV)
    _randomise(torch.nn.ModuleDict({"norm": norm}))
    x = torch.randn(2, 24, 5, 7, device=DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = norm(x)
        monkeypatch.setattr(fused, "fast_path", lambda t: not torch.is_grad_enabled())
        calls = []
        real = fused.layer_norm_rows
        monkeypatch.setattr(fused, "layer_norm_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = norm(x)
    assert bool(calls) == channels_last
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_fused_weights_follow_parameter_changes(monkeypatch):
    """The fused path caches its stacked weights; an in-place update (an optimiser step, a
    load_state_dict) must be seen by the next forward."""
    bb, neck = _backbone_and_neck()
    x = torch.randn(1, 3, 64, 64, device=DEV)
    _forward(bb, neck, x, True, monkeypatch)
    with torch.no_grad():
        bb.layers[1].attn.key.weight.mul_(-2.0)
        bb.layers[2].mlp.value.weight.add_(0.1)
        bb.layers[0].attn.spatial_decay.add_(1.0)
    ref = _forward(bb, neck, x, False, monkeypatch)
    out = _forward(bb, neck, x, True, monkeypatch)
    torch.testing.assert_close(out[3], ref[3], atol=5e-5, rtol=5e-5)


def test_training_keeps_the_module_path(monkeypatch):
    """With gradients recorded the fused kernels (no autograd) are never used."""
    bb, neck = _backbone_and_neck()
    called = []
    monkeypatch.setattr(fused, "fast_path", lambda t: called.append(1) or (not torch.is_grad_enabled()))
    monkeypatch.setattr(fused_path, "vrwkv_stack", lambda *a, **k: pytest.fail("fused path under grad"))
    x = torch.randn(1, 3, 64, 64, device=DEV)
    feat = neck(bb(x)[2])
    feat.sum().backward()
    assert called and bb.layers[0].attn.key.weight.grad is not None


def test_status_line(monkeypatch):
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert fused.status() == f"off: {fused.ENV_SWITCH}=0"
    monkeypatch.delenv(fused.ENV_SWITCH)
    assert fused.status().startswith("on for CUDA inference")


def test_fast_path_switch(monkeypatch):
    t = torch.zeros(1, device="meta")
    monkeypatch.setenv(fused.ENV_SWITCH, "0")
    assert not fused.fast_path(t)
    monkeypatch.delenv(fused.ENV_SWITCH)
    with torch.no_grad():
        assert not fused.fast_path(torch.zeros(1))  # CPU tensors take the module path


@pytest.mark.cuda
@pytest.mark.parametrize("size", [256, 320])
def test_rwkvsam_s_encoder_fused_on_gpu(size, monkeypatch):
    """The real kernels at the model's widths. float32: the fused path matches the module path.
    bf16 autocast: the fused path is no further from the float32 result than the module path is
    (each rounds differently; the fused kernels round less often)."""
    from rwkvsam_core import build_model

    model = build_model("rwkvsam_s", device="cuda", image_size=size, pretrained=False).eval()
    _randomise(model.backbone)
    x = torch.randn(1, 3, size, size, device="cuda")

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    def embed(flag: str, bf16: bool) -> torch.Tensor:
        monkeypatch.setenv(fused.ENV_SWITCH, flag)
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            return model.neck(model.backbone(x)[2]).float()

    ref32, out32 = embed("0", False), embed("1", False)
    torch.testing.assert_close(out32, ref32, atol=1e-3, rtol=1e-3)
    ref16, out16 = embed("0", True), embed("1", True)
    err_module = ((ref16 - ref32).norm() / ref32.norm()).item()
    err_fused = ((out16 - ref32).norm() / ref32.norm()).item()
    assert err_fused < 1.25 * err_module + 1e-3, (err_fused, err_module)


@pytest.mark.cuda
def test_shipped_weights_on_gpu_fused_masks_match_module_path(monkeypatch):
    """What users get on a GPU: the Predictor with the shipped weights takes the fused path by
    default; its masks agree with the module path's and still segment (see test_shipped_weights)."""
    import numpy as np
    from test_shipped_weights import _ellipses

    from rwkvsam_core import Predictor, build_model

    model = build_model("rwkvsam_t", device="cuda")
    image, masks = _ellipses()
    preds = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(fused.ENV_SWITCH, flag)
        p = Predictor(model)
        p.set_image(image)
        preds[flag] = []
        for m in masks:
            r, c = np.nonzero(m)
            box = np.array([c.min(), r.min(), c.max() + 1, r.max() + 1])
            preds[flag].append(p.predict(box=box, multimask_output=False)[0][0])
    for a, b, m in zip(preds["1"], preds["0"], masks, strict=True):
        assert (a & b).sum() / (a | b).sum() > 0.98
        assert (a & m).sum() / (a | m).sum() > 0.9
