"""SAM's prompt encoder: points, boxes and low-resolution masks to decoder embeddings.

Parameter names and shapes follow the official segment-anything ``prompt_encoder.*`` keys, so the
official checkpoints load strictly. Coordinates are pixels of the padded model input (size
``input_image_size``); they are normalised by that size, whatever it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d

__all__ = ["PositionEmbeddingRandom", "PromptEncoder"]

SizeLike = int | tuple[int, int]


def _pair(size: SizeLike) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"expected an int or a (height, width) pair, got {size!r}")
    return (int(size[0]), int(size[1]))


class PositionEmbeddingRandom(nn.Module):
    """Positional encoding with random spatial frequencies (Fourier features).

    The frequency matrix is the buffer ``positional_encoding_gaussian_matrix`` of shape
    ``(2, num_pos_feats)``; the encoding of a point has ``2 * num_pos_feats`` channels
    (sines then cosines).
    """

    def __init__(self, num_pos_feats: int = 64, scale: float | None = None) -> None:
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """Encode ``coords`` of shape ``(..., 2)`` in ``[0, 1]`` as ``(..., 2 * num_pos_feats)``."""
        gauss = self.positional_encoding_gaussian_matrix
        proj = (2 * coords.to(gauss.dtype) - 1) @ gauss
        proj = (2 * math.pi) * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def forward(self, size: SizeLike) -> torch.Tensor:
        """Encoding of the centres of an ``(h, w)`` grid, shape ``(2 * num_pos_feats, h, w)``."""
        h, w = _pair(size)
        gauss = self.positional_encoding_gaussian_matrix
        ys = (torch.arange(h, device=gauss.device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=gauss.device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: SizeLike) -> torch.Tensor:
        """Encode pixel coordinates ``(B, N, 2)`` (x, y) of an ``(h, w)`` image as ``(B, N, C)``."""
        h, w = _pair(image_size)
        # Divide (not multiply by a reciprocal): same rounding as the official code. The divisor
        # (w, h) is built on the coordinates' device: torch.tensor([w, h], device=...) would copy
        # from the host, which CUDA-graph capture forbids.
        first = torch.arange(2, device=coords_input.device) == 0
        denom = torch.where(first, float(w), float(h)).to(torch.float32)
        coords = coords_input.to(torch.float32) / denom
        return self._pe_encoding(coords)


class PromptEncoder(nn.Module):
    """Encode point, box and mask prompts for SAM's mask decoder.

    Args:
        embed_dim: prompt embedding size D (256 in SAM).
        image_embedding_size: (h, w) of the image embedding (input size // 16), or an int.
        input_image_size: (H, W) of the padded model input that coordinates refer to, or an int.
        mask_in_chans: hidden channels of the mask downscaling path.
        activation: activation class of the mask downscaling path (GELU, exact).
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: SizeLike,
        input_image_size: SizeLike,
        mask_in_chans: int = 16,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = _pair(input_image_size)
        self.image_embedding_size = _pair(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)

        # 0: negative point, 1: positive point, 2: box top-left corner, 3: box bottom-right corner.
        self.num_point_embeddings: int = 4
        self.point_embeddings = nn.ModuleList([nn.Embedding(1, embed_dim) for _ in range(4)])
        self.not_a_point_embed = nn.Embedding(1, embed_dim)

        h, w = self.image_embedding_size
        self.mask_input_size = (4 * h, 4 * w)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, shape ``(1, D, h, w)``."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        """Points ``(B, P, 2)`` and labels ``(B, P)`` to ``(B, P [+1], D)``."""
        points = points.to(torch.float32) + 0.5  # centre of the pixel
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 2))], dim=1)
            labels = torch.cat([labels, labels.new_full((labels.shape[0], 1), -1)], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        lab = labels[..., None]
        not_a_point = self.not_a_point_embed.weight.to(pe.dtype)
        neg = self.point_embeddings[0].weight.to(pe.dtype)
        pos = self.point_embeddings[1].weight.to(pe.dtype)
        out = torch.where(lab == 0, pe + neg, pe)
        out = torch.where(lab == 1, pe + pos, out)
        out = torch.where(lab == -1, not_a_point.expand_as(pe), out)
        return out

    def _embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes ``(B, 4)`` XYXY to two corner embeddings ``(B, 2, D)``."""
        corners = (boxes.to(torch.float32) + 0.5).reshape(-1, 2, 2)
        pe = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_embed = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight], dim=0)
        return pe + corner_embed.to(pe.dtype)

    def _embed_masks(self, masks: torch.Tensor) -> torch.Tensor:
        """Masks ``(B, 1, 4h, 4w)`` (logits) to dense embeddings ``(B, D, h, w)``."""
        if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
            raise ValueError(
                f"mask prompt must have shape (B, 1, {self.mask_input_size[0]}, {self.mask_input_size[1]}) "
                f"for input size {self.input_image_size}, got {tuple(masks.shape)}"
            )
        weight = self.mask_downscaling[0].weight
        return self.mask_downscaling(masks.to(weight.dtype))

    @staticmethod
    def _batch_size(
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> int:
        sizes = {}
        if points is not None:
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2:
                raise ValueError(f"point coordinates must have shape (B, P, 2), got {tuple(coords.shape)}")
            if tuple(labels.shape) != tuple(coords.shape[:2]):
                raise ValueError(
                    f"point labels must have shape {tuple(coords.shape[:2])}, got {tuple(labels.shape)}"
                )
            sizes["points"] = coords.shape[0]
        if boxes is not None:
            if boxes.shape[-1] != 4:
                raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
            sizes["boxes"] = boxes.reshape(-1, 4).shape[0]
        if masks is not None:
            sizes["masks"] = masks.shape[0]
        if not sizes:
            return 1
        if len(set(sizes.values())) != 1:
            raise ValueError(f"prompt batch sizes differ: {sizes}")
        return next(iter(sizes.values()))

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts.

        Args:
            points: ``(coords (B, P, 2) in input pixels (x, y), labels (B, P))`` with labels
                1 positive, 0 negative, -1 padding; or None. Without a box, one padding point is
                appended (as in SAM).
            boxes: ``(B, 4)`` XYXY in input pixels, or None.
            masks: ``(B, 1, 4h, 4w)`` low-resolution mask logits, or None.

        Returns:
            sparse ``(B, N, D)`` (N = points [+ padding] + 2 per box) and dense ``(B, D, h, w)``
            (the no-mask embedding expanded without a copy when ``masks`` is None).
        """
        bs = self._batch_size(points, boxes, masks)
        weight = self.no_mask_embed.weight
        parts = [weight.new_zeros((bs, 0, self.embed_dim))]
        if points is not None:
            coords, labels = points
            parts.append(self._embed_points(coords, labels, pad=boxes is None).to(weight.dtype))
        if boxes is not None:
            parts.append(self._embed_boxes(boxes).to(weight.dtype))
        sparse = torch.cat(parts, dim=1)

        if masks is not None:
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
