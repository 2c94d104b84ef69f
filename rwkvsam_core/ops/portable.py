"""Portable PyTorch implementation of the Bi-WKV operator (runs on any device torch supports).

Maths (ARCHITECTURE.md section 2), per batch b and channel c, with positions t, i in 0..T-1::

    y_t = ( sum_{i != t} exp(-(|t-i|-1)*w + k_i) * v_i + exp(u + k_t) * v_t )
        / ( sum_{i != t} exp(-(|t-i|-1)*w + k_i)       + exp(u + k_t) )

Two facts make this O(T) with plain cumulative sums:

* y is invariant to a per-(b, c) shift of k, so k is replaced by k - m with m = max_t k_t (detached).
  Every weight is then at most exp(|w| * T) and the term holding the maximum is never lost.
* With centred positions p_t = t - (T-1)/2 the decay factorises:
  causal pairs (i < t):       exp(-(t-i-1)*w) = exp(-(p_t-1)*w) * exp(p_i*w)
  anti-causal pairs (i > t):  exp(-(i-t-1)*w) = exp((p_t+1)*w) * exp(-p_i*w)
  so the causal sum is exp(-(p_t-1)*w) times an exclusive prefix sum of exp(k_i - m + p_i*w) * v_i,
  and the anti-causal sum is exp((p_t+1)*w) times an exclusive suffix sum of exp(k_i - m - p_i*w) * v_i.

When |w| * (T/2 + 1) <= ``SAFE_HALF_RANGE`` for every channel, all factors lie in
[exp(-8), exp(8)] and float32 is ample: this is the fast path (one pass of cumulative sums), with an
analytic backward that is O(T) as well (see ``_BiWKVFunction.backward``). Otherwise the sequence is
cut into chunks short enough that the same bound holds inside each chunk, and chunk states are
carried across chunks in log-scaled form (mantissa times exp(log-scale)), so arbitrarily large |w|
never overflows; that path is differentiated by autograd (still O(B*T*C) memory, never T x T).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SAFE_HALF_RANGE", "bi_wkv_portable"]

#: Largest |w| * (L/2 + 1) for which a sequence (or chunk) of length L is summed in one pass.
SAFE_HALF_RANGE = 8.0


def _compute_dtype(k: torch.Tensor) -> torch.dtype:
    return torch.float64 if k.dtype == torch.float64 else torch.float32


def _centred_positions(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(length, 1) tensor of t - (length-1)/2."""
    return (torch.arange(length, dtype=dtype, device=device) - (length - 1) / 2).unsqueeze(1)


def _excl_prefix(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Exclusive cumulative sum along ``dim``: out[t] = sum_{i < t} x[i]."""
    out = torch.zeros_like(x)
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).copy_(torch.cumsum(x.narrow(dim, 0, n - 1), dim=dim))
    return out


#: Block length of the CPU scan (see ``_prefix_sum_``).
_SCAN_BLOCK = 16


def _prefix_sum_(a: torch.Tensor) -> None:
    """In-place inclusive prefix sum of a (N, n, C) tensor (contiguous in its last two dims) along dim 1.

    torch.cumsum along a strided dimension walks each column separately and is slow on the CPU.
    Here each block of ``_SCAN_BLOCK`` rows is scanned by row additions vectorised over all columns,
    block totals are scanned recursively and added back: O(n) work, about 3 passes over the data.
    """
    n = a.shape[1]
    L = _SCAN_BLOCK
    if n <= L:
        for i in range(1, n):
            a[:, i] += a[:, i - 1]
        return
    nb = n // L
    m = nb * L
    blocks = a[:, :m].unflatten(1, (nb, L))
    for i in range(1, L):
        blocks[:, :, i] += blocks[:, :, i - 1]
    totals = blocks[:, :, L - 1].clone()
    _prefix_sum_(totals)
    blocks[:, 1:] += totals[:, :-1].unsqueeze(2)
    for i in range(m, n):
        a[:, i] += a[:, i - 1]


def _suffix_sum_(a: torch.Tensor) -> None:
    """In-place inclusive suffix sum along dim 1, the mirror image of ``_prefix_sum_``."""
    n = a.shape[1]
    L = _SCAN_BLOCK
    if n <= L:
        for i in range(n - 2, -1, -1):
            a[:, i] += a[:, i + 1]
        return
    nb = n // L
    r = n - nb * L
    blocks = a[:, r:].unflatten(1, (nb, L))
    for i in range(L - 2, -1, -1):
        blocks[:, :, i] += blocks[:, :, i + 1]
    totals = blocks[:, :, 0].clone()
    _suffix_sum_(totals)
    blocks[:, :-1] += totals[:, 1:].unsqueeze(2)
    for i in range(r - 1, -1, -1):
        a[:, i] += a[:, i + 1]


def _scan_pair_(z: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sum of z[0] and inclusive suffix sum of z[1] along dim 2.

    z: (2, N, T, C), contiguous. On the CPU the scan is done in place (and z returned); elsewhere
    torch.cumsum is fast in any layout and a new tensor is returned.
    """
    if z.device.type != "cpu":
        return torch.stack((torch.cumsum(z[0], dim=1), torch.cumsum(z[1].flip(1), dim=1).flip(1)))
    _prefix_sum_(z[0])
    _suffix_sum_(z[1])
    return z


def _decay_factors(w: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, C) factors exp(p*w) and exp(-p*w) for centred positions p = t - (T-1)/2."""
    p = torch.arange(T, dtype=w.dtype, device=w.device) - (T - 1) / 2
    e_pos = (p.unsqueeze(1) * w).exp_()
    return e_pos, torch.reciprocal(e_pos)


def _bidir_decay_sum(x: torch.Tensor, w: torch.Tensor, order: int = 1) -> torch.Tensor:
    """Sum over the symmetric decay kernel without its diagonal, O(T), along dim -2.

    x: (..., T, C). Returns out (..., T, C) with
      order 1: out[t] = sum_{i != t} exp(-(|t-i|-1)*w) * x[i]
      order 2: out[t] = sum_{i != t} (|t-i|-1) * exp(-(|t-i|-1)*w) * x[i]
    Requires max|w| * (T/2 + 1) <= SAFE_HALF_RANGE (all factors then lie in [e^-8, e^8]).

    With centred positions p, causal pairs factorise as exp(-(t-1-i)*w) = exp(-p_{t-1}*w) * exp(p_i*w):
    the causal part at t is (e_neg * P)[t-1] with P the inclusive prefix sum of e_pos * x; likewise the
    anti-causal part is (e_pos * S)[t+1] with S the inclusive suffix sum of e_neg * x. For order 2, a
    second prefix (suffix) sum turns sum_{i<=s} into sum_{i<=s} (s+1-i), read at s = t-2 (t+2), and
    the rescale gains a factor exp(-w).
    """
    shape = x.shape
    T, C = shape[-2], shape[-1]
    if order >= T:
        return torch.zeros_like(x)
    e_pos, e_neg = _decay_factors(w, T)
    xf = x.reshape(-1, T, C)
    z = torch.empty((2, *xf.shape), dtype=x.dtype, device=x.device)
    torch.mul(xf, e_pos, out=z[0])
    torch.mul(xf, e_neg, out=z[1])
    for _ in range(order):
        z = _scan_pair_(z)
    pre, suf = z[0], z[1]
    pre.mul_(e_neg)
    suf.mul_(e_pos)
    out = torch.empty_like(xf)
    o = order
    if 2 * o < T:
        torch.add(pre[:, : T - 2 * o], suf[:, 2 * o :], out=out[:, o : T - o])
        out[:, :o] = suf[:, o : 2 * o]
        out[:, T - o :] = pre[:, T - 2 * o : T - o]
    else:
        out.zero_()
        out[:, o:] += pre[:, : T - o]
        out[:, : T - o] += suf[:, o:]
    if o > 1:
        out.mul_(torch.exp(-(o - 1) * w))
    return out.view(shape)


class _BiWKVFunction(torch.autograd.Function):
    """Single-pass Bi-WKV, valid when max_c |w_c| * (T/2 + 1) <= SAFE_HALF_RANGE.

    Inputs k, v are contiguous (B, T, C) in the compute dtype (float32 or float64); w, u (C,) in the
    same dtype.
    """

    @staticmethod
    def forward(ctx, w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = torch.empty((2, *k.shape), dtype=k.dtype, device=k.device)  # [exp(k-m) * v, exp(k-m)]
        torch.sub(k, k.amax(dim=1, keepdim=True), out=x[1])
        x[1].exp_()
        torch.mul(x[1], v, out=x[0])
        nd = _bidir_decay_sum(x, w)  # (2, B, T, C): numerator, denominator without the self term
        nd.addcmul_(x, torch.exp(u))
        den = nd[1]
        y = nd[0].div_(den)
        ctx.save_for_backward(w, u, x, y, den)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        """Analytic gradients, O(T) per (b, c).

        With a_t = g_t / den_t and W_ti the (shifted) weight of value i in output t:
          dv_i = sum_t a_t W_ti,  dk_i = sum_t a_t W_ti (v_i - y_t),
          du   = sum_t a_t W_tt (v_t - y_t),
          dw   = -sum_t a_t sum_{i != t} (|t-i|-1) W_ti (v_i - y_t).
        The decay part of W is symmetric in (t, i), so the sums over t for dv and dk are the same
        bidirectional sums as the forward's; dw uses the order-2 sums of the forward's terms.
        """
        w, u, x, y, den = ctx.saved_tensors
        ekv, ek = x[0], x[1]
        eu = torch.exp(u)
        a = gy.to(y.dtype) / den  # (B, T, C)
        both = torch.stack((a, a * y))
        q = _bidir_decay_sum(both, w)
        q.addcmul_(both, eu)
        dv = ek * q[0]
        dk = ekv * q[0] - ek * q[1]
        du = (a * (ekv - ek * y)).sum(dim=(0, 1)) * eu
        d2 = _bidir_decay_sum(x, w, order=2)
        dw = -(a * (d2[0] - y * d2[1])).sum(dim=(0, 1))
        return dw, du, dk, dv


def _causal_chunked(
    w: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal sums in log-scaled form for any w (differentiable by autograd).

    Returns ``(mant, lam)``: mant (B, T, C, 2) and lam (B, T, C) with
    sum_{i<t} exp(k_i - (t-1-i)*w) * [v_i, 1] == mant[:, t] * exp(lam[:, t]).
    ``chunk`` must satisfy max|w| * (chunk/2 + 1) <= SAFE_HALF_RANGE.
    """
    T = k.shape[1]
    mants: list[torch.Tensor] = []
    lams: list[torch.Tensor] = []
    carry: torch.Tensor | None = None  # (B, C, 2) mantissa of sum_{i<s} exp(k_i + (i-s+1)*w) [v_i, 1]
    carry_lam: torch.Tensor | None = None  # (B, C) its log-scale
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        n = e - s
        kc = k[:, s:e]
        p = _centred_positions(n, k.dtype, k.device)
        centre = (n - 1) / 2
        mc = kc.detach().amax(dim=1, keepdim=True)  # (B, 1, C)
        x = torch.exp(kc - mc + p * w)
        terms = torch.stack((x * v[:, s:e], x), dim=-1)
        local = _excl_prefix(terms)
        local_lam = mc - (p - 1) * w  # (B, n, C)
        if carry is None:
            mants.append(local)
            lams.append(local_lam.expand_as(kc))
        else:
            tau = torch.arange(n, dtype=k.dtype, device=k.device).unsqueeze(1)
            carry_at = carry_lam.unsqueeze(1) - tau * w  # (B, n, C)
            lam = torch.maximum(local_lam, carry_at).detach()
            mant = local * torch.exp(local_lam - lam).unsqueeze(-1)
            mant = mant + carry.unsqueeze(1) * torch.exp(carry_at - lam).unsqueeze(-1)
            mants.append(mant)
            lams.append(lam)
        # state at the end of this chunk: sum_{i<e} exp(k_i + (i-e+1)*w) [v_i, 1]
        tot = terms.sum(dim=1)  # (B, C, 2)
        tot_lam = mc.squeeze(1) + (centre - n + 1) * w  # (B, C)
        if carry is None:
            carry, carry_lam = tot, tot_lam
        else:
            decayed_lam = carry_lam - n * w
            new_lam = torch.maximum(decayed_lam, tot_lam).detach()
            carry = carry * torch.exp(decayed_lam - new_lam).unsqueeze(-1) + tot * torch.exp(
                tot_lam - new_lam
            ).unsqueeze(-1)
            carry_lam = new_lam
    return torch.cat(mants, dim=1), torch.cat(lams, dim=1)


def _bi_wkv_chunked(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int
) -> torch.Tensor:
    """Bi-WKV for any |w| via chunked log-scaled scans (autograd differentiates it)."""
    k = k - k.detach().amax(dim=1, keepdim=True)
    kk = torch.cat((k, k.flip(1)), dim=0)
    vv = torch.cat((v, v.flip(1)), dim=0)
    mant, lam = _causal_chunked(w, kk, vv, chunk)
    B = k.shape[0]
    mant_c, lam_c = mant[:B], lam[:B]
    mant_a, lam_a = mant[B:].flip(1), lam[B:].flip(1)
    lam_s = u + k
    ref = torch.maximum(torch.maximum(lam_c, lam_a), lam_s).detach()
    fc = torch.exp(lam_c - ref).unsqueeze(-1)
    fa = torch.exp(lam_a - ref).unsqueeze(-1)
    fs = torch.exp(lam_s - ref)
    tot = mant_c * fc + mant_a * fa
    return (tot[..., 0] + fs * v) / (tot[..., 1] + fs)


def single_pass_ok(w: torch.Tensor, T: int) -> bool:
    """True when the single-pass (fast) path is numerically safe for these decays and length."""
    return float(w.detach().abs().max()) * (T / 2 + 1) <= SAFE_HALF_RANGE


def chunk_length(w: torch.Tensor) -> int:
    """Longest chunk L with max|w| * (L/2 + 1) <= SAFE_HALF_RANGE (at least 1)."""
    wmax = float(w.detach().abs().max())
    if wmax == 0.0:
        raise ValueError("chunk_length needs a non-zero decay")
    return max(1, math.floor(2 * (SAFE_HALF_RANGE / wmax - 1)))


def bi_wkv_portable(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, chunk: int | None = None
) -> torch.Tensor:
    """Bi-WKV in plain PyTorch, O(T) time and O(B*T*C) memory.

    Args:
        w: (C,) decay, already divided by T.
        u: (C,) bonus of the token itself, already divided by T.
        k: (B, T, C) keys.
        v: (B, T, C) values, same dtype as k.
        chunk: force the chunked path with this chunk length (testing); by default the single-pass
            path is used whenever it is safe and the chunked one otherwise.

    Returns:
        y: (B, T, C) in k's dtype. Accumulation is float32 (float64 for float64 inputs).

    Inputs are assumed validated (see ``rwkvsam_core.ops.bi_wkv``).
    """
    out_dtype = k.dtype
    cdt = _compute_dtype(k)
    T = k.shape[1]
    wc, uc = w.to(cdt), u.to(cdt)
    kc, vc = k.to(cdt).contiguous(), v.to(cdt).contiguous()
    if chunk is None and single_pass_ok(wc, T):
        y = _BiWKVFunction.apply(wc, uc, kc, vc)
    else:
        if chunk is None:
            chunk = chunk_length(wc)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        y = _bi_wkv_chunked(wc, uc, kc, vc, chunk)
    return y.to(out_dtype)
