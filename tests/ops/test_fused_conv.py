"""Fused Triton kernels of the convolutional backbone stages against plain PyTorch references.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1 must be
set before the kernels are decorated, hence before the module import below); shapes stay tiny because
the interpreter is slow. On a CUDA machine the same tests run the compiled kernels on the GPU, and the
``cuda`` test checks the model-sized shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rwkvsam_core.ops.fused_conv import (  # noqa: E402  (after the interpreter switch)
    MAX_LN_CHANNELS,
    add_channel_bias_,
    avg_pool3x3s2,
    conv3x3_few_channels,
    depthwise3x3,
    pointwise_conv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Relative error allowed per dtype of the stored result / GEMM operands.
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
#: The interpreter rounds float32 -> bfloat16 towards zero (GPUs round to nearest even), so a
#: kernel-side bfloat16 rounding costs up to one ulp (2^-8) there instead of half of one.
BF16_ROUNDING_TOL = 1e-3 if DEVICE == "cuda" else 1e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _randn(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=DEVICE, dtype=dtype)


def _pointwise_reference(x, weight, bias, ln, gelu, residual):
    """float64 reference; x and the normalised rows are rounded to weight.dtype as the kernel does."""
    xr = x.double()
    if ln is not None:
        xr = F.layer_norm(xr, (x.shape[1],), ln[0].double(), ln[1].double(), ln[2])
    xr = xr.to(weight.dtype).double()
    y = F.linear(xr, weight.double(), None if bias is None else bias.double())
    if gelu:
        y = F.gelu(y)
    if residual is not None:
        y = y + residual.double()
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("M", "K", "N", "use_ln", "gelu", "use_res", "use_bias"),
    [
        (131, 24, 40, True, True, False, True),  # odd sizes, pre-norm + GELU (MBConv conv1)
        (70, 48, 20, False, False, True, True),  # conv3 + shortcut
        (37, 80, 16, False, True, False, False),  # K over two K steps, no bias
        (33, 96, 130, True, False, True, False),  # N over two N blocks
    ],
)
def test_pointwise_conv_matches_torch(dtype, M, K, N, use_ln, gelu, use_res, use_bias):
    x = _randn(M, K, dtype=dtype, scale=2.0) + 0.5
    weight = _randn(N, K, dtype=dtype, scale=K**-0.5)
    bias = _randn(N, dtype=dtype) if use_bias else None
    ln = (_randn(K, dtype=dtype) + 1.0, _randn(K, dtype=dtype), 1e-6) if use_ln else None
    residual = _randn(M, N, dtype=dtype) if use_res else None
    out = pointwise_conv(x, weight, bias, ln=ln, gelu=gelu, residual=residual)
    assert out.shape == (M, N) and out.dtype == dtype and out.device == x.device
    ref = _pointwise_reference(x, weight, bias, ln, gelu, residual)
    assert _rel(out, ref) < TOL[dtype]


def test_pointwise_conv_bf16_operands_fp32_output_and_strided_weight():
    """Autocast-style call: float32 activations and LN parameters, bfloat16 weight (compute dtype) given
    as a non-contiguous view, float32 output."""
    M, K, N = 50, 32, 48
    x = _randn(M, K)
    weight = _randn(K, N, dtype=torch.bfloat16, scale=K**-0.5).t()
    bias = _randn(N)
    ln = (_randn(K) + 1.0, _randn(K), 1e-6)
    residual = _randn(M, N, dtype=torch.bfloat16)
    out = pointwise_conv(x, weight, bias, ln=ln, gelu=True, residual=residual, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    ref = _pointwise_reference(x, weight, bias, ln, True, residual)
    assert _rel(out, ref) < BF16_ROUNDING_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pointwise_conv_relu_square_epilogue(dtype):
    """The VRWKV channel mix's key: relu(x @ W^T) ** 2 with W given as the transposed view the fused
    path keeps, K spanning several K tiles; gelu and relu_square together are refused."""
    M, K, N = 70, 160, 96
    x = _randn(M, K, dtype=dtype)
    weight = _randn(K, N, dtype=dtype, scale=K**-0.5).t()
    out = pointwise_conv(x, weight, relu_square=True)
    assert out.dtype == dtype
    ref = torch.relu(x.double() @ weight.double().t()).square()
    assert _rel(out, ref) < TOL[dtype]
    assert (out >= 0).all()
    with pytest.raises(ValueError, match="choose one"):
        pointwise_conv(x, weight, gelu=True, relu_square=True)


def test_pointwise_conv_layer_norm_of_constant_rows_is_its_bias():
    """Zero variance: the rows normalise to the LN bias (eps keeps rstd finite). Not bit-exact: on a
    GPU the mean's division need not be correctly rounded (it failed at atol 1e-6 on an H200), and
    a residue of one ulp of 3.0 (2.4e-7) in x - mean is multiplied by rstd = 1/sqrt(eps) = 1000."""
    M, K, N = 20, 24, 16
    x = torch.full((M, K), 3.0, device=DEVICE)
    ln_b = _randn(K)
    weight = torch.eye(N, K, device=DEVICE)
    out = pointwise_conv(x, weight, ln=(_randn(K), ln_b, 1e-6))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ln_b[:N].expand(M, N), rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("H", "W", "C", "stride"), [(9, 7, 20, 1), (9, 7, 20, 2), (6, 5, 24, 2), (1, 1, 4, 2)]
)
def test_depthwise3x3_matches_conv2d(dtype, H, W, C, stride):
    B = 2
    x = _randn(B, H, W, C, dtype=dtype)
    weight = _randn(C, 1, 3, 3, scale=0.5)
    bias = _randn(C)
    out = depthwise3x3(x, weight, bias, stride)
    ref = F.gelu(
        F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), bias.double(), stride, 1, groups=C)
    ).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("config", [None, (1, 8, 16, 4), (3, 4, 32, 2), (5, 16, 16, 4)])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise3x3_programs_walking_several_row_blocks(config, stride):
    """Each program walks ROWS output rows, carrying partial sums from one input row to the next:
    images taller than one row block (the last one ragged), blocks that start inside the image,
    several column and channel blocks."""
    x = _randn(1, 37, 21, 40)
    weight, bias = _randn(40, 1, 3, 3, scale=0.5), _randn(40)
    out = depthwise3x3(x, weight, bias, stride, _config=config)
    ref = F.gelu(
        F.conv2d(x.double().permute(0, 3, 1, 2), weight.double(), bias.double(), stride, 1, groups=40)
    ).permute(0, 2, 3, 1)
    assert _rel(out, ref) < 1e-6


def test_depthwise3x3_from_channels_last_without_bias_or_gelu():
    """The intended call: a channels-last NCHW activation permuted to NHWC (no copy), float32 output."""
    B, C, H, W = 1, 20, 8, 9
    x_nchw = _randn(B, C, H, W, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight = _randn(C, 1, 3, 3, dtype=torch.bfloat16)
    x = x_nchw.permute(0, 2, 3, 1)
    assert x.is_contiguous()
    out = depthwise3x3(x, weight, None, 2, gelu=False, out_dtype=torch.float32)
    ref = F.conv2d(x_nchw.double(), weight.double(), None, 2, 1, groups=C).permute(0, 2, 3, 1)
    assert out.dtype == torch.float32
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("H", "W", "C"), [(9, 7, 20), (8, 6, 16), (1, 2, 3)])
def test_avg_pool3x3s2_matches_torch(dtype, H, W, C):
    x = _randn(2, H, W, C, dtype=dtype)
    out = avg_pool3x3s2(x)
    ref = F.avg_pool2d(
        x.double().permute(0, 3, 1, 2), 3, stride=2, padding=1, count_include_pad=False
    ).permute(0, 2, 3, 1)
    assert out.shape == ref.shape and out.dtype == dtype
    assert _rel(out, ref) < (1e-6 if dtype == torch.float32 else TOL[dtype])


def test_outputs_are_fully_written(monkeypatch):
    """Every element of odd-sized outputs is written: output buffers are pre-filled with NaN."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(torch, "empty", nan_empty)
    x = _randn(2, 5, 3, 20)
    assert torch.isfinite(avg_pool3x3s2(x)).all()
    assert torch.isfinite(depthwise3x3(x, _randn(20, 1, 3, 3), _randn(20), 1)).all()
    assert torch.isfinite(pointwise_conv(_randn(129, 20), _randn(17, 20))).all()


def test_pointwise_conv_errors():
    x, w = _randn(8, 16), _randn(4, 16)
    with pytest.raises(ValueError, match=r"x must be \(M, K\)"):
        pointwise_conv(x[None], w)
    with pytest.raises(ValueError, match="does not match x"):
        pointwise_conv(x, _randn(4, 12))
    with pytest.raises(ValueError, match="x must be float32"):
        pointwise_conv(x.to(torch.float64), w)
    with pytest.raises(ValueError, match="contiguous"):
        pointwise_conv(_randn(16, 8).t(), w)
    with pytest.raises(ValueError, match="bias must have shape"):
        pointwise_conv(x, w, _randn(5))
    with pytest.raises(ValueError, match="residual must have shape"):
        pointwise_conv(x, w, residual=_randn(8, 5))
    with pytest.raises(ValueError, match="ln weight and bias"):
        pointwise_conv(x, w, ln=(_randn(15), _randn(16), 1e-6))
    with pytest.raises(ValueError, match="ln must be"):
        pointwise_conv(x, w, ln=(_randn(16), _randn(16)))
    wide = MAX_LN_CHANNELS + 8
    with pytest.raises(ValueError, match="at most"):
        pointwise_conv(_randn(2, wide), _randn(4, wide), ln=(_randn(wide), _randn(wide), 1e-6))
    with pytest.raises(ValueError, match="out_dtype"):
        pointwise_conv(x, w, out_dtype=torch.int32)
    with pytest.raises(ValueError, match="is on meta"):
        pointwise_conv(x, w.to("meta"))


def test_stencil_errors():
    x = _randn(1, 5, 5, 8)
    weight, bias = _randn(8, 1, 3, 3), _randn(8)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        depthwise3x3(x[0], weight, bias, 1)
    with pytest.raises(ValueError, match="contiguous NHWC"):
        depthwise3x3(x.permute(0, 3, 1, 2), weight, bias, 1)
    with pytest.raises(ValueError, match="weight must have shape"):
        depthwise3x3(x, _randn(8, 1, 5, 5), bias, 1)
    with pytest.raises(ValueError, match="bias must have shape"):
        depthwise3x3(x, weight, _randn(4), 1)
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        depthwise3x3(x, weight, bias, 3)
    with pytest.raises(ValueError, match="x must be float32"):
        avg_pool3x3s2(x.to(torch.int32))
    with pytest.raises(ValueError, match="contiguous NHWC"):
        avg_pool3x3s2(x.transpose(1, 2))


def test_gelu_of_the_kernels_is_exact_to_float32_precision():
    """The kernels' GELU (erfc by Abramowitz and Stegun 7.1.26, no cancellation in the negative
    tail) against float64 erf GELU over [-12, 12]: absolute error at most 5e-7 (torch's own float32
    GELU: 3.8e-7), relative 1e-6 for x > 0. Run through an identity 1x1 conv with float32 products."""
    x = torch.linspace(-12, 12, 4096 * 16, dtype=torch.float32, device=DEVICE).view(-1, 16)
    out = pointwise_conv(x, torch.eye(16, device=DEVICE), gelu=True)
    ref = F.gelu(x.double())
    err = (out.double() - ref).abs()
    assert err.max().item() < 5e-7
    pos = x > 0
    assert (err[pos] / ref[pos].abs()).max().item() < 1e-6


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize(
    ("cin", "n", "stride", "H", "W"), [(3, 20, 2, 9, 7), (3, 16, 1, 5, 6), (1, 40, 2, 4, 3)]
)
def test_conv3x3_few_channels_matches_conv_ln_gelu(layout, cin, n, stride, H, W):
    """The stem's first convolution + bias + LayerNorm over its output channels + GELU, reading the
    image in either layout, against conv2d -> layer_norm -> gelu in float64."""
    x = _randn(2, cin, H, W)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = _randn(n, cin, 3, 3, scale=0.3), _randn(n)
    ln_w, ln_b = _randn(n) + 1.0, _randn(n)
    out = conv3x3_few_channels(x, weight, bias, stride, ln=(ln_w, ln_b, 1e-6), gelu=True)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1)
    ref = F.gelu(F.layer_norm(ref.permute(0, 2, 3, 1), (n,), ln_w.double(), ln_b.double(), 1e-6))
    assert out.shape == ref.shape and out.is_contiguous()
    assert _rel(out, ref) < TOL[torch.float32]
    plain = conv3x3_few_channels(x, weight, bias, stride, out_dtype=torch.bfloat16)
    ref_plain = F.conv2d(x.double(), weight.double(), bias.double(), stride=stride, padding=1).permute(
        0, 2, 3, 1
    )
    assert plain.dtype == torch.bfloat16 and _rel(plain, ref_plain) < TOL[torch.bfloat16]


def test_conv3x3_few_channels_rejects_bad_input():
    with pytest.raises(ValueError, match="input channels"):
        conv3x3_few_channels(_randn(1, 8, 4, 4), _randn(4, 8, 3, 3), _randn(4), 1)
    with pytest.raises(ValueError, match="stride"):
        conv3x3_few_channels(_randn(1, 3, 4, 4), _randn(4, 3, 3, 3), _randn(4), 3)
    with pytest.raises(ValueError, match="weight"):
        conv3x3_few_channels(_randn(1, 3, 4, 4), _randn(4, 3, 1, 1), _randn(4), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_channel_bias_in_place(dtype):
    x = _randn(2, 5, 3, 12, dtype=dtype)
    bias = _randn(12)
    ref = (x.double() + bias.double()).to(dtype)
    assert add_channel_bias_(x, bias) is x
    assert _rel(x, ref) < (BF16_ROUNDING_TOL if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        add_channel_bias_(x.transpose(1, 2), bias)


@pytest.mark.cuda
def test_model_sized_shapes_bf16_on_gpu():
    """MBConv stage 1 at input 1024: LN + 1x1 (64 -> 256) + GELU on 512^2 rows, depthwise 3x3 stride 2 on
    512 x 512 x 256 and the shortcut's average pool, all bfloat16, against torch's own bf16 kernels."""
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(0)
    M, K, N = 512 * 512, 64, 256
    x = torch.randn(M, K, device=device, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(N, K, device=device, generator=gen) * K**-0.5).to(torch.bfloat16)
    bias = torch.randn(N, device=device, generator=gen).to(torch.bfloat16)
    ln_w = torch.randn(K, device=device, generator=gen) + 1.0
    ln_b = torch.randn(K, device=device, generator=gen)
    out = pointwise_conv(x, weight, bias, ln=(ln_w, ln_b, 1e-6), gelu=True)
    normed = F.layer_norm(x.float(), (K,), ln_w, ln_b, 1e-6).to(torch.bfloat16)
    ref = F.gelu(F.linear(normed, weight, bias))
    assert _rel(out, ref) < 1e-2

    act = out.view(1, 512, 512, N)
    dw_w = (torch.randn(N, 1, 3, 3, device=device, generator=gen) * 0.3).to(torch.bfloat16)
    dw_b = torch.randn(N, device=device, generator=gen).to(torch.bfloat16)
    dw = depthwise3x3(act, dw_w, dw_b, 2)
    act_nchw = act.permute(0, 3, 1, 2)
    dw_ref = F.gelu(F.conv2d(act_nchw, dw_w, dw_b, 2, 1, groups=N)).permute(0, 2, 3, 1)
    assert dw.shape == (1, 256, 256, N)
    assert _rel(dw, dw_ref) < 1e-2

    pooled = avg_pool3x3s2(act)
    pool_ref = F.avg_pool2d(act_nchw, 3, 2, 1, count_include_pad=False).permute(0, 2, 3, 1)
    assert _rel(pooled, pool_ref) < 1e-2
