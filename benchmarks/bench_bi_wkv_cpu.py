"""Bi-WKV portable implementation on the CPU: forward and forward+backward times.

Usage: python benchmarks/bench_bi_wkv_cpu.py [--repeat 20] [--threads N] [--tune-malloc]

Prints a Markdown table (median and best of ``--repeat`` runs, wall clock) for the shapes the
RWKV-SAM encoder uses: (1, 4096, 192) = rwkvsam_t at 1024^2, (1, 4096, 384) = rwkvsam_s at 1024^2,
(1, 16384, 192) = rwkvsam_t at 2048^2. Decays follow the block's init (spatial_decay / T).

``--tune-malloc`` (glibc only) keeps freed memory in the heap (mallopt M_MMAP_THRESHOLD = 32 MiB,
M_TRIM_THRESHOLD = 1 GiB) instead of returning every large tensor to the OS; on VMs where page faults
are expensive this removes most of the time spent first-touching fresh tensors.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import statistics
import time

import torch
from _machine import cpu_model  # benchmarks/_machine.py (run as a script)

from rwkvsam_core.ops import bi_wkv, bi_wkv_backend_info

SHAPES = [(1, 4096, 192), (1, 4096, 384), (1, 16384, 192)]


def tune_malloc() -> bool:
    """glibc: keep up to 1 GiB of freed memory in the heap and mmap only blocks above 32 MiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def make_inputs(B: int, T: int, C: int, requires_grad: bool):
    i = torch.arange(C, dtype=torch.float32)
    w = (-5 + 8 * (i / (C - 1)) ** 0.7) / T
    u = (math.log(0.3) + 0.5 * (((i + 1) % 3) - 1)) / T
    k = torch.randn(B, T, C) * 3
    v = torch.randn(B, T, C)
    return [x.requires_grad_(requires_grad) for x in (w, u, k, v)]


def timeit(fn, repeat: int) -> tuple[float, float, float]:
    """(median wall ms, best wall ms, best process CPU ms); CPU time is robust to other load on the
    machine when running with one thread."""
    for _ in range(3):
        fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e3, min(wall) * 1e3, min(cpu) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tune-malloc", action="store_true", help="glibc mallopt, see the module docstring")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default"
    if args.tune_malloc:
        malloc = "tuned (mallopt)" if tune_malloc() else "default (mallopt unavailable)"

    print(
        f"CPU: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}, malloc {malloc}"
    )
    print(f"backend: {bi_wkv_backend_info('cpu')}")
    print()
    print(
        "| B, T, C | forward ms (median / best / best CPU) | forward+backward ms (median / best / best CPU) |"
    )
    print("|---|---|---|")
    for B, T, C in SHAPES:
        w, u, k, v = make_inputs(B, T, C, requires_grad=False)
        with torch.inference_mode():
            fwd = timeit(lambda w=w, u=u, k=k, v=v: bi_wkv(w, u, k, v), args.repeat)
        wg, ug, kg, vg = make_inputs(B, T, C, requires_grad=True)
        g = torch.randn(B, T, C)

        def step(wg=wg, ug=ug, kg=kg, vg=vg, g=g):
            torch.autograd.grad(bi_wkv(wg, ug, kg, vg), (wg, ug, kg, vg), g)

        both = timeit(step, max(3, args.repeat // 2))
        f, b = (" / ".join(f"{x:.1f}" for x in r) for r in (fwd, both))
        print(f"| {B}, {T}, {C} | {f} | {b} |")


if __name__ == "__main__":
    main()
