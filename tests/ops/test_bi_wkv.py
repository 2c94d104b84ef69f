"""Bi-WKV: the public op and the portable implementation against the float64 O(T^2) reference.

The reference itself is checked against literal Python loops over the formula of ARCHITECTURE.md
section 2 (the "-1" in the distance, the u bonus for i == t, no epsilon), so every other test
compares against the formula and not just against another implementation.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from rwkvsam_core.ops import bi_wkv, bi_wkv_backend_info, bi_wkv_gated
from rwkvsam_core.ops.portable import SAFE_HALF_RANGE, bi_wkv_portable, single_pass_ok
from rwkvsam_core.ops.reference import bi_wkv_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


def _inputs(B: int, T: int, C: int, seed: int, *, u_scale: float = 3.0, w_t: tuple = (-5.0, 3.0)):
    """Decays spanning w_t (w = decay / T, channels shuffled), u in [-u_scale, u_scale], k spread over
    [-60, 60] with a per-channel spread from ~1 to 60, v standard normal."""
    gen = torch.Generator().manual_seed(seed)
    decay = (
        torch.linspace(w_t[0], w_t[1], C)[torch.randperm(C, generator=gen)]
        if C > 1
        else torch.tensor([w_t[0]])
    )
    w = decay / T
    u = (torch.rand(C, generator=gen) * 2 - 1) * u_scale
    spread = torch.exp(torch.linspace(0.0, math.log(60.0), C))[torch.randperm(C, generator=gen)]
    k = (torch.randn(B, T, C, generator=gen) * spread).clamp(-60, 60)
    v = torch.randn(B, T, C, generator=gen)
    return w, u, k, v


def _naive(w, u, k, v):
    """Literal loops over the formula (tiny sizes only)."""
    B, T, C = k.shape
    y = torch.empty(B, T, C, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for t in range(T):
                num = math.exp(u[c] + k[b, t, c]) * v[b, t, c]
                den = math.exp(u[c] + k[b, t, c])
                for i in range(T):
                    if i != t:
                        e = math.exp(-(abs(t - i) - 1) * w[c] + k[b, i, c])
                        num += e * v[b, i, c]
                        den += e
                y[b, t, c] = num / den
    return y


def _channels(C: int, n: int = 8) -> torch.Tensor:
    """A subset of channels including the first and last ones."""
    return torch.unique(torch.linspace(0, C - 1, min(n, C)).round().long())


def test_reference_is_the_formula():
    w, u, k, v = _inputs(2, 6, 3, seed=1)
    k = k / 10  # keep math.exp in range
    y_loop = _naive(w.double().tolist(), u.double().tolist(), k.double(), v.double())
    torch.testing.assert_close(bi_wkv_reference(w, u, k, v), y_loop, rtol=1e-12, atol=1e-12)


def test_hand_computed_t2():
    """T = 2: y_0 = (e^{u+k0} v0 + e^{k1} v1) / (e^{u+k0} + e^{k1}) since |t-i|-1 = 0."""
    w = torch.tensor([0.7], dtype=torch.float64)
    u = torch.tensor([0.4], dtype=torch.float64)
    k = torch.tensor([[[0.3], [-0.2]]], dtype=torch.float64)
    v = torch.tensor([[[2.0], [-1.0]]], dtype=torch.float64)
    a, b = math.exp(0.4 + 0.3), math.exp(-0.2)
    y0 = (a * 2.0 + b * -1.0) / (a + b)
    a1, b1 = math.exp(0.4 - 0.2), math.exp(0.3)
    y1 = (a1 * -1.0 + b1 * 2.0) / (a1 + b1)
    expected = torch.tensor([[[y0], [y1]]], dtype=torch.float64)
    torch.testing.assert_close(bi_wkv(w, u, k, v), expected, rtol=1e-14, atol=0)


def _rows(T: int, n: int = 192) -> torch.Tensor:
    """All positions for short sequences; for long ones both ends plus a random middle sample."""
    if 3 * n >= T:
        return torch.arange(T)
    middle = torch.randperm(T - 2 * n, generator=torch.Generator().manual_seed(T))[:n] + n
    return torch.cat((torch.arange(n), middle.sort().values, torch.arange(T - n, T)))


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("C", [4, 192])
@pytest.mark.parametrize("T", [1, 2, 7, 63, 1000, 4096])
def test_forward_float32_matches_reference(B, T, C):
    w, u, k, v = _inputs(B, T, C, seed=T * 1000 + C + B)
    y = bi_wkv(w, u, k, v)
    assert y.shape == (B, T, C) and y.dtype == torch.float32
    # the op is independent per channel: the O(T^2) reference runs on a channel subset and, for long
    # sequences, on a subset of output positions (both ends and a random middle sample)
    ch = _channels(C) if T * C > 1000 * 4 else torch.arange(C)
    rows = _rows(T)
    y_ref = bi_wkv_reference(w[ch], u[ch], k[..., ch], v[..., ch], block=256, rows=rows)
    assert _rel(y[:, rows][..., ch], y_ref) < 1e-5


def test_forward_realistic_block_parameters():
    """The block's own scaling: decays of the 'fancy' init and spatial_first, both divided by T."""
    B, T, C = 1, 4096, 192
    i = torch.arange(C, dtype=torch.float32)
    decay = -5 + 8 * (i / (C - 1)) ** 0.7
    first = math.log(0.3) + 0.5 * (((i + 1) % 3) - 1)
    w, u = decay / T, first / T
    k, v = torch.randn(B, T, C) * 3, torch.randn(B, T, C)
    y = bi_wkv(w, u, k, v)
    ch, rows = _channels(C, 6), _rows(T)
    y_ref = bi_wkv_reference(w[ch], u[ch], k[..., ch], v[..., ch], block=256, rows=rows)
    assert _rel(y[:, rows][..., ch], y_ref) < 1e-5


def _grads(fn, w, u, k, v, g):
    xs = [x.detach().clone().requires_grad_() for x in (w, u, k, v)]
    y = fn(*xs)
    return y, torch.autograd.grad(y, xs, g)


@pytest.mark.parametrize(
    ("B", "T", "C"), [(3, 1, 4), (3, 2, 4), (3, 7, 4), (3, 63, 4), (3, 1000, 4), (1, 4096, 4), (1, 1000, 192)]
)
def test_gradients_float32_match_reference(B, T, C):
    w, u, k, v = _inputs(B, T, C, seed=7 * T + C)
    g = torch.randn(B, T, C)
    _, grads = _grads(bi_wkv, w, u, k, v, g)
    ch = _channels(C, 2 if T >= 4096 else 8)  # the reference's backward at T = 4096 is the slow part
    sub = (w[ch], u[ch], k[..., ch], v[..., ch])
    _, grads_ref = _grads(
        lambda *x: bi_wkv_reference(*x, block=512), *(x.double() for x in sub), g[..., ch].double()
    )
    for name, got, ref in zip("wukv", grads, grads_ref, strict=True):
        got = got[..., ch]
        if ref.norm() == 0:
            # T = 1 (y = v exactly) and T = 2 (no distance > 1): the exact gradient vanishes
            assert got.abs().max() < 1e-6, name
        else:
            assert _rel(got, ref) < 1e-4, (name, _rel(got, ref))


def test_zero_gradients_are_structural():
    """T = 1: y = v, so dk = du = dw = 0; T = 2: all distances are <= 1, so dw = 0 (the reference agrees)."""
    for T in (1, 2):
        w, u, k, v = (x.double() for x in _inputs(2, T, 4, seed=T, u_scale=1.0))
        _, (dw, du, dk, dv) = _grads(bi_wkv_reference, w, u, k, v, torch.randn(2, T, 4).double())
        assert dw.abs().max() == 0 and dv.abs().max() > 0
        if T == 1:
            assert du.abs().max() == 0 and dk.abs().max() == 0


@pytest.mark.parametrize("chunk", [None, 1, 3, 4])
def test_gradcheck_float64(chunk):
    w, u, k, v = (x.double() for x in _inputs(2, 9, 3, seed=11, u_scale=1.0))
    k = k / 20
    xs = [x.clone().requires_grad_() for x in (w * 4, u, k, v)]
    assert torch.autograd.gradcheck(lambda *a: bi_wkv_portable(*a, chunk=chunk), xs)


def test_gradcheck_float64_large_decay():
    """|w| * T = 40 > the single-pass range: the chunked scan is used and differentiated."""
    w, u, k, v = (x.double() for x in _inputs(1, 12, 3, seed=12, u_scale=1.0, w_t=(-40.0, 40.0)))
    assert not single_pass_ok(w, 12)
    xs = [x.clone().requires_grad_() for x in (w, u, k / 20, v)]
    assert torch.autograd.gradcheck(bi_wkv, xs)


@pytest.mark.parametrize("chunk", [1, 5, 64, 999])
def test_chunked_scan_matches_single_pass(chunk):
    w, u, k, v = _inputs(2, 1000, 6, seed=chunk)
    g = torch.randn(2, 1000, 6)
    y, grads = _grads(bi_wkv_portable, w, u, k, v, g)
    y_c, grads_c = _grads(lambda *x: bi_wkv_portable(*x, chunk=chunk), w, u, k, v, g)
    assert _rel(y_c, y) < 1e-5
    for a, b in zip(grads_c, grads, strict=True):
        assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("wt", [50.0, -50.0, 400.0, -400.0])
def test_large_decay_does_not_overflow(wt):
    B, T, C = 2, 500, 4
    w, u, k, v = _inputs(B, T, C, seed=int(abs(wt)), w_t=(wt, wt / 3))
    k = torch.rand(B, T, C) * 120 - 60
    g = torch.randn(B, T, C)
    y, grads = _grads(bi_wkv, w, u, k, v, g)
    assert torch.isfinite(y).all() and all(torch.isfinite(x).all() for x in grads)
    y_ref, grads_ref = _grads(bi_wkv_reference, *(x.double() for x in (w, u, k, v)), g.double())
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(grads, grads_ref, strict=True):
        assert _rel(a, b) < 1e-4


def test_extreme_keys_single_pass():
    """k at +-60 with the maximum of the sequence at either end: nothing overflows or underflows to 0/0."""
    B, T, C = 2, 257, 4
    w = torch.linspace(-8, 8, C) / T
    assert single_pass_ok(w, T)
    k = torch.full((B, T, C), -60.0)
    k[0, 0] = 60.0
    k[1, -1] = 60.0
    k[:, T // 2, 1] = 59.0
    u, v = torch.zeros(C), torch.randn(B, T, C)
    y = bi_wkv(w, u, k, v)
    assert torch.isfinite(y).all()
    assert _rel(y, bi_wkv_reference(w, u, k, v)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    w, u, k, v = _inputs(2, 300, 8, seed=3, u_scale=1.0)
    k = k.clamp(-8, 8)
    kh, vh = k.to(dtype).requires_grad_(), v.to(dtype).requires_grad_()
    wr, ur = w.clone().requires_grad_(), u.clone().requires_grad_()
    y = bi_wkv(wr, ur, kh, vh)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    assert kh.grad.dtype == dtype and vh.grad.dtype == dtype and wr.grad.dtype == torch.float32
    y_ref = bi_wkv_reference(w, u, kh.detach(), vh.detach())  # same rounded inputs
    assert _rel(y, y_ref) < 1e-2


def test_float64_stays_float64():
    w, u, k, v = (x.double() for x in _inputs(2, 500, 5, seed=4))
    y = bi_wkv(w, u, k, v)
    assert y.dtype == torch.float64
    assert _rel(y, bi_wkv_reference(w, u, k, v)) < 1e-12


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 255, 256, 257, 1000, 4099])
def test_blocked_cpu_scan_matches_cumsum(n):
    """The in-place blocked prefix/suffix sums used on the CPU, for lengths around the block size."""
    from rwkvsam_core.ops.portable import _prefix_sum_, _suffix_sum_

    x = torch.randn(3, n, 5, dtype=torch.float64)
    pre, suf = x.clone(), x.clone()
    _prefix_sum_(pre)
    _suffix_sum_(suf)
    torch.testing.assert_close(pre, torch.cumsum(x, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(suf, torch.cumsum(x.flip(1), 1).flip(1), rtol=1e-12, atol=1e-12)


def test_non_contiguous_inputs():
    w, u, k, v = _inputs(2, 50, 6, seed=5)
    kt = k.transpose(0, 1).contiguous().transpose(0, 1)
    vs = torch.cat((v, v), dim=2)[..., ::2]
    assert not kt.is_contiguous() and not vs.is_contiguous()
    torch.testing.assert_close(bi_wkv(w, u, kt, vs), bi_wkv(w, u, k, vs.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_is_the_gate_times_bi_wkv(dtype):
    """bi_wkv_gated (the spatial mix's sigmoid(r) * Bi-WKV): on the CPU the gate is applied in float32
    to bi_wkv's output, rounded once to k's dtype, and gradients flow through it."""
    w, u, k, v = _inputs(2, 40, 6, seed=8)
    k, v = k.to(dtype), v.to(dtype)
    r = (torch.randn(k.shape, generator=torch.Generator().manual_seed(9)) * 3).to(dtype)
    out = bi_wkv_gated(w, u, k, v, r)
    assert out.dtype == dtype
    assert torch.equal(out, (torch.sigmoid(r.float()) * bi_wkv(w, u, k, v).float()).to(dtype))
    rg = r.float().clone().requires_grad_()
    bi_wkv_gated(w, u, k.float(), v.float(), rg).sum().backward()
    y = bi_wkv(w, u, k.float(), v.float())
    torch.testing.assert_close(rg.grad, y * torch.sigmoid(r.float()) * (1 - torch.sigmoid(r.float())))


def test_gated_keeps_float64():
    w, u, k, v = _inputs(1, 12, 3, seed=11)
    k, v = k.double(), v.double()
    r = torch.randn(k.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    out = bi_wkv_gated(w, u, k, v, r)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.sigmoid(r) * bi_wkv(w, u, k, v))


def test_gated_rejects_a_mismatched_gate():
    w, u, k, v = _inputs(1, 10, 4, seed=10)
    with pytest.raises(ValueError, match="r must have k's shape"):
        bi_wkv_gated(w, u, k, v, k[:, :3])
    with pytest.raises(ValueError, match="r must have k's shape"):
        bi_wkv_gated(w, u, k, v, k.double())


def test_empty_batch():
    w, u = torch.zeros(4), torch.zeros(4)
    y = bi_wkv(w, u, torch.zeros(0, 5, 4), torch.zeros(0, 5, 4))
    assert y.shape == (0, 5, 4)


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((4,), (4,), (5, 4), (5, 4)), "k must have shape"),
        (((4,), (4,), (1, 5, 4), (1, 5, 3)), "v must have k's shape"),
        (((3,), (4,), (1, 5, 4), (1, 5, 4)), r"w and u must have shape \(C,\)"),
        (((4,), (4, 1), (1, 5, 4), (1, 5, 4)), r"w and u must have shape \(C,\)"),
    ],
)
def test_shape_errors(shapes, match):
    with pytest.raises(ValueError, match=match):
        bi_wkv(*(torch.zeros(s) for s in shapes))


def test_dtype_and_device_errors():
    w, k = torch.zeros(4), torch.zeros(1, 5, 4)
    with pytest.raises(ValueError, match="floating-point"):
        bi_wkv(w, w, k.long(), k.long())
    with pytest.raises(ValueError, match="v must have k's dtype"):
        bi_wkv(w, w, k, k.double())
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        bi_wkv(w, w, k.numpy(), k)
    with pytest.raises(ValueError, match="one device"):
        bi_wkv(w.to("meta"), w, k, k)


def test_saved_tensors_are_linear_in_t():
    """Bytes autograd keeps for backward stay a small multiple of B*T*C (never T x T)."""
    B, T, C = 1, 8192, 8
    w, u, k, v = (x.requires_grad_() for x in _inputs(B, T, C, seed=6))
    saved: dict[int, int] = {}  # storage address -> bytes (views of one buffer count once, in full)

    def pack(t):
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bi_wkv(w, u, k, v)
    assert y.requires_grad
    assert 0 < sum(saved.values()) <= 8 * B * T * C * 4, sum(saved.values())


def test_long_sequence_memory_bound():
    """T = 65536, C = 64 forward + backward in a fresh process: peak RSS growth stays O(B*T*C).

    One T x T float32 matrix for a single channel would be 16 GiB; the bound is 1 GiB (64 x the
    size of k)."""
    code = textwrap.dedent(
        """
        import resource, torch
        from rwkvsam_core.ops import bi_wkv
        B, T, C = 1, 65536, 64
        w = (torch.linspace(-5, 3, C) / T).requires_grad_()
        u = torch.zeros(C, requires_grad=True)
        k = torch.randn(B, T, C, requires_grad=True)
        v = torch.randn(B, T, C, requires_grad=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        y = bi_wkv(w, u, k, v)
        y.square().sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        ok = all(bool(torch.isfinite(x).all()) for x in (y, w.grad, u.grad, k.grad, v.grad))
        # spot check three outputs of channel 0 against the formula, O(T) each
        idx = torch.arange(T, dtype=torch.float64)
        errs = []
        for t in (0, 12345, T - 1):
            e = -((idx - t).abs() - 1) * w[0].double() + k[0, :, 0].double()
            e[t] = u[0].double() + k[0, t, 0].double()
            ref = (torch.softmax(e, 0) * v[0, :, 0].double()).sum()
            errs.append(abs(float(y[0, t, 0]) - float(ref)))
        print((after - before) * 1024, int(ok), max(errs))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    growth, ok, err = res.stdout.split()
    assert int(ok) == 1
    assert float(err) < 1e-5
    assert int(growth) < 64 * 65536 * 64 * 4, f"peak RSS grew by {int(growth) / 2**20:.0f} MiB"


def test_backend_info_cpu():
    info = bi_wkv_backend_info("cpu")
    assert info["backend"] == "portable" and info["reason"]
    assert set(info) == {"backend", "reason"}


def test_backend_info_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    info = bi_wkv_backend_info("cuda")
    assert info["backend"] == "portable" and "CUDA" in info["reason"]


def test_backend_info_uses_cuda_dispatch_hook(monkeypatch):
    import types

    import rwkvsam_core.ops as ops

    fake = types.ModuleType("rwkvsam_core.ops._cuda_dispatch")
    fake.get_cuda_impl = lambda: (lambda w, u, k, v: k, "cuda: fake kernel for the test")
    monkeypatch.setitem(sys.modules, "rwkvsam_core.ops._cuda_dispatch", fake)
    monkeypatch.setattr(ops, "_cuda_choice", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bi_wkv_backend_info("cuda") == {"backend": "cuda", "reason": "cuda: fake kernel for the test"}

    fake.get_cuda_impl = lambda: (None, "no nvcc")
    monkeypatch.setattr(ops, "_cuda_choice", None)
    info = bi_wkv_backend_info("cuda")
    assert info["backend"] == "portable" and "no nvcc" in info["reason"]


def test_choice_logged_once_per_device(caplog, monkeypatch):
    import rwkvsam_core.ops as ops

    monkeypatch.setattr(ops, "_logged_devices", set())
    w, u, k, v = _inputs(1, 5, 2, seed=0)
    with caplog.at_level(logging.INFO, logger="rwkvsam_core.ops"):
        bi_wkv(w, u, k, v)
        bi_wkv(w, u, k, v)
    msgs = [r.getMessage() for r in caplog.records if "bi_wkv on cpu" in r.getMessage()]
    assert len(msgs) == 1 and "portable" in msgs[0]


def test_safe_range_constant():
    assert SAFE_HALF_RANGE == 8.0
    assert single_pass_ok(torch.tensor([15.9 / 4096]), 4096)  # |w| (T/2 + 1) < 8
    assert not single_pass_ok(torch.tensor([20.0 / 4096]), 4096)


@pytest.mark.cuda
def test_portable_on_cuda_matches_reference():
    w, u, k, v = _inputs(2, 1000, 16, seed=9)
    g = torch.randn(2, 1000, 16)
    dev = [x.cuda() for x in (w, u, k, v)]
    y, grads = _grads(bi_wkv_portable, *dev, g.cuda())
    y_ref, grads_ref = _grads(bi_wkv_reference, *(x.double() for x in (w, u, k, v)), g.double())
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(grads, grads_ref, strict=True):
        assert _rel(a, b) < 1e-4
