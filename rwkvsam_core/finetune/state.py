"""Atomic training-state files (model, optimizer, scheduler, RNG, step) for exact resume."""

from __future__ import annotations

import logging
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["STATE_NAME", "save_train_state", "load_train_state", "rng_state", "set_rng_state"]

STATE_NAME = "train_state.pt"


def rng_state() -> dict[str, Any]:
    """Snapshot of the Python, numpy and torch (CPU + CUDA) generators."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a :func:`rng_state` snapshot."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_train_state(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``: a kill at any
    moment leaves either the previous complete file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_train_state(path: str | Path) -> dict[str, Any] | None:
    """Load a training state written by :func:`save_train_state`, or None if there is none."""
    path = Path(path)
    if not path.is_file():
        return None
    # weights_only=False: the file also holds RNG states (numpy tuples); it is our own output.
    return torch.load(path, map_location="cpu", weights_only=False)
