"""Model variants and ``build_model``."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .allocator import tune_allocator
from .cache import invalidate_fingerprint
from .checkpoint import (
    LAYOUT_AUTHORS,
    LAYOUT_AUTHORS_STAGE1,
    LAYOUT_OFFICIAL_SAM,
    LAYOUT_OURS,
    CheckpointError,
    check_keys,
    load_checkpoint,
    load_state_dict_strict,
)
from .modeling.rwkvsam import RWKVSAM, SAM, PromptableSegmenter

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "rwkvsam_t"


def _rwkvsam(dims: tuple[int, int, int]) -> Callable[..., RWKVSAM]:
    def build(name: str, image_size: int, decoder_mode: str) -> RWKVSAM:
        return RWKVSAM(
            dims,
            depth=14,
            hidden_rate=2,
            image_size=image_size,
            decoder_mode=decoder_mode,
            config={"name": name},
        )

    return build


def _sam(dim: int, depth: int, heads: int, global_attn: tuple[int, ...]) -> Callable[..., SAM]:
    def build(name: str, image_size: int, decoder_mode: str) -> SAM:
        if decoder_mode != "multimask":
            raise ValueError("SAM models only have the multimask decoder")
        return SAM(dim, depth, heads, global_attn, image_size=image_size, config={"name": name})

    return build


MODEL_BUILDERS: dict[str, Callable[..., PromptableSegmenter]] = {
    "rwkvsam_t": _rwkvsam((32, 64, 192)),
    "rwkvsam_s": _rwkvsam((64, 128, 384)),
    "rwkvsam_b": _rwkvsam((128, 256, 768)),
    "sam_vit_b": _sam(768, 12, 12, (2, 5, 8, 11)),
    "sam_vit_l": _sam(1024, 24, 16, (5, 11, 17, 23)),
    "sam_vit_h": _sam(1280, 32, 16, (7, 15, 23, 31)),
}
MODEL_NAMES = tuple(MODEL_BUILDERS)

DEFAULT_WEIGHTS_DIR = Path(__file__).parent / "weights"


def default_checkpoint(name: str) -> Path | None:
    """The weights shipped with the package for ``name`` (None when there are none)."""
    override = os.environ.get("RWKVSAM_WEIGHTS_DIR")
    folder = Path(override) if override else DEFAULT_WEIGHTS_DIR
    path = folder / f"{name}.safetensors"
    return path if path.is_file() else None


def build_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    image_size: int | None = None,
    decoder_mode: str | None = None,
    pretrained: bool = True,
) -> PromptableSegmenter:
    """Build a model by name, optionally loading weights.

    Args:
        name: one of ``MODEL_NAMES``.
        checkpoint: our safetensors checkpoint, an official SAM checkpoint (``sam_vit_*`` load it
            whole; ``rwkvsam_*`` take its prompt encoder and mask decoder), or the authors' RWKV-SAM
            layout (selects the single-token decoder). None: the weights shipped for ``name`` if any
            (unless ``pretrained=False``), else random weights with a loud warning.
        device: "cpu", "cuda", "cuda:1"... (default: cuda if available, else cpu).
        image_size: model input side (multiple of 16); default from the checkpoint, else 1024.
        decoder_mode: "multimask" or "single"; default from the checkpoint, else multimask.
    Returns: the model in eval mode on ``device``.

    The first call in a process also applies ``rwkvsam_core.allocator.tune_allocator()`` (glibc
    settings worth up to 10x on the CPU; ``RWKVSAM_TUNE_ALLOCATOR=0`` disables it).
    """
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    tune_allocator()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ckpt_is_default = checkpoint is None and pretrained
    if ckpt_is_default:
        checkpoint = default_checkpoint(name)
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    is_sam = name.startswith("sam_")

    if ckpt is not None and ckpt.layout == LAYOUT_OURS:
        cfg = ckpt.config or {}
        if cfg.get("name") not in (None, name):
            raise CheckpointError(f"{checkpoint} holds a {cfg.get('name')} model, not {name}")
        image_size = image_size or cfg.get("image_size")
        saved_mode = cfg.get("decoder_mode")
        if decoder_mode and saved_mode and decoder_mode != saved_mode:
            # the single-token decoder feeds only mask token 0 through the transformer: a multimask
            # decoder's weights give other masks there (measured: IoU 0.27 on a real box), not a subset
            raise CheckpointError(
                f"{checkpoint} holds a {saved_mode!r} mask decoder; decoder_mode={decoder_mode!r} "
                f"cannot use it. Leave decoder_mode unset{' or pass pretrained=False' if ckpt_is_default else ''}."
            )
        decoder_mode = decoder_mode or saved_mode
    elif ckpt is not None and ckpt.layout in (LAYOUT_AUTHORS, LAYOUT_AUTHORS_STAGE1):
        if is_sam:
            raise CheckpointError(f"{checkpoint} is an RWKV-SAM checkpoint; use an rwkvsam_* model")
        has_extra_mlps = any(
            k.startswith("mask_decoder.output_hypernetworks_mlps.1.") for k in ckpt.state_dict
        )
        if ckpt.layout == LAYOUT_AUTHORS:
            decoder_mode = decoder_mode or ("multimask" if has_extra_mlps else "single")
    image_size = int(image_size or 1024)
    model = MODEL_BUILDERS[name](name, image_size, decoder_mode or "multimask")

    if ckpt is None:
        warnings.warn(
            f"RWKV-SAM: no weights for {name}: the model has RANDOM weights and its masks are noise. "
            "Pass checkpoint=... (our format, an official SAM checkpoint, or the authors' layout).",
            UserWarning,
            stacklevel=2,
        )
    else:
        _load_into(model, ckpt, str(checkpoint), is_sam)
        model.config["checkpoint"] = os.fspath(checkpoint)
    invalidate_fingerprint(model)
    return model.to(device).eval()


def _load_into(model: PromptableSegmenter, ckpt, source: str, is_sam: bool) -> None:
    sd = ckpt.state_dict
    if ckpt.layout == LAYOUT_OFFICIAL_SAM and not is_sam:
        parts = {k: v for k, v in sd.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
        if model.decoder_mode == "single":
            parts = _single_token_subset(parts)
        _load_subset(model, parts, source, ("prompt_encoder.", "mask_decoder."))
        logger.warning(
            "loaded the prompt encoder and mask decoder of %s; backbone, neck and refine are random", source
        )
        return
    if ckpt.layout == LAYOUT_AUTHORS_STAGE1:
        _load_subset(model, sd, source, ("backbone.", "neck."))
        logger.warning(
            "loaded the distilled backbone and neck of %s; prompt encoder, decoder and refine are random",
            source,
        )
        return
    load_state_dict_strict(model, sd, source)


def _single_token_subset(sd: dict) -> dict:
    """``sd`` without the hypernetwork MLPs of mask tokens 1-3, which a single-token decoder lacks."""
    return {
        k: v
        for k, v in sd.items()
        if not k.startswith("mask_decoder.output_hypernetworks_mlps.")
        or k.startswith("mask_decoder.output_hypernetworks_mlps.0.")
    }


def _load_subset(model: torch.nn.Module, sd: dict, source: str, prefixes: tuple[str, ...]) -> None:
    """Strictly load the parameters under ``prefixes`` (the rest of the model keeps its weights)."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith(prefixes)}
    subset = {k: v for k, v in sd.items() if k.startswith(prefixes)}
    check_keys(own, subset, source)
    model.load_state_dict(subset, strict=False)
