"""Fused Triton kernels for inference of the image encoder on NVIDIA GPUs (issue 3).

The profile of one bf16 forward of rwkvsam_s at 1024 (H200, BENCHMARKS.md) spent most of its time
in memory passes between the matrix products: LayerNorm in float32 on channels-last tensors with
few channels, the casts autocast puts around it, Q-Shift's gather and select, the token mixes, the
gates and the residual updates, about 770 kernels a forward. The kernels here do those passes in
one read and one write each:

- :func:`layer_norm_rows`: LayerNorm over the last dimension of a row-major ``(N, C)`` view (a
  channels-last image or a token sequence), optionally with a residual update applied first
  (``x + scale * delta``, ``delta`` optionally gated by ``sigmoid(gate)``) and an exact GELU
  after; written in any dtype.
- :func:`vrwkv_prep`: the front of a VRWKV mixer in two passes: the residual update of the
  previous mixer with LayerNorm (:func:`layer_norm_rows`, normalised rows kept in float32), then
  Q-Shift on the token grid and the ``M`` token mixes ``xx + mu * (x - xx)``, where each output
  value reads its own row and the one neighbour its channel quarter takes. (One pass that
  recomputed the LayerNorm of the four neighbours of each token was slower on an H200: 22.7 us a
  call at 4096 x 384 against 6 + 8.7 us; BENCHMARKS.md.)
(The spatial mix's gate is applied by the Bi-WKV CUDA kernel's output pass,
``rwkvsam_core.ops.bi_wkv_gated``, and the channel mix's squared ReLU by the epilogue of its key
product, ``fused_conv.pointwise_conv(..., relu_square=True)``.)

Everything computes in float32 and rounds once, when storing. Inference only (no autograd): the
model calls these only under ``torch.no_grad``/``inference_mode`` on CUDA tensors
(:func:`fast_path`), training keeps the autograd path. Importable without Triton or a GPU;
:func:`status` says whether the fused path is on.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)
_announced = False

__all__ = [
    "fast_path",
    "status",
    "layer_norm_rows",
    "vrwkv_prep",
]

try:  # Triton ships with CUDA builds of torch; CPU-only machines usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

#: Environment switch: ``RWKVSAM_FUSED=0`` turns the fused inference path off (A/B, debugging).
ENV_SWITCH = "RWKVSAM_FUSED"


def status() -> str:
    """One line: whether CUDA inference of the encoder takes the fused path, and why not."""
    if triton is None:
        return "off: Triton is not installed (the encoder runs module by module)"
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"off: {ENV_SWITCH}=0"
    return (
        f"on for CUDA inference without gradients (Triton {triton.__version__}); {ENV_SWITCH}=0 turns it off"
    )


def fast_path(x: torch.Tensor) -> bool:
    """Whether the model should take the fused inference path for ``x``.

    True for CUDA tensors when no gradient is recorded (``no_grad``/``inference_mode``), Triton is
    importable, ``RWKVSAM_FUSED`` is not ``0`` and torch.compile is not tracing (it fuses itself).
    """
    global _announced
    taken = (
        not torch.compiler.is_compiling()  # first: nothing else is evaluated while dynamo traces
        and x.is_cuda
        and not torch.is_grad_enabled()
        and triton is not None
        and os.environ.get(ENV_SWITCH, "1") != "0"
    )
    if taken and not _announced:
        _announced = True
        logger.info("image encoder: fused Triton inference path (%s)", status())
    return taken


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _ln_tile(block_c: int) -> tuple[int, int]:
    """(rows, warps) of a LayerNorm-rows program: about 4096 elements a tile (64 rows of 64
    channels, 8 rows of 512), 8 warps only for rows wider than that."""
    rows = max(1, min(128, 4096 // block_c))
    return rows, 4 if rows * block_c <= 4096 else 8


if triton is not None:

    @triton.jit
    def _gelu(x):
        """Exact (erf) GELU, 0.5 x (1 + erf(x / sqrt(2))), of a float32 tile.

        1 + erf(s) is evaluated as erfc(|s|) for s < 0 and 2 - erfc(|s|) otherwise, with erfc from
        Abramowitz and Stegun 7.1.26 (one division, one exp, five multiply-adds): no cancellation
        in the negative tail. Over [-12, 12] its largest absolute error is 4.2e-7 (torch's float32
        GELU: 3.8e-7). On an H200 the 512^2 x 64 -> 256 expansion (LayerNorm, product, GELU) took
        144 us with libdevice's erf, 82 without a GELU, and 123 with this one.
        """
        s = x * 0.7071067811865476
        a = tl.abs(s)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (
            0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
        )
        erfc = poly * tl.exp(-a * a)
        return 0.5 * x * tl.where(s < 0, erfc, 2.0 - erfc)

    @triton.jit
    def _updated_rows(
        X, D, G, S, rows, valid, cols, cmask, C, HAS_DELTA: tl.constexpr, HAS_GATE: tl.constexpr
    ):
        """x[rows] (+ s * delta[rows] (* sigmoid(gate[rows]))) in float32, [R, BLOCK_C]."""
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        m = valid[:, None] & cmask[None, :]
        x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(D + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_GATE:
                g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
                d = d / (1.0 + tl.exp(-g))
            s = tl.load(S + cols, mask=cmask, other=0.0).to(tl.float32)
            x = x + s[None, :] * d
        return x

    @triton.jit
    def _normalise(x, w, b, cmask, C, eps):
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / C
        rstd = 1.0 / tl.sqrt(var + eps)
        return xc * rstd[:, None] * w[None, :] + b[None, :]

    @triton.jit
    def _ln_rows_kernel(
        X,
        D,
        G,
        S,
        W,
        B,
        XOUT,
        OUT,
        N,
        C,
        eps,
        HAS_DELTA: tl.constexpr,
        HAS_GATE: tl.constexpr,
        WRITE_X: tl.constexpr,
        GELU: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_C)
        rmask = rows < N
        cmask = cols < C
        x = _updated_rows(X, D, G, S, rows, rmask, cols, cmask, C, HAS_DELTA, HAS_GATE)
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        m = rmask[:, None] & cmask[None, :]
        if WRITE_X:
            tl.store(XOUT + offs, x.to(XOUT.dtype.element_ty), mask=m)
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=cmask, other=0.0).to(tl.float32)
        y = _normalise(x, w, b, cmask, C, eps)
        if GELU:
            y = _gelu(y)
        tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _shift_mix_kernel(
        Z, MIX, OUT, N, T, H, WIDTH, C, Q, M: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        """Q-Shift and the M token mixes of normalised rows Z, for ROWS tokens x BLOCK_C channels:
        each output value reads its own row and the one neighbour its channel quarter takes."""
        n = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        nmask = n < N
        cmask = cols < C
        t = n % T
        row = t // WIDTH
        col = t - row * WIDTH
        m = nmask[:, None] & cmask[None, :]
        n64 = n.to(tl.int64)
        offs = n64[:, None] * C + cols[None, :]
        z = tl.load(Z + offs, mask=m, other=0.0).to(tl.float32)
        quarter = tl.where(cols < 4 * Q, cols // tl.maximum(Q, 1), 4)[None, :]
        step = tl.where(quarter == 0, -1, tl.where(quarter == 1, 1, tl.where(quarter == 2, -WIDTH, WIDTH)))
        ok = tl.where(
            quarter == 0,
            (col > 0)[:, None],
            tl.where(
                quarter == 1,
                (col < WIDTH - 1)[:, None],
                tl.where(quarter == 2, (row > 0)[:, None], (row < H - 1)[:, None]),
            ),
        )
        shifted = quarter < 4
        zn = tl.load(Z + offs + step * C, mask=m & ok & shifted, other=0.0).to(tl.float32)
        xx = tl.where(shifted, zn, z)
        for mi in tl.static_range(M):
            mu = tl.load(MIX + mi * C + cols, mask=cmask, other=0.0).to(tl.float32)
            tl.store(OUT + mi * N * C + offs, (xx + mu[None, :] * (z - xx)).to(OUT.dtype.element_ty), mask=m)


def _check_rows(name: str, t: torch.Tensor, n: int, c: int) -> None:
    if t.shape[-1] != c or t.numel() != n * c:
        raise ValueError(f"{name} must hold {n} rows of {c} values, got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _update_args(x, delta, gate, scale, n, c):
    if delta is None:
        if gate is not None or scale is not None:
            raise ValueError("gate and scale need a delta")
        return x, x, x
    if scale is None:
        raise ValueError("a delta needs its per-channel scale")
    _check_rows("delta", delta, n, c)
    if gate is not None:
        _check_rows("gate", gate, n, c)
    if scale.shape != (c,):
        raise ValueError(f"scale must have shape ({c},), got {tuple(scale.shape)}")
    return delta, (gate if gate is not None else delta), scale


def layer_norm_rows(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    gelu: bool = False,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    _config: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dimension of ``x``, with an optional residual update before it.

    Args:
        x: ``(..., C)`` contiguous (a token sequence, or a channels-last image permuted to NHWC).
        weight, bias: ``(C,)``; eps as in ``F.layer_norm``.
        delta, gate, scale: when ``delta`` is given, the rows normalised are
            ``x + scale * delta`` (``delta * sigmoid(gate)`` when ``gate`` is given), computed in
            float32 and also returned, in ``promote_types(x.dtype, scale.dtype)``.
        gelu: apply the exact GELU to the normalised rows.
        out_dtype: dtype of the normalised rows (default ``x.dtype``).
        out: optional preallocated output (``x``'s shape, ``out_dtype``).

    Returns:
        ``(y, x_updated)``: the normalised rows (``x``'s shape) and the updated ``x`` (``x`` itself
        when there was no delta).
    """
    c = x.shape[-1]
    n = x.numel() // max(c, 1)
    _check_rows("x", x, n, c)
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must have shape ({c},)")
    d, g, s = _update_args(x, delta, gate, scale, n, c)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device) if out is None else out
    x_new = x
    if delta is not None:
        x_new = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, scale.dtype), device=x.device)
    if n == 0:
        return y, x_new
    block_c = _block(c)
    rows, warps = _config or _ln_tile(block_c)
    _ln_rows_kernel[(triton.cdiv(n, rows),)](
        x,
        d,
        g,
        s,
        weight,
        bias,
        x_new,
        y,
        n,
        c,
        float(eps),
        HAS_DELTA=delta is not None,
        HAS_GATE=gate is not None,
        WRITE_X=delta is not None,
        GELU=gelu,
        ROWS=rows,
        BLOCK_C=block_c,
        num_warps=warps,
    )
    return y, x_new


def vrwkv_prep(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    mixes: torch.Tensor,
    height: int,
    width: int,
    *,
    delta: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    _config: tuple[int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Front of a VRWKV mixer: [residual update,] LayerNorm, Q-Shift and ``M`` token mixes.

    With ``z = LayerNorm(x')`` for ``x' = x + scale * delta`` (``delta * sigmoid(gate)`` with a
    gate; ``x' = x`` without a delta) and ``zz = QShift(z)`` on the ``height`` x ``width`` grid
    (channel quarter 0 from the left neighbour, 1 the right, 2 above, 3 below, zero outside the
    grid; channels past ``4 * (C // 4)`` unshifted), output ``m`` is ``zz + mixes[m] * (z - zz)``.

    Args:
        x: ``(B, T, C)`` contiguous tokens in row-major grid order, ``T = height * width``.
        weight, bias, eps: the LayerNorm's.
        mixes: ``(M, C)`` interpolation weights (M >= 1).
    Returns:
        ``(mixed, x')``: ``mixed`` ``(M, B * T, C)`` in ``out_dtype`` (default ``x.dtype``) and the
        updated tokens (``x`` itself without a delta).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, C), got shape {tuple(x.shape)}")
    b, t, c = x.shape
    if t != height * width:
        raise ValueError(f"T = {t} tokens do not fill a {height} x {width} grid")
    if mixes.dim() != 2 or mixes.shape[1] != c or mixes.shape[0] < 1:
        raise ValueError(f"mixes must be (M, {c}), got shape {tuple(mixes.shape)}")
    n = b * t
    _check_rows("x", x, n, c)
    if weight.shape != (c,) or bias.shape != (c,):
        raise ValueError(f"weight and bias must have shape ({c},)")
    mixes = mixes.contiguous()
    m = mixes.shape[0]
    out = torch.empty((m, n, c), dtype=out_dtype or x.dtype, device=x.device)
    z, x_new = layer_norm_rows(
        x, weight, bias, eps, delta=delta, gate=gate, scale=scale, out_dtype=torch.float32
    )
    if n:
        rows, block_c, warps = _config or (16, min(128, _block(c)), 4)
        _shift_mix_kernel[(triton.cdiv(n, rows), triton.cdiv(c, block_c))](
            z,
            mixes,
            out,
            n,
            t,
            height,
            width,
            c,
            c // 4,
            M=m,
            ROWS=rows,
            BLOCK_C=block_c,
            num_warps=warps,
        )
    return out, x_new
