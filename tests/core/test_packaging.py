"""A regular (non-editable) wheel carries what an installed package needs at run time."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_carries_cuda_sources_and_manifests(tmp_path: Path) -> None:
    had_build_dir = (ROOT / "build").exists()
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    if not had_build_dir:  # setuptools stages the wheel in <repo>/build: leave the checkout as it was
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("rwkvsam-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for src in ("bi_wkv.cpp", "bi_wkv_kernels.cu", "bi_wkv.h"):
        assert f"rwkvsam_core/_kernels/{src}" in names
        assert (ROOT / "rwkvsam_core" / "_kernels" / src).exists() is False  # the checkout stays clean
    assert "napari_plugin/napari.yaml" in names
    assert "training/data_sources/manifest.json" in names
    shipped = sorted((ROOT / "rwkvsam_core" / "weights").glob("*.safetensors"))
    for w in shipped:
        assert f"rwkvsam_core/weights/{w.name}" in names
