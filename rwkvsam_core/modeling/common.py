"""Small layers shared by the SAM-style modules (weight-compatible with segment-anything)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import fused
from . import fused_path

__all__ = ["LayerNorm2d", "MLPBlock", "PatchUpsample2d"]


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
        layer_norm over a channels-last view: no extra pass for channels-last inputs. CUDA
        inference on a channels-last tensor takes one Triton pass (rwkvsam_core.ops.fused; torch's
        kernel plus autocast's cast cost 27 us a call on the decoder's 256 x 256 x 64 maps).
        """
        if fused.fast_path(x):
            y = fused_path.layer_norm_2d(self, x)
            if y is not None:
                return y
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


class PatchUpsample2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d(in, out, kernel_size=2, stride=2)`` computed as one matrix product.

    With kernel = stride = 2 the output patches do not overlap: every input pixel maps to its own
    2x2 output patch through a (C_in -> 4 C_out) linear map. One GEMM plus a pixel shuffle is about
    twice as fast on the CPU as the generic transposed convolution; parameters, state-dict keys and
    results (up to float rounding) are those of the plain module.

    Shapes: input ``(B, C_in, H, W)`` -> output ``(B, C_out, 2H, 2W)`` (channels-last memory layout).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        if output_size is not None:
            return super().forward(x, output_size)
        b, cin, h, w = x.shape
        cout = self.out_channels
        rows = x.permute(0, 2, 3, 1).reshape(b * h * w, cin)
        patches = torch.mm(rows, self.weight.reshape(cin, cout * 4))  # columns ordered (cout, dy, dx)
        out = patches.view(b, h, w, cout, 2, 2).permute(0, 1, 4, 2, 5, 3).reshape(b, 2 * h, 2 * w, cout)
        if self.bias is not None:
            out = out + self.bias
        return out.permute(0, 3, 1, 2)
