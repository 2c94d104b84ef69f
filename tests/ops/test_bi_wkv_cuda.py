"""GPU tests of the Bi-WKV CUDA extension and the Triton implementation (issue 3).

Marked ``cuda``: skipped on machines without a GPU, run on the device machine. The CUDA tests are
skipped (with the reason) only when no nvcc exists; a failing build is a failure.
Outputs and all four gradients are compared with float64 evaluations of the exact formula on the
same (rounded) inputs: the O(T^2) reference where it fits in memory, the portable implementation
in float64 on the GPU otherwise. Outputs are allocated from a caching allocator pre-filled with NaN,
so an element the kernel forgets to write fails loudly.
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

# every GPU test carries both marks; the few CPU tests at the end check the pure-Python parts
gpu = pytest.mark.cuda
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# relative L2 tolerances: (y, dk/dv, dw/du). Reduced-precision outputs are rounded once (bf16: 2^-9);
# dw and du are accumulated in float32 in every case.
TOL = {
    torch.float32: (2e-5, 1e-4, 1e-3),
    torch.bfloat16: (1e-2, 1e-2, 2e-3),
    torch.float16: (2e-3, 2e-3, 2e-3),
}


def _ops(backend: str):
    if backend == "cuda":
        from rwkvsam_core.ops import cuda_ext

        try:
            cuda_ext.load_extension()
        except cuda_ext.CompilerNotFoundError as exc:
            pytest.skip(f"no CUDA compiler: {exc}")
        return torch.ops.rwkvsam.bi_wkv, torch.ops.rwkvsam.bi_wkv_backward
    from rwkvsam_core.ops import triton_bi_wkv

    ok, why = triton_bi_wkv.available()
    if not ok:
        pytest.skip(f"Triton unavailable: {why}")
    triton_bi_wkv.register_op()
    return torch.ops.rwkvsam.bi_wkv_triton, torch.ops.rwkvsam.bi_wkv_triton_backward


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values (an unwritten or overflowed element)"
    den = b.norm()
    if den == 0:
        return float(a.norm())
    return float((a - b).norm() / den)


def _poison(*likes: torch.Tensor, copies: int = 3) -> None:
    """Fill cached allocator blocks of the outputs' sizes with NaN, then free them for reuse."""
    blocks = []
    for t in likes:
        n = max(1, t.numel() * t.element_size() // 4)
        for _ in range(copies):
            blocks.append(torch.full((n,), float("nan"), device="cuda"))
    del blocks


def _inputs(
    B: int, T: int, C: int, dtype: torch.dtype, seed: int, *, wscale: float = 4.0, kscale: float = 2.0
):
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    # w in the model is spatial_decay / T with spatial_decay in [-5, 3]; wscale stretches it
    w = (torch.rand(C, generator=g, device=dev) * 8 - 5) * wscale / T
    u = torch.randn(C, generator=g, device=dev) * 0.5
    k = (torch.randn(B, T, C, generator=g, device=dev) * kscale).to(dtype)
    v = torch.randn(B, T, C, generator=g, device=dev).to(dtype)
    gy = torch.randn(B, T, C, generator=g, device=dev).to(dtype)
    return w, u, k, v, gy


def _expected(w, u, k, v, gy):
    """float64 output and gradients (dw, du, dk, dv) on exactly these inputs."""
    from rwkvsam_core.ops.portable import bi_wkv_portable
    from rwkvsam_core.ops.reference import bi_wkv_reference

    xs = [x.detach().double().requires_grad_() for x in (w, u, k, v)]
    B, T, C = k.shape
    if B * T * T * C <= 2**25:
        y = bi_wkv_reference(*xs, block=max(1, min(T, 2**25 // max(1, B * T * C))))
    else:
        y = bi_wkv_portable(*xs)
    y.backward(gy.double())
    return y.detach(), tuple(x.grad for x in xs)


@functools.lru_cache(maxsize=1)
def _case(dtype: torch.dtype, B: int, T: int, C: int):
    seed = zlib.crc32(f"{dtype}-{B}-{T}-{C}".encode())
    w, u, k, v, gy = _inputs(B, T, C, dtype, seed)
    y_ref, grads_ref = _expected(w, u, k, v, gy)
    return (w, u, k, v, gy), y_ref, grads_ref


def _check(backend, inputs, y_ref, grads_ref, dtype, label=""):
    fwd, bwd = _ops(backend)
    w, u, k, v, gy = inputs
    _poison(k, k, k)
    y = fwd(w, u, k, v)
    assert y.shape == k.shape and y.dtype == k.dtype
    _poison(k, k, k, w)
    dw, du, dk, dv = bwd(w, u, k, v, gy)
    assert dk.dtype == k.dtype and dv.dtype == v.dtype and dw.dtype == w.dtype and du.dtype == u.dtype
    _assert_within(f"{backend} {label}", dtype, (dw, du, dk, dv), grads_ref, y, y_ref)
    if backend == "cuda":
        _check_saved_pair(inputs, y, grads_ref, dtype, label)


def _check_saved_pair(inputs, y, grads_ref, dtype, label=""):
    """The training pair (a forward that also returns lse2 and float32 y, a backward that uses them
    instead of recomputing the forward): same y as the inference forward, gradients within the same
    tolerances of the float64 ones."""
    w, u, k, v, gy = inputs
    _poison(k, k, k, k)
    ys, yf, lse = torch.ops.rwkvsam.bi_wkv_fwd_saved(w, u, k, v)
    assert ys.dtype == k.dtype and lse.dtype == torch.float32 and lse.shape == k.shape
    assert yf.shape == ((0,) if k.dtype == torch.float32 else k.shape)
    assert torch.equal(ys, y), f"saved forward {label}: y differs from the inference forward"
    _poison(k, k, k, w)
    dw, du, dk, dv = torch.ops.rwkvsam.bi_wkv_bwd_saved(w, u, k, v, ys, yf, lse, gy)
    _assert_within(f"saved pair {label}", dtype, (dw, du, dk, dv), grads_ref)


def _assert_within(label, dtype, grads, grads_ref, y=None, y_ref=None):
    """Relative L2 errors of (dw, du, dk, dv) and optionally y against float64, within TOL[dtype]."""
    ty, tkv, twu = TOL[dtype]
    errs = {
        n: (_rel(g, r), t)
        for n, g, r, t in zip(("dw", "du", "dk", "dv"), grads, grads_ref, (twu, twu, tkv, tkv), strict=True)
    }
    if y is not None:
        errs["y"] = (_rel(y, y_ref), ty)
    bad = {n: e for n, (e, t) in errs.items() if not e <= t}
    assert not bad, f"{label}: relative errors over tolerance: {bad} (all: {errs})"


_GRID = [
    (dtype, B, T, C, backend)
    for dtype in DTYPES
    for B in (1, 4)
    for T in (1, 7, 63, 1000, 4096, 16384)
    for C in (8, 192, 384, 768)
    for backend in ("cuda", "triton")
]


@gpu
@needs_gpu
@pytest.mark.parametrize(
    ("dtype", "B", "T", "C", "backend"),
    _GRID,
    ids=[f"{str(d).split('.')[-1]}-B{B}-T{T}-C{C}-{be}" for d, B, T, C, be in _GRID],
)
def test_matches_float64(dtype, B, T, C, backend):
    inputs, y_ref, grads_ref = _case(dtype, B, T, C)
    _check(backend, inputs, y_ref, grads_ref, dtype, f"{dtype} B={B} T={T} C={C}")


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    ("T", "wscale", "kscale"),
    [(1000, 100.0, 2.0), (1000, -100.0, 2.0), (257, 4.0, 40.0), (4096, 50.0, 10.0)],
)
def test_extreme_decay_and_keys(backend, T, wscale, kscale):
    """|w| * T up to 500 (either sign) and keys spread over +-200: the log-space scans must neither
    overflow nor lose the dominant term. (float32 exponents limit accuracy once |w| * T >> 1e3.)"""
    w, u, k, v, gy = _inputs(2, T, 64, torch.float32, 7, wscale=wscale, kscale=kscale)
    if wscale < 0:
        w = -w.abs()
    y_ref, grads_ref = _expected(w, u, k, v, gy)
    fwd, bwd = _ops(backend)
    y = fwd(w, u, k, v)
    assert _rel(y, y_ref) < 1e-4
    dw, du, dk, dv = bwd(w, u, k, v, gy)
    assert _rel(dk, grads_ref[2]) < 1e-3
    assert _rel(dv, grads_ref[3]) < 1e-3
    assert _rel(du, grads_ref[1]) < 1e-3
    assert _rel(dw, grads_ref[0]) < 1e-2


@gpu
@needs_gpu
@pytest.mark.parametrize("T", [64, 300])
def test_fast_and_exact_channels_side_by_side(T):
    """The CUDA output pass takes a one-reference-exponent form for channels with |w| log2(e) <= 2 and
    |u| log2(e) <= 40 and the exact per-step rescaling otherwise. Channels of both kinds share warps
    here (w over [-1.6, 1.6], u over [-35, 35], interleaved) and every one must match float64."""
    C = 64
    w, u, k, v, gy = _inputs(2, T, C, torch.float32, 17)
    w = torch.linspace(-1.6, 1.6, C, device="cuda")
    perm = torch.randperm(C, generator=torch.Generator(device="cuda").manual_seed(5), device="cuda")
    u = torch.linspace(-35.0, 35.0, C, device="cuda")[perm]
    fast = (w.abs() * 1.4426950408889634 <= 2) & (u.abs() * 1.4426950408889634 <= 40)
    assert 0 < int(fast.sum()) < C
    y_ref, grads_ref = _expected(w, u, k, v, gy)
    fwd, bwd = _ops("cuda")
    y = fwd(w, u, k, v)
    per_channel = ((y.double() - y_ref).norm(dim=(0, 1)) / y_ref.norm(dim=(0, 1))).max()
    assert per_channel < 1e-4, f"worst channel off by {float(per_channel):.2e}"
    dw, du, dk, dv = bwd(w, u, k, v, gy)
    assert _rel(dk, grads_ref[2]) < 1e-3 and _rel(dv, grads_ref[3]) < 1e-3
    assert _rel(du, grads_ref[1]) < 1e-3 and _rel(dw, grads_ref[0]) < 1e-2
    ys, _, lse = torch.ops.rwkvsam.bi_wkv_fwd_saved(w, u, k, v)
    assert torch.equal(ys, y)
    assert torch.isfinite(lse).all()


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [16384 + 2000, 40000])
def test_long_sequences_beyond_the_two_launch_forward(dtype, T):
    """Past 16384 tokens the forward goes back to three launches (chunk states, carry scan, outputs):
    outputs and gradients still match float64."""
    inputs = _inputs(1, T, 8, dtype, 23)
    y_ref, grads_ref = _expected(*inputs)
    _check("cuda", inputs, y_ref, grads_ref, dtype, f"{dtype} T={T}")


_GATED_SHAPES = [(2, 7, 40), (1, 4096, 384), (4, 4096, 192), (1, 20000, 8)]


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "T", "C"), _GATED_SHAPES)
def test_gated_forward(dtype, B, T, C):
    """bi_wkv_gated = sigmoid(r) * Bi-WKV in one kernel, through both launch shapes of the forward
    (two launches at (1, 4096, 384), three at (4, 4096, 192) and T = 20000 on a 132-SM card)."""
    from rwkvsam_core.ops import bi_wkv_gated

    _ops("cuda")
    w, u, k, v, gy = _inputs(B, T, C, dtype, 31)
    g = torch.Generator(device="cuda").manual_seed(32)
    r = (torch.randn(B, T, C, generator=g, device="cuda") * 3).to(dtype)
    y_ref, _ = _expected(w, u, k, v, gy)
    expected = torch.sigmoid(r.double()) * y_ref
    _poison(k, k, k)
    out = torch.ops.rwkvsam.bi_wkv_gated(w, u, k, v, r)
    assert out.dtype == dtype and out.shape == k.shape
    assert _rel(out, expected) <= TOL[dtype][0]
    with torch.no_grad():  # the public function takes the kernel when nothing needs a gradient
        assert torch.equal(bi_wkv_gated(w, u, k, v, r), out)


@gpu
@needs_gpu
def test_gated_op_contract():
    """Fake implementation and schema (torch.compile, CUDA graphs), clear errors on a bad r, and the
    public function falls back to the differentiable formula when a gradient is needed."""
    from rwkvsam_core.ops import bi_wkv, bi_wkv_gated

    _ops("cuda")
    w, u, k, v, _ = _inputs(2, 37, 24, torch.float32, 33)
    r = torch.randn_like(k)
    op = torch.ops.rwkvsam.bi_wkv_gated
    torch.library.opcheck(op, (w, u, k, v, r), test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(ValueError, match="r must have k's shape"):
        op(w, u, k, v, r[:, :5])
    with pytest.raises(ValueError, match="r must have k's shape"):
        op(w, u, k, v, r.double())
    kg = k.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="inference-only"):
        op(w, u, kg, v, r).sum().backward()
    y = bi_wkv_gated(w, u, kg, v, r)
    y.sum().backward()
    kr = k.clone().requires_grad_()
    (torch.sigmoid(r) * bi_wkv(w, u, kr, v)).sum().backward()
    torch.testing.assert_close(kg.grad, kr.grad)


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_noncontiguous_inputs(backend):
    fwd, bwd = _ops(backend)
    w, u, k, v, gy = _inputs(2, 300, 96, torch.float32, 3)
    # same values in non-contiguous storage: (B, C, T) buffers viewed as (B, T, C), strided w/u
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    vt = v.transpose(1, 2).contiguous().transpose(1, 2)
    w2 = torch.stack((w, w), 1)[:, 0]
    u2 = torch.stack((u, u), 1)[:, 1]
    assert not kt.is_contiguous() and not w2.is_contiguous()
    torch.testing.assert_close(fwd(w2, u2, kt, vt), fwd(w, u, k, v), rtol=0, atol=0)
    for a, b in zip(
        bwd(w2, u2, kt, vt, gy.transpose(1, 2).contiguous().transpose(1, 2)), bwd(w, u, k, v, gy), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(backend, dtype):
    fwd, bwd = _ops(backend)
    w, u, k, v, gy = _inputs(4, 4096, 384, dtype, 11)
    first = (fwd(w, u, k, v), *bwd(w, u, k, v, gy))
    for _ in range(2):
        again = (fwd(w, u, k, v), *bwd(w, u, k, v, gy))
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b), "results differ between identical runs"


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(backend, dtype):
    fwd, _ = _ops(backend)
    w, u, k, v, _ = _inputs(2, 37, 24, dtype, 5)
    args = tuple(x.clone().requires_grad_() for x in (w, u, k, v))
    torch.library.opcheck(fwd, args)


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_saved_pair(dtype):
    _ops("cuda")
    w, u, k, v, gy = _inputs(2, 37, 24, dtype, 6)
    args = tuple(x.clone().requires_grad_() for x in (w, u, k, v))
    torch.library.opcheck(torch.ops.rwkvsam.bi_wkv_fwd_saved, args)
    ys, yf, lse = torch.ops.rwkvsam.bi_wkv_fwd_saved(w, u, k, v)
    torch.library.opcheck(torch.ops.rwkvsam.bi_wkv_bwd_saved, (w, u, k, v, ys, yf, lse, gy))


@gpu
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_public_bi_wkv_trains_through_saved_pair(dtype):
    """rwkvsam_core.ops.bi_wkv with inputs that need gradients: the training forward (its autograd
    node is the saved pair's) and gradients equal to the float64 ones."""
    from rwkvsam_core.ops import bi_wkv

    _ops("cuda")
    w, u, k, v, gy = _inputs(2, 300, 48, dtype, 29)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y = bi_wkv(*xs)
    assert "bi_wkv_fwd_saved" in type(y.grad_fn).__name__ or "bi_wkv_fwd_saved" in str(y.grad_fn.name())
    y.backward(gy)
    y_ref, grads_ref = _expected(w, u, k, v, gy)
    ty, tkv, twu = TOL[dtype]
    assert _rel(y, y_ref) <= ty
    for got, exp, tol in zip(xs, grads_ref, (twu, twu, tkv, tkv), strict=True):
        assert _rel(got.grad, exp) <= tol
    with torch.no_grad():  # no gradient: the inference forward, same values
        assert torch.equal(bi_wkv(w, u, k, v), y.detach())


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_autograd_through_op(backend):
    fwd, _ = _ops(backend)
    w, u, k, v, gy = _inputs(2, 100, 40, torch.float32, 9)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    y = fwd(*xs)
    y.backward(gy)
    y_ref, grads_ref = _expected(w, u, k, v, gy)
    assert _rel(y, y_ref) < 2e-5
    for got, exp in zip(xs, grads_ref, strict=True):
        assert _rel(got.grad, exp) < 1e-3


@gpu
@needs_gpu
def test_cuda_graph_capture():
    fwd, bwd = _ops("cuda")
    w, u, k, v, gy = _inputs(1, 4096, 384, torch.bfloat16, 13)
    static = [x.clone() for x in (w, u, k, v, gy)]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream, as CUDA graphs require
        fwd(*static[:4])
        bwd(*static)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_g = fwd(*static[:4])
        grads_g = bwd(*static)
    w2, u2, k2, v2, gy2 = _inputs(1, 4096, 384, torch.bfloat16, 14)
    for dst, src in zip(static, (w2, u2, k2, v2, gy2), strict=True):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_g, fwd(w2, u2, k2, v2))
    for a, b in zip(grads_g, bwd(w2, u2, k2, v2, gy2), strict=True):
        assert torch.equal(a, b)


@gpu
@needs_gpu
@pytest.mark.parametrize(("path", "dtype"), [("op", torch.float32), ("public", torch.bfloat16)])
def test_torch_compile_fullgraph(path, dtype):
    """The op itself (its recomputing backward), and rwkvsam_core.ops.bi_wkv with gradients (the
    training pair), compiled with fullgraph: same values and gradients as eager."""
    fwd, _ = _ops("cuda")
    if path == "public":
        from rwkvsam_core.ops import bi_wkv as fwd

    def f(w, u, k, v):
        return (fwd(w, u, k, v) * 2).sum(-1)

    w, u, k, v, _ = _inputs(2, 200, 64, dtype, 17 if path == "op" else 31)
    xs = [x.clone().requires_grad_() for x in (w, u, k, v)]
    xs_e = [x.clone().requires_grad_() for x in (w, u, k, v)]
    out = torch.compile(f, fullgraph=True)(*xs)
    out_e = f(*xs_e)
    torch.testing.assert_close(out, out_e)
    g = torch.randn_like(out)
    out.backward(g)
    out_e.backward(g)
    for a, b in zip(xs, xs_e, strict=True):
        torch.testing.assert_close(a.grad, b.grad)


@gpu
@needs_gpu
def test_public_bi_wkv_uses_kernel():
    from rwkvsam_core.ops import bi_wkv, bi_wkv_backend_info

    _ops("cuda")  # skip when no nvcc
    info = bi_wkv_backend_info("cuda")
    assert info["backend"] == "cuda" and info["reason"].startswith("cuda:"), info
    w, u, k, v, gy = _inputs(1, 63, 16, torch.bfloat16, 19)
    y_ref, _ = _expected(w, u, k, v, gy)
    assert _rel(bi_wkv(w, u, k, v), y_ref) < 1e-2


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_low_precision_w_u(backend):
    """w, u in bfloat16 (a model cast with .to(bfloat16)): gradients come back in their dtype."""
    fwd, bwd = _ops(backend)
    w, u, k, v, gy = _inputs(1, 50, 32, torch.bfloat16, 23)
    wb, ub = w.bfloat16(), u.bfloat16()
    y = fwd(wb, ub, k, v)
    y_ref, grads_ref = _expected(wb, ub, k, v, gy)
    assert _rel(y, y_ref) < 1e-2
    dw, du, _, _ = bwd(wb, ub, k, v, gy)
    assert dw.dtype == torch.bfloat16 and du.dtype == torch.bfloat16
    assert _rel(dw, grads_ref[0]) < 1e-2 and _rel(du, grads_ref[1]) < 1e-2


@gpu
@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bad_inputs_raise(backend):
    fwd, bwd = _ops(backend)
    k = torch.randn(1, 8, 4, device="cuda")
    w = torch.zeros(4, device="cuda")
    with pytest.raises(ValueError, match="shape"):
        fwd(w, w, k, torch.randn(1, 8, 5, device="cuda"))
    with pytest.raises(ValueError, match=r"\(C,\)"):
        fwd(torch.zeros(3, device="cuda"), w, k, k)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        fwd(w, w, k.double(), k.double())
    with pytest.raises(ValueError, match="grad_y"):
        bwd(w, w, k, k, torch.randn(1, 7, 4, device="cuda"))
    with pytest.raises(ValueError, match="one CUDA device"):
        fwd(w.cpu(), w, k, k)


def test_kernel_sources_found():
    from rwkvsam_core.ops.cuda_ext import SOURCE_FILES, kernel_source_dir

    src = kernel_source_dir()
    assert all((src / f).is_file() for f in SOURCE_FILES)


def test_nvrtc_check_script_covers_every_launched_kernel():
    """scripts/check_kernels_nvrtc.py (the compile check without a GPU) instantiates every kernel the
    launchers start, and the kernels stay above its marker line."""
    import importlib.util
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location(
        "check_kernels_nvrtc", root / "scripts" / "check_kernels_nvrtc.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    src = (root / "kernels" / "bi_wkv_kernels.cu").read_text()
    device, host = src.split(mod.MARKER)
    launched = set(re.findall(r"(\w+_kernel)(?:<[^<>]*>)?\s*(?:\n\s*)?<<<", host))
    assert launched >= {"sup_summary_kernel", "fwd_fused_kernel", "fwd_out_kernel", "bwd_out_kernel"}
    covered = " ".join(mod._instantiations())
    assert all(f"rwkvsam::{k}" in covered for k in launched), launched
    assert all(re.search(rf"\b{k}\(", device) for k in launched)  # defined above the marker
    assert mod._readable("_ZN7rwkvsam3_GLOBAL__N_114fwd_out_kernelI13__nv_bfloat16S2_Lb0ELb1EEEvPKT_") == (
        "fwd_out_kernel<bf16, (same), 0, 1>"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on machines without CUDA")
def test_dispatch_without_cuda_says_portable():
    from rwkvsam_core.ops import _cuda_dispatch

    impl, reason = _cuda_dispatch._choose()
    assert impl is None and reason.startswith("portable:")


def test_argument_checks_are_clear():
    from rwkvsam_core.ops.cuda_ext import check_args

    w = torch.zeros(4)
    k = torch.zeros(1, 8, 4)
    with pytest.raises(ValueError, match=r"\(B, T, C\)"):
        check_args(w, w, k[0], k[0])
    with pytest.raises(ValueError, match="v must have k's shape"):
        check_args(w, w, k, torch.zeros(1, 8, 5))
    with pytest.raises(ValueError, match="dtype"):
        check_args(w, w, k, k.half())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        check_args(w, w, k.double(), k.double())
    with pytest.raises(ValueError, match=r"\(C,\)"):
        check_args(torch.zeros(3), w, k, k)
    with pytest.raises(ValueError, match="CUDA device"):
        check_args(w, w, k, k)  # CPU tensors never reach the kernel
