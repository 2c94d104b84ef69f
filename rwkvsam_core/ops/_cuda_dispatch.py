"""Choose the Bi-WKV implementation for CUDA tensors: CUDA extension, else Triton, else portable.

``rwkvsam_core.ops.bi_wkv`` calls :func:`get_cuda_impl` lazily, the first time it sees a CUDA tensor.
The environment variable ``RWKVSAM_BI_WKV_BACKEND`` (``cuda``, ``triton`` or ``portable``) forces
a choice; a forced backend that cannot run is an error, not a silent fallback.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

__all__ = ["BACKEND_ENV", "get_cuda_impl"]

logger = logging.getLogger(__name__)

BACKEND_ENV = "RWKVSAM_BI_WKV_BACKEND"

_choice: tuple[Callable | None, str] | None = None


def _wrap(op: Callable) -> Callable:
    """impl(w, u, k, v) -> y for CUDA tensors; float64 inputs go to the portable code (the kernels
    compute in float32 and would silently lose precision)."""

    def impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if k.dtype == torch.float64:
            from .portable import bi_wkv_portable

            return bi_wkv_portable(w, u, k, v)
        return op(w, u, k, v)

    return impl


def _try_cuda() -> tuple[Callable | None, str]:
    from . import cuda_ext

    try:
        _, info = cuda_ext.load_extension()
    except cuda_ext.CompilerNotFoundError as exc:
        return None, f"no CUDA compiler ({exc})"
    except Exception as exc:  # build errors carry the compiler output; keep the log line short
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        logger.debug("Bi-WKV CUDA extension build failed", exc_info=True)
        return None, f"CUDA extension build failed: {first}"
    infer = _wrap(torch.ops.rwkvsam.bi_wkv)
    train = torch.ops.rwkvsam.bi_wkv_fwd_saved

    def impl(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # with a gradient to come, the training forward keeps what the backward needs (no recomputation)
        if (
            k.dtype != torch.float64
            and torch.is_grad_enabled()
            and (w.requires_grad or u.requires_grad or k.requires_grad or v.requires_grad)
        ):
            return train(w, u, k, v)[0]
        return infer(w, u, k, v)

    return impl, f"cuda: {info}"


def _try_triton() -> tuple[Callable | None, str]:
    from . import triton_bi_wkv

    ok, why = triton_bi_wkv.available()
    if not ok:
        return None, why
    triton_bi_wkv.register_op()
    return _wrap(torch.ops.rwkvsam.bi_wkv_triton), why


def _choose() -> tuple[Callable | None, str]:
    if not torch.cuda.is_available():
        return None, "portable: CUDA is not available"
    forced = os.environ.get(BACKEND_ENV, "").strip().lower()
    if forced not in ("", "cuda", "triton", "portable"):
        raise ValueError(f"{BACKEND_ENV} must be cuda, triton or portable, got {forced!r}")
    if forced == "portable":
        return None, f"portable: forced by {BACKEND_ENV}"
    if forced == "triton":
        impl, why = _try_triton()
        if impl is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but Triton cannot run: {why}")
        return impl, f"triton: forced by {BACKEND_ENV} ({why})"
    impl, cuda_why = _try_cuda()
    if impl is not None:
        return impl, cuda_why
    if forced == "cuda":
        raise RuntimeError(f"{BACKEND_ENV}=cuda but the CUDA extension is unavailable: {cuda_why}")
    impl, triton_why = _try_triton()
    if impl is not None:
        return impl, f"triton: {cuda_why}; using the Triton kernels ({triton_why})"
    return None, f"portable: {cuda_why}; Triton unavailable ({triton_why})"


def get_cuda_impl() -> tuple[Callable | None, str]:
    """The Bi-WKV implementation for CUDA tensors and one line saying which and why.

    Returns:
        ``(impl, reason)``: ``impl(w (C,), u (C,), k (B,T,C), v (B,T,C)) -> y (B,T,C)``, differentiable,
        or ``None`` when the portable implementation should be used. Decided once per process;
        the decision is logged once (INFO for the CUDA kernel, WARNING for a fallback).
    """
    global _choice
    if _choice is None:
        _choice = _choose()
        impl, reason = _choice
        if impl is not None and reason.startswith("cuda:"):
            logger.info("Bi-WKV on CUDA tensors: %s", reason)
        else:
            logger.warning("Bi-WKV on CUDA tensors: %s", reason)
    return _choice
