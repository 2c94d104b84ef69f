"""Where the GPU time of one rwkvsam_s encoder forward goes, by region of the model (issue 3).

Runs the encoder (backbone + neck, random weights) at batch 1 under bf16 autocast in inference
mode, wraps every region (stem, each MBConv, the strided downsample, each VRWKV block's norm /
spatial mix / channel mix, the final norm, the neck) in a profiler range, and prints per region:
GPU kernel time and kernel count per forward; then the top kernels by name; then the forward
replayed as a CUDA graph (what the encoder benchmark times) for reference.

Usage (on a GPU machine):
    python benchmarks/profile_encoder_regions.py [--sizes 1024,4096] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _region_names(model) -> dict[str, torch.nn.Module]:
    bb = model.backbone
    regions = {"stem": bb.stem}
    for s, stage in enumerate(bb.conv_stages):
        for i, blk in enumerate(stage):
            regions[f"stage{s + 1}.mbconv{i}"] = blk
    regions["downsample"] = bb.conv_final_pool
    for i, layer in enumerate(bb.layers):
        regions[f"vrwkv{i:02d}"] = layer
        regions[f"vrwkv{i:02d}/norm1"] = layer.norm1
        regions[f"vrwkv{i:02d}/spatial_mix"] = layer.attn
        regions[f"vrwkv{i:02d}/norm2"] = layer.norm2
        regions[f"vrwkv{i:02d}/channel_mix"] = layer.mlp
    regions["final_norm"] = bb.final_norm
    regions["neck"] = model.neck
    return regions


def _wrap(module: torch.nn.Module, name: str) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        with torch.profiler.record_function(name):
            return inner(*args, **kwargs)

    module.forward = forward


def _wrap_fused_stack(names: set[str]) -> None:
    """Name the fused path's VRWKV stack (it bypasses the block modules) as one region."""
    from rwkvsam_core.modeling import fused_path

    inner = fused_path.vrwkv_stack
    if getattr(inner, "_profiled", False):
        return

    def stack(*args, **kwargs):
        with torch.profiler.record_function("vrwkv x14 (fused path)"):
            return inner(*args, **kwargs)

    stack._profiled = True
    fused_path.vrwkv_stack = stack
    names.add("vrwkv x14 (fused path)")


def _wrap_peak(module: torch.nn.Module, name: str, peaks: dict, base: int) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        torch.cuda.reset_peak_memory_stats()
        out = inner(*args, **kwargs)
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
        return out

    module.forward = forward


def _unwrap(model: torch.nn.Module) -> None:
    for mod in model.modules():
        mod.__dict__.pop("forward", None)


def profile(size: int, reps: int) -> dict:
    from bench_gpu_encoder import RWKVSAMEncoder, _graphed, _median_ms, _spin_up
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from rwkvsam_core import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("rwkvsam_s", device="cuda", image_size=size, pretrained=False)
    enc = RWKVSAMEncoder(model).eval()
    x = torch.randn(1, 3, size, size, device="cuda")

    def run(inp=x):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return enc(inp)

    graph_ms = _median_ms(_graphed(run, x))
    regions = _region_names(model)
    # peak memory inside each top-level region (allocator statistics, no synchronisation)
    peaks: dict[str, float] = {}
    base = torch.cuda.memory_allocated()
    for name, mod in regions.items():
        if "/" not in name:
            _wrap_peak(mod, name, peaks, base)
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    _unwrap(model)
    for name, mod in regions.items():
        _wrap(mod, name)
    names = set(regions)
    _wrap_fused_stack(names)
    for _ in range(3):
        run()
    _spin_up()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run()
        torch.cuda.synchronize()

    # attribute every kernel to the innermost region range that launched it
    events = prof.events()
    region_us: dict[str, float] = defaultdict(float)
    region_n: dict[str, int] = defaultdict(int)
    kernel_us: dict[str, float] = defaultdict(float)
    kernel_n: dict[str, int] = defaultdict(int)

    def innermost(evt) -> str:
        best = "other"
        p = evt
        while p is not None:
            if p.name in names:
                return p.name
            p = p.cpu_parent
        return best

    region_kernels: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    total_us = 0.0
    n_kernels = 0
    for evt in events:
        for k in getattr(evt, "kernels", []) or []:
            dur = k.duration if hasattr(k, "duration") else (k.end - k.start)
            region = innermost(evt)
            region_us[region] += dur
            region_n[region] += 1
            group = region.split("/")[0] if not region.startswith("vrwkv") else "vrwkv"
            region_kernels[group][k.name][0] += dur
            region_kernels[group][k.name][1] += 1
    # every kernel the GPU ran, by name: Triton launches (driver API) are not linked to the ops above
    from torch.autograd import DeviceType

    for evt in events:
        if evt.device_type == DeviceType.CUDA and evt.name not in names:  # not a range's GPU span
            dur = evt.time_range.elapsed_us()
            kernel_us[evt.name] += dur
            kernel_n[evt.name] += 1
            total_us += dur
            n_kernels += 1
    linked_us = sum(region_us.values())
    region_us["not linked to a region (Triton launches)"] = max(0.0, total_us - linked_us)
    region_n["not linked to a region (Triton launches)"] = max(
        0, n_kernels - sum(region_n[r] for r in region_us if not r.startswith("not linked"))
    )
    # fold per-block regions into groups for a compact table
    groups: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for r, us in region_us.items():
        key = r
        if r.startswith("vrwkv"):
            part = r.split("/", 1)[1] if "/" in r else "residual and glue"
            key = f"vrwkv x{len(model.backbone.layers)} / {part}"
        groups[key][0] += us / reps
        groups[key][1] += region_n[r] / reps
    print(f"\nrwkvsam_s encoder at {size}, bf16 autocast, inference, batch 1, {torch.cuda.get_device_name()}")
    print(f"CUDA-graph replay: {graph_ms:.3f} ms a forward")
    print(f"kernels a forward: {n_kernels / reps:.0f}, summed kernel time {total_us / reps / 1000:.3f} ms\n")
    print("| region | GPU time (us) | kernels | share |")
    print("|---|---|---|---|")
    for key, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        print(f"| {key} | {us:.1f} | {n:.0f} | {100 * us / (total_us / reps):.1f}% |")
    print("\nkernels of each region (a forward; the VRWKV blocks together):")
    for group, kernels in region_kernels.items():
        print(f"  {group}:")
        for name, (us, cnt) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:12]:
            print(f"    {us / reps:8.1f} us  x{cnt / reps:<4.0f} {name[:150]}")
    if n_kernels == 0:  # attribution failed on this torch version: show the plain table
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))
    print(
        "\npeak memory above the weights inside each region (GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in peaks.items() if not k.startswith("vrwkv") or k == "vrwkv00")
    )
    print("\n| kernel | GPU time a forward (us) | launches a forward |")
    print("|---|---|---|")
    top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:30]
    for name, us in top:
        print(f"| {name[:90]} | {us / reps:.1f} | {kernel_n[name] / reps:.0f} |")
    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "size": size,
        "graph_ms": graph_ms,
        "peak_GiB_by_region": peaks,
        "kernels_per_forward": n_kernels / reps,
        "kernel_ms_per_forward": total_us / reps / 1000,
        "groups_us": {k: v[0] for k, v in groups.items()},
        "groups_kernels": {k: v[1] for k, v in groups.items()},
        "top_kernels_us": {k: v / reps for k, v in top},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024", help="comma-separated input sizes")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    res = [profile(int(s), args.reps) for s in args.sizes.split(",")]
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
