"""Inference-only Triton kernels for the convolutional stages of the image backbone (NHWC activations).

Each kernel folds the element-wise passes around a convolution into the convolution itself, so that an
activation crosses memory once instead of three or four times:

- :func:`pointwise_conv`: a 1x1 convolution as a row-major GEMM ``(M, K) @ (N, K)^T`` with optional
  LayerNorm of each input row before it (MBConv's pre-norm), bias, exact GELU and a residual after it.
- :func:`depthwise3x3`: 3x3 depthwise convolution (padding 1, stride 1 or 2) + bias + exact GELU.
- :func:`avg_pool3x3s2`: ``nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)``.
- :func:`conv3x3_few_channels`: the stem's first convolution (3 input channels) with bias, the
  LayerNorm and GELU after it, reading the input image in whatever layout it comes.
- :func:`add_channel_bias_`: a convolution's bias added in place to its channels-last output.

Numerics: everything element-wise (LayerNorm, bias, GELU, residual, stencil sums) is float32; the GEMM
multiplies operands rounded to ``weight.dtype`` (bfloat16 under autocast, float32 otherwise, then
without TF32) and accumulates in float32. Offsets that scale with the image are int64, so inputs of
2048 x 2048 pixels and more do not overflow.

No autograd: call these only under ``torch.no_grad()`` / ``torch.inference_mode()``. The module
imports Triton at the top; import it only where Triton is installed. Under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) the kernels run unchanged, except that bfloat16 GEMM operands
are widened to float32 after their bfloat16 rounding (the interpreter cannot multiply bfloat16), which
gives the same products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .fused import _gelu  # the exact GELU shared by every fused kernel

__all__ = ["add_channel_bias_", "avg_pool3x3s2", "conv3x3_few_channels", "depthwise3x3", "pointwise_conv"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Widest LayerNorm row :func:`pointwise_conv` holds in one tile.
MAX_LN_CHANNELS = 512

# GEMM operand modes of _pointwise_kernel (constexpr DOT_MODE).
_DOT_NATIVE = 0  # 16-bit operands on tensor cores
_DOT_IEEE = 1  # float32 operands, full float32 products (no TF32)
_DOT_WIDEN = 2  # 16-bit operands widened to float32 first (Triton interpreter only)


@triton.jit
def _mma(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b with float32 accumulation, operands as described by DOT_MODE."""
    if DOT_MODE == 0:
        acc = tl.dot(a, b, acc)
    elif DOT_MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return acc


@triton.jit
def _pointwise_kernel(
    x_ptr,  # (M, K) row-major
    w_ptr,  # (N, K) with strides (stride_wn, stride_wk); its dtype is the compute dtype
    bias_ptr,  # (N,) or a dummy when HAS_BIAS is false
    ln_w_ptr,  # (K,) LayerNorm weight or a dummy when HAS_LN is false
    ln_b_ptr,  # (K,) LayerNorm bias or a dummy
    res_ptr,  # (M, N) row-major residual or a dummy when HAS_RES is false
    out_ptr,  # (M, N) row-major
    M,
    N,
    K,
    stride_wn,
    stride_wk,
    eps,
    HAS_LN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    RELU_SQUARE: tl.constexpr,
    HAS_RES: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # One program per (BLOCK_M rows, BLOCK_N output channels); the N blocks of one row block are
    # consecutive program ids, so the x tile they share is read from HBM about once.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid % num_n
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    x_rows = x_ptr + rows64[:, None] * K
    w_cols = w_ptr + cols[None, :].to(tl.int64) * stride_wn
    compute_dtype = w_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LN:
        # The whole row is one tile (BLOCK_K >= K): normalise in float32, then round to the compute dtype.
        k_ok = rk < K
        x = tl.load(x_rows + rk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / K
        xc = tl.where(k_ok[None, :], x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / K + eps)
        gamma = tl.load(ln_w_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        beta = tl.load(ln_b_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
        a = (xc * rstd[:, None] * gamma[None, :] + beta[None, :]).to(compute_dtype)
        w = tl.load(w_cols + rk[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, w, acc, DOT_MODE)
    else:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            a = tl.load(x_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + kk[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a.to(compute_dtype), w, acc, DOT_MODE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = _gelu(acc)
    if RELU_SQUARE:
        acc = tl.maximum(acc, 0.0)
        acc = acc * acc
    out_offs = rows64[:, None] * N + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        acc += tl.load(res_ptr + out_offs, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _avg_pool3x3_kernel(
    x_ptr,  # (B, H, W, C) contiguous
    out_ptr,  # (B, Ho, Wo, C) contiguous
    H,
    W,
    C,
    Ho,
    Wo,
    STRIDE: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per (image row of the output, BLOCK_W output pixels, BLOCK_C channels); channels
    # are the contiguous axis, so every tap is a coalesced [BLOCK_W, BLOCK_C] load. The result is
    # the mean of the in-image taps (count_include_pad=False).
    pid_bh = tl.program_id(0)
    b = pid_bh // Ho
    ho = pid_bh % Ho
    wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wo_ok = wo < Wo
    c_ok = c < C
    acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
    for kh in tl.static_range(3):
        hi = ho * STRIDE - 1 + kh
        h_in = (hi >= 0) & (hi < H)
        row_base = (b.to(tl.int64) * H + hi) * W
        for kw in tl.static_range(3):
            wi = wo * STRIDE - 1 + kw
            # a select rather than `h_in & ...`: the interpreter mistypes scalar & vector booleans
            ok = tl.where(h_in, (wi >= 0) & (wi < W) & wo_ok, False)
            offs = (row_base + wi)[:, None] * C + c[None, :]
            acc += tl.load(x_ptr + offs, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    # taps inside the image: rows [ho*S - 1, ho*S + 1] and columns [wo*S - 1, wo*S + 1] clipped (masked
    # columns past Wo may count 0: clamp so that they divide by 1)
    n_rows = tl.minimum(ho * STRIDE + 1, H - 1) - tl.maximum(ho * STRIDE - 1, 0) + 1
    n_cols = tl.minimum(wo * STRIDE + 1, W - 1) - tl.maximum(wo * STRIDE - 1, 0) + 1
    acc = acc / tl.maximum(n_rows * n_cols, 1).to(tl.float32)[:, None]
    out_row = (b.to(tl.int64) * Ho + ho) * Wo
    out_offs = (out_row + wo)[:, None] * C + c[None, :]
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=wo_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_tap_row(x_ptr, b, hi, H, W, C, wo, wo_ok, c, c_ok, STRIDE: tl.constexpr):
    """The three horizontally shifted [BLOCK_W, BLOCK_C] views of input row ``hi`` that the 3x3
    windows of output columns ``wo`` read (zeros outside the image), in x's dtype (widened to
    float32 by the products with the float32 taps)."""
    h_in = (hi >= 0) & (hi < H)
    row_base = (b.to(tl.int64) * H + hi) * W
    wi = wo * STRIDE - 1
    ok0 = tl.where(h_in, (wi >= 0) & wo_ok, False)
    ok1 = tl.where(h_in, (wi + 1 < W) & wo_ok, False)
    ok2 = tl.where(h_in, (wi + 2 < W) & wo_ok, False)
    offs = (row_base + wi)[:, None] * C + c[None, :]
    t0 = tl.load(x_ptr + offs, mask=ok0[:, None] & c_ok[None, :], other=0.0)
    t1 = tl.load(x_ptr + offs + C, mask=ok1[:, None] & c_ok[None, :], other=0.0)
    t2 = tl.load(x_ptr + offs + 2 * C, mask=ok2[:, None] & c_ok[None, :], other=0.0)
    return t0, t1, t2


@triton.jit
def _dot3(t0, t1, t2, w0, w1, w2):
    """One kernel row's contribution, ``t0 * w0 + t1 * w1 + t2 * w2``, in that order."""
    return t0 * w0 + t1 * w1 + t2 * w2


@triton.jit
def _dw_rows_kernel(
    x_ptr,  # (B, H, W, C) contiguous
    w_ptr,  # (C, 9) depthwise taps
    bias_ptr,  # (C,) or a dummy when HAS_BIAS is false
    out_ptr,  # (B, Ho, Wo, C) contiguous
    H,
    W,
    C,
    Ho,
    Wo,
    STRIDE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program per (ROWS consecutive output rows, BLOCK_W output columns, BLOCK_C channels),
    # walking down its rows.
    row_blocks = tl.cdiv(Ho, ROWS)
    b = tl.program_id(0) // row_blocks
    ho0 = (tl.program_id(0) % row_blocks) * ROWS
    wo = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    wo_ok = wo < Wo
    c_ok = c < C
    w00 = tl.load(w_ptr + c * 9 + 0, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w01 = tl.load(w_ptr + c * 9 + 1, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w02 = tl.load(w_ptr + c * 9 + 2, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w10 = tl.load(w_ptr + c * 9 + 3, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w11 = tl.load(w_ptr + c * 9 + 4, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w12 = tl.load(w_ptr + c * 9 + 5, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w20 = tl.load(w_ptr + c * 9 + 6, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w21 = tl.load(w_ptr + c * 9 + 7, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    w22 = tl.load(w_ptr + c * 9 + 8, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    row = ho0 * STRIDE - 1  # the first input row of the program's first window
    # Input row r holds three taps per output column; its dot with kernel row k goes into output row
    # (r + 1 - k) / STRIDE. Only the unfinished outputs' partial sums stay in registers (two rows
    # for stride 1, one for stride 2), and each input row is loaded once, one step ahead.
    t0, t1, t2 = _dw_tap_row(x_ptr, b, row, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
    acc = _dot3(t0, t1, t2, w00, w01, w02)
    if STRIDE == 1:
        t0, t1, t2 = _dw_tap_row(x_ptr, b, row + 1, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
        acc += _dot3(t0, t1, t2, w10, w11, w12)
        nxt = _dot3(t0, t1, t2, w00, w01, w02)  # output row ho0 + 1
        t0, t1, t2 = _dw_tap_row(x_ptr, b, row + 2, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
    else:
        t0, t1, t2 = _dw_tap_row(x_ptr, b, row + 1, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
        u0, u1, u2 = _dw_tap_row(x_ptr, b, row + 2, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
    for i in range(ROWS):
        ho = ho0 + i
        # the next step's input rows, loaded before this row's arithmetic so that their latency
        # overlaps it
        nrow = (ho + 1) * STRIDE + 1
        if STRIDE == 1:
            n0, n1, n2 = _dw_tap_row(x_ptr, b, nrow, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
            out = acc + _dot3(t0, t1, t2, w20, w21, w22)
            acc = nxt + _dot3(t0, t1, t2, w10, w11, w12)
            nxt = _dot3(t0, t1, t2, w00, w01, w02)
            t0, t1, t2 = n0, n1, n2
        else:
            n0, n1, n2 = _dw_tap_row(x_ptr, b, nrow - 1, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
            v0, v1, v2 = _dw_tap_row(x_ptr, b, nrow, H, W, C, wo, wo_ok, c, c_ok, STRIDE)
            out = acc + _dot3(t0, t1, t2, w10, w11, w12)
            out += _dot3(u0, u1, u2, w20, w21, w22)
            acc = _dot3(u0, u1, u2, w00, w01, w02)
            t0, t1, t2 = n0, n1, n2
            u0, u1, u2 = v0, v1, v2
        if HAS_BIAS:
            out += bias
        if GELU:
            out = _gelu(out)
        out_offs = ((b.to(tl.int64) * Ho + ho) * Wo + wo)[:, None] * C + c[None, :]
        row_ok = tl.where(ho < Ho, wo_ok, False)
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & c_ok[None, :])


def _interpreted() -> bool:
    """Whether the kernels were decorated under the Triton interpreter (TRITON_INTERPRET=1)."""
    return isinstance(_pointwise_kernel, InterpretedFunction)


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def _check_device(ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but x is on {ref.device}")


def _gemm_config(K: int, N: int, has_ln: bool, elem_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of _pointwise_kernel for H100-class GPUs.

    Chosen with benchmarks/tune_fused_kernels.py on an H200 (CUDA-graph timing, the shapes of
    rwkvsam_s at 1024; BENCHMARKS.md): with LayerNorm and K <= 64, 32 x 128 tiles (the 512^2 x 64 ->
    256 expansion: 190 -> 145 us against 128 x 128); with LayerNorm and wider K, 128 x 256 tiles over
    8 warps; without LayerNorm, 128 x min(128, N) tiles over K steps of 64. With LayerNorm the whole
    row is one K tile.
    """
    block_n = max(16, min(128, triton.next_power_of_2(N)))
    if has_ln:
        block_k = max(16, triton.next_power_of_2(K))
        if block_k <= 64:
            return 32, block_n, block_k, 4
        block_n = max(16, min(256, triton.next_power_of_2(N), 65536 // (block_k * elem_size)))
        return 128, block_n, block_k, 8
    block_k = max(16, min(64, triton.next_power_of_2(K)))
    return 128, block_n, block_k, 8 if block_n >= 128 else 4


def pointwise_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    gelu: bool = False,
    relu_square: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    _config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """1x1 convolution of NHWC rows, ``out = [residual +] [act](LN(x) @ weight^T [+ bias])``.

    Args:
        x: ``(M, K)`` contiguous rows (a channels-last activation viewed as pixels x channels),
            float32, bfloat16 or float16.
        weight: ``(N, K)`` (a ``(N, K, 1, 1)`` conv weight reshaped); its dtype is the compute dtype
            the product runs in (float32 products without TF32).
        bias: ``(N,)`` or None.
        ln: None, or ``(ln_weight (K,), ln_bias (K,), eps)``: LayerNorm of each row of ``x`` over K
            (float32, biased variance) before the product; needs ``K <= MAX_LN_CHANNELS``.
        gelu: apply exact (erf) GELU after the bias.
        relu_square: apply ``relu(.) ** 2`` after the bias instead (a VRWKV channel mix's key).
        residual: ``(M, N)`` contiguous tensor added (in float32) last, or None.
        out_dtype: dtype of the result, ``weight.dtype`` by default.

    Returns:
        A new ``(M, N)`` tensor of dtype ``out_dtype``.
    """
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"x must be (M, K) and weight (N, K), got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    M, K = x.shape
    N = weight.shape[0]
    if gelu and relu_square:
        raise ValueError("gelu and relu_square are two activations: choose one")
    if weight.shape[1] != K:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}: expected ({N}, {K})"
        )
    _check_float("x", x)
    _check_float("weight", weight)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (row-major (M, K))")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (N,):
            raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
        bias = bias.contiguous()
    if residual is not None:
        _check_float("residual", residual)
        if residual.shape != (M, N):
            raise ValueError(f"residual must have shape ({M}, {N}), got {tuple(residual.shape)}")
        if not residual.is_contiguous():
            raise ValueError("residual must be contiguous (row-major (M, N))")
    ln_w = ln_b = None
    eps = 0.0
    if ln is not None:
        if len(ln) != 3:
            raise ValueError("ln must be (ln_weight, ln_bias, eps)")
        ln_w, ln_b, eps = ln
        if ln_w.shape != (K,) or ln_b.shape != (K,):
            raise ValueError(
                f"ln weight and bias must have shape ({K},), got {tuple(ln_w.shape)} and {tuple(ln_b.shape)}"
            )
        _check_float("ln weight", ln_w)
        _check_float("ln bias", ln_b)
        if K > MAX_LN_CHANNELS:
            raise ValueError(f"LayerNorm rows hold at most {MAX_LN_CHANNELS} channels, got K={K}")
        ln_w, ln_b, eps = ln_w.contiguous(), ln_b.contiguous(), float(eps)
    _check_device(x, weight=weight, bias=bias, residual=residual, ln_weight=ln_w, ln_bias=ln_b)
    out_dtype = weight.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")

    out = torch.empty((M, N), dtype=out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if weight.dtype == torch.float32:
        dot_mode = _DOT_IEEE
    elif weight.dtype == torch.bfloat16 and _interpreted():
        dot_mode = _DOT_WIDEN
    else:
        dot_mode = _DOT_NATIVE
    block_m, block_n, block_k, num_warps = _gemm_config(K, N, ln is not None, weight.element_size())
    num_stages = 3
    if _config is not None:  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): tuning runs
        block_m, block_n, block_k, num_warps, num_stages = _config
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _pointwise_kernel[grid](
        x,
        weight,
        bias if bias is not None else out,
        ln_w if ln_w is not None else out,
        ln_b if ln_b is not None else out,
        residual if residual is not None else out,
        out,
        M,
        N,
        K,
        weight.stride(0),
        weight.stride(1),
        eps,
        HAS_LN=ln is not None,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        RELU_SQUARE=relu_square,
        HAS_RES=residual is not None,
        DOT_MODE=dot_mode,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def _check_nhwc(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, W, C), got shape {tuple(x.shape)}")
    _check_float("x", x)
    if not x.is_contiguous():
        raise ValueError("x must be contiguous NHWC (permute a channels-last tensor to (B, H, W, C))")


def depthwise3x3(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    *,
    gelu: bool = True,
    out_dtype: torch.dtype | None = None,
    _config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Depthwise 3x3 convolution of an NHWC tensor, zero padding 1, then bias and exact GELU.

    Same result as ``nn.Conv2d(C, C, 3, stride, padding=1, groups=C)`` (+ ``F.gelu``) on the NCHW
    view, with float32 accumulation.

    Args:
        x: ``(B, H, W, C)`` contiguous (a channels-last NCHW tensor permuted to NHWC).
        weight: ``(C, 1, 3, 3)`` depthwise conv weight (any float dtype; taps used in float32).
        bias: ``(C,)`` or None.
        stride: 1 or 2.
        gelu: apply exact GELU after the bias.
        out_dtype: dtype of the result, ``x.dtype`` by default.

    Returns:
        A new ``(B, Ho, Wo, C)`` tensor with ``Ho = (H - 1) // stride + 1`` (likewise ``Wo``).
    """
    _check_nhwc(x)
    C = x.shape[3]
    if weight.shape != (C, 1, 3, 3):
        raise ValueError(f"weight must have shape ({C}, 1, 3, 3), got {tuple(weight.shape)}")
    _check_float("weight", weight)
    if bias is not None:
        if bias.shape != (C,):
            raise ValueError(f"bias must have shape ({C},), got {tuple(bias.shape)}")
        _check_float("bias", bias)
        bias = bias.contiguous()
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    _check_device(x, weight=weight, bias=bias)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    taps = weight.reshape(C, 9).contiguous()
    B, H, W, _ = x.shape
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    out = torch.empty((B, Ho, Wo, C), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    # 16 rows x 16 columns x 128 channels: tuned on an H200 (benchmarks/tune_fused_kernels.py)
    rows, block_w, block_c, num_warps = _config or (16, 16, min(128, max(16, triton.next_power_of_2(C))), 4)
    grid = (B * triton.cdiv(Ho, rows), triton.cdiv(Wo, block_w), triton.cdiv(C, block_c))
    _dw_rows_kernel[grid](
        x,
        taps,
        bias if bias is not None else out,
        out,
        H,
        W,
        C,
        Ho,
        Wo,
        STRIDE=stride,
        HAS_BIAS=bias is not None,
        GELU=gelu,
        ROWS=rows,
        BLOCK_W=block_w,
        BLOCK_C=block_c,
        num_warps=num_warps,
    )
    return out


def avg_pool3x3s2(x: torch.Tensor, _config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)`` of an NHWC tensor.

    Each output is the float32 mean of the taps of its 3x3 window that lie inside the image.

    Args:
        x: ``(B, H, W, C)`` contiguous.

    Returns:
        A new ``(B, Ho, Wo, C)`` tensor of ``x.dtype``, ``Ho = (H - 1) // 2 + 1`` (likewise ``Wo``).
    """
    _check_nhwc(x)
    B, H, W, C = x.shape
    Ho, Wo = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    out = torch.empty((B, Ho, Wo, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c = max(16, min(128, triton.next_power_of_2(C)))
    block_w = max(1, min(2048 // block_c, triton.next_power_of_2(Wo)))
    num_warps = 4
    if _config is not None:  # (BLOCK_W, BLOCK_C, num_warps): tuning runs
        block_w, block_c, num_warps = _config
    grid = (B * Ho, triton.cdiv(Wo, block_w), triton.cdiv(C, block_c))
    _avg_pool3x3_kernel[grid](
        x, out, H, W, C, Ho, Wo, STRIDE=2, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=num_warps
    )
    return out


@triton.jit
def _direct_conv3x3_kernel(
    X,
    Wt,
    Bias,
    LNW,
    LNB,
    OUT,
    P,
    H,
    W,
    HO,
    WO,
    N,
    sxb,
    sxc,
    sxh,
    sxw,
    eps,
    CIN: tl.constexpr,
    STRIDE: tl.constexpr,
    HAS_LN: tl.constexpr,
    GELU: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """BLOCK_P output pixels x all N output channels: the 9 * CIN taps of each pixel gathered into
    one [BLOCK_P, BLOCK_K] tile (im2col in registers) times the [BLOCK_K, N] weight on tensor cores,
    then bias, LayerNorm over the N channels and GELU on the tile."""
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    b = p // (HO * WO)
    r = p - b * (HO * WO)
    ho = r // WO
    wo = r - ho * WO
    j = tl.arange(0, BLOCK_K)
    jmask = j < CIN * 9
    ci = j // 9
    dy = (j % 9) // 3
    dx = j % 3
    hi = ho[:, None] * STRIDE - 1 + dy[None, :]
    wi = wo[:, None] * STRIDE - 1 + dx[None, :]
    ok = pmask[:, None] & jmask[None, :] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
    taps = tl.load(X + b[:, None] * sxb + ci[None, :] * sxc + hi * sxh + wi * sxw, mask=ok, other=0.0)
    wts = tl.load(Wt + n[None, :] * (CIN * 9) + j[:, None], mask=jmask[:, None] & nmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    if DOT_MODE == 1:
        acc = _mma(taps.to(tl.float32), wts.to(tl.float32), acc, DOT_MODE)
    else:
        acc = _mma(taps.to(tl.bfloat16), wts.to(tl.bfloat16), acc, DOT_MODE)
    acc += tl.load(Bias + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if HAS_LN:
        mean = tl.sum(tl.where(nmask[None, :], acc, 0.0), axis=1) / N
        xc = tl.where(nmask[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
        lw = tl.load(LNW + n, mask=nmask, other=0.0).to(tl.float32)
        lb = tl.load(LNB + n, mask=nmask, other=0.0).to(tl.float32)
        acc = xc * rstd[:, None] * lw[None, :] + lb[None, :]
    if GELU:
        acc = _gelu(acc)
    m = pmask[:, None] & nmask[None, :]
    tl.store(OUT + p[:, None] * N + n[None, :], acc.to(OUT.dtype.element_ty), mask=m)


#: Widest input :func:`conv3x3_few_channels` takes (it unrolls 9 * Cin outer products).
MAX_DIRECT_CIN = 4


def conv3x3_few_channels(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    stride: int,
    *,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    gelu: bool = False,
    out_dtype: torch.dtype | None = None,
    _config: tuple[int, int] | None = None,
) -> torch.Tensor:
    """3x3 convolution (padding 1) of an image with few channels (the stem's RGB input), with bias,
    optional LayerNorm over the output channels and exact GELU, in one pass.

    Args:
        x: ``(B, Cin, H, W)`` with any strides (NCHW or channels-last, no copy), ``Cin <= 4``.
        weight: ``(N, Cin, 3, 3)``; bias ``(N,)``; ``N <= 512``.
        ln: None or ``(ln_weight (N,), ln_bias (N,), eps)``.
    Returns:
        A new NHWC ``(B, Ho, Wo, N)`` tensor (``out_dtype``, default ``x.dtype``). float32 results
        use float32 products; 16-bit results use bfloat16 operands (tensor cores), float32 sums.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, Cin, H, W), got shape {tuple(x.shape)}")
    B, cin, H, W = x.shape
    N = weight.shape[0]
    if cin > MAX_DIRECT_CIN:
        raise ValueError(f"at most {MAX_DIRECT_CIN} input channels, got {cin}")
    if weight.shape != (N, cin, 3, 3) or bias.shape != (N,):
        raise ValueError(f"weight must be ({N}, {cin}, 3, 3) and bias ({N},)")
    if N > MAX_LN_CHANNELS:
        raise ValueError(f"at most {MAX_LN_CHANNELS} output channels, got {N}")
    if stride not in (1, 2):
        raise ValueError(f"stride must be 1 or 2, got {stride}")
    _check_float("x", x)
    ln_w = ln_b = None
    eps = 0.0
    if ln is not None:
        ln_w, ln_b, eps = ln
        if ln_w.shape != (N,) or ln_b.shape != (N,):
            raise ValueError(f"ln weight and bias must have shape ({N},)")
    _check_device(x, weight=weight, bias=bias, ln_weight=ln_w, ln_bias=ln_b)
    Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    out = torch.empty((B, Ho, Wo, N), dtype=out_dtype or x.dtype, device=x.device)
    P = B * Ho * Wo
    if P == 0:
        return out
    block_n = max(16, triton.next_power_of_2(N))
    block_p = max(16, min(128, 8192 // block_n))
    num_warps = 4
    out_dtype = out.dtype
    # float32 results: full float32 products; 16-bit results: bfloat16 operands on tensor cores, as
    # autocast's convolution would round them
    if out_dtype == torch.float32:
        dot_mode = _DOT_IEEE
    else:
        dot_mode = _DOT_WIDEN if _interpreted() else _DOT_NATIVE
    if _config is not None:  # (BLOCK_P, num_warps): tuning runs
        block_p, num_warps = _config
    _direct_conv3x3_kernel[(triton.cdiv(P, block_p),)](
        x,
        weight.contiguous(),
        bias.contiguous(),
        ln_w if ln_w is not None else out,
        ln_b if ln_b is not None else out,
        out,
        P,
        H,
        W,
        Ho,
        Wo,
        N,
        *x.stride(),
        float(eps),
        CIN=cin,
        STRIDE=stride,
        HAS_LN=ln is not None,
        GELU=gelu,
        DOT_MODE=dot_mode,
        BLOCK_P=block_p,
        BLOCK_K=max(16, triton.next_power_of_2(cin * 9)),
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return out


@triton.jit
def _add_bias_kernel(X, Bias, numel, C, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    bias = tl.load(Bias + offs % C, mask=m, other=0.0).to(tl.float32)
    tl.store(X + offs, (x + bias).to(X.dtype.element_ty), mask=m)


def add_channel_bias_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x += bias`` over the last dimension of a contiguous ``(..., C)`` tensor, in place (one
    vectorised pass; torch's broadcast add on a channels-last convolution output is not)."""
    if not x.is_contiguous() or bias.shape != (x.shape[-1],):
        raise ValueError(
            f"x must be contiguous (..., C) and bias (C,), got {tuple(x.shape)}, {tuple(bias.shape)}"
        )
    numel = x.numel()
    if numel:
        block = 4096
        _add_bias_kernel[(triton.cdiv(numel, block),)](
            x, bias.contiguous(), numel, x.shape[-1], BLOCK=block, num_warps=4
        )
    return x
