"""Build hook: wheels carry the CUDA sources of ``kernels/`` as ``rwkvsam_core/_kernels``.

Everything else is in pyproject.toml. Editable installs and source checkouts read ``kernels/``
directly (``rwkvsam_core.ops.cuda_ext.kernel_source_dir``); a regular wheel has no repository next to it.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNEL_SOURCES = ("bi_wkv.cpp", "bi_wkv_kernels.cu", "bi_wkv.h")


class BuildPyWithKernels(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        src = Path(__file__).resolve().parent / "kernels"
        dst = Path(self.build_lib) / "rwkvsam_core" / "_kernels"
        dst.mkdir(parents=True, exist_ok=True)
        for name in KERNEL_SOURCES:
            shutil.copy2(src / name, dst / name)


setup(cmdclass={"build_py": BuildPyWithKernels})
