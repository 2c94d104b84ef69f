"""Triton implementation of Bi-WKV (forward and exact backward): the fallback when nvcc is missing.

Same decomposition as the CUDA kernel (kernels/README.md), three launches per direction of work:

1. ``_summary_kernel``: one program per (chunk of L tokens, batch, block of channels) reduces its
   chunk to a log2-scaled state per direction (causal: the chunk seen from its right end;
   anti-causal: seen from its left end).
2. ``_carry_kernel``: one program per (batch, block of channels, direction) walks the chunk states
   in scan order and writes, for each chunk, the state of everything before it (exclusive scan;
   a state moved by n tokens decays by 2^(-n*w2)).
3. ``_output_fwd_kernel`` / ``_output_bwd_kernel``: one program per chunk evaluates the chunk
   exactly as an L x L masked weight matrix (per output row a log-sum-exp with its own maximum),
   plus the two carried states.

All arithmetic is float32 in base 2 (k2 = k*log2(e), w2 = w*log2(e), u2 = u*log2(e)).
The backward recomputes y (float32) and lse2 = log2(denominator) with the forward kernels, then runs
the same scan with key -lse2 and values (g, g*y) plus their derivatives with respect to w.
Everything here is importable without Triton or a GPU; ``available()`` says whether it can run.
"""

from __future__ import annotations

import math

import torch

__all__ = ["CHUNK", "OP_NAME", "available", "bi_wkv_triton_backward", "bi_wkv_triton_forward", "register_op"]

#: Tokens per chunk (the in-chunk matrix is CHUNK x CHUNK per channel).
CHUNK = 16
#: Channels per program.
BLOCK_C = 32
_LOG2E = 1.0 / math.log(2.0)
#: Name of the custom op this module registers (``torch.ops.rwkvsam.bi_wkv_triton``).
OP_NAME = "rwkvsam::bi_wkv_triton"
_lib: torch.library.Library | None = None

try:  # Triton ships with CUDA builds of torch; CPU-only machines usually lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without Triton
    triton = None
    tl = None


def available() -> tuple[bool, str]:
    """(can the Triton path run here, one-line reason)."""
    if triton is None:
        return False, "triton is not installed"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, f"triton {triton.__version__}"


if triton is not None:

    @triton.jit
    def _summary_kernel(
        key_ptr,  # (B, T, C): k (forward, GRAD=0) or lse2 (backward, GRAD=1)
        a_ptr,  # (B, T, C): v (forward) or g (backward)
        y_ptr,  # (B, T, C) float32: y (backward only)
        w2_ptr,  # (C,) float32, w * log2(e)
        out_ptr,  # (2, NCOMP, B, NCH, C) float32
        B,
        T,
        C,
        NCH,
        GRAD: tl.constexpr,
        L: tl.constexpr,
        BC: tl.constexpr,
    ):
        ch = tl.program_id(0)
        b = tl.program_id(1)
        cb = tl.program_id(2)
        j = tl.arange(0, L)
        c = cb * BC + tl.arange(0, BC)
        s0 = ch * L
        n = tl.minimum(T - s0, L)
        cm = c < C
        m2 = (j[:, None] < n) & cm[None, :]
        off = (b.to(tl.int64) * T + s0 + j[:, None]) * C + c[None, :]
        w2 = tl.load(w2_ptr + c, mask=cm, other=0.0)
        if GRAD:
            key = -tl.load(key_ptr + off, mask=m2, other=0.0).to(tl.float32)
            g = tl.load(a_ptr + off, mask=m2, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + off, mask=m2, other=0.0).to(tl.float32)
            a1 = g
            a2 = g * yv
        else:
            key = tl.load(key_ptr + off, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
            a1 = tl.load(a_ptr + off, mask=m2, other=0.0).to(tl.float32)
            a2 = tl.full([L, BC], 1.0, tl.float32)
        NCOMP: tl.constexpr = 5 if GRAD else 3
        plane = B * NCH * C
        base = (b.to(tl.int64) * NCH + ch) * C + c
        for d in tl.static_range(2):
            # distance of token j to the chunk end in scan direction
            if d == 0:
                dist = (n - 1 - j).to(tl.float32)
            else:
                dist = j.to(tl.float32)
            e = key - dist[:, None] * w2[None, :]
            e = tl.where(m2, e, float("-inf"))
            mx = tl.max(e, axis=0)
            mxs = tl.where(cm, mx, 0.0)
            p = tl.where(m2, tl.exp2(e - mxs[None, :]), 0.0)
            tl.store(out_ptr + (d * NCOMP + 0) * plane + base, tl.where(cm, mx, float("-inf")), mask=cm)
            tl.store(out_ptr + (d * NCOMP + 1) * plane + base, tl.sum(p * a1, axis=0), mask=cm)
            tl.store(out_ptr + (d * NCOMP + 2) * plane + base, tl.sum(p * a2, axis=0), mask=cm)
            if GRAD:
                tl.store(
                    out_ptr + (d * NCOMP + 3) * plane + base, -tl.sum(dist[:, None] * p * a1, axis=0), mask=cm
                )
                tl.store(
                    out_ptr + (d * NCOMP + 4) * plane + base, -tl.sum(dist[:, None] * p * a2, axis=0), mask=cm
                )

    @triton.jit
    def _carry_kernel(
        sum_ptr,  # (2, NCOMP, B, NCH, C) chunk states
        carry_ptr,  # (2, NCOMP, B, NCH, C) exclusive scan of the chunk states
        w2_ptr,
        B,
        T,
        C,
        NCH,
        GRAD: tl.constexpr,
        L: tl.constexpr,
        BC: tl.constexpr,
    ):
        b = tl.program_id(0)
        cb = tl.program_id(1)
        d = tl.program_id(2)
        c = cb * BC + tl.arange(0, BC)
        cm = c < C
        w2 = tl.load(w2_ptr + c, mask=cm, other=0.0)
        NCOMP: tl.constexpr = 5 if GRAD else 3
        plane = B * NCH * C
        # The scale is kept anchored to the sequence start (a = p + pos * w2, pos = tokens scanned so
        # far): moving the state by a chunk then costs no arithmetic on it, so rounding does not
        # accumulate over thousands of chunks.
        a = tl.full([BC], float("-inf"), tl.float32)
        s1 = tl.zeros([BC], tl.float32)
        s2 = tl.zeros([BC], tl.float32)
        r1 = tl.zeros([BC], tl.float32)
        r2 = tl.zeros([BC], tl.float32)
        for r in range(NCH):
            chk = r + d * (NCH - 1 - 2 * r)
            lni = tl.minimum(T - chk * L, L)
            pos_end = tl.where(d == 0, chk * L + lni, T - chk * L).to(tl.float32)
            ln = lni.to(tl.float32)
            base = (b.to(tl.int64) * NCH + chk) * C + c
            tl.store(carry_ptr + (d * NCOMP + 0) * plane + base, a - (pos_end - ln) * w2, mask=cm)
            tl.store(carry_ptr + (d * NCOMP + 1) * plane + base, s1, mask=cm)
            tl.store(carry_ptr + (d * NCOMP + 2) * plane + base, s2, mask=cm)
            if GRAD:
                tl.store(carry_ptr + (d * NCOMP + 3) * plane + base, r1, mask=cm)
                tl.store(carry_ptr + (d * NCOMP + 4) * plane + base, r2, mask=cm)
            py = tl.load(sum_ptr + (d * NCOMP + 0) * plane + base, mask=cm, other=float("-inf"))
            y1 = tl.load(sum_ptr + (d * NCOMP + 1) * plane + base, mask=cm, other=0.0)
            y2 = tl.load(sum_ptr + (d * NCOMP + 2) * plane + base, mask=cm, other=0.0)
            ay = py + pos_end * w2
            q = tl.maximum(a, ay)
            qs = tl.where(q == float("-inf"), 0.0, q)
            ex = tl.exp2(a - qs)
            ey = tl.exp2(ay - qs)
            if GRAD:
                z1 = tl.load(sum_ptr + (d * NCOMP + 3) * plane + base, mask=cm, other=0.0)
                z2 = tl.load(sum_ptr + (d * NCOMP + 4) * plane + base, mask=cm, other=0.0)
                r1 = ex * (r1 - ln * s1) + ey * z1
                r2 = ex * (r2 - ln * s2) + ey * z2
            s1 = ex * s1 + ey * y1
            s2 = ex * s2 + ey * y2
            a = q

    @triton.jit
    def _output_fwd_kernel(
        k_ptr,
        v_ptr,
        w2_ptr,
        u2_ptr,
        carry_ptr,  # (2, 3, B, NCH, C)
        y_ptr,  # (B, T, C) output, any float dtype
        lse_ptr,  # (B, T, C) float32 log2(denominator), written when WRITE_LSE
        B,
        T,
        C,
        NCH,
        WRITE_LSE: tl.constexpr,
        L: tl.constexpr,
        BC: tl.constexpr,
    ):
        ch = tl.program_id(0)
        b = tl.program_id(1)
        cb = tl.program_id(2)
        j = tl.arange(0, L)
        c = cb * BC + tl.arange(0, BC)
        s0 = ch * L
        n = tl.minimum(T - s0, L)
        cm = c < C
        m2 = (j[:, None] < n) & cm[None, :]
        off = (b.to(tl.int64) * T + s0 + j[:, None]) * C + c[None, :]
        w2 = tl.load(w2_ptr + c, mask=cm, other=0.0)
        u2 = tl.load(u2_ptr + c, mask=cm, other=0.0)
        k2 = tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
        v = tl.load(v_ptr + off, mask=m2, other=0.0).to(tl.float32)
        plane = B * NCH * C
        base = (b.to(tl.int64) * NCH + ch) * C + c
        pc = tl.load(carry_ptr + 0 * plane + base, mask=cm, other=float("-inf"))
        nc = tl.load(carry_ptr + 1 * plane + base, mask=cm, other=0.0)
        dc = tl.load(carry_ptr + 2 * plane + base, mask=cm, other=0.0)
        pa = tl.load(carry_ptr + 3 * plane + base, mask=cm, other=float("-inf"))
        na = tl.load(carry_ptr + 4 * plane + base, mask=cm, other=0.0)
        da = tl.load(carry_ptr + 5 * plane + base, mask=cm, other=0.0)
        # exponent matrix E[t, i, c] of token i's weight in output t
        jt = j[:, None, None]
        ji = j[None, :, None]
        dist = tl.abs(jt - ji).to(tl.float32) - 1.0
        E = k2[None, :, :] - dist * w2[None, None, :]
        E = tl.where(jt == ji, (u2[None, :] + k2)[:, None, :], E)
        E = tl.where((ji < n) & cm[None, None, :], E, float("-inf"))
        jf = j.to(tl.float32)[:, None]
        ec = pc[None, :] - jf * w2[None, :]  # causal carry seen from token t
        ea = pa[None, :] - ((n - 1) - jf) * w2[None, :]  # anti-causal carry
        mx = tl.maximum(tl.max(E, axis=1), tl.maximum(ec, ea))
        mx = tl.where(m2, mx, 0.0)
        P = tl.exp2(E - mx[:, None, :])
        fc = tl.exp2(ec - mx)
        fa = tl.exp2(ea - mx)
        num = tl.sum(P * v[None, :, :], axis=1) + fc * nc[None, :] + fa * na[None, :]
        den = tl.sum(P, axis=1) + fc * dc[None, :] + fa * da[None, :]
        den = tl.where(m2, den, 1.0)
        tl.store(y_ptr + off, (num / den).to(y_ptr.dtype.element_ty), mask=m2)
        if WRITE_LSE:
            tl.store(lse_ptr + off, mx + tl.log2(den), mask=m2)

    @triton.jit
    def _output_bwd_kernel(
        k_ptr,
        v_ptr,
        g_ptr,  # (B, T, C) grad of y
        y_ptr,  # (B, T, C) float32 recomputed y
        lse_ptr,  # (B, T, C) float32 log2(denominator)
        w2_ptr,
        u2_ptr,
        carry_ptr,  # (2, 5, B, NCH, C)
        dk_ptr,
        dv_ptr,
        dwp_ptr,  # (B*NCH, C) float32 partial dw
        dup_ptr,  # (B*NCH, C) float32 partial du
        B,
        T,
        C,
        NCH,
        L: tl.constexpr,
        BC: tl.constexpr,
    ):
        ch = tl.program_id(0)
        b = tl.program_id(1)
        cb = tl.program_id(2)
        j = tl.arange(0, L)
        c = cb * BC + tl.arange(0, BC)
        s0 = ch * L
        n = tl.minimum(T - s0, L)
        cm = c < C
        m2 = (j[:, None] < n) & cm[None, :]
        off = (b.to(tl.int64) * T + s0 + j[:, None]) * C + c[None, :]
        w2 = tl.load(w2_ptr + c, mask=cm, other=0.0)
        u2 = tl.load(u2_ptr + c, mask=cm, other=0.0)
        k2 = tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32) * 1.4426950408889634
        v = tl.load(v_ptr + off, mask=m2, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + off, mask=m2, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + off, mask=m2, other=0.0)
        kap = -tl.load(lse_ptr + off, mask=m2, other=0.0)
        gy = g * y
        # in-chunk weights W[i, t] = E_{t i} / D_t = 2^(k2_i + kap_t - (|t-i|-1) w2), t != i
        ji = j[:, None, None]
        jt = j[None, :, None]
        distf = tl.abs(jt - ji).to(tl.float32) - 1.0
        X = k2[:, None, :] + kap[None, :, :] - distf * w2[None, None, :]
        valid = (jt != ji) & (jt < n) & (ji < n) & cm[None, None, :]
        W = tl.where(valid, tl.exp2(tl.where(valid, X, 0.0)), 0.0)
        Pi = tl.sum(W * g[None, :, :], axis=1)
        Qi = tl.sum(W * gy[None, :, :], axis=1)
        RPi = -tl.sum(W * distf * g[None, :, :], axis=1)
        RQi = -tl.sum(W * distf * gy[None, :, :], axis=1)
        dv = Pi
        dk = v * Pi - Qi
        dwt = v * RPi - RQi
        plane = B * NCH * C
        base = (b.to(tl.int64) * NCH + ch) * C + c
        jf = j.to(tl.float32)[:, None]
        for d in tl.static_range(2):
            s = tl.load(carry_ptr + (d * 5 + 0) * plane + base, mask=cm, other=float("-inf"))
            P0 = tl.load(carry_ptr + (d * 5 + 1) * plane + base, mask=cm, other=0.0)
            Q0 = tl.load(carry_ptr + (d * 5 + 2) * plane + base, mask=cm, other=0.0)
            R0 = tl.load(carry_ptr + (d * 5 + 3) * plane + base, mask=cm, other=0.0)
            S0 = tl.load(carry_ptr + (d * 5 + 4) * plane + base, mask=cm, other=0.0)
            if d == 0:
                sh = jf  # tokens between the chunk start and token i
            else:
                sh = (n - 1) - jf
            ex = k2 + s[None, :] - sh * w2[None, :]
            a = tl.where(m2, tl.exp2(tl.where(m2, ex, float("-inf"))), 0.0)
            Pd = a * P0[None, :]
            Qd = a * Q0[None, :]
            dv += Pd
            dk += v * Pd - Qd
            dwt += v * (a * R0[None, :] - sh * Pd) - (a * S0[None, :] - sh * Qd)
        o = tl.where(m2, tl.exp2(tl.where(m2, u2[None, :] + k2 + kap, float("-inf"))), 0.0) * g
        dv += o
        dk += o * (v - y)
        tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=m2)
        tl.store(dk_ptr + off, dk.to(dk_ptr.dtype.element_ty), mask=m2)
        prow = (b.to(tl.int64) * NCH + ch) * C + c
        tl.store(dwp_ptr + prow, tl.sum(tl.where(m2, dwt, 0.0), axis=0), mask=cm)
        tl.store(dup_ptr + prow, tl.sum(tl.where(m2, o * (v - y), 0.0), axis=0), mask=cm)


def _prep(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[2],) or u.shape != w.shape:
        raise ValueError(
            f"bi_wkv: expected w, u (C,) and k, v (B, T, C); got w {tuple(w.shape)}, u {tuple(u.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    w2 = (w.detach().to(torch.float32) * _LOG2E).contiguous()
    u2 = (u.detach().to(torch.float32) * _LOG2E).contiguous()
    return w2, u2, k.contiguous(), v.contiguous()


def _scan(key, a1, yf, w2, B, T, C, grad: bool) -> torch.Tensor:
    """Chunk summaries then their exclusive scan: (2, NCOMP, B, NCH, C) float32 carries."""
    nch = triton.cdiv(T, CHUNK)
    ncomp = 5 if grad else 3
    summ = torch.empty((2, ncomp, B, nch, C), device=key.device, dtype=torch.float32)
    carry = torch.empty_like(summ)
    cbs = triton.cdiv(C, BLOCK_C)
    _summary_kernel[(nch, B, cbs)](
        key, a1, yf if yf is not None else a1, w2, summ, B, T, C, nch, GRAD=grad, L=CHUNK, BC=BLOCK_C
    )
    _carry_kernel[(B, cbs, 2)](summ, carry, w2, B, T, C, nch, GRAD=grad, L=CHUNK, BC=BLOCK_C)
    return carry


def bi_wkv_triton_forward(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    with_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bi-WKV forward with Triton.

    Args:
        w, u: (C,) any float dtype (computed in float32).
        k, v: (B, T, C) float32/bfloat16/float16, same dtype.
        with_lse: also return log2 of every denominator and y in float32 (what the backward needs).

    Returns:
        (y (B, T, C) in k's dtype, or float32 when ``with_lse``; lse2 (B, T, C) float32 or None).
    """
    if triton is None:
        raise RuntimeError("bi_wkv: the Triton path needs the triton package")
    w2, u2, k, v = _prep(w, u, k, v)
    B, T, C = k.shape
    y = torch.empty(k.shape, device=k.device, dtype=torch.float32 if with_lse else k.dtype)
    if k.numel() == 0:
        return y, (torch.empty_like(y, dtype=torch.float32) if with_lse else None)
    lse = torch.empty(k.shape, device=k.device, dtype=torch.float32) if with_lse else y
    carry = _scan(k, v, None, w2, B, T, C, grad=False)
    nch = triton.cdiv(T, CHUNK)
    _output_fwd_kernel[(nch, B, triton.cdiv(C, BLOCK_C))](
        k, v, w2, u2, carry, y, lse, B, T, C, nch, WRITE_LSE=with_lse, L=CHUNK, BC=BLOCK_C
    )
    return y, (lse if with_lse else None)


def bi_wkv_triton_backward(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact gradient of Bi-WKV with Triton (recomputes the forward in float32).

    Args:
        w, u: (C,); k, v, grad_y: (B, T, C).

    Returns:
        (dw (C,) in w's dtype, du (C,) in u's dtype, dk, dv (B, T, C) in k's / v's dtypes);
        dw and du are summed over the batch with a fixed-order reduction (deterministic).
    """
    if triton is None:
        raise RuntimeError("bi_wkv: the Triton path needs the triton package")
    yf, lse = bi_wkv_triton_forward(w, u, k, v, with_lse=True)
    w2, u2, kc, vc = _prep(w, u, k, v)
    g = grad_y.contiguous()
    B, T, C = kc.shape
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    if kc.numel() == 0:
        return torch.zeros_like(w), torch.zeros_like(u), dk, dv
    nch = triton.cdiv(T, CHUNK)
    carry = _scan(lse, g, yf, w2, B, T, C, grad=True)
    dwp = torch.empty((B * nch, C), device=k.device, dtype=torch.float32)
    dup = torch.empty_like(dwp)
    _output_bwd_kernel[(nch, B, triton.cdiv(C, BLOCK_C))](
        kc, vc, g, yf, lse, w2, u2, carry, dk, dv, dwp, dup, B, T, C, nch, L=CHUNK, BC=BLOCK_C
    )
    return dwp.sum(0).to(w.dtype), dup.sum(0).to(u.dtype), dk, dv


def register_op() -> None:
    """Define ``rwkvsam::bi_wkv_triton`` / ``rwkvsam::bi_wkv_triton_backward`` (CUDA kernels here,
    fake implementations and autograd as for the CUDA extension). Idempotent."""
    global _lib
    if _lib is not None:
        return
    from .cuda_ext import register_fake_and_autograd

    lib = torch.library.Library("rwkvsam", "FRAGMENT")
    lib.define("bi_wkv_triton(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor")
    lib.define(
        "bi_wkv_triton_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor grad_y) "
        "-> (Tensor, Tensor, Tensor, Tensor)"
    )

    from .cuda_ext import check_args

    def fwd(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_args(w, u, k, v)
        with torch.cuda.device(k.device):
            return bi_wkv_triton_forward(w, u, k, v)[0]

    def bwd(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_y: torch.Tensor):
        check_args(w, u, k, v, grad_y)
        with torch.cuda.device(k.device):
            return bi_wkv_triton_backward(w, u, k, v, grad_y.to(k.dtype))

    lib.impl("bi_wkv_triton", fwd, "CUDA")
    lib.impl("bi_wkv_triton_backward", bwd, "CUDA")
    _lib = lib
    register_fake_and_autograd(OP_NAME, "rwkvsam::bi_wkv_triton_backward")
