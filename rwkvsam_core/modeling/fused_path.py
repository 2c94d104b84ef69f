"""The image encoder's fused inference path on CUDA (issue 3): same maths, fewer memory passes.

Taken by the backbone and neck when :func:`rwkvsam_core.ops.fused.fast_path` says so (CUDA tensors,
no gradient recorded, Triton importable, ``RWKVSAM_FUSED`` not ``0``). Training and the CPU keep
the module-by-module path, which stays the reference: tests compare the two.

Dtypes follow autocast: the matrix products run in the autocast dtype when autocast is on for CUDA
(else in the weights' dtype), the residual stream in ``promote_types(tokens, layer scale)`` (float32
under autocast, as the module path's ``addcmul`` gives), and every fused kernel computes in float32
and rounds once. So results match the module path to within one rounding of the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import bi_wkv_gated, fused

__all__ = ["compute_dtype", "conv", "layer_norm_2d", "mbconv", "stem", "vrwkv_stack"]

#: The MBConv's expanded (x4) tensor is computed in horizontal strips when it would exceed this
#: many bytes (at input 4096 the first block's is 2 GiB), so peak memory stays bounded.
MBCONV_STRIP_BYTES = 256 * 2**20


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the module path's matrix products run in: autocast's, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def _norm_out_dtype(x: torch.Tensor) -> torch.dtype:
    """What ``F.layer_norm`` returns for ``x``: float32 under autocast, else ``x``'s dtype."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) else x.dtype


def layer_norm_2d(
    norm: nn.Module, x: torch.Tensor, *, gelu: bool = False, out_dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """LayerNorm2d ``norm`` (+ exact GELU) of a channels-last NCHW tensor in one pass.

    ``out_dtype`` defaults to what the module path returns (float32 under autocast); callers that
    feed a convolution pass the compute dtype, which the convolution would cast to anyway.
    Returns None when ``x`` is not channels-last contiguous (the caller takes the module path).
    """
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    nhwc = x.permute(0, 2, 3, 1)
    y, _ = fused.layer_norm_rows(
        nhwc, norm.weight, norm.bias, norm.eps, gelu=gelu, out_dtype=out_dtype or _norm_out_dtype(x)
    )
    return y.permute(0, 3, 1, 2)


def _cached(module: nn.Module, tag: str, extra: tuple, build):
    """``build()`` cached on ``module`` until one of its parameters changes (data, place, dtype or
    an in-place update: an optimiser step, ``load_state_dict``) or ``extra`` (e.g. the compute
    dtype) does."""
    key = (extra, tuple((p.data_ptr(), p.dtype, p._version) for p in module.parameters()))
    slot = f"_fused_{tag}"
    cached = module.__dict__.get(slot)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, build())
        module.__dict__[slot] = cached
    return cached[1]


def _matrix(conv: nn.Conv2d, dtype: torch.dtype) -> torch.Tensor:
    """A 1x1 convolution's weight as an (out, in) matrix in ``dtype``, cached."""
    return _cached(conv, "matrix", (dtype,), lambda: conv.weight.reshape(conv.out_channels, -1).to(dtype))


def conv(module: nn.Conv2d, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``module(x)`` for a channels-last ``x`` already in the compute dtype: cuDNN without its bias
    (weight cast once and cached), then the bias in one vectorised pass over the channels-last
    output (torch adds it with a slow broadcast kernel: 45 us of the stem's 230 at 1024)."""
    from ..ops import fused_conv

    weight = _cached(module, "weight", (dtype,), lambda: module.weight.to(dtype))
    y = F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if module.bias is None:
        return y
    if not y.is_contiguous(memory_format=torch.channels_last):
        return y + module.bias.to(y.dtype).view(1, -1, 1, 1)
    fused_conv.add_channel_bias_(y.permute(0, 2, 3, 1), module.bias)
    return y


def stem(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The stem, fused: conv3x3 s2 + bias + LayerNorm2d + GELU in one kernel reading the image in
    its own layout (no channels-last copy, no cast), then the second conv through :func:`conv`.
    Returns None for inputs with more channels than the direct kernel takes."""
    from ..ops import fused_conv

    conv1, norm1, conv2 = module.conv1, module.norm1, module.conv2
    if x.dim() != 4 or x.shape[1] > fused_conv.MAX_DIRECT_CIN or conv1.padding != (1, 1):
        return None
    dtype = compute_dtype(x, conv2.weight)
    y = fused_conv.conv3x3_few_channels(
        x,
        conv1.weight,
        conv1.bias,
        conv1.stride[0],
        ln=(norm1.weight, norm1.bias, norm1.eps),
        gelu=True,
        out_dtype=dtype,
    )
    return conv(conv2, y.permute(0, 3, 1, 2), dtype)


def _mbconv_rows(
    block: nn.Module, x: torch.Tensor, dtype: torch.dtype, out_dtype: torch.dtype
) -> torch.Tensor:
    """One MBConv on NHWC ``x`` (B, H, W, Cin) -> (B, Ho, Wo, Cout): LayerNorm + 1x1 conv + bias +
    GELU in one kernel, depthwise 3x3 + bias + GELU in one, 1x1 conv + bias + shortcut in one."""
    from ..ops import fused_conv

    b, h, w, cin = x.shape
    norm, conv1, dw, conv3 = block.pre_norm, block.conv1_1x1, block.conv2_kxk, block.conv3_1x1
    stride = dw.stride[0]
    mid = fused_conv.pointwise_conv(
        x.reshape(-1, cin),
        _matrix(conv1, dtype),
        conv1.bias,
        ln=(norm.weight, norm.bias, norm.eps),
        gelu=True,
        out_dtype=dtype,
    )
    mid = fused_conv.depthwise3x3(
        mid.view(b, h, w, -1), dw.weight, dw.bias, stride, gelu=True, out_dtype=dtype
    )
    ho, wo = mid.shape[1:3]
    shortcut = block.shortcut
    if isinstance(shortcut, nn.Identity):
        res = x
    elif isinstance(shortcut, nn.Conv2d):
        res = fused_conv.pointwise_conv(
            x.reshape(-1, cin), _matrix(shortcut, dtype), shortcut.bias, out_dtype=dtype
        )
    else:  # Downsample2d: 3x3 average pool, stride 2, then a 1x1 conv when the widths differ
        res = fused_conv.avg_pool3x3s2(x)
        if isinstance(shortcut.expand, nn.Conv2d):
            res = fused_conv.pointwise_conv(
                res.reshape(-1, cin), _matrix(shortcut.expand, dtype), shortcut.expand.bias, out_dtype=dtype
            )
    out = fused_conv.pointwise_conv(
        mid.reshape(-1, mid.shape[-1]),
        _matrix(conv3, dtype),
        conv3.bias,
        residual=res.reshape(b * ho * wo, -1).contiguous(),
        out_dtype=out_dtype,
    )
    return out.view(b, ho, wo, -1)


def mbconv(block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """An MBConv block on a channels-last NCHW tensor, fused (see :func:`_mbconv_rows`).

    When the expanded tensor would exceed :data:`MBCONV_STRIP_BYTES`, output rows are computed in
    horizontal strips, each from the input rows its 3x3 windows need (strips start on an even input
    row for stride 2, so every window keeps its place). Returns None when ``x`` is not channels-last
    or the block's input is too wide for the fused LayerNorm (the caller takes the module path).
    """
    from ..ops import fused_conv

    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    b, cin, h, w = x.shape
    if cin > fused_conv.MAX_LN_CHANNELS:
        return None
    dtype = compute_dtype(x, block.conv1_1x1.weight)
    # the module path's result dtype: conv3's output (compute dtype) plus the shortcut's, which is a
    # convolution's output or (identity, average pool alone) x's dtype
    sc = block.shortcut
    convolved = isinstance(sc, nn.Conv2d) or isinstance(getattr(sc, "expand", None), nn.Conv2d)
    out_dtype = torch.promote_types(dtype, dtype if convolved else x.dtype)
    nhwc = x.permute(0, 2, 3, 1)
    stride = block.conv2_kxk.stride[0]
    mid_bytes = b * h * w * block.conv1_1x1.out_channels * torch.finfo(dtype).bits // 8
    if mid_bytes <= MBCONV_STRIP_BYTES:
        return _mbconv_rows(block, nhwc, dtype, out_dtype).permute(0, 3, 1, 2)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    out = torch.empty((b, ho, wo, block.conv3_1x1.out_channels), dtype=out_dtype, device=x.device)
    rows_per_strip = max(1, ho * MBCONV_STRIP_BYTES // (2 * mid_bytes))
    for a in range(0, ho, rows_per_strip):
        e = min(ho, a + rows_per_strip)
        first = max(0, a * stride - stride)  # one window row of margin above, same parity
        last = min(h, (e - 1) * stride + 2)
        strip = _mbconv_rows(block, nhwc[:, first:last].contiguous(), dtype, out_dtype)
        skip = (a * stride - first) // stride
        out[:, a:e] = strip[:, skip : skip + e - a]
    return out.permute(0, 3, 1, 2)


class _BlockWeights:
    """A VRWKV block's weights as the fused path uses them, rebuilt when a parameter changes."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, t: int) -> None:
        attn, mlp = layer.attn, layer.mlp
        with torch.no_grad():
            self.kvr_t = (
                torch.stack((attn.key.weight, attn.value.weight, attn.receptance.weight))
                .to(dtype)
                .transpose(1, 2)
            )
            self.out_t = attn.output.weight.to(dtype).t()
            self.key_t = mlp.key.weight.to(dtype).t()
            self.value_t = mlp.value.weight.to(dtype).t()
            self.recept_t = mlp.receptance.weight.to(dtype).t()
            self.w = attn.spatial_decay / t
            self.u = attn.spatial_first / t
            self.spatial_mixes = torch.stack((attn.spatial_mix_k, attn.spatial_mix_v, attn.spatial_mix_r))
            self.channel_mixes = torch.stack((mlp.spatial_mix_k, mlp.spatial_mix_r))

    @classmethod
    def of(cls, layer: nn.Module, dtype: torch.dtype, t: int) -> _BlockWeights:
        return _cached(layer, "block", (dtype, t), lambda: cls(layer, dtype, t))


def vrwkv_stack(
    layers: nn.ModuleList, final_norm: nn.LayerNorm, tokens: torch.Tensor, height: int, width: int
):
    """All VRWKV blocks and the final LayerNorm on ``tokens`` (B, T, C), fused.

    Per block: one kernel for [previous channel mix's residual +] LN1 + Q-Shift + three mixes, one
    batched GEMM for k, v, r, Bi-WKV with the gate (one kernel with the CUDA extension), the output
    GEMM, one kernel for the residual + LN2 +
    Q-Shift + two mixes, the channel mix's three GEMMs and its squared ReLU; the channel mix's gate
    and residual are applied by the next block's first kernel (or the final LayerNorm's).
    """
    from ..ops import fused_conv

    b, t, c = tokens.shape
    n = b * t
    dtype = compute_dtype(tokens, layers[0].attn.key.weight)
    x = tokens.contiguous()
    rr = vv = None  # the previous channel mix's gate and value, applied by the next front
    for i, layer in enumerate(layers):
        wts = _BlockWeights.of(layer, dtype, t)
        mixed, x = fused.vrwkv_prep(
            x,
            layer.norm1.weight,
            layer.norm1.bias,
            layer.norm1.eps,
            wts.spatial_mixes,
            height,
            width,
            delta=vv,
            gate=rr,
            scale=layers[i - 1].layer_scale_2 if i else None,
            out_dtype=dtype,
        )
        k, v, r = torch.bmm(mixed, wts.kvr_t).unbind(0)
        y = bi_wkv_gated(wts.w, wts.u, k.view(b, t, c), v.view(b, t, c), r.view(b, t, c))
        o = torch.mm(y.view(n, c), wts.out_t)
        mixed2, x = fused.vrwkv_prep(
            x,
            layer.norm2.weight,
            layer.norm2.bias,
            layer.norm2.eps,
            wts.channel_mixes,
            height,
            width,
            delta=o,
            scale=layer.layer_scale_1,
            out_dtype=dtype,
        )
        # the squared ReLU in the product's epilogue (cuBLAS would need a pass of its own)
        h = fused_conv.pointwise_conv(mixed2[0], wts.key_t.t(), relu_square=True)
        rr = torch.mm(mixed2[1], wts.recept_t)
        vv = torch.mm(h, wts.value_t)
    out, _ = fused.layer_norm_rows(
        x.view(n, c),
        final_norm.weight,
        final_norm.bias,
        final_norm.eps,
        delta=vv,
        gate=rr,
        scale=layers[-1].layer_scale_2,
        out_dtype=_norm_out_dtype(tokens),
    )
    return out.view(b, t, c)
