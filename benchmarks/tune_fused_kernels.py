"""Tile sizes of the fused encoder kernels (rwkvsam_core.ops.fused, fused_conv) at the shapes of
rwkvsam_s at input 1024, batch 1, bf16 (issue 3).

For each kernel and shape, times the default configuration and a small grid of alternatives with
``triton.testing.do_bench`` and prints the time, the bytes the kernel must move at least, and the
bandwidth that implies. The winners are then written into the kernels' defaults by hand.

Usage (on a GPU machine): python benchmarks/tune_fused_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BF16 = torch.bfloat16

try:  # the script runs on a GPU machine, where Triton ships with torch
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _relu_square_kernel(X, numel, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < numel
        x = tl.maximum(tl.load(X + offs, mask=m, other=0.0).to(tl.float32), 0.0)
        tl.store(X + offs, (x * x).to(X.dtype.element_ty), mask=m)


def _relu_square_(x: torch.Tensor) -> torch.Tensor:
    """``x = relu(x) ** 2`` in place, one pass: how the fused path squared the channel mix's key
    after cuBLAS before the GEMM epilogue took it over (the baseline of ``--key-gemm``)."""
    numel = x.numel()
    _relu_square_kernel[(triton.cdiv(numel, 2048),)](x, numel, BLOCK=2048, num_warps=4)
    return x


def _bench(fn, launches: int = 20) -> float:
    """GPU time of one call (ms): ``launches`` calls captured in a CUDA graph, the graph replayed and
    timed with events, so the host's launch overhead (tens of us for a Python launcher) drops out."""
    import statistics

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / launches)
    return statistics.median(times)


def _row(name: str, nbytes: float, results: dict) -> dict:
    default = results.pop("default")
    best_cfg, best = min(results.items(), key=lambda kv: kv[1]) if results else ("default", default)
    if default <= best:
        best_cfg, best = "default", default
    print(
        f"| {name} | {default * 1e3:.1f} | {best * 1e3:.1f} | {best_cfg} | {nbytes / 1e6:.1f} | "
        f"{nbytes / best / 1e6:.0f} |",
        flush=True,
    )
    return {"default_us": default * 1e3, "best_us": best * 1e3, "best": str(best_cfg), "MB": nbytes / 1e6}


def tune() -> dict:
    from rwkvsam_core.ops import fused, fused_conv

    dev = "cuda"
    out: dict = {}
    print("| kernel at shape | default (us) | best (us) | best config | MB moved (floor) | GB/s at best |")
    print("|---|---|---|---|---|---|")

    ln_cfgs = [(64, 128, 64, 4, 1), (128, 128, 64, 4, 1), (128, 128, 64, 8, 1), (128, 256, 64, 8, 1)]
    ln_cfgs += [(256, 128, 64, 8, 1), (64, 256, 64, 4, 1), (64, 64, 64, 4, 1), (32, 256, 64, 4, 1)]
    ln_cfgs += [(32, 128, 64, 4, 1), (16, 256, 64, 4, 1), (32, 256, 64, 8, 1), (64, 128, 64, 8, 1)]
    mm_cfgs = [(128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 128, 4, 3)]
    mm_cfgs += [(256, 64, 64, 8, 3), (128, 128, 128, 8, 2), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4)]
    mm_cfgs += [(64, 128, 64, 8, 3), (32, 128, 64, 4, 3), (64, 64, 128, 4, 3), (32, 64, 64, 4, 3)]
    pointwise = [
        ("s1.0 conv1 LN+GELU", 512 * 512, 64, 256, True),
        ("s1.1 conv1 LN+GELU", 256 * 256, 64, 256, True),
        ("s2.0 conv1 LN+GELU", 256 * 256, 64, 512, True),
        ("s2.k conv1 LN+GELU", 128 * 128, 128, 512, True),
        ("s1.k conv3 +res", 256 * 256, 256, 64, False),
        ("s2.k conv3 +res", 128 * 128, 512, 128, False),
        ("s2.0 shortcut", 128 * 128, 64, 128, False),
    ]
    for name, m, k, n, ln in pointwise:
        x = torch.randn(m, k, device=dev, dtype=BF16)
        w = torch.randn(n, k, device=dev, dtype=BF16) * k**-0.5
        b = torch.randn(n, device=dev)
        lnp = (torch.ones(k, device=dev), torch.zeros(k, device=dev), 1e-6) if ln else None
        res = None if ln else torch.randn(m, n, device=dev, dtype=BF16)
        res_cfgs = {}
        for cfg in [None] + (ln_cfgs if ln else mm_cfgs):
            c = cfg
            if ln and cfg is not None:
                c = (cfg[0], cfg[1], max(16, 1 << (k - 1).bit_length()), cfg[3], 1)
            if c is not None and c[1] > max(16, 1 << (n - 1).bit_length()):
                continue
            try:
                t = _bench(
                    partial(
                        fused_conv.pointwise_conv,
                        x,
                        w,
                        b,
                        ln=lnp,
                        gelu=ln,
                        residual=res,
                        out_dtype=BF16,
                        _config=c,
                    )
                )
            except Exception as exc:  # e.g. out of shared memory
                print(f"  {name} {c}: {type(exc).__name__}", flush=True)
                continue
            res_cfgs["default" if cfg is None else c] = t
        nbytes = 2 * (m * k + m * n + (0 if ln else m * n))
        out[name] = _row(name, nbytes, res_cfgs)

    # what the 512^2 x 64 -> 256 expansion costs without its GELU, without its LayerNorm
    x = torch.randn(512 * 512, 64, device=dev, dtype=BF16)
    w = torch.randn(256, 64, device=dev, dtype=BF16) * 0.125
    b = torch.randn(256, device=dev)
    lnp = (torch.ones(64, device=dev), torch.zeros(64, device=dev), 1e-6)
    for label, kw in (("no GELU", {"ln": lnp}), ("no LN", {"gelu": True}), ("neither", {})):
        t = _bench(partial(fused_conv.pointwise_conv, x, w, b, out_dtype=BF16, **kw))
        out[f"s1.0 conv1 {label}"] = _row(
            f"s1.0 conv1, {label}", 2 * (x.numel() + 512 * 512 * 256), {"default": t}
        )
    # the average pool: (BLOCK_W, BLOCK_C, warps); the depthwise kernel, which slides down ROWS output
    # rows: (ROWS, BLOCK_W, BLOCK_C, warps). (The one-output-row-per-program depthwise kernel it was
    # measured against on 2026-11-27 is gone: BENCHMARKS.md.)
    st_cfgs = [(16, 128, 4), (16, 64, 2), (32, 64, 4), (8, 256, 4)]
    dw_cfgs = [(8, 16, 64, 4), (16, 16, 64, 4), (8, 32, 64, 4), (8, 16, 128, 4), (4, 16, 128, 4)]
    dw_cfgs += [(16, 32, 64, 4), (8, 32, 128, 8), (8, 8, 128, 4), (8, 16, 256, 8), (16, 8, 128, 4)]
    dw_cfgs += [(32, 16, 128, 4), (8, 16, 32, 2)]
    stencils = [
        ("s1.0 dw s2", (1, 512, 512, 256), 2, False),
        ("s1.1 dw s1", (1, 256, 256, 256), 1, False),
        ("s2.0 dw s2", (1, 256, 256, 512), 2, False),
        ("s2.k dw s1", (1, 128, 128, 512), 1, False),
        ("s1.0 pool", (1, 512, 512, 64), 2, True),
        ("s2.0 pool", (1, 256, 256, 64), 2, True),
    ]
    for name, shape, stride, pool in stencils:
        x = torch.randn(*shape, device=dev, dtype=BF16)
        c = shape[3]
        w = torch.randn(c, 1, 3, 3, device=dev)
        b = torch.randn(c, device=dev)
        res_cfgs = {}
        for cfg in [None] + (st_cfgs if pool else dw_cfgs):
            if pool:
                fn = partial(fused_conv.avg_pool3x3s2, x, _config=cfg)
            else:
                fn = partial(fused_conv.depthwise3x3, x, w, b, stride, _config=cfg)
            try:
                res_cfgs["default" if cfg is None else cfg] = _bench(fn)
            except Exception as exc:
                print(f"  {name} {cfg}: {type(exc).__name__}", flush=True)
        nbytes = 2 * x.numel() * (1 + 1 / stride**2)
        out[name] = _row(name, nbytes, res_cfgs)

    img = torch.randn(1, 3, 1024, 1024, device=dev)
    w1, b1 = torch.randn(64, 3, 3, 3, device=dev), torch.randn(64, device=dev)
    lnp = (torch.ones(64, device=dev), torch.zeros(64, device=dev), 1e-6)
    res_cfgs = {}
    for cfg in [None, (32, 4), (64, 4), (128, 4), (128, 8), (256, 8), (64, 2), (32, 2)]:
        res_cfgs["default" if cfg is None else cfg] = _bench(
            partial(
                fused_conv.conv3x3_few_channels,
                img,
                w1,
                b1,
                2,
                ln=lnp,
                gelu=True,
                out_dtype=BF16,
                _config=cfg,
            )
        )
    out["stem conv1+LN+GELU"] = _row("stem conv1+LN+GELU", img.numel() * 4 + 512 * 512 * 64 * 2, res_cfgs)

    # VRWKV front: LayerNorm rows (+ residual) and shift-mix, two passes vs one
    t, c = 4096, 384  # input 1024; input 2048 has 4x the tokens
    x = torch.randn(1, t, c, device=dev)
    d = torch.randn(1, t, c, device=dev, dtype=BF16)
    g = torch.randn(1, t, c, device=dev, dtype=BF16)
    s = torch.rand(c, device=dev)
    lw, lb = torch.ones(c, device=dev), torch.zeros(c, device=dev)
    mixes = torch.rand(3, c, device=dev)
    res_cfgs = {}
    for cfg in [None, (1, 4), (2, 4), (4, 4), (8, 4), (8, 8), (16, 8), (2, 2)]:
        res_cfgs["default" if cfg is None else cfg] = _bench(
            partial(
                fused.layer_norm_rows,
                x,
                lw,
                lb,
                1e-6,
                delta=d,
                gate=g,
                scale=s,
                out_dtype=torch.float32,
                _config=cfg,
            )
        )
    out["ln rows +gated residual"] = _row("ln rows +gated residual", t * c * (4 + 2 + 2 + 4 + 4), res_cfgs)
    z = torch.randn(t * c, device=dev).view(1, t, c)
    res_cfgs = {}
    for cfg in [
        None,
        (8, 128, 4),
        (32, 128, 4),
        (16, 128, 8),
        (32, 128, 8),
        (8, 512, 4),
        (16, 512, 8),
        (16, 64, 4),
    ]:
        res_cfgs["default" if cfg is None else cfg] = _bench(
            partial(fused.vrwkv_prep, z, lw, lb, 1e-6, mixes, 64, 64, out_dtype=BF16, _config=cfg)
        )
    # (the timing above includes its layer_norm_rows pass; the shift-mix alone is the difference)
    out["prep two-pass (no delta)"] = _row("prep two-pass (no delta)", t * c * (4 + 4 + 4 + 3 * 2), res_cfgs)
    return out


def channel_mix_key() -> dict:
    """The VRWKV channel mix's key product with its squared ReLU, (M, 384) x (384, 1536) bf16: cuBLAS
    followed by an in-place squared-ReLU pass (``_relu_square_``), against the Triton 1x1 GEMM with the activation in its
    epilogue (default tiles and a few others), at batch 1 and batch 8 of rwkvsam_s at 1024."""
    from rwkvsam_core.ops import fused_conv

    out: dict = {}
    print(
        "| channel-mix key at M | cuBLAS + relu_square_ (us) | Triton epilogue default (us) | best (us) | best config |"
    )
    print("|---|---|---|---|---|")
    cfgs = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (256, 128, 64, 8, 3)]
    cfgs += [(128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (128, 256, 32, 8, 4)]
    for m in (4096, 8 * 4096):
        x = torch.randn(m, 384, device="cuda", dtype=BF16)
        w = torch.randn(1536, 384, device="cuda", dtype=BF16) * 384**-0.5
        wt = w.t()
        ref = _relu_square_(torch.mm(x, wt))
        got = fused_conv.pointwise_conv(x, w, relu_square=True)
        err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
        base = _bench(lambda x=x, wt=wt: _relu_square_(torch.mm(x, wt)))
        tri = {"default": _bench(lambda x=x, w=w: fused_conv.pointwise_conv(x, w, relu_square=True))}
        for c in cfgs:
            try:
                tri[c] = _bench(partial(fused_conv.pointwise_conv, x, w, relu_square=True, _config=c))
            except Exception as exc:  # a tile that does not fit shared memory
                print(f"  {c}: {type(exc).__name__}")
        best_cfg, best = min(tri.items(), key=lambda kv: kv[1])
        print(
            f"| {m} | {base * 1e3:.1f} | {tri['default'] * 1e3:.1f} | {best * 1e3:.1f} | {best_cfg} "
            f"(max rel. diff {err:.1e}) |",
            flush=True,
        )
        out[str(m)] = {"cublas_us": base * 1e3, "triton_us": {str(k): v * 1e3 for k, v in tri.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--key-gemm", action="store_true", help="only the channel mix's key product")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    res = channel_mix_key() if args.key_gemm else tune()
    if args.json:
        args.json.write_text(json.dumps({"device": torch.cuda.get_device_name(), "kernels": res}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
