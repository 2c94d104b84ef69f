"""Whole promptable segmentation models: RWKV-SAM (RWKV backbone + refine) and SAM (ViT encoder).

Both map tensors to tensors and hold no per-image state (the Predictor owns that).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Neck, RWKVSAMBackbone
from .mask_decoder import MaskDecoder, TwoWayTransformer
from .prompt_encoder import PromptEncoder
from .refine import RefineModule
from .sam_vit import ImageEncoderViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
EMBED_DIM = 256
DECODER_MODES = ("multimask", "single")


def _check_image_size(image_size: int) -> int:
    if not isinstance(image_size, int) or image_size % 16 or not 64 <= image_size <= 4096:
        raise ValueError(f"image_size must be a multiple of 16 between 64 and 4096, got {image_size!r}")
    return image_size


class PromptableSegmenter(nn.Module):
    """Shared prompt encoder / mask decoder logic; subclasses provide ``encode_image``.

    Args:
        image_size: side S of the square padded model input (multiple of 16).
        decoder_mode: "multimask" (all four mask tokens, SAM-style choice among 3 candidates) or
            "single" (the authors' RWKV-SAM decoder: only mask token 0 and hypernetwork MLP 0).
        config: json-serialisable description embedded in checkpoints.
    """

    def __init__(self, image_size: int, decoder_mode: str, config: dict[str, Any]) -> None:
        super().__init__()
        if decoder_mode not in DECODER_MODES:
            raise ValueError(f"decoder_mode must be one of {DECODER_MODES}, got {decoder_mode!r}")
        self.image_size = _check_image_size(image_size)
        self.decoder_mode = decoder_mode
        self.config = dict(config, image_size=image_size, decoder_mode=decoder_mode)
        emb = image_size // 16
        self.prompt_encoder = PromptEncoder(
            embed_dim=EMBED_DIM,
            image_embedding_size=(emb, emb),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=EMBED_DIM,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBED_DIM, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
            num_hypernetwork_mlps=1 if decoder_mode == "single" else None,
        )
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(-1, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(-1, 1, 1), persistent=False)
        self.decoder_checkpoint_chunk = 0  # see set_decoder_checkpointing

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (S/4)."""
        return self.image_size // 4

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise and zero-pad.

        Args: x (B, 3, h, w) float RGB in 0..255 with max(h, w) <= image_size.
        Returns: (B, 3, S, S).
        """
        h, w = x.shape[-2:]
        if max(h, w) > self.image_size:
            raise ValueError(f"input {h}x{w} is larger than the model input {self.image_size}")
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fuse(self, f_sam: torch.Tensor, feats: dict[str, torch.Tensor], index: torch.Tensor | None):
        return f_sam

    def decode(
        self,
        feats: dict[str, torch.Tensor],
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks for N prompts.

        Args:
            feats: output of ``encode_image`` for one image (all prompts on it) or B images.
            point_coords: (N, P, 2) x, y in the padded input frame; point_labels: (N, P) with
                1 positive, 0 negative, -1 padding.
            boxes: (N, 4) XYXY in the input frame. mask_input: (N, 1, S/4, S/4) low-res logits.
            multimask_output: return the 3 candidate masks (K=3) instead of one (K=1);
                a single-token model always returns K=1.
            image_index: (N,) long, which image of ``feats`` each prompt belongs to (needed when
                feats hold B > 1 images).
        Returns:
            low-res mask logits (N, K, S/4, S/4) and predicted IoU (N, K).
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        points = (point_coords, point_labels) if point_coords is not None else None
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        n = sparse.shape[0]
        emb = feats["embedding"]
        index = None
        if image_index is not None:
            index = image_index.to(emb.device, torch.long)
            if index.shape != (n,):
                raise ValueError(f"image_index must have shape ({n},), got {tuple(index.shape)}")
            src = emb[index]
        elif emb.shape[0] == 1:
            src = emb.expand(n, -1, -1, -1)
        elif emb.shape[0] == n:
            src = emb
            index = torch.arange(n, device=emb.device)
        else:
            raise ValueError(f"features hold {emb.shape[0]} images for {n} prompts: pass image_index")
        src = src + dense
        dec = self.mask_decoder
        single = self.decoder_mode == "single"
        num_tokens = 1 if single else dec.num_mask_tokens
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight[:num_tokens]], dim=0)
        tokens = torch.cat([out_tokens.unsqueeze(0).expand(n, -1, -1), sparse], dim=1)

        def run(src: torch.Tensor, tokens: torch.Tensor, index: torch.Tensor | None):
            m = src.shape[0]
            pos = self.prompt_encoder.get_dense_pe().expand(m, -1, -1, -1)
            hs, out = dec.transformer(src, pos, tokens)
            out = out.transpose(1, 2).reshape(m, emb.shape[1], emb.shape[2], emb.shape[3])
            f = self._fuse(dec.output_upscaling(out), feats, index)
            hyper = torch.stack(
                [dec.output_hypernetworks_mlps[i](hs[:, 1 + i]) for i in range(num_tokens)], dim=1
            )
            masks = (hyper @ f.flatten(2)).view(m, num_tokens, f.shape[-2], f.shape[-1])
            return masks, dec.iou_prediction_head(hs[:, 0])

        chunk = self.decoder_checkpoint_chunk
        if chunk and self.training and torch.is_grad_enabled():
            # the per-prompt activations (transformer over the S/16 grid, upscaling and refine at S/4)
            # are recomputed in backward, ``chunk`` prompts at a time, instead of kept for every prompt
            from torch.utils.checkpoint import checkpoint

            outs = [
                checkpoint(
                    run,
                    src[i : i + chunk],
                    tokens[i : i + chunk],
                    index[i : i + chunk] if index is not None else None,
                    use_reentrant=False,
                )
                for i in range(0, n, chunk)
            ]
            masks, iou = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        else:
            masks, iou = run(src, tokens, index)
        if single or not multimask_output:
            return masks[:, :1], iou[:, :1]
        return masks[:, 1:], iou[:, 1:]

    def set_decoder_checkpointing(self, chunk: int = 16) -> None:
        """Training only: recompute each prompt's decoder activations (two-way transformer, upscaling,
        refine) in the backward pass, ``chunk`` prompts at a time (0 turns it off). Same results;
        memory per prompt drops from ~100 MB (float32, input 1024) to the decoder's inputs."""
        if chunk < 0:
            raise ValueError(f"chunk must be >= 0, got {chunk}")
        self.decoder_checkpoint_chunk = int(chunk)

    def forward(self, x: torch.Tensor, **prompts: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """encode_image(x) then decode(feats, **prompts); x is the (B, 3, S, S) preprocessed input."""
        return self.decode(self.encode_image(x), **prompts)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError


class RWKVSAM(PromptableSegmenter):
    """RWKV-SAM: RWKV backbone + neck, SAM prompt encoder and mask decoder, conv-fusion refine.

    Args:
        dims: backbone widths (C1, C2, C3); depth: VRWKV blocks; hidden_rate: channel-mix expansion.
    """

    def __init__(
        self,
        dims: tuple[int, int, int],
        depth: int = 14,
        hidden_rate: int = 2,
        image_size: int = 1024,
        decoder_mode: str = "multimask",
        config: dict[str, Any] | None = None,
    ) -> None:
        cfg = dict(config or {}, arch="rwkvsam", dims=list(dims), depth=depth, hidden_rate=hidden_rate)
        super().__init__(image_size, decoder_mode, cfg)
        self.backbone = RWKVSAMBackbone(tuple(dims), depth=depth, hidden_rate=hidden_rate)
        self.neck = Neck(dims[2], EMBED_DIM)
        self.refine = RefineModule(dims[0], dims[1], EMBED_DIM)

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x (B, 3, S, S) preprocessed. Returns {"embedding": (B, 256, S/16, S/16),
        "refine": (B, 64, S/4, S/4) image-only term of the refine module}."""
        x_hr, x_mr, x = self.backbone(x)
        return {"embedding": self.neck(x), "refine": self.refine.image_term(x_hr, x_mr)}

    def _fuse(self, f_sam, feats, index):
        term = feats["refine"]
        if index is not None:
            term = term[index]
        return self.refine.fuse(f_sam, term)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.backbone.set_grad_checkpointing(enable)


class SAM(PromptableSegmenter):
    """Segment Anything with its ViT image encoder (weight-compatible with the official checkpoints)."""

    def __init__(
        self,
        encoder_embed_dim: int,
        encoder_depth: int,
        encoder_num_heads: int,
        encoder_global_attn_indexes: tuple[int, ...],
        image_size: int = 1024,
        config: dict[str, Any] | None = None,
    ) -> None:
        cfg = dict(
            config or {},
            arch="sam",
            encoder_embed_dim=encoder_embed_dim,
            encoder_depth=encoder_depth,
            encoder_num_heads=encoder_num_heads,
            encoder_global_attn_indexes=list(encoder_global_attn_indexes),
        )
        super().__init__(image_size, "multimask", cfg)
        # Position tables keep the official 1024-input shapes (official checkpoints load as they
        # are) and are resized on the fly for other input sizes.
        self.image_encoder = ImageEncoderViT(
            depth=encoder_depth,
            embed_dim=encoder_embed_dim,
            img_size=image_size,
            mlp_ratio=4,
            num_heads=encoder_num_heads,
            patch_size=16,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            use_rel_pos=True,
            global_attn_indexes=tuple(encoder_global_attn_indexes),
            window_size=14,
            out_chans=EMBED_DIM,
            pretrain_img_size=1024,
        )

    def encode_image(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Args: x (B, 3, S, S) preprocessed. Returns {"embedding": (B, 256, S/16, S/16)}."""
        return {"embedding": self.image_encoder(x)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.image_encoder.set_grad_checkpointing(enable)
