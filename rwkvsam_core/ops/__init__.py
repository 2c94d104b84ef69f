"""The Bi-WKV operator: one public function, dispatching to the best implementation for the device.

``bi_wkv(w, u, k, v)`` computes, for every batch b and channel c (ARCHITECTURE.md section 2)::

    y_t = ( sum_{i != t} exp(-(|t-i|-1)*w + k_i) * v_i + exp(u + k_t) * v_t )
        / ( sum_{i != t} exp(-(|t-i|-1)*w + k_i)       + exp(u + k_t) )

CUDA tensors use the CUDA kernel when ``rwkvsam_core.ops._cuda_dispatch`` provides one; everything
else (and CUDA when the kernel is unavailable) uses the portable PyTorch implementation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .portable import bi_wkv_portable

__all__ = ["bi_wkv", "bi_wkv_backend_info", "bi_wkv_gated"]

logger = logging.getLogger(__name__)

_PORTABLE_REASON = "portable PyTorch implementation (O(T) cumulative sums, float32/float64 accumulation)"
_cuda_choice: tuple[Callable | None, str] | None = None
_logged_devices: set[str] = set()


def _cuda_impl() -> tuple[Callable | None, str]:
    """(impl or None, reason), looked up once per process."""
    global _cuda_choice
    if _cuda_choice is None:
        try:
            from ._cuda_dispatch import get_cuda_impl
        except ImportError as exc:
            _cuda_choice = (None, f"no CUDA dispatch module ({exc})")
        else:
            try:
                _cuda_choice = get_cuda_impl()
            except Exception as exc:  # a broken kernel build must never break the model
                logger.warning("Bi-WKV CUDA kernel lookup failed: %s", exc)
                _cuda_choice = (None, f"CUDA kernel lookup failed: {exc}")
    return _cuda_choice


def bi_wkv_backend_info(device: str | torch.device = "cpu") -> dict[str, str]:
    """Which Bi-WKV implementation ``bi_wkv`` uses for tensors on ``device``, and why.

    Returns:
        ``{"backend": "portable" | "cuda" | ..., "reason": one line}``.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return {"backend": "portable", "reason": "CUDA is not available in this torch build/machine"}
        impl, reason = _cuda_impl()
        if impl is not None:
            return {"backend": "cuda", "reason": reason}
        if not reason.startswith("portable"):
            reason = f"portable: CUDA kernel unavailable ({reason})"
        return {"backend": "portable", "reason": reason}
    return {"backend": "portable", "reason": f"portable: {dev.type} device uses the {_PORTABLE_REASON}"}


def _log_choice_once(device: torch.device) -> None:
    if device.type not in _logged_devices:
        _logged_devices.add(device.type)
        info = bi_wkv_backend_info(device)
        logger.info("bi_wkv on %s: %s backend (%s)", device.type, info["backend"], info["reason"])


def _validate(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("w", w), ("u", u), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"bi_wkv: {name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"bi_wkv: {name} must be a floating-point tensor, got {x.dtype}")
    if k.dim() != 3:
        raise ValueError(f"bi_wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"bi_wkv: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise ValueError(f"bi_wkv: v must have k's dtype {k.dtype}, got {v.dtype}")
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(
            f"bi_wkv: w and u must have shape (C,) = ({C},), got w {tuple(w.shape)}, u {tuple(u.shape)}"
        )
    devices = {x.device for x in (w, u, k, v)}
    if len(devices) != 1:
        raise ValueError(f"bi_wkv: all inputs must be on one device, got {sorted(map(str, devices))}")


def _check_gate(k: torch.Tensor, r: torch.Tensor) -> None:
    """ValueError unless the gate r of a gated Bi-WKV has k's shape, dtype and device."""
    if r.shape != k.shape or r.dtype != k.dtype or r.device != k.device:
        raise ValueError(
            f"bi_wkv_gated: r must have k's shape {tuple(k.shape)}, dtype {k.dtype} and device {k.device}, "
            f"got {tuple(r.shape)} {r.dtype} on {r.device}"
        )


def bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional WKV attention of Vision-RWKV / RWKV-SAM, exact formula, O(T).

    Args:
        w: (C,) per-channel decay, already divided by T (may be negative).
        u: (C,) per-channel bonus of the token itself, already divided by T.
        k: (B, T, C) keys (float16, bfloat16, float32 or float64).
        v: (B, T, C) values, same dtype as k.

    Returns:
        y: (B, T, C) in k's dtype; accumulation is float32 (float64 for float64 inputs).
        Differentiable in w, u, k and v.

    Raises:
        ValueError: on wrong shapes, dtypes or mixed devices.
    """
    _validate(w, u, k, v)
    if k.numel() == 0:
        return torch.zeros_like(k)
    _log_choice_once(k.device)
    if k.device.type == "cuda":
        impl, _ = _cuda_impl()
        if impl is not None:
            return impl(w, u, k, v)
    return bi_wkv_portable(w, u, k, v)


def bi_wkv_gated(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor
) -> torch.Tensor:
    """``sigmoid(r) * bi_wkv(w, u, k, v)``: the gated output of a VRWKV spatial mix.

    With the CUDA kernel and no gradient to record, one kernel computes both in float32 and rounds
    once to k's dtype (no pass over ``y`` for the gate). Otherwise the gate is applied in float32
    (float64 for float64 inputs) to ``bi_wkv``'s output (differentiable), then rounded to k's dtype.

    Args:
        w, u, k, v: as for :func:`bi_wkv`.
        r: (B, T, C) receptance, k's dtype.

    Raises:
        ValueError: on wrong shapes, dtypes or mixed devices.
    """
    _validate(w, u, k, v)
    _check_gate(k, r)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (w, u, k, v, r))
    if (
        not needs_grad
        and k.numel()
        and k.device.type == "cuda"
        and k.dtype != torch.float64
        and _cuda_impl()[1].startswith("cuda:")  # the extension, not the Triton stand-in
    ):
        return torch.ops.rwkvsam.bi_wkv_gated(w, u, k, v, r)
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    return (torch.sigmoid(r.to(acc)) * bi_wkv(w, u, k, v).to(acc)).to(k.dtype)
