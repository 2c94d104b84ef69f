"""SAM's ViT image encoder (vit_b / vit_l / vit_h), weight-compatible with the official checkpoints.

Parameter names follow the official ``image_encoder.*`` keys. The parameters are shaped for
``pretrain_img_size`` (1024 for the official checkpoints) so those checkpoints load strictly at
any ``img_size``; at another input size the absolute position embedding is resized bicubically
and the global-attention relative position tables are resized linearly on the fly (the official
code does the latter too).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from .common import LayerNorm2d, MLPBlock

__all__ = ["VIT_CONFIGS", "ImageEncoderViT", "build_sam_vit_encoder"]

#: Official SAM encoder configurations.
VIT_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12, "global_attn_indexes": (2, 5, 8, 11)},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "global_attn_indexes": (5, 11, 17, 23)},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16, "global_attn_indexes": (7, 15, 23, 31)},
}


_SAM_NORM = partial(nn.LayerNorm, eps=1e-6)


def _window_partition(x: Tensor, window: int) -> tuple[Tensor, tuple[int, int]]:
    """``(B, H, W, C)`` -> windows ``(B * nW, window, window, C)`` and the padded size (Hp, Wp)."""
    b, h, w, c = x.shape
    pad_h = (-h) % window
    pad_w = (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.reshape(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def _window_unpartition(
    windows: Tensor, window: int, padded: tuple[int, int], size: tuple[int, int]
) -> Tensor:
    """Inverse of :func:`_window_partition`: ``(B * nW, window, window, C)`` -> ``(B, H, W, C)``."""
    hp, wp = padded
    h, w = size
    nh, nw = hp // window, wp // window
    b = windows.shape[0] // (nh * nw)
    x = windows.reshape(b, nh, nw, window, window, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    if hp != h or wp != w:
        x = x[:, :h, :w, :]
    return x.contiguous()


def _relative_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative position embeddings for every (query, key) pair: ``(q_size, k_size, C)``.

    ``rel_pos`` ``(L, C)`` is resized linearly to ``2 * max(q_size, k_size) - 1`` rows if needed.
    """
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t().unsqueeze(0), size=length, mode="linear").squeeze(0).t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    index = (q_coords - k_coords + (k_size - 1) * k_scale).long()
    return rel_pos[index]


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: ``(B, 3, H, W)`` -> ``(B, H/p, W/p, D)``."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention with decomposed relative positions (MViTv2 style).

    ``rel_pos_h``/``rel_pos_w`` have ``2 * size - 1`` rows for the size they were built for.
    Shapes: ``(B, H, W, D)`` -> ``(B, H, W, D)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required with relative positions")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, hd)
        bias = None
        if self.use_rel_pos:
            table_h = _relative_table(h, h, self.rel_pos_h)  # (h, h, hd)
            table_w = _relative_table(w, w, self.rel_pos_w)  # (w, w, hd)
            rq = q.reshape(b, self.num_heads, h, w, -1)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", rq, table_h)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", rq, table_w)
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm ViT block; windowed attention when ``window_size > 0``, else global."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | Any = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        """``(B, H, W, D)`` -> ``(B, H, W, D)``."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = _window_partition(x, self.window_size)
            x = _window_unpartition(self.attn(x), self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's ViT image encoder with a neck to ``out_chans`` channels.

    Args:
        img_size: side of the square padded input the encoder is used at.
        patch_size: patch side (16).
        in_chans: input channels (3).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer size.
        out_chans: channels of the output embedding (256).
        norm_layer: token norm class; default LayerNorm with eps 1e-6 as in SAM's builders
            (the official class defaults to eps 1e-5, its builders all pass 1e-6).
        act_layer: MLP activation (exact GELU).
        use_abs_pos: learnable absolute position embedding.
        use_rel_pos: decomposed relative positions in every attention.
        rel_pos_zero_init: zero-initialise the relative position tables.
        window_size: window of the non-global blocks (14); 0 = all global.
        global_attn_indexes: blocks with global attention.
        pretrain_img_size: input size the position parameters are shaped for (default
            ``img_size``); 1024 for the official checkpoints.

    Shapes: ``(B, 3, H, W)`` (H, W multiples of ``patch_size``, normally ``img_size``) ->
    ``(B, out_chans, H / patch_size, W / patch_size)``.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[nn.Module] | Any = _SAM_NORM,
        act_layer: type[nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: Sequence[int] = (),
        pretrain_img_size: int | None = None,
    ) -> None:
        super().__init__()
        if pretrain_img_size is None:
            pretrain_img_size = img_size
        for name, size in (("img_size", img_size), ("pretrain_img_size", pretrain_img_size)):
            if size % patch_size != 0:
                raise ValueError(f"{name} ({size}) must be a multiple of patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.pretrain_img_size = pretrain_img_size
        self.grad_checkpointing = False
        grid = pretrain_img_size // patch_size

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed: nn.Parameter | None = None
        if use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        global_set = set(global_attn_indexes)
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                norm_layer=norm_layer,
                act_layer=act_layer,
                use_rel_pos=use_rel_pos,
                rel_pos_zero_init=rel_pos_zero_init,
                window_size=0 if i in global_set else window_size,
                input_size=(grid, grid),
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory, same outputs)."""
        self.grad_checkpointing = enable

    def _pos_embed(self, h: int, w: int) -> Tensor:
        assert self.pos_embed is not None
        if self.pos_embed.shape[1:3] == (h, w):
            return self.pos_embed
        pe = self.pos_embed.permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        """Encode a normalised, padded image batch ``(B, 3, H, W)`` -> ``(B, out_chans, H/16, W/16)``."""
        if x.dim() != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"expected input (B, C, H, W) with H, W multiples of {self.patch_size}, got {tuple(x.shape)}"
            )
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self._pos_embed(x.shape[1], x.shape[2])
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


def build_sam_vit_encoder(name: str, img_size: int = 1024, pretrain_img_size: int = 1024) -> ImageEncoderViT:
    """Build the official ``vit_b`` / ``vit_l`` / ``vit_h`` encoder (random weights).

    Parameters are shaped for ``pretrain_img_size`` so an official checkpoint's
    ``image_encoder.*`` loads strictly whatever ``img_size`` is.
    """
    if name not in VIT_CONFIGS:
        raise ValueError(f"unknown SAM encoder {name!r}; choose one of {sorted(VIT_CONFIGS)}")
    cfg = VIT_CONFIGS[name]
    return ImageEncoderViT(
        img_size=img_size,
        patch_size=16,
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=_SAM_NORM,
        act_layer=nn.GELU,
        use_abs_pos=True,
        use_rel_pos=True,
        rel_pos_zero_init=True,
        window_size=14,
        global_attn_indexes=cfg["global_attn_indexes"],
        pretrain_img_size=pretrain_img_size,
    )
