"""Synthetic compositions with exact masks for the starter weights (see ``generator.py``).

On disk: ``python -m training.synth --pack generated_data/source_pack --out generated_data/synth --n 20000``;
on the fly (no disk, e.g. on the GPU machine): ``SynthDataset(SourcePool.from_pack(pack), n, seed)``.
"""

from .dataset import SynthDataset, generate_dataset, sample_name
from .generator import (
    Composition,
    Cutout,
    SourcePool,
    SynthConfig,
    compose,
    procedural_texture,
    random_shape_mask,
)

__all__ = [
    "Composition",
    "Cutout",
    "SourcePool",
    "SynthConfig",
    "compose",
    "procedural_texture",
    "random_shape_mask",
    "SynthDataset",
    "generate_dataset",
    "sample_name",
]
