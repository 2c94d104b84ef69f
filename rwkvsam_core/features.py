"""Per-image features: everything the decoder needs to answer prompts on one image."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """Encoder output for one image.

    Attributes:
        tensors: ``model.encode_image`` output with batch 1, e.g. "embedding" (1, 256, S/16, S/16)
            and, for RWKV-SAM, "refine" (1, 64, S/4, S/4).
        original_size: (H, W) of the image given to ``set_image``.
        input_size: (h, w) of the resized image inside the padded S x S input.
        image_size: S, the model input side.
    """

    tensors: dict[str, torch.Tensor]
    original_size: tuple[int, int]
    input_size: tuple[int, int]
    image_size: int

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ImageFeatures:
        """Copy of the features on ``device`` (and floating tensors cast to ``dtype`` if given)."""
        moved = {}
        for name, t in self.tensors.items():
            t = t.to(device) if device is not None else t
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            moved[name] = t
        return ImageFeatures(moved, tuple(self.original_size), tuple(self.input_size), int(self.image_size))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
