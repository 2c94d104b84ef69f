"""RWKV-SAM image backbone: convolutional stages (MBConv) followed by Vision-RWKV blocks.

Shapes for an input of side S (a multiple of 16) and widths (C1, C2, C3):
stem -> C1 x S/2, stage 1 -> X_hr C1 x S/4, stage 2 -> X_mr C2 x S/8, downsample -> C3 x S/16,
14 VRWKV blocks on T = (S/16)^2 tokens, final LayerNorm. Module and parameter names follow the
layout of ARCHITECTURE.md section 4 so that foreign checkpoints map one to one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..ops import bi_wkv, fused
from . import fused_path
from .common import LayerNorm2d


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never going below 90% of it."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class Stem(nn.Module):
    """conv3x3 s2 -> LayerNorm2d -> GELU -> conv3x3 s1."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        self.norm1 = LayerNorm2d(out_chans, eps=1e-6)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_path(x):
            y = fused_path.stem(self, x)
            if y is not None:
                return y
        # channels-last: the convolutions and LayerNorm2d run without layout copies
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        return self.conv2(F.gelu(self.norm1(x)))


class Downsample2d(nn.Module):
    """Shortcut of a strided MBConv: 3x3 average pool (stride 2) then a 1x1 conv if widths differ."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)
        self.expand = nn.Conv2d(in_chans, out_chans, 1) if in_chans != out_chans else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MBConv(nn.Module):
    """Pre-norm inverted bottleneck: LN2d -> 1x1 (x4) -> GELU -> dw3x3 (stride) -> GELU -> 1x1, plus shortcut."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, expand_ratio: float = 4.0) -> None:
        super().__init__()
        mid = make_divisible(out_chans * expand_ratio)
        if stride == 2:
            self.shortcut: nn.Module = Downsample2d(in_chans, out_chans)
        elif in_chans != out_chans:
            self.shortcut = nn.Conv2d(in_chans, out_chans, 1)
        else:
            self.shortcut = nn.Identity()
        self.pre_norm = LayerNorm2d(in_chans, eps=1e-6)
        self.conv1_1x1 = nn.Conv2d(in_chans, mid, 1)
        self.conv2_kxk = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid)
        self.conv3_1x1 = nn.Conv2d(mid, out_chans, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_path(x):
            y = fused_path.mbconv(self, x)
            if y is not None:
                return y
        shortcut = self.shortcut(x)
        x = F.gelu(self.conv1_1x1(self.pre_norm(x)))
        x = F.gelu(self.conv2_kxk(x))
        return self.conv3_1x1(x) + shortcut


class StridedConvDownsample(nn.Module):
    """LayerNorm2d -> conv3x3 stride 2 (C2 -> C3)."""

    def __init__(self, in_chans: int, out_chans: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_chans, eps=1e-6)
        self.proj = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.fast_path(x):
            dtype = fused_path.compute_dtype(x, self.proj.weight)
            y = fused_path.layer_norm_2d(self.norm, x, out_dtype=dtype)
            if y is not None:
                return fused_path.conv(self.proj, y, dtype)
        return self.proj(self.norm(x))


QShiftPlan = tuple[torch.Tensor, torch.Tensor]


def q_shift_plan(height: int, width: int, device: torch.device | str) -> QShiftPlan:
    """Gather index and validity mask of :func:`q_shift` on a ``height`` x ``width`` grid.

    Built on ``device`` with a few small kernels and no host-to-device copy (CUDA-graph safe); the
    backbone builds it once per forward and shares it between all blocks.

    Returns:
        ``index`` (T * 4,) long: for row ``t * 4 + j`` of a ``(B, T * 4, C // 4)`` view of the tokens,
        the row holding quarter j of its neighbour (itself where there is none), and ``valid``
        (T, 4, 1) bool: False where the neighbour lies outside the grid.
    """
    t = torch.arange(height * width, device=device)
    row = torch.div(t, width, rounding_mode="floor")
    col = t - row * width
    # quarter 0: left (w-1), 1: right (w+1), 2: above (h-1), 3: below (h+1)
    src = torch.stack((t - 1, t + 1, t - width, t + width), dim=1)
    valid = torch.stack((col > 0, col < width - 1, row > 0, row < height - 1), dim=1)
    src = torch.where(valid, src, t.unsqueeze(1))
    index = (src * 4 + torch.arange(4, device=device)).flatten()
    return index, valid.unsqueeze(-1)


def q_shift(
    x: torch.Tensor, height: int, width: int, plan: QShiftPlan | None = None, gather: bool = False
) -> torch.Tensor:
    """Quarter shift on the token grid.

    Args:
        x: (B, T, C) tokens in row-major order, T = height * width.
        plan: ``q_shift_plan(height, width, x.device)``, built here when not given.
        gather: use the row gather on the CPU too (GPUs always use it; tests compare the two).
    Returns:
        (B, T, C): channel quarter 0 takes the left neighbour, 1 the right, 2 the one above,
        3 the one below (zero outside the grid); channels past 4 * (C // 4) pass through.
        Two kernels when C % 4 == 0 (a row gather and a masked select), no zero-fill or slice copies.
    """
    b, t, c = x.shape
    q = c // 4
    if q == 0:
        return x
    if 4 * q < c:
        head = q_shift(x[..., : 4 * q].contiguous(), height, width, plan, gather)
        return torch.cat((head, x[..., 4 * q :]), dim=-1)
    if x.device.type == "cpu" and not gather:
        # on the CPU four strided slice copies beat the row gather (0.23 vs 5.5 ms at 64 x 64 x 192)
        grid = x.view(b, height, width, c)
        out = torch.zeros_like(grid)
        out[:, :, 1:, 0:q] = grid[:, :, :-1, 0:q]
        out[:, :, :-1, q : 2 * q] = grid[:, :, 1:, q : 2 * q]
        out[:, 1:, :, 2 * q : 3 * q] = grid[:, :-1, :, 2 * q : 3 * q]
        out[:, :-1, :, 3 * q : 4 * q] = grid[:, 1:, :, 3 * q : 4 * q]
        return out.view(b, t, c)
    index, valid = plan if plan is not None else q_shift_plan(height, width, x.device)
    rows = torch.index_select(x.reshape(b, t * 4, q), 1, index)
    return torch.where(valid, rows.view(b, t, 4, q), 0.0).view(b, t, c)


def _lerp(xx: torch.Tensor, x: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """xx + mix * (x - xx) in one kernel, in the promoted dtype of the tokens and the mix (as the
    separate subtract and addcmul computed it, e.g. float32 mixes of bfloat16 tokens)."""
    if x.dtype != mix.dtype:
        dtype = torch.promote_types(x.dtype, mix.dtype)
        xx, x, mix = xx.to(dtype), x.to(dtype), mix.to(dtype)
    return torch.lerp(xx, x, mix)


def _channel_ramp(channels: int) -> torch.Tensor:
    return torch.arange(channels, dtype=torch.float64) / channels


class SpatialMix(nn.Module):
    """Bidirectional WKV token mixing with Q-Shift interpolation (no biases)."""

    def __init__(self, dim: int, layer_id: int, num_layers: int) -> None:
        super().__init__()
        r01 = layer_id / (num_layers - 1) if num_layers > 1 else 0.0
        r10 = 1.0 - layer_id / num_layers
        i = torch.arange(dim, dtype=torch.float64)
        decay = -5 + 8 * (i / max(dim - 1, 1)) ** (0.7 + 1.3 * r01)
        zigzag = ((i + 1) % 3 - 1) * 0.5
        ramp = _channel_ramp(dim)
        self.spatial_decay = nn.Parameter(decay.float())
        self.spatial_first = nn.Parameter((math.log(0.3) + zigzag).float())
        self.spatial_mix_k = nn.Parameter(ramp.pow(r10).float())
        self.spatial_mix_v = nn.Parameter((ramp.pow(r10) + 0.3 * r01).float())
        self.spatial_mix_r = nn.Parameter(ramp.pow(0.5 * r10).float())
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)
        self.output = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, height: int, width: int, plan: QShiftPlan | None = None
    ) -> torch.Tensor:
        b, t, c = x.shape
        xx = q_shift(x, height, width, plan)
        # the three token mixes xx + mu * (x - xx) in one kernel, then k, v, r in one batched GEMM
        mix = torch.stack((self.spatial_mix_k, self.spatial_mix_v, self.spatial_mix_r)).view(3, 1, 1, c)
        mixed = _lerp(xx, x, mix).view(3, b * t, c)
        weight = torch.stack((self.key.weight, self.value.weight, self.receptance.weight))
        k, v, r = torch.bmm(mixed, weight.transpose(1, 2)).view(3, b, t, c).unbind(0)
        y = bi_wkv(self.spatial_decay / t, self.spatial_first / t, k, v)
        return self.output(torch.sigmoid(r) * y)


class ChannelMix(nn.Module):
    """Squared-ReLU feed-forward gated by a receptance, with Q-Shift interpolation (no biases)."""

    def __init__(self, dim: int, layer_id: int, num_layers: int, hidden_rate: int = 2) -> None:
        super().__init__()
        r10 = 1.0 - layer_id / num_layers
        ramp = _channel_ramp(dim).pow(r10).float()
        self.spatial_mix_k = nn.Parameter(ramp.clone())
        self.spatial_mix_r = nn.Parameter(ramp.clone())
        self.key = nn.Linear(dim, hidden_rate * dim, bias=False)
        self.value = nn.Linear(hidden_rate * dim, dim, bias=False)
        self.receptance = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, height: int, width: int, plan: QShiftPlan | None = None
    ) -> torch.Tensor:
        c = x.shape[-1]
        xx = q_shift(x, height, width, plan)
        mix = torch.stack((self.spatial_mix_k, self.spatial_mix_r)).view(2, 1, 1, c)
        x_k, x_r = _lerp(xx, x, mix).unbind(0)
        k = torch.relu(self.key(x_k)).square()
        return torch.sigmoid(self.receptance(x_r)) * self.value(k)


class VRWKVBlock(nn.Module):
    """x += g1 * SpatialMix(LN1(x)); x += g2 * ChannelMix(LN2(x))."""

    def __init__(self, dim: int, layer_id: int, num_layers: int, hidden_rate: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = SpatialMix(dim, layer_id, num_layers)
        self.mlp = ChannelMix(dim, layer_id, num_layers, hidden_rate)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), 1e-2))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), 1e-2))

    def forward(
        self, x: torch.Tensor, height: int, width: int, plan: QShiftPlan | None = None
    ) -> torch.Tensor:
        if plan is None:
            plan = q_shift_plan(height, width, x.device)
        x = torch.addcmul(x, self.layer_scale_1, self.attn(self.norm1(x), height, width, plan))
        return torch.addcmul(x, self.layer_scale_2, self.mlp(self.norm2(x), height, width, plan))


class RWKVSAMBackbone(nn.Module):
    """Conv stem + 2 MBConv stages + strided conv + VRWKV blocks + LayerNorm.

    Args:
        dims: (C1, C2, C3) widths of the stride-4, stride-8 and stride-16 stages.
        depth: number of VRWKV blocks (14 in the paper).
        hidden_rate: channel-mix expansion (2 in the released config).
    """

    def __init__(self, dims: tuple[int, int, int], depth: int = 14, hidden_rate: int = 2, in_chans: int = 3):
        super().__init__()
        c1, c2, c3 = dims
        self.dims = tuple(dims)
        self.stem = Stem(in_chans, c1)
        self.conv_stages = nn.ModuleList(
            [
                nn.Sequential(MBConv(c1, c1, stride=2), MBConv(c1, c1)),
                nn.Sequential(MBConv(c1, c2, stride=2), *[MBConv(c2, c2) for _ in range(3)]),
            ]
        )
        self.conv_final_pool = StridedConvDownsample(c2, c3)
        self.layers = nn.ModuleList([VRWKVBlock(c3, i, depth, hidden_rate) for i in range(depth)])
        self.final_norm = nn.LayerNorm(c3, eps=1e-6)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        # Conv biases keep PyTorch's default (small, non-zero) initialisation on purpose: with zero
        # biases the zero padding of the input stays an exactly-zero vector through the conv stages,
        # LayerNorm2d then sees zero variance there and multiplies the gradient by 1/sqrt(eps) = 1000
        # per layer, and the gradient norm overflows to inf on any padded (non-square) image.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run(self, module: nn.Module, *args):
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Args: x (B, 3, S, S). Returns (X_hr (B,C1,S/4,S/4), X_mr (B,C2,S/8,S/8), X (B,C3,S/16,S/16))."""
        x = self._run(self.stem, x)  # its output is channels-last
        x_hr = self._run(self.conv_stages[0], x)
        x_mr = self._run(self.conv_stages[1], x_hr)
        x = self._run(self.conv_final_pool, x_mr)
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # row-major tokens, index h * W + w
        if fused.fast_path(tokens) and len(self.layers) > 0:
            tokens = fused_path.vrwkv_stack(self.layers, self.final_norm, tokens, h, w)
        else:
            plan = q_shift_plan(h, w, x.device)
            for layer in self.layers:
                tokens = self._run(layer, tokens, h, w, plan)
            tokens = self.final_norm(tokens)
        x = tokens.view(b, h, w, c).permute(0, 3, 1, 2)
        return x_hr, x_mr, x


class Neck(nn.Module):
    """conv1x1 C3->256 (no bias) -> LN2d -> conv3x3 256->256 (no bias) -> LN2d."""

    def __init__(self, in_chans: int, out_chans: int = 256) -> None:
        super().__init__()
        self.out_proj = nn.Sequential(
            nn.Conv2d(in_chans, out_chans, 1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans, eps=1e-6),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not fused.fast_path(x):
            return self.out_proj(x)
        conv1, norm1, conv2, norm2 = self.out_proj
        h = conv1(x)
        dtype = fused_path.compute_dtype(h, conv2.weight)
        y = fused_path.layer_norm_2d(norm1, h, out_dtype=dtype)
        h = conv2(norm1(h)) if y is None else fused_path.conv(conv2, y, dtype)
        return norm2(h)  # LayerNorm2d takes its fused pass itself; this one keeps the module's dtype
