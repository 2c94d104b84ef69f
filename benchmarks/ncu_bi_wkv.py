"""Drive the Bi-WKV CUDA op once per shape for Nsight Compute (issue 3 profile).

    ncu --clock-control none --set full -k regex:'summary|carry|out_kernel|column' \
        -o report python benchmarks/ncu_bi_wkv.py [--shapes 1,4096,384 8,4096,384] [--dtype bf16]

Each shape runs the inference forward ``torch.ops.rwkvsam.bi_wkv``, the recomputing backward
``bi_wkv_backward`` and the training pair ``bi_wkv_fwd_saved`` + ``bi_wkv_bwd_saved`` (random inputs
in the model's range), so the report holds every kernel of each path once per shape.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1,4096,384", "8,4096,384"])
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"])
    args = ap.parse_args()
    from rwkvsam_core.ops.cuda_ext import load_extension

    _, info = load_extension()
    print(info, flush=True)
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    g = torch.Generator(device="cuda").manual_seed(0)
    for s in args.shapes:
        B, T, C = (int(x) for x in s.split(","))
        w = (torch.rand(C, device="cuda", generator=g) * 8 - 5) / T
        u = torch.rand(C, device="cuda", generator=g) - 0.5
        k = torch.randn(B, T, C, device="cuda", generator=g).to(dt)
        v = torch.randn(B, T, C, device="cuda", generator=g).to(dt)
        gy = torch.randn(B, T, C, device="cuda", generator=g).to(dt)
        torch.ops.rwkvsam.bi_wkv(w, u, k, v)
        torch.ops.rwkvsam.bi_wkv_backward(w, u, k, v, gy)
        y, yf, lse = torch.ops.rwkvsam.bi_wkv_fwd_saved(w, u, k, v)
        torch.ops.rwkvsam.bi_wkv_bwd_saved(w, u, k, v, y, yf, lse, gy)
        torch.cuda.synchronize()
        print("ran", s, args.dtype, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
