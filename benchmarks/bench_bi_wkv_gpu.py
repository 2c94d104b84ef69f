"""Bi-WKV on the GPU: forward and forward+backward time and achieved bandwidth (issue 3).

For each (B, T, C) of the issue and each dtype, times the CUDA extension, the Triton kernels and the
portable PyTorch implementation. Kernel times are the median of CUDA-graph replays (launch overhead
out), each replay running the op over several input sets in turn so that the inputs do not sit in
L2 between calls; "eager" is the median of plain calls timed with CUDA events (launch overhead in).
Backends: ``cuda`` times the inference forward (``bi_wkv``) and, for forward+backward, the training
pair (``bi_wkv_fwd_saved`` keeps lse2 and float32 y, ``bi_wkv_bwd_saved`` uses them), which is what
``rwkvsam_core.ops.bi_wkv`` runs when gradients are needed; ``cuda-recompute`` is ``bi_wkv`` +
``bi_wkv_backward`` (the backward recomputes the forward). Bandwidth is the bytes floor over the
time: forward reads k, v and writes y; forward+backward also reads grad_y and writes dk, dv (6
tensors of B*T*C). The copy column is a measured device-to-device copy (bytes read + written per
second) on the same card.

Usage (on a GPU machine):
    python benchmarks/bench_bi_wkv_gpu.py [--json out.json] [--reps 50]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = [(1, 4096, 384), (8, 4096, 384), (1, 16384, 384), (1, 4096, 768)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
L2_FLUSH_BYTES = 160 * 2**20  # rotate input sets until at least this many bytes are touched per replay


def spin_up(seconds: float = 0.3) -> None:
    """Keep the GPU busy for a while so that its clocks leave the idle state before timing (an idle
    H200 sits at 345 MHz and short bursts of small kernels never raise it)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def sm_clock_mhz() -> int | None:
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # pynvml missing
        return None


def _median_ms(fn: Callable[[], None], reps: int, warmup: int = 5) -> float:
    spin_up()
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(reps: int) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (GB/s)."""
    n = 2**28
    src = torch.randn(n, device="cuda")
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), reps)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _graph_ms(body: Callable[[], None], reps: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    return _median_ms(g.replay, reps)


def _inputs(B: int, T: int, C: int, dtype: torch.dtype, n_sets: int):
    sets = []
    for i in range(n_sets):
        g = torch.Generator(device="cuda").manual_seed(i)
        w = (torch.rand(C, generator=g, device="cuda") * 8 - 5) / T
        u = torch.randn(C, generator=g, device="cuda") * 0.5
        k = torch.randn(B, T, C, generator=g, device="cuda").to(dtype)
        v = torch.randn(B, T, C, generator=g, device="cuda").to(dtype)
        gy = torch.randn(B, T, C, generator=g, device="cuda").to(dtype)
        sets.append((w, u, k, v, gy))
    return sets


def _saved_pair(w, u, k, v, gy):
    """Forward+backward through the training pair (what autograd runs through ``ops.bi_wkv``)."""
    y, yf, lse = torch.ops.rwkvsam.bi_wkv_fwd_saved(w, u, k, v)
    return torch.ops.rwkvsam.bi_wkv_bwd_saved(w, u, k, v, y, yf, lse, gy)


def _then(fwd: Callable, bwd: Callable) -> Callable:
    """Forward+backward as a forward op followed by a backward op that recomputes what it needs."""

    def fb(w, u, k, v, gy):
        fwd(w, u, k, v)
        return bwd(w, u, k, v, gy)

    return fb


def _ops() -> dict[str, tuple[Callable, Callable | None, bool]]:
    """name -> (forward, forward+backward ``fb(w, u, k, v, grad_y)`` or None for autograd through
    the forward, capturable in a CUDA graph)."""
    ops: dict[str, tuple[Callable, Callable | None, bool]] = {}
    from rwkvsam_core.ops import cuda_ext

    try:
        _, info = cuda_ext.load_extension()
        print(f"cuda extension: {info}")
        ops["cuda"] = (torch.ops.rwkvsam.bi_wkv, _saved_pair, True)
        ops["cuda-recompute"] = (
            torch.ops.rwkvsam.bi_wkv,
            _then(torch.ops.rwkvsam.bi_wkv, torch.ops.rwkvsam.bi_wkv_backward),
            True,
        )
    except Exception as exc:  # report and carry on with the others
        print(f"cuda extension unavailable: {exc}")
    from rwkvsam_core.ops import triton_bi_wkv

    ok, why = triton_bi_wkv.available()
    if ok:
        triton_bi_wkv.register_op()
        fwd = torch.ops.rwkvsam.bi_wkv_triton
        ops["triton"] = (fwd, _then(fwd, torch.ops.rwkvsam.bi_wkv_triton_backward), True)
    else:
        print(f"triton unavailable: {why}")
    from rwkvsam_core.ops.portable import bi_wkv_portable

    ops["portable"] = (bi_wkv_portable, None, False)
    return ops


def _time_op(fwd: Callable, fb: Callable | None, capturable: bool, sets: list, reps: int) -> dict:
    """Median times in us: eager forward and forward+backward on the first input set, and the same
    under CUDA-graph replay over all sets (per set)."""
    out = {}
    w, u, k, v, gy = sets[0]
    out["fwd_eager_us"] = _median_ms(lambda: fwd(w, u, k, v), reps) * 1e3
    if fb is None:  # autograd through the implementation
        ws, us, ks, vs = (x.clone().requires_grad_() for x in (w, u, k, v))

        def fb_eager():
            fwd(ws, us, ks, vs).backward(gy)

    else:

        def fb_eager():
            fb(w, u, k, v, gy)

    out["fwdbwd_eager_us"] = _median_ms(fb_eager, reps) * 1e3
    out["sm_clock_MHz"] = sm_clock_mhz()
    if capturable:

        def f_body():
            for w_, u_, k_, v_, _ in sets:
                fwd(w_, u_, k_, v_)

        def fb_body():
            for w_, u_, k_, v_, g_ in sets:
                fb(w_, u_, k_, v_, g_)

        out["fwd_graph_us"] = _graph_ms(f_body, reps) * 1e3 / len(sets)
        out["fwdbwd_graph_us"] = _graph_ms(fb_body, reps) * 1e3 / len(sets)
        out["sm_clock_MHz_graph"] = sm_clock_mhz()
    return out


def bench(reps: int, shapes=SHAPES, dtypes=DTYPES, backends: tuple[str, ...] | None = None) -> dict:
    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth(reps)
    print(f"device: {dev}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    ops = _ops()
    rows = []
    for name, (fwd, fb, capturable) in ops.items():
        if backends and name not in backends:
            continue
        for dname, dtype in dtypes.items():
            for B, T, C in shapes:
                el = torch.tensor([], dtype=dtype).element_size()
                tensor_bytes = B * T * C * el
                n_sets = max(1, min(16, math.ceil(L2_FLUSH_BYTES / (3 * tensor_bytes))))
                sets = _inputs(B, T, C, dtype, n_sets if capturable else 1)
                row = {"backend": name, "dtype": dname, "B": B, "T": T, "C": C}
                row.update(_time_op(fwd, fb, capturable, sets, reps))
                best_f = row.get("fwd_graph_us", row["fwd_eager_us"])
                best_fb = row.get("fwdbwd_graph_us", row["fwdbwd_eager_us"])
                row["fwd_floor_us"] = 3 * tensor_bytes / (copy_gbs * 1e9) * 1e6
                row["fwd_GBs"] = 3 * tensor_bytes / (best_f * 1e-6) / 1e9
                row["fwdbwd_GBs"] = 6 * tensor_bytes / (best_fb * 1e-6) / 1e9
                row["fwd_x_floor"] = best_f / row["fwd_floor_us"]
                rows.append(row)
                del sets
                torch.cuda.empty_cache()
    return {
        "device": dev,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "copy_GBs": copy_gbs,
        "rows": rows,
    }


def print_table(res: dict) -> None:
    print(
        f"\nBi-WKV on {res['device']} ({res['date']}, torch {res['torch']}, CUDA {res['cuda']}); "
        f"copy {res['copy_GBs']:.0f} GB/s. Times in us (median); graph = CUDA-graph replay, rotating inputs."
    )
    hdr = (
        "| backend | dtype | B,T,C | fwd graph | fwd eager | fwd+bwd graph | fwd+bwd eager | fwd GB/s | "
        "fwd / floor | fwd+bwd GB/s | SM MHz |"
    )
    print(hdr)
    print("|" + "---|" * 11)
    for r in res["rows"]:

        def f(key, r=r):
            return f"{r[key]:.1f}" if key in r else "-"

        print(
            f"| {r['backend']} | {r['dtype']} | {r['B']},{r['T']},{r['C']} | {f('fwd_graph_us')} | "
            f"{f('fwd_eager_us')} | {f('fwdbwd_graph_us')} | {f('fwdbwd_eager_us')} | {r['fwd_GBs']:.0f} | "
            f"{r['fwd_x_floor']:.1f}x | {r['fwdbwd_GBs']:.0f} | {r.get('sm_clock_MHz_graph', r.get('sm_clock_MHz'))} |"
        )


def profile(shapes=((1, 4096, 384), (8, 4096, 384)), dtype=torch.bfloat16) -> None:
    """Per-kernel GPU time of the CUDA extension's forward and backward (torch.profiler)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    from rwkvsam_core.ops import cuda_ext

    cuda_ext.load_extension()
    fwd, bwd = torch.ops.rwkvsam.bi_wkv, torch.ops.rwkvsam.bi_wkv_backward
    for B, T, C in shapes:
        w, u, k, v, gy = _inputs(B, T, C, dtype, 1)[0]
        for _ in range(3):
            fwd(w, u, k, v)
            bwd(w, u, k, v, gy)
        spin_up()
        with tprofile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                fwd(w, u, k, v)
                bwd(w, u, k, v, gy)
            torch.cuda.synchronize()
        print(f"\nprofile {B},{T},{C} {dtype} (10 x forward + backward):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument(
        "--backends", default="", help="comma list among cuda,cuda-recompute,triton,portable (default all)"
    )
    ap.add_argument(
        "--profile", action="store_true", help="print per-kernel times of the CUDA extension first"
    )
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    if args.profile:
        profile()
    backends = tuple(b for b in args.backends.split(",") if b) or None
    res = bench(args.reps, backends=backends)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
