"""Compile the Bi-WKV CUDA kernels' device code without a GPU or nvcc, and print each kernel's
registers and spills (a check to run before spending device time on a build).

NVRTC (the runtime compiler) and ptxas ship as PyPI wheels, so this works on a CPU-only machine:

    pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 nvidia-cuda-runtime-cu12
    python scripts/check_kernels_nvrtc.py [--arch sm_90] [--ptx out.ptx]

It compiles ``kernels/bi_wkv_kernels.cu`` up to the line ``// ---- host launchers ----`` (NVRTC
compiles device code only), instantiates every kernel template the launchers use, runs ptxas on
the result and prints ptxas's resource lines. The exit status is non-zero on a compile error.
The CUDA version of the wheels need not match the device's toolkit: register counts may differ by
a few from what nvcc on the GPU machine gives.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "// ---- host launchers ----"
# the header's constants the kernels use (the header also declares host functions NVRTC cannot parse)
PRELUDE = """
#include <cuda_fp16.h>
#include <cuda_bf16.h>
typedef long long int64_t;
#define INFINITY __int_as_float(0x7f800000)
namespace rwkvsam { constexpr int kChunk = 16; }
"""
TYPES = {"float": "float", "half": "__half", "bf16": "__nv_bfloat16"}


def _instantiations() -> list[str]:
    """Every kernel template the launchers instantiate, as explicit instantiations."""
    out = []
    ns = "rwkvsam::"
    for t in TYPES.values():
        for grad in ("false", "true"):
            out.append(
                f"template __global__ void {ns}summary_kernel<{t}, {grad}>(const {t}*, const {t}*, const float*, "
                "const float*, const float*, float*, int, int, int, int);"
            )
        out.append(
            f"template __global__ void {ns}sup_summary_kernel<{t}>(const {t}*, const {t}*, const float*, float*, "
            "float*, int, int, int, int, int);"
        )
        out.append(
            f"template __global__ void {ns}bwd_out_kernel<{t}>(const {t}*, const {t}*, const {t}*, const float*, "
            f"const float*, const float*, const float*, const float*, {t}*, {t}*, float*, float*, int, int, int, "
            "int);"
        )
        # (out_t, WRITE_LSE, GATED) as launch_forward uses them
        for o, lse, gated in (
            (t, "false", "false"),
            (t, "false", "true"),
            (t, "true", "false"),
            ("float", "true", "false"),
        ):
            out.append(
                f"template __global__ void {ns}fwd_out_kernel<{t}, {o}, {lse}, {gated}>(const {t}*, const {t}*, "
                f"const float*, const float*, const float*, {o}*, float*, float*, const {o}*, int, int, int, int);"
            )
            out.append(
                f"template __global__ void {ns}fwd_fused_kernel<{t}, {o}, {lse}, {gated}>(const {t}*, const {t}*, "
                f"const float*, const float*, const float*, const float*, {o}*, float*, float*, const {o}*, int, "
                "int, int, int, int);"
            )
    for grad in ("false", "true"):
        for ch in (16, 32):
            out.append(
                f"template __global__ void {ns}carry_kernel<{grad}, {ch}>(const float*, float*, const float*, int, "
                "int, int, int);"
            )
    out = sorted(set(out))
    # not a template: a reference keeps it in the output
    out.append(
        f"__device__ void (*keep_column_sum)(const float*, float*, float*, int, int) = {ns}column_sum_kernel;"
    )
    return out


def _readable(mangled: str) -> str:
    """``fwd_out_kernel<bf16, bf16, 0, 1>`` from the mangled name."""
    kernels = "sup_summary|summary|fwd_out|fwd_fused|bwd_out|carry|column_sum"
    m = re.search(rf"\d+((?:{kernels})_kernel)(?:I(\w*?)EEv)?", mangled)
    if not m:
        return mangled
    rest, args = m.group(2) or "", []
    tokens = (r"13__nv_bfloat16", r"6__half", r"f", r"Lb([01])E", r"Li(\d+)E", r"S\d*_")
    names = ("bf16", "half", "float", None, None, "(same)")
    while rest:
        for pattern, name in zip(tokens, names, strict=True):
            t = re.match(pattern, rest)
            if t:
                args.append(name or t.group(1))
                rest = rest[t.end() :]
                break
        else:  # a type this list does not know: show the rest as it is
            args.append(rest)
            break
    return f"{m.group(1)}<{', '.join(args)}>" if args else m.group(1)


def _wheel_dirs() -> tuple[Path, Path, Path]:
    try:
        import nvidia  # namespace package of the CUDA wheels
    except ImportError:
        sys.exit(
            "install the CUDA wheels first: pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-nvcc-cu12 "
            "nvidia-cuda-runtime-cu12"
        )
    base = Path(list(nvidia.__path__)[0])
    nvrtc = next((base / "cuda_nvrtc" / "lib").glob("libnvrtc.so*"), None)
    ptxas = base / "cuda_nvcc" / "bin" / "ptxas"
    include = base / "cuda_runtime" / "include"
    if nvrtc is None or not ptxas.exists() or not include.exists():
        sys.exit(f"incomplete CUDA wheels under {base}: need cuda_nvrtc, cuda_nvcc (ptxas) and cuda_runtime")
    return nvrtc, ptxas, include


def compile_device_code(source: str, arch: str) -> str:
    """PTX of ``source`` (NVRTC), or exit with the compiler log."""
    nvrtc_path, _, include = _wheel_dirs()
    lib = ctypes.CDLL(str(nvrtc_path))
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"bi_wkv_kernels.cu", 0, None, None):
        sys.exit("nvrtcCreateProgram failed")
    opts = [
        f"--gpu-architecture=compute_{arch.split('_')[1]}",
        "-std=c++17",
        f"-I{include}",
        "-default-device",
    ]
    arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if status:
        sys.exit(f"NVRTC failed:\n{text}")
    if text:
        print(text)
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--ptx", type=Path, default=None, help="also write the PTX here")
    args = ap.parse_args(argv)
    src = (ROOT / "kernels" / "bi_wkv_kernels.cu").read_text()
    if MARKER not in src:
        sys.exit(f"marker {MARKER!r} not found in kernels/bi_wkv_kernels.cu")
    device = src.split(MARKER)[0]
    device = re.sub(r'#include (<cmath>|<cstdint>|<cuda_runtime.h>|"bi_wkv.h")', "", device)
    # the anonymous namespace and rwkvsam stay open at the marker
    source = PRELUDE + device + "\n}  // namespace\n}  // namespace rwkvsam\n" + "\n".join(_instantiations())
    ptx = compile_device_code(source, args.arch)
    if args.ptx:
        args.ptx.write_text(ptx)
    _, ptxas, _ = _wheel_dirs()
    with tempfile.TemporaryDirectory() as tmp:
        ptx_file = Path(tmp) / "k.ptx"
        ptx_file.write_text(ptx)
        res = subprocess.run(
            [str(ptxas), f"-arch={args.arch}", "-O3", "-v", str(ptx_file), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
        )
    name = None
    for line in (res.stderr + res.stdout).splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            name = m.group(1)
            continue
        if "spill" in line or "Used" in line:
            line = line.replace("ptxas info    : ", "").strip()
            if name:
                print(f"{_readable(name)}:")
                name = None
            print(f"    {line}")
        elif "error" in line.lower():
            print(line)
    return res.returncode


if __name__ == "__main__":
    raise SystemExit(main())
