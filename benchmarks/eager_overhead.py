"""Host (launch) overhead of the encoder in eager mode, fused path vs module path (issue 3).

Eager forwards are launch-bound at small inputs: this times each region of the rwkvsam_s encoder
with a synchronisation before and after (wall time = GPU time + launch overhead not hidden), with
RWKVSAM_FUSED on and off, and the cost of one launch of a trivial Triton kernel and of a trivial
torch op from Python.

Usage (on a GPU machine): python benchmarks/eager_overhead.py [--sizes 1024,2048]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _wall_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def launch_costs() -> None:
    from rwkvsam_core.ops import fused_conv

    g = torch.randn(4, 16, device="cuda")
    b = torch.randn(16, device="cuda")
    n = 200

    def triton_calls():
        for _ in range(n):
            fused_conv.add_channel_bias_(g, b)

    def torch_calls():
        for _ in range(n):
            g.add_(b)

    print(
        f"one call from Python: Triton add_channel_bias_ {_wall_ms(triton_calls, 5) / n * 1e3:.1f} us, "
        f"torch add_ {_wall_ms(torch_calls, 5) / n * 1e3:.1f} us"
    )


def regions(size: int) -> None:
    from rwkvsam_core import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("rwkvsam_s", device="cuda", image_size=size, pretrained=False).eval()
    bb = model.backbone
    x = torch.randn(1, 3, size, size, device="cuda")
    rows = {}
    for flag in ("0", "1"):
        os.environ["RWKVSAM_FUSED"] = flag
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            s = bb.stem(x)
            h = bb.conv_stages[0](s)
            m = bb.conv_stages[1](h)
            d = bb.conv_final_pool(m)
            feat = bb(x)[2]
            parts = {
                "stem": partial(bb.stem, x),
                "stage 1": partial(bb.conv_stages[0], s),
                "stage 2": partial(bb.conv_stages[1], h),
                "downsample": partial(bb.conv_final_pool, m),
                "backbone": partial(bb, x),
                "neck": partial(model.neck, feat),
            }
            for name, fn in parts.items():
                rows.setdefault(name, {})[flag] = _wall_ms(fn)
            del d
    os.environ.pop("RWKVSAM_FUSED")
    print(f"\neager bf16 autocast at {size} (wall ms, synchronised), module path vs fused path")
    print("| region | module | fused |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['0']:.2f} | {r['1']:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024,2048")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    launch_costs()
    for s in args.sizes.split(","):
        regions(int(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
