"""Small layers shared by the SAM-style modules (weight-compatible with segment-anything)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNorm2d", "MLPBlock"]


class LayerNorm2d(nn.Module):
    """Layer normalisation over the channel dimension of an NCHW tensor.

    Args:
        num_channels: number of channels C.
        eps: added to the variance for numerical stability.

    Shapes:
        input ``(B, C, H, W)`` -> output ``(B, C, H, W)``.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape ``(B, C, H, W)`` over ``C``.

        Same maths as SAM's (biased variance, eps inside the square root), computed by one fused
        layer_norm over a channels-last view: no extra pass for channels-last inputs.
        """
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MLPBlock(nn.Module):
    """Two-layer feed-forward block ``lin2(act(lin1(x)))``.

    Args:
        embedding_dim: input and output feature size D.
        mlp_dim: hidden size.
        act: activation class (instantiated without arguments), GELU by default.

    Shapes:
        input ``(..., D)`` -> output ``(..., D)``.
    """

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape ``(..., D)``."""
        return self.lin2(self.act(self.lin1(x)))
