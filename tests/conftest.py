"""Shared test configuration: deterministic seeds, quiet random-weight warnings, CUDA marker skip."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (rwkvsam_core.ops.fused*) run on CPU tensors through Triton's interpreter when
    # Triton is installed; the switch must be set before the kernels are decorated (on import).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RWKV-SAM: no weights", category=UserWarning)
        yield
