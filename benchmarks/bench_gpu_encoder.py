"""RWKV-SAM-S image encoder vs a plain ViT-S/16 on the GPU (issue 3).

Times, at batch 1 and several input sizes, the rwkvsam_s encoder (backbone + neck, random weights)
and a plain ViT-S/16 encoder written here (patch embedding, learned position embedding, 12 blocks
of dim 384 with 6 heads of global attention through ``scaled_dot_product_attention``, MLP 4x, and
the same neck as RWKV-SAM: conv1x1 -> LN2d -> conv3x3 -> LN2d to 256 channels). Both run in the
same execution mode, applied identically to both:

- ``fp32``: eager float32; ``bf16``: eager under bf16 autocast;
- ``bf16-graph``: the bf16 forward replayed from a CUDA graph;
- ``bf16-compile``: ``torch.compile(encoder, mode=--compile-mode, fullgraph=True, dynamic=False)``
  under bf16 autocast (compiled once per encoder and size, shared with the next mode);
- ``bf16-compile-graph``: that compiled forward replayed from a CUDA graph.

Reports latency (median of CUDA-event timings), FPS, peak memory, and the ratio of FPS. Also:
rwkvsam_s at batch 8 (images/s), and the full model with one box prompt at 1024 (encode + decode,
eager and CUDA graph) plus one more prompt on an already encoded image (decode only).

Usage (on a GPU machine):
    python benchmarks/bench_gpu_encoder.py [--sizes 1024] [--modes bf16,bf16-graph,...] [--json out.json]
Without a GPU, ``--count-ops SIZE`` prints the aten ops of one forward of each encoder (CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LayerNorm2d(nn.Module):
    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViTS16Encoder(nn.Module):
    """Plain ViT-S/16 (12 blocks, dim 384, 6 heads, global attention) + a 256-channel neck."""

    def __init__(self, image_size: int, dim: int = 384, depth: int = 12, heads: int = 6) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 16, 16)
        g = image_size // 16
        self.pos = nn.Parameter(torch.randn(1, g * g, dim) * 0.02)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.neck = nn.Sequential(
            nn.Conv2d(dim, 256, 1, bias=False),
            LayerNorm2d(256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            LayerNorm2d(256),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x)
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return self.neck(t.transpose(1, 2).reshape(b, c, h, w))


class RWKVSAMEncoder(nn.Module):
    """backbone + neck of a built RWKV-SAM model (what produces the image embedding)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone = model.backbone
        self.neck = model.neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x)[2])


def _spin_up(seconds: float = 0.3) -> None:
    """Raise the GPU clocks out of idle before timing."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def _median_ms(fn: Callable[[], object], budget_s: float = 1.5, max_reps: int = 50) -> float:
    fn()
    _spin_up()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once = time.perf_counter() - t0
    reps = int(max(3, min(max_reps, budget_s / max(once, 1e-6))))
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


def _graphed(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], object]:
    static = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(static)
    return g.replay


MODES = ("fp32", "bf16", "bf16-graph", "bf16-compile", "bf16-compile-graph")
DEFAULT_MODES = "bf16,bf16-graph,bf16-compile,bf16-compile-graph"


def compile_encoder(enc: nn.Module, compile_mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder's forward through torch.compile: whole graph, static shapes."""
    return torch.compile(enc, mode=compile_mode, fullgraph=True, dynamic=False)


def _error(exc: Exception) -> dict:
    lines = str(exc).strip().splitlines()
    return {"error": f"{type(exc).__name__}: {(lines[0] if lines else '')[:160]}"}


def measure(
    enc: nn.Module,
    x: torch.Tensor,
    mode: str,
    compiled: dict | None = None,
    compile_mode: str = "max-autotune-no-cudagraphs",
) -> dict:
    """mode: one of MODES. Returns latency_ms, fps, peak_GiB (or error).

    ``compiled`` caches the compiled forward per encoder (key ``id(enc)``) so that the two compile
    modes share one compilation; the mode that compiles reports the compile time (``compile_s``,
    inductor's autotuning included).
    """
    compiled = {} if compiled is None else compiled
    extra = {}

    def forward(inp: torch.Tensor):
        return enc(inp)

    try:
        if mode.startswith("bf16-compile"):
            if id(enc) not in compiled:
                compiled[id(enc)] = compile_encoder(enc, compile_mode)
                t0 = time.perf_counter()
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    compiled[id(enc)](x)
                torch.cuda.synchronize()
                extra["compile_s"] = time.perf_counter() - t0
            forward = compiled[id(enc)]
    except Exception as exc:  # a compile failure is a result too
        return _error(exc)

    def run(inp: torch.Tensor):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
            return forward(inp)

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        if mode.endswith("-graph"):
            fn = _graphed(run, x)
        else:

            def fn():
                return run(x)

        ms = _median_ms(fn)
    except Exception as exc:  # report (e.g. out of memory, capture failure) and go on
        return _error(exc)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"latency_ms": ms, "fps": 1000.0 / ms * x.shape[0], "peak_GiB": peak, **extra}


def bench_extras() -> dict:
    """rwkvsam_s at batch 8, and the full model with one box (encode + decode; decode only), bf16."""
    from rwkvsam_core import build_model

    extra = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("rwkvsam_s", device="cuda", image_size=1024, pretrained=False)
    rw = RWKVSAMEncoder(model).eval()
    xb = torch.randn(8, 3, 1024, 1024, device="cuda")
    for mode in ("bf16", "bf16-graph"):
        extra[f"batch8_{mode}"] = measure(rw, xb, mode)
    del xb
    # full model with one box prompt
    x1 = torch.randn(1, 3, 1024, 1024, device="cuda")
    box = torch.tensor([[200.0, 300.0, 700.0, 800.0]], device="cuda")

    def full(inp):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            feats = model.encode_image(inp)
            return model.decode(feats, boxes=box, multimask_output=False)

    for mode in ("eager", "graph"):
        try:
            fn = _graphed(full, x1) if mode == "graph" else (lambda: full(x1))
            ms = _median_ms(fn)
            extra[f"full_box_{mode}"] = {"latency_ms": ms, "fps": 1000.0 / ms}
        except Exception as exc:
            extra[f"full_box_{mode}"] = _error(exc)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        feats = model.encode_image(x1)
    box2 = torch.tensor([[100.0, 100.0, 400.0, 500.0]], device="cuda")

    def prompt_only(_inp=None):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model.decode(feats, boxes=box2, multimask_output=False)

    for mode in ("eager", "graph"):
        try:
            fn = _graphed(prompt_only, x1) if mode == "graph" else prompt_only
            extra[f"cached_prompt_{mode}"] = {"latency_ms": _median_ms(fn)}
        except Exception as exc:
            extra[f"cached_prompt_{mode}"] = _error(exc)
    for k, v in extra.items():
        print(f"{k}: {v}", flush=True)
    return extra


def bench(
    sizes: list[int],
    modes: list[str],
    compile_mode: str = "max-autotune-no-cudagraphs",
    extras: bool = True,
    budget_s: float = float("inf"),
) -> dict:
    """Extras first (quick), then every (size, mode) pair; pairs that would start after ``budget_s``
    seconds are skipped (reported as errors) so that a time-limited run still prints a table."""
    from rwkvsam_core import build_model
    from rwkvsam_core.ops import bi_wkv_backend_info

    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    info = bi_wkv_backend_info("cuda")
    extra = bench_extras() if extras else {}
    rows = []
    for size in sizes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model("rwkvsam_s", device="cuda", image_size=size, pretrained=False)
        rw = RWKVSAMEncoder(model).eval()
        vit = ViTS16Encoder(size).cuda().eval()
        x = torch.randn(1, 3, size, size, device="cuda")
        compiled: dict = {}
        for mode in modes:
            if time.perf_counter() - t_start > budget_s:
                r = v = {"error": f"skipped: past the {budget_s:.0f} s budget"}
            else:
                r = measure(rw, x, mode, compiled, compile_mode)
                v = measure(vit, x, mode, compiled, compile_mode)
            row = {"size": size, "mode": mode, "rwkvsam_s": r, "vit_s16": v}
            if "fps" in r and "fps" in v:
                row["fps_ratio"] = r["fps"] / v["fps"]
            rows.append(row)
            print(_fmt_row(row), flush=True)
        del model, rw, vit, compiled
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "bi_wkv": info,
        "compile_mode": compile_mode,
        "rows": rows,
        "extra": extra,
        "wall_s": time.perf_counter() - t_start,
    }


def profile_encoder(size: int = 1024, rows: int = 18) -> None:
    """Top GPU kernels of one bf16-autocast forward of the rwkvsam_s encoder (backbone + neck)."""
    from torch.profiler import ProfilerActivity, profile

    from rwkvsam_core import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("rwkvsam_s", device="cuda", image_size=size, pretrained=False)
    enc = RWKVSAMEncoder(model).eval()
    x = torch.randn(1, 3, size, size, device="cuda")

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            return enc(x)

    for _ in range(3):
        run()
    _spin_up()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    print(f"\nrwkvsam_s encoder at {size}, bf16 autocast, eager, 5 forwards: top kernels")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


_NO_KERNEL_OPS = (
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::_unsafe_view",
    "aten::lift_fresh",
    "aten::promote_types",
    "aten::result_type",
)


def count_ops(enc: nn.Module, x: torch.Tensor, bf16: bool = False) -> Counter:
    """aten ops of one inference forward of ``enc`` (any device, CPU included), by name.

    Counts what the dispatcher runs below autograd: views and bare allocations are left out, so
    each counted op is one kernel or (linear, conv with bias) a GEMM/conv and its epilogue. The
    casts that CUDA autocast inserts do not appear. One Bi-WKV call counts as one op
    (``rwkvsam::bi_wkv``) on every device: on the CPU its portable implementation is many ops.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    import rwkvsam_core.modeling.backbone as backbone_mod

    counts: Counter = Counter()
    inside = [False]

    class _Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if not inside[0] and not func.is_view and name not in _NO_KERNEL_OPS:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    real = backbone_mod.bi_wkv

    def counted_bi_wkv(*args):
        inside[0] = True
        try:
            return real(*args)
        finally:
            inside[0] = False
            counts["rwkvsam::bi_wkv"] += 1

    def run():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return enc(x)

    run()  # one-time work (backend choice, logging) stays out of the count
    backbone_mod.bi_wkv = counted_bi_wkv
    try:
        with _Count():
            run()
    finally:
        backbone_mod.bi_wkv = real
    return counts


def print_op_counts(size: int, device: str = "cpu") -> None:
    """Op counts of one forward of each encoder at ``size``, fp32 and bf16 autocast."""
    from rwkvsam_core import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("rwkvsam_s", device=device, image_size=size, pretrained=False)
    encoders = {"rwkvsam_s": RWKVSAMEncoder(model).eval(), "vit_s16": ViTS16Encoder(size).to(device).eval()}
    x = torch.randn(1, 3, size, size, device=device)
    print(f"aten ops per forward at {size} on {device} (views and allocations not counted)")
    for name, enc in encoders.items():
        for bf16 in (False, True):
            c = count_ops(enc, x, bf16)
            top = ", ".join(f"{k.split('::')[-1]} {v}" for k, v in c.most_common(8))
            print(f"{name} {'bf16' if bf16 else 'fp32'}: {sum(c.values())} ops ({top}, ...)")


def cpu_compile_check(size: int = 128) -> float:
    """torch.compile(fullgraph=True, dynamic=False) of the rwkvsam_s encoder on the CPU vs eager.

    The portable CPU Bi-WKV picks its algorithm from the values of w (a data-dependent branch that
    no full graph can hold), so here it runs as an opaque custom op, as the CUDA kernel does on the
    GPU; everything else is the model's own code. Returns the max abs difference (float32).
    """
    import rwkvsam_core.modeling.backbone as backbone_mod
    from rwkvsam_core import build_model
    from rwkvsam_core.ops.portable import bi_wkv_portable

    @torch.library.custom_op("rwkvsam_bench::bi_wkv_portable", mutates_args=())
    def opaque_bi_wkv(w: torch.Tensor, u: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return bi_wkv_portable(w, u, k, v)

    @opaque_bi_wkv.register_fake
    def _(w, u, k, v):
        return torch.empty_like(k)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = build_model("rwkvsam_s", device="cpu", image_size=size, pretrained=False)
    enc = RWKVSAMEncoder(model).eval()
    x = torch.randn(1, 3, size, size)
    real = backbone_mod.bi_wkv
    backbone_mod.bi_wkv = opaque_bi_wkv
    try:
        with torch.no_grad():
            eager = enc(x)
            t0 = time.perf_counter()
            out = torch.compile(enc, fullgraph=True, dynamic=False)(x)
            took = time.perf_counter() - t0
    finally:
        backbone_mod.bi_wkv = real
    diff = (out - eager).abs().max().item()
    print(
        f"rwkvsam_s encoder at {size} on CPU: compiled (fullgraph) in {took:.0f} s, max |compiled - eager| {diff:.2e}"
    )
    return diff


def _cell(d: dict) -> str:
    if "error" in d:
        return f"ERR {d['error'][:40]}"
    cell = f"{d['latency_ms']:.2f} ms / {d['fps']:.0f} FPS / {d['peak_GiB']:.2f} GiB"
    return cell + (f" (compiled in {d['compile_s']:.0f} s)" if "compile_s" in d else "")


def _fmt_row(row: dict) -> str:
    ratio = f"{row['fps_ratio']:.2f}x" if "fps_ratio" in row else "-"
    return (
        f"| {row['size']} | {row['mode']} | {_cell(row['rwkvsam_s'])} | {_cell(row['vit_s16'])} | {ratio} |"
    )


def print_table(res: dict) -> None:
    print(
        f"\nEncoders on {res['device']} ({res['date']}, torch {res['torch']}); bi_wkv: {res['bi_wkv']}; "
        f"compile mode: {res['compile_mode']}"
    )
    print("| size | mode | RWKV-SAM-S (latency / FPS / peak) | ViT-S/16 (latency / FPS / peak) | FPS ratio |")
    print("|---|---|---|---|---|")
    for row in res["rows"]:
        print(_fmt_row(row))
    for k, v in res["extra"].items():
        print(f"{k}: {v}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1024", help="comma-separated input sizes (e.g. 512,1024,2048,4096)")
    ap.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {','.join(MODES)}")
    ap.add_argument(
        "--compile-mode",
        default="max-autotune-no-cudagraphs",
        help="torch.compile mode of the compile modes (CUDA graphs are this script's own)",
    )
    ap.add_argument("--no-extras", action="store_true", help="skip batch 8 and the full-model timings")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="start no (size, mode) pair after this many seconds (the table is still printed)",
    )
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--profile", action="store_true", help="print the encoder's top kernels at 1024 first")
    ap.add_argument(
        "--count-ops",
        type=int,
        metavar="SIZE",
        default=None,
        help="print aten ops per forward at SIZE and exit",
    )
    ap.add_argument(
        "--cpu-compile-check",
        type=int,
        metavar="SIZE",
        default=None,
        help="compile the rwkvsam_s encoder on the CPU at SIZE, compare with eager, and exit",
    )
    args = ap.parse_args(argv)
    modes = args.modes.split(",")
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        ap.error(f"unknown modes {unknown}; choose from {MODES}")
    if args.cpu_compile_check is not None:
        cpu_compile_check(args.cpu_compile_check)
        return 0
    if args.count_ops is not None:
        print_op_counts(args.count_ops, "cuda" if torch.cuda.is_available() else "cpu")
        return 0
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    if args.profile:
        profile_encoder()
    sizes = [int(s) for s in args.sizes.split(",")]
    res = bench(sizes, modes, args.compile_mode, extras=not args.no_extras, budget_s=args.budget_s)
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
