"""Conv-fusion refine module: fuses the stride-4 / stride-8 backbone features into SAM's mask features.

F = mix(concat[F_sam, mr, hr]) + F_sam, with
hr = hr_feat_proj(X_hr): conv3x3 C1->64, LN2d, GELU, conv3x3 64->32 (stride 4),
mr = mr_feat_proj(X_mr): convT2x2 s2 C2->64, LN2d, GELU, conv3x3 64->32 (stride 8 -> 4),
mix: conv3x3 96->64, LN2d, GELU, conv3x3 64->32.

hr and mr depend only on the image. Because the first mix convolution is linear in its input
channels, its hr/mr share (plus the bias) is also image-only: ``image_term`` computes it once per
image, and ``fuse`` adds the prompt-dependent F_sam share. This is the same function as the
concatenated convolution, at a third of the per-prompt cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d, PatchUpsample2d


class RefineModule(nn.Module):
    """Args: hr_chans (C1), mr_chans (C2), feat_dim (SAM transformer dim, 256)."""

    def __init__(self, hr_chans: int, mr_chans: int, feat_dim: int = 256) -> None:
        super().__init__()
        mid, out = feat_dim // 4, feat_dim // 8
        self.out_chans = out
        self.hr_feat_proj = nn.Sequential(
            nn.Conv2d(hr_chans, mid, 3, padding=1),
            LayerNorm2d(mid, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mid, out, 3, padding=1),
        )
        self.mr_feat_proj = nn.Sequential(
            PatchUpsample2d(mr_chans, mid),
            LayerNorm2d(mid, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mid, out, 3, padding=1),
        )
        self.mix_feat_proj = nn.Sequential(
            nn.Conv2d(3 * out, mid, 3, padding=1),
            LayerNorm2d(mid, eps=1e-6),
            nn.GELU(),
            nn.Conv2d(mid, out, 3, padding=1),
        )

    def image_term(self, x_hr: torch.Tensor, x_mr: torch.Tensor) -> torch.Tensor:
        """Image-only part of the first mix convolution.

        Args: x_hr (B, C1, S/4, S/4), x_mr (B, C2, S/8, S/8). Returns (B, 64, S/4, S/4).
        """
        hr = self.hr_feat_proj(x_hr)
        mr = self.mr_feat_proj(x_mr)
        conv = self.mix_feat_proj[0]
        return F.conv2d(torch.cat([mr, hr], dim=1), conv.weight[:, self.out_chans :], conv.bias, padding=1)

    def fuse(self, f_sam: torch.Tensor, image_term: torch.Tensor) -> torch.Tensor:
        """Args: f_sam (N, 32, S/4, S/4) SAM mask features, image_term (N or 1, 64, S/4, S/4).
        Returns the fused features (N, 32, S/4, S/4)."""
        conv = self.mix_feat_proj[0]
        x = F.conv2d(f_sam, conv.weight[:, : self.out_chans], None, padding=1) + image_term
        for layer in self.mix_feat_proj[1:]:
            x = layer(x)
        return x + f_sam
