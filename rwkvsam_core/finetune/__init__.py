"""Fine-tuning engine: prompt sampling, losses, schedule, resumable (DDP-ready) training loop.

from rwkvsam_core import build_model
from rwkvsam_core.data import InstanceFolderDataset
from rwkvsam_core.finetune import FinetuneConfig, run_finetune
result = run_finetune(build_model("rwkvsam_t"), InstanceFolderDataset("data/"),
                      FinetuneConfig(steps=200, batch_size=2), "runs/ft")
result.checkpoint   # runs/ft/model.safetensors
"""

from .engine import (
    FinetuneConfig,
    FinetuneResult,
    SegmentationTask,
    model_input,
    run_finetune,
    set_trainable,
    train,
)
from .losses import LossConfig, dice_loss, segmentation_loss, sigmoid_bce
from .prompts import PromptConfig, mask_to_box, sample_correction_points, sample_instance_prompts
from .schedule import cosine_with_warmup, lr_factor

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "SegmentationTask",
    "model_input",
    "run_finetune",
    "set_trainable",
    "train",
    "LossConfig",
    "dice_loss",
    "segmentation_loss",
    "sigmoid_bce",
    "PromptConfig",
    "mask_to_box",
    "sample_correction_points",
    "sample_instance_prompts",
    "cosine_with_warmup",
    "lr_factor",
]
