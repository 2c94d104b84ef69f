"""Plain O(T^2) float64 evaluation of the Bi-WKV formula, for tests only.

    y_t = ( sum_{i != t} exp(-(|t-i|-1)*w + k_i) * v_i + exp(u + k_t) * v_t )
        / ( sum_{i != t} exp(-(|t-i|-1)*w + k_i)       + exp(u + k_t) )

It builds the T x T exponent matrix (in row blocks, to bound memory) and takes a softmax over i,
which is the formula above written stably. Differentiable by autograd.
"""

from __future__ import annotations

import torch

__all__ = ["bi_wkv_reference"]


def bi_wkv_reference(
    w: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int = 1024,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference Bi-WKV in float64.

    Args:
        w: (C,) decay (already divided by T).
        u: (C,) bonus of the token itself (already divided by T).
        k: (B, T, C) keys.
        v: (B, T, C) values.
        block: number of output rows evaluated at once (memory is B * block * T * C doubles).
        rows: optional (R,) long tensor of output positions to evaluate (all T by default).

    Returns:
        y: (B, T, C) float64, or (B, R, C) when ``rows`` is given.
    """
    if k.dim() != 3 or v.shape != k.shape or w.shape != (k.shape[2],) or u.shape != w.shape:
        raise ValueError(
            f"expected w, u (C,) and k, v (B, T, C); got w {tuple(w.shape)}, u {tuple(u.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    w, u, k, v = (x.to(torch.float64) for x in (w, u, k, v))
    T = k.shape[1]
    kc = k.permute(0, 2, 1)  # (B, C, T)
    vc = v.permute(0, 2, 1).unsqueeze(-1)  # (B, C, T, 1)
    idx = torch.arange(T, device=k.device)
    out_rows = idx if rows is None else rows.to(k.device)
    outs = []
    for s in range(0, out_rows.numel(), block):
        t = out_rows[s : s + block]
        dist = (t[:, None] - idx[None, :]).abs()  # (n, T)
        expo = -(dist.to(torch.float64) - 1) * w[:, None, None] + kc[:, :, None, :]  # (B, C, n, T)
        self_term = (u[:, None] + kc[:, :, t]).unsqueeze(-1)  # (B, C, n, 1)
        expo = torch.where(dist == 0, self_term, expo)
        outs.append((torch.softmax(expo, dim=-1) @ vc).squeeze(-1))  # (B, C, n)
    return torch.cat(outs, dim=2).permute(0, 2, 1)
