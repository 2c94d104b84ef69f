"""Checkpoints: our safetensors format, and importers for official SAM and the authors' RWKV-SAM layout.

Our format is a safetensors file whose metadata holds the model config as JSON under
``rwkvsam_config`` (variant name, image size, decoder mode, format version, what it was trained on).
Foreign ``.pth`` files are read with ``torch.load(weights_only=True)``: never arbitrary pickles.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_KEY = "rwkvsam_config"

LAYOUT_OURS = "rwkvsam"
LAYOUT_OFFICIAL_SAM = "official_sam"
LAYOUT_AUTHORS = "authors_rwkvsam"
LAYOUT_AUTHORS_STAGE1 = "authors_rwkvsam_stage1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk, converted to our key layout.

    Attributes:
        state_dict: tensors under our module names.
        layout: which layout the file had (``LAYOUT_*``).
        config: our embedded config (only for our format), else None.
        metadata: the raw safetensors metadata (our format) or {}.
    """

    state_dict: dict[str, torch.Tensor]
    layout: str
    config: dict[str, Any] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def save_checkpoint(
    model: torch.nn.Module, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``model``'s weights and config as safetensors, atomically.

    Args:
        model: a model from ``build_model`` (must have ``.config``).
        path: destination file (parent directories are created).
        metadata: extra facts merged into the embedded config (e.g. ``trained_on``, ``steps``).
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = dict(getattr(model, "config", {}))
    config.update(metadata or {})
    config["format_version"] = FORMAT_VERSION
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={CONFIG_KEY: json.dumps(config, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config embedded in one of our safetensors checkpoints, without loading its tensors.

    Returns None for a file of another format or layout (no ``rwkvsam_config``).

    Raises:
        CheckpointError: the file cannot be read as safetensors.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint in any supported layout and convert it to our key names.

    Supported: our safetensors format; plain safetensors / ``.pth`` state dicts of official SAM
    (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``); the authors' RWKV-SAM layout
    (``backbone.*``, ``neck.*``, ``pe.*``, ``mask_decoder.mask_decoder.*``, possibly wrapped in
    ``state_dict`` by mmengine) and their stage-1 layout (``backbone_student.*``, ``neck_student.*``).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    metadata: dict[str, str] = {}
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            raw = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    elif isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in raw.items()}
    if CONFIG_KEY in metadata:
        return Checkpoint(sd, LAYOUT_OURS, json.loads(metadata[CONFIG_KEY]), metadata)
    layout = detect_layout(sd)
    if layout == LAYOUT_OFFICIAL_SAM:
        return Checkpoint(sd, layout, None, metadata)
    return Checkpoint(convert_authors_state_dict(sd), layout, None, metadata)


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """Which layout a state dict has (raises CheckpointError if none fits)."""
    keys = list(sd)
    if any(k.startswith("backbone_student.") for k in keys):
        return LAYOUT_AUTHORS_STAGE1
    if any(k.startswith("mask_decoder.mask_decoder.") or k.startswith("pe.") for k in keys) or (
        any(k.startswith("backbone.layers.") for k in keys)
    ):
        return LAYOUT_AUTHORS
    if any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in keys):
        return LAYOUT_OFFICIAL_SAM
    raise CheckpointError(
        "unrecognised checkpoint layout (expected ours, official SAM or the authors' RWKV-SAM); "
        f"first keys: {keys[:5]}"
    )


_AUTHORS_PREFIXES = (
    ("mask_decoder.mask_decoder.", "mask_decoder."),
    ("mask_decoder.hr_feat_proj.", "refine.hr_feat_proj."),
    ("mask_decoder.mr_feat_proj.", "refine.mr_feat_proj."),
    ("mask_decoder.mix_feat_proj.", "refine.mix_feat_proj."),
    ("pe.", "prompt_encoder."),
    ("backbone_student.", "backbone."),
    ("neck_student.", "neck."),
    ("backbone.", "backbone."),
    ("neck.", "neck."),
)


def convert_authors_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map the authors' RWKV-SAM keys to ours.

    Their Q-Shift mix coefficients have shape (1, 1, C); ours are (C,). Keys of a stage-1
    distillation teacher (``backbone_teacher.*`` etc.) are dropped; any other unknown key is kept
    as is so that strict loading reports it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.startswith(("backbone_teacher.", "neck_teacher.", "teacher.")):
            continue
        new = key
        for old_prefix, new_prefix in _AUTHORS_PREFIXES:
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix) :]
                break
        if ".spatial_mix_" in new and value.ndim == 3 and value.shape[:2] == (1, 1):
            value = value.reshape(-1)
        out[new] = value
    return out


def load_state_dict_strict(
    module: torch.nn.Module, sd: dict[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Load strictly; on any mismatch raise CheckpointError naming missing, unexpected and mis-shaped keys."""
    check_keys(module.state_dict(), sd, source)
    module.load_state_dict(sd, strict=True)


def check_keys(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise CheckpointError unless ``sd`` has exactly the keys and shapes of ``own``."""
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shaped = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if own[k].shape != sd[k].shape
    )
    if missing or unexpected or shaped:

        def fmt(items: list[str]) -> str:
            head = ", ".join(items[:20])
            return head + (f", ... ({len(items)} in all)" if len(items) > 20 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if shaped:
            parts.append(f"mis-shaped keys: {fmt(shaped)}")
        raise CheckpointError(f"{source} does not fit the model; " + "; ".join(parts))
