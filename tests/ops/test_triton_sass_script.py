"""scripts/triton_sass_counts.py: the fused kernels compiled for sm_90 without a GPU.

Needs Triton with its NVIDIA backend (CUDA builds of torch bring it; the CPU CI has none, so the
module is skipped there). The script runs in a subprocess: this test session may have switched on
Triton's interpreter, under which kernels cannot be compiled.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton with its NVIDIA backend")

ROOT = Path(__file__).resolve().parents[2]


def test_counts_and_registers_of_the_expansion_kernel():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "triton_sass_counts.py"), "--kernels", "ln_gemm"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    counts = dict(re.findall(r"ln_gemm gelu=(\w+): ([\d.]+) SASS instructions an output", run.stdout))
    assert set(counts) == {"True", "False"}, run.stdout
    # the GELU epilogue costs instructions: the counts are of real, different kernels
    assert float(counts["True"]) > float(counts["False"]) + 5
    assert len(re.findall(r"Used \d+ registers", run.stdout)) == 2, run.stdout
