"""Build the Bi-WKV CUDA kernels on first use and register them as ``torch.ops.rwkvsam.bi_wkv``.

The C++/CUDA sources (``bi_wkv.cpp``, ``bi_wkv_kernels.cu``, ``bi_wkv.h``) are looked up next to the
package (``rwkvsam_core/_kernels``, where a wheel carries them) and then in the source checkout
(``<repo>/kernels``). They are compiled with ``torch.utils.cpp_extension.load`` for the compute
capabilities of the visible GPUs (e.g. ``sm_90`` on H100/H200) into
``$TORCH_EXTENSIONS_DIR/<name>`` or ``~/.cache/rwkvsam/torch_extensions/<name>``; the name carries a
hash of the sources, the architectures and the torch/CUDA versions, so a changed source or GPU
rebuilds once and every later process reuses the cached build.

On top of the compiled functions this module defines the custom ops (Python-side argument checks,
CUDA implementations from the extension, fake implementations and the autograd formula)::

    rwkvsam::bi_wkv(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor
    rwkvsam::bi_wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor grad_y) -> (Tensor, Tensor, Tensor, Tensor)
    rwkvsam::bi_wkv_fwd_saved(Tensor w, Tensor u, Tensor k, Tensor v) -> (Tensor y, Tensor yf, Tensor lse)
    rwkvsam::bi_wkv_bwd_saved(Tensor w, Tensor u, Tensor k, Tensor v, Tensor y, Tensor yf, Tensor lse,
                              Tensor grad_y) -> (Tensor, Tensor, Tensor, Tensor)

``bi_wkv`` is the inference forward; its autograd formula calls ``bi_wkv_backward``, which computes the
forward again. ``bi_wkv_fwd_saved`` is the training forward: besides ``y`` (k's dtype) it returns
``lse`` (log2 of every denominator, float32) and ``yf`` (``y`` in float32; empty when k is float32,
where ``y`` itself is float32), which its autograd formula hands to ``bi_wkv_bwd_saved``, so the
backward skips the forward's three kernels at the cost of keeping 4-8 bytes per element.
``rwkvsam_core.ops.bi_wkv`` takes the training forward when a gradient is needed. The ops
work under torch.compile, CUDA graphs and ``torch.library.opcheck``. Nothing happens at
import time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

__all__ = [
    "CompilerNotFoundError",
    "SOURCE_FILES",
    "check_args",
    "kernel_source_dir",
    "load_extension",
    "register_fake_and_autograd",
]

logger = logging.getLogger(__name__)

#: Files that make up the extension (compiled: the .cpp and .cu; hashed: all three).
SOURCE_FILES = ("bi_wkv.cpp", "bi_wkv_kernels.cu", "bi_wkv.h")

_lock = threading.Lock()
_module: ModuleType | None = None
_registered: set[str] = set()
_lib: torch.library.Library | None = None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CompilerNotFoundError(RuntimeError):
    """No CUDA compiler (nvcc) is available to build the extension."""


def kernel_source_dir() -> Path:
    """Directory holding the CUDA sources: ``rwkvsam_core/_kernels`` or else ``<repo>/kernels``.

    Raises:
        FileNotFoundError: when neither location holds all of :data:`SOURCE_FILES`.
    """
    import rwkvsam_core

    pkg = Path(rwkvsam_core.__file__).resolve().parent
    candidates = (pkg / "_kernels", pkg.parent / "kernels")
    for cand in candidates:
        if all((cand / f).is_file() for f in SOURCE_FILES):
            return cand
    raise FileNotFoundError(
        "Bi-WKV CUDA sources not found; looked for "
        + ", ".join(SOURCE_FILES)
        + " in "
        + " and ".join(map(str, candidates))
    )


def _nvcc() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None:
        raise CompilerNotFoundError("this torch build has no CUDA support")
    candidates = []
    if CUDA_HOME:
        candidates.append(Path(CUDA_HOME) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise CompilerNotFoundError("no nvcc found (set CUDA_HOME or put nvcc on PATH)")


def _arch_flags() -> tuple[list[str], str]:
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    if not caps:
        raise RuntimeError("no CUDA device visible")
    flags = [f"-gencode=arch=compute_{a}{b},code=sm_{a}{b}" for a, b in caps]
    return flags, ",".join(f"sm_{a}{b}" for a, b in caps)


def _cache_root() -> Path:
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "rwkvsam" / "torch_extensions"


def load_extension(verbose: bool = False) -> tuple[ModuleType, str]:
    """Compile (once, cached on disk) and load the extension; register its fake/autograd parts.

    Returns:
        (the loaded Python module, one line describing the build).

    Raises:
        CompilerNotFoundError: no nvcc.
        FileNotFoundError: sources missing.
        RuntimeError / subprocess errors: the build failed (the message holds the compiler output).
    """
    global _module
    with _lock:
        if _module is not None:
            return _module, _module.__rwkvsam_build_info__
        nvcc = _nvcc()
        src = kernel_source_dir()
        arch, arch_desc = _arch_flags()
        h = hashlib.sha256()
        for f in SOURCE_FILES:
            h.update((src / f).read_bytes())
        h.update(f"{arch_desc}|{torch.__version__}|{torch.version.cuda}".encode())
        name = f"rwkvsam_bi_wkv_{h.hexdigest()[:12]}"
        build_dir = _cache_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        from torch.utils.cpp_extension import load

        logger.info("building/loading the Bi-WKV CUDA extension %s for %s in %s", name, arch_desc, build_dir)
        mod = load(
            name=name,
            sources=[str(src / "bi_wkv.cpp"), str(src / "bi_wkv_kernels.cu")],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "-lineinfo", *arch],
            build_directory=str(build_dir),
            verbose=verbose,
        )
        _define_ops(mod)
        mod.__rwkvsam_build_info__ = (
            f"compiled for {arch_desc} with {nvcc} (torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
        _module = mod
        return mod, mod.__rwkvsam_build_info__


def check_args(
    w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_y: torch.Tensor | None = None
) -> None:
    """Validate the op's arguments in Python (clear errors before any kernel runs).

    Raises:
        ValueError: wrong shapes, dtypes or devices.
    """
    if k.dim() != 3:
        raise ValueError(f"bi_wkv: k must have shape (B, T, C), got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"bi_wkv: v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if v.dtype != k.dtype:
        raise ValueError(f"bi_wkv: v must have k's dtype {k.dtype}, got {v.dtype}")
    if k.dtype not in _KERNEL_DTYPES:
        raise ValueError(f"bi_wkv kernel: k and v must be float32, float16 or bfloat16, got {k.dtype}")
    C = k.shape[2]
    if w.shape != (C,) or u.shape != (C,):
        raise ValueError(
            f"bi_wkv: w and u must have shape (C,) = ({C},), got w {tuple(w.shape)}, u {tuple(u.shape)}"
        )
    if not (w.is_floating_point() and u.is_floating_point()):
        raise ValueError("bi_wkv: w and u must be floating point")
    tensors = (w, u, k, v) if grad_y is None else (w, u, k, v, grad_y)
    if any(t.device != k.device for t in tensors) or k.device.type != "cuda":
        raise ValueError("bi_wkv kernel: all inputs must be on one CUDA device")
    if grad_y is not None and grad_y.shape != k.shape:
        raise ValueError(
            f"bi_wkv_backward: grad_y must have k's shape {tuple(k.shape)}, got {tuple(grad_y.shape)}"
        )
    if k.shape[0] > 65535:
        raise ValueError(f"bi_wkv kernel: batch size above 65535 is not supported, got {k.shape[0]}")


def _define_ops(mod: ModuleType) -> None:
    global _lib
    if _lib is not None:
        return
    lib = torch.library.Library("rwkvsam", "FRAGMENT")
    lib.define("bi_wkv(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor")
    lib.define(
        "bi_wkv_backward(Tensor w, Tensor u, Tensor k, Tensor v, Tensor grad_y) -> (Tensor, Tensor, Tensor, Tensor)"
    )

    def forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        check_args(w, u, k, v)
        return mod.forward(w, u, k, v)

    def backward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_y: torch.Tensor):
        check_args(w, u, k, v, grad_y)
        return tuple(mod.backward(w, u, k, v, grad_y))

    lib.define("bi_wkv_fwd_saved(Tensor w, Tensor u, Tensor k, Tensor v) -> (Tensor, Tensor, Tensor)")
    lib.define(
        "bi_wkv_bwd_saved(Tensor w, Tensor u, Tensor k, Tensor v, Tensor y, Tensor yf, Tensor lse, Tensor grad_y)"
        " -> (Tensor, Tensor, Tensor, Tensor)"
    )

    def fwd_saved(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        check_args(w, u, k, v)
        y, lse, yf = mod.forward_saved(w, u, k, v)
        return y, yf, lse

    def bwd_saved(w, u, k, v, y, yf, lse, grad_y):
        check_args(w, u, k, v, grad_y)
        return tuple(mod.backward_saved(w, u, k, v, y, yf, lse, grad_y))

    # inference only: sigmoid(r) * bi_wkv(w, u, k, v), the spatial mix's gate applied by the kernel
    lib.define("bi_wkv_gated(Tensor w, Tensor u, Tensor k, Tensor v, Tensor r) -> Tensor")

    def gated(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: torch.Tensor):
        from . import _check_gate

        check_args(w, u, k, v)
        _check_gate(k, r)
        return mod.forward_gated(w, u, k, v, r)

    lib.impl("bi_wkv", forward, "CUDA")
    lib.impl("bi_wkv_backward", backward, "CUDA")
    lib.impl("bi_wkv_fwd_saved", fwd_saved, "CUDA")
    lib.impl("bi_wkv_bwd_saved", bwd_saved, "CUDA")
    lib.impl("bi_wkv_gated", gated, "CUDA")
    _lib = lib
    register_fake_and_autograd("rwkvsam::bi_wkv", "rwkvsam::bi_wkv_backward")
    _register_saved_fake_and_autograd()
    _register_gated_fake_and_autograd()


def _register_gated_fake_and_autograd() -> None:
    """The gated op is for inference: its fake implementation, and an autograd formula that refuses
    clearly instead of returning no gradient."""

    @torch.library.register_fake("rwkvsam::bi_wkv_gated")
    def _fake(w, u, k, v, r):
        torch._check(k.dim() == 3, lambda: f"bi_wkv: k must be (B, T, C), got {tuple(k.shape)}")
        return k.new_empty(k.shape)

    def backward(ctx, grad_y):
        raise RuntimeError(
            "rwkvsam::bi_wkv_gated is inference-only; for gradients use "
            "torch.sigmoid(r) * rwkvsam_core.ops.bi_wkv(w, u, k, v)"
        )

    def setup_context(ctx, inputs, output) -> None:
        pass

    torch.library.register_autograd("rwkvsam::bi_wkv_gated", backward, setup_context=setup_context)


def _needed_grads(ctx, grads: tuple) -> tuple:
    """(dw, du, dk, dv) with None where the input needs no gradient."""
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad, strict=True))


def _register_saved_fake_and_autograd() -> None:
    """Fake implementations of the training forward / backward pair and the forward's autograd."""

    @torch.library.register_fake("rwkvsam::bi_wkv_fwd_saved")
    def _fake_fwd(w, u, k, v):
        torch._check(k.dim() == 3, lambda: f"bi_wkv: k must be (B, T, C), got {tuple(k.shape)}")
        yf = (
            k.new_empty((0,), dtype=torch.float32)
            if k.dtype == torch.float32
            else k.new_empty(k.shape, dtype=torch.float32)
        )
        return k.new_empty(k.shape), yf, k.new_empty(k.shape, dtype=torch.float32)

    @torch.library.register_fake("rwkvsam::bi_wkv_bwd_saved")
    def _fake_bwd(w, u, k, v, y, yf, lse, grad_y):
        return w.new_empty(w.shape), u.new_empty(u.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output) -> None:
        y, yf, lse = output
        ctx.mark_non_differentiable(yf, lse)
        ctx.save_for_backward(*inputs, y, yf, lse)

    def backward(ctx, grad_y, _grad_yf, _grad_lse):
        w, u, k, v, y, yf, lse = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(y)
        return _needed_grads(ctx, torch.ops.rwkvsam.bi_wkv_bwd_saved(w, u, k, v, y, yf, lse, grad_y))

    torch.library.register_autograd("rwkvsam::bi_wkv_fwd_saved", backward, setup_context=setup_context)


def register_fake_and_autograd(op_name: str, backward_name: str) -> None:
    """Attach fake (meta) implementations and the autograd formula to a Bi-WKV op pair.

    ``op_name`` must have the schema ``(Tensor w, Tensor u, Tensor k, Tensor v) -> Tensor`` and
    ``backward_name`` ``(Tensor w, Tensor u, Tensor k, Tensor v, Tensor grad_y) -> (dw, du, dk, dv)``.
    Idempotent per op name.
    """
    if op_name in _registered:
        return
    ns, fwd = op_name.split("::")
    _, bwd = backward_name.split("::")
    bwd_op: Callable = getattr(getattr(torch.ops, ns), bwd)

    def fake_forward(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch._check(k.dim() == 3, lambda: f"bi_wkv: k must be (B, T, C), got {tuple(k.shape)}")
        return k.new_empty(k.shape)

    def fake_backward(
        w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad_y: torch.Tensor
    ):
        return w.new_empty(w.shape), u.new_empty(u.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    torch.library.register_fake(op_name)(fake_forward)
    torch.library.register_fake(backward_name)(fake_backward)

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def backward(ctx, grad_y: torch.Tensor):
        w, u, k, v = ctx.saved_tensors
        return _needed_grads(ctx, bwd_op(w, u, k, v, grad_y))

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    _registered.add(op_name)
