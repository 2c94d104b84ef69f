"""Compile the fused encoder's Triton kernels for sm_90 without a GPU, and print their registers,
spills and SASS instruction counts per output element (a check to run before spending device time).

Triton compiles ahead of time for a target it is given, and its wheel ships ptxas and nvdisasm, so
this runs on a CPU-only machine with Triton installed:

    pip install triton
    python scripts/triton_sass_counts.py [--kernels ln_gemm,depthwise] [--arch 90]

Each kernel is compiled with the specialisations Triton's JIT makes at run time for the model's
tensors: pointers and sizes divisible by 16, unit strides as constants. (Without them the loads
are not vectorised and the counts come out about twice too high.) The counts are static: every
SASS instruction of the kernel once, divided by the output elements one thread owns per tile (for
the depthwise kernel, per output row of its walk), so they include prologue and epilogue. The
difference between two variants, e.g. with and without GELU, is what they are good for.
The Triton version here may differ from a GPU machine's: treat the numbers as estimates.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tools():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton, GPUTarget, ASTSource


def _bin(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise SystemExit(f"{path} not found: this Triton wheel does not ship {name}")
    return str(path)


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (its wheel may ship several)."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return get_ptxas(arch).path
    except TypeError:  # older Triton: no arch argument
        return get_ptxas().path


def _resources(kernel, arch: int) -> str:
    """ptxas's register and spill line for the compiled kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    run = subprocess.run(
        [_ptxas(arch), "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", "/dev/null"],
        capture_output=True,
        text=True,
    )
    lines = [
        ln.split(":", 1)[-1].strip() for ln in run.stderr.splitlines() if "registers" in ln or "spill" in ln
    ]
    return "; ".join(lines) or f"ptxas gave no resource line: {run.stderr.strip()[-300:]}"


def sass_histogram(kernel) -> collections.Counter:
    """Opcode (without modifiers) -> static count in the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    out = subprocess.run([_bin("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops: collections.Counter = collections.Counter()
    for line in out.splitlines():
        m = re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(2).split(".")[0]] += 1
    return ops


def _compile(fn, signature: dict, constexprs: dict, divisible: list[str], arch: int, **options):
    triton, GPUTarget, ASTSource = _tools()
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def ln_gemm(arch: int, gelu: bool):
    """The MBConv expansion: LayerNorm + 1x1 (64 -> 256) + bias [+ GELU], its default 32 x 128 tile."""
    from rwkvsam_core.ops import fused_conv as fc

    sig = {
        "x_ptr": "*bf16",
        "w_ptr": "*bf16",
        "bias_ptr": "*fp32",
        "ln_w_ptr": "*fp32",
        "ln_b_ptr": "*fp32",
        "res_ptr": "*bf16",
        "out_ptr": "*bf16",
        "M": "i32",
        "N": "i32",
        "K": "i32",
        "stride_wn": "i32",
        "stride_wk": "constexpr",
        "eps": "fp32",
    }
    consts = {"stride_wk": 1, "HAS_LN": True, "HAS_BIAS": True, "GELU": gelu, "RELU_SQUARE": False}
    consts.update(HAS_RES=False, DOT_MODE=0, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64)
    sig.update({k: "constexpr" for k in consts if k not in sig})
    divisible = [
        "x_ptr",
        "w_ptr",
        "bias_ptr",
        "ln_w_ptr",
        "ln_b_ptr",
        "res_ptr",
        "out_ptr",
        "M",
        "N",
        "K",
        "stride_wn",
    ]
    kernel = _compile(fc._pointwise_kernel, sig, consts, divisible, arch, num_warps=4, num_stages=3)
    return kernel, 32 * 128 / 128  # outputs a thread owns


def depthwise(arch: int, gelu: bool, stride: int):
    """The depthwise 3x3 (+ bias [+ GELU]), its default 16 x 16 x 128 tile, per output row step."""
    from rwkvsam_core.ops import fused_conv as fc

    sig = {"x_ptr": "*bf16", "w_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16"}
    sig.update({k: "i32" for k in ("H", "W", "C", "Ho", "Wo")})
    consts = {"STRIDE": stride, "HAS_BIAS": True, "GELU": gelu, "ROWS": 16, "BLOCK_W": 16, "BLOCK_C": 128}
    sig.update({k: "constexpr" for k in consts})
    divisible = ["x_ptr", "w_ptr", "bias_ptr", "out_ptr", "H", "W", "C", "Ho", "Wo"]
    kernel = _compile(fc._dw_rows_kernel, sig, consts, divisible, arch, num_warps=4)
    return kernel, 16 * 128 / 128


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", default="ln_gemm,depthwise", help="comma-separated: ln_gemm, depthwise")
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    args = ap.parse_args(argv)
    try:
        _tools()
    except ImportError:
        print("needs Triton (pip install triton)")
        return 1
    sys.path.insert(0, str(ROOT))
    variants = []
    for name in args.kernels.split(","):
        if name == "ln_gemm":
            variants += [(f"ln_gemm gelu={g}", lambda g=g: ln_gemm(args.arch, g)) for g in (True, False)]
        elif name == "depthwise":
            variants += [
                (f"depthwise stride={s} gelu={g}", lambda s=s, g=g: depthwise(args.arch, g, s))
                for s in (1, 2)
                for g in (True, False)
            ]
        else:
            raise SystemExit(f"unknown kernel {name!r}")
    for label, build in variants:
        kernel, per_thread = build()
        ops = sass_histogram(kernel)
        top = ", ".join(f"{op} {n / per_thread:.2f}" for op, n in ops.most_common(10))
        print(f"{label}: {sum(ops.values()) / per_thread:.1f} SASS instructions an output ({top})")
        print(f"    {_resources(kernel, args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
