"""Fine-tune on a user's own annotations (an exported Label Studio project, a COCO file, mask folders).

Defaults for small projects: decoder + refine train (the image encoder and prompt encoder stay frozen,
so a few hundred images suffice and a CPU can do it), lr 1e-4, 500 steps, batch 4.
"""

from __future__ import annotations

import argparse

from rwkvsam_core.finetune import FinetuneConfig, FinetuneResult

__all__ = ["FINETUNE_DEFAULTS", "add_args", "from_args"]

FINETUNE_DEFAULTS = FinetuneConfig(steps=500, batch_size=4, warmup_steps=20, save_every=50)


def add_args(p: argparse.ArgumentParser) -> None:
    """Options of ``rwkvsam train finetune``."""
    from rwkvsam_core.finetune.cli import add_finetune_args

    add_finetune_args(p, FINETUNE_DEFAULTS)


def from_args(args: argparse.Namespace) -> FinetuneResult:
    """Run the fine-tuning recipe."""
    from rwkvsam_core.finetune.cli import finetune_from_args

    return finetune_from_args(args, FINETUNE_DEFAULTS)
