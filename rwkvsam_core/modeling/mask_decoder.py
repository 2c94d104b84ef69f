"""SAM's mask decoder: the two-way transformer, the output upscaling and the hypernetwork heads.

Parameter names and shapes follow the official segment-anything ``mask_decoder.*`` keys. The
decoder's pieces are public attributes and small methods so that the RWKV-SAM decoder (which
fuses extra high-resolution features before the hypernetwork product) reuses them.

Batching: image embeddings of batch 1 are broadcast to the N prompts instead of being copied N
times; a batch of N embeddings is paired with the N prompts one to one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .common import LayerNorm2d, MLPBlock, PatchUpsample2d

__all__ = ["MLP", "Attention", "TwoWayAttentionBlock", "TwoWayTransformer", "MaskDecoder"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (``layers.{i}`` keys).

    Shapes: ``(..., input_dim)`` -> ``(..., output_dim)``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out, strict=True))
        self.sigmoid_output = sigmoid_output

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to ``x`` of shape ``(..., input_dim)``."""
        last = self.num_layers - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = F.relu(x)
        return torch.sigmoid(x) if self.sigmoid_output else x


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by ``downsample_rate``.

    Batch dimensions of q and k/v broadcast (a batch-1 image attends for N prompts).
    Shapes: q ``(B, Nq, D)``, k and v ``(B, Nk, D)`` -> ``(B, Nq, D)``.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must divide the internal width {self.internal_dim} "
                f"(embedding_dim {embedding_dim} // downsample_rate {downsample_rate})"
            )
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attend ``q`` ``(B, Nq, D)`` to ``k``/``v`` ``(B', Nk, D)``; B and B' broadcast."""
        qh = self._heads(self.q_proj(q))
        kh = self._heads(self.k_proj(k))
        vh = self._heads(self.v_proj(v))
        scores = qh @ kh.transpose(-1, -2)
        scores = scores / math.sqrt(qh.shape[-1])
        out = torch.softmax(scores, dim=-1) @ vh
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token-to-image attention, token MLP, image-to-token attention.

    Post-norm residual blocks with LayerNorm eps 1e-5. The first block of the transformer skips
    the positional encoding in its self-attention (and has no residual there), as in SAM.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        """queries/query_pe ``(N, T, D)``; keys/key_pe ``(N or 1, HW, D)`` -> updated (queries, keys)."""
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)

        q = queries + query_pe
        k = keys + key_pe
        queries = self.norm2(queries + self.cross_attn_token_to_image(q, k, keys))

        queries = self.norm3(queries + self.mlp(queries))

        q = queries + query_pe
        k = keys + key_pe
        keys = self.norm4(keys + self.cross_attn_image_to_token(k, q, queries))
        return queries, keys


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer between prompt tokens and image embedding.

    Args:
        depth: number of two-way blocks (2 in SAM).
        embedding_dim: D (256).
        num_heads: attention heads (8).
        mlp_dim: hidden size of the token MLP (2048).
        activation: activation of the token MLP (ReLU in SAM).
        attention_downsample_rate: width reduction of the cross attentions (2).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Run the transformer.

        Args:
            image_embedding: ``(B, D, h, w)`` with B = N or 1 (broadcast to the N prompts).
            image_pe: ``(B', D, h, w)`` with B' = N or 1.
            point_embedding: tokens ``(N, T, D)``.

        Returns:
            tokens ``(N, T, D)`` and image keys ``(N, h*w, D)``.
        """
        keys = image_embedding.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        queries = point_embedding
        for layer in self.layers:
            queries, keys = layer(queries=queries, keys=keys, query_pe=point_embedding, key_pe=key_pe)
        q = queries + point_embedding
        k = keys + key_pe
        queries = self.norm_final_attn(queries + self.final_attn_token_to_image(q, k, keys))
        if keys.shape[0] != queries.shape[0]:
            keys = keys.expand(queries.shape[0], -1, -1)
        return queries, keys


class MaskDecoder(nn.Module):
    """SAM's mask decoder (IoU token + mask tokens, two-way transformer, hypernetwork heads).

    Args:
        transformer_dim: D (256).
        transformer: the two-way transformer.
        num_multimask_outputs: masks in multimask mode (3); there are ``num_multimask_outputs + 1``
            mask tokens.
        iou_head_depth: layers of the IoU head MLP.
        iou_head_hidden_dim: hidden width of the IoU head.
        activation: activation of the output upscaling (GELU, exact).
        num_hypernetwork_mlps: how many hypernetwork MLPs exist (default: one per mask token). A
            smaller number gives a model whose transformer sees only the first
            ``num_hypernetwork_mlps`` mask tokens and which returns that many masks (the authors'
            single-token RWKV-SAM layout keeps only ``output_hypernetworks_mlps.0``).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        activation: type[nn.Module] = nn.GELU,
        num_hypernetwork_mlps: int | None = None,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        if num_hypernetwork_mlps is None:
            num_hypernetwork_mlps = self.num_mask_tokens
        if not 1 <= num_hypernetwork_mlps <= self.num_mask_tokens:
            raise ValueError(
                f"num_hypernetwork_mlps must be in [1, {self.num_mask_tokens}], got {num_hypernetwork_mlps}"
            )
        self.num_hypernetwork_mlps = num_hypernetwork_mlps

        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            PatchUpsample2d(transformer_dim, transformer_dim // 4),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            PatchUpsample2d(transformer_dim // 4, transformer_dim // 8),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(num_hypernetwork_mlps)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    @property
    def single_token(self) -> bool:
        """True when only some mask tokens have a hypernetwork MLP (no multimask output)."""
        return self.num_hypernetwork_mlps < self.num_mask_tokens

    def run_transformer(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        num_mask_tokens: int | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run the two-way transformer on ``[iou token, mask tokens[:num_mask_tokens], prompts]``.

        Args:
            image_embeddings: ``(B, D, h, w)``, B = 1 (shared by all prompts) or N.
            image_pe: ``(1 or N, D, h, w)``.
            sparse_prompt_embeddings: ``(N, P, D)``.
            dense_prompt_embeddings: ``(N or 1, D, h, w)``.
            num_mask_tokens: mask tokens fed to the transformer (default ``num_hypernetwork_mlps``).

        Returns:
            iou token ``(N, D)``, mask tokens ``(N, num_mask_tokens, D)``, image features ``(N, D, h, w)``.
        """
        n = sparse_prompt_embeddings.shape[0]
        if image_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} must be 1 or the number of prompts {n}"
            )
        if dense_prompt_embeddings.shape[0] not in (1, n):
            raise ValueError(
                f"dense_prompt_embeddings batch {dense_prompt_embeddings.shape[0]} must be 1 or {n}"
            )
        if num_mask_tokens is None:
            num_mask_tokens = self.num_hypernetwork_mlps
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight[:num_mask_tokens]], dim=0)
        out_tokens = out_tokens.unsqueeze(0).expand(n, -1, -1)
        tokens = torch.cat([out_tokens, sparse_prompt_embeddings.to(out_tokens.dtype)], dim=1)

        dense = dense_prompt_embeddings
        if dense.shape[0] > 1 and dense.stride(0) == 0:
            # The expanded no-mask embedding is the same for all prompts: keep one copy so the
            # first attention computes the image keys/values once.
            dense = dense[:1]
        src = image_embeddings + dense
        b, c, h, w = src.shape
        hs, keys = self.transformer(src, image_pe, tokens)
        feats = keys.transpose(1, 2).reshape(n, c, h, w)
        return hs[:, 0, :], hs[:, 1 : 1 + num_mask_tokens, :], feats

    def hypernetwork(self, mask_tokens_out: Tensor) -> Tensor:
        """Mask tokens ``(N, K, D)`` (K <= number of MLPs) to mask weights ``(N, K, D // 8)``."""
        k = mask_tokens_out.shape[1]
        if k > self.num_hypernetwork_mlps:
            raise ValueError(f"{k} mask tokens but only {self.num_hypernetwork_mlps} hypernetwork MLPs")
        return torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(k)], dim=1
        )

    @staticmethod
    def masks_from_features(hyper_in: Tensor, features: Tensor) -> Tensor:
        """Dot mask weights ``(N, K, C)`` with features ``(N, C, H, W)`` -> logits ``(N, K, H, W)``."""
        n, c, h, w = features.shape
        return (hyper_in @ features.reshape(n, c, h * w)).reshape(n, -1, h, w)

    def predict_masks(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """All masks and IoU scores: ``(N, M, 4h, 4w)``, ``(N, num_mask_tokens)``; M = number of MLPs."""
        iou_token_out, mask_tokens_out, feats = self.run_transformer(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        upscaled = self.output_upscaling(feats)
        masks = self.masks_from_features(self.hypernetwork(mask_tokens_out), upscaled)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse_prompt_embeddings: Tensor,
        dense_prompt_embeddings: Tensor,
        multimask_output: bool,
    ) -> tuple[Tensor, Tensor]:
        """Predict masks.

        Args:
            image_embeddings: ``(1 or N, D, h, w)``.
            image_pe: ``(1 or N, D, h, w)`` (``PromptEncoder.get_dense_pe()``).
            sparse_prompt_embeddings: ``(N, P, D)``.
            dense_prompt_embeddings: ``(N or 1, D, h, w)``.
            multimask_output: return masks 1..3 (True) or mask 0 (False). A single-token decoder
                always returns its one mask.

        Returns:
            low-res mask logits ``(N, K, 4h, 4w)`` and IoU predictions ``(N, K)``.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        if self.single_token:
            return masks[:, :1], iou_pred[:, :1]
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]
