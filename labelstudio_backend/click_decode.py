"""One click decoded alone, with its mask finished only where it is needed.

The click-grouping rule (README, "Interactive mode") decodes a new positive click alone and asks one
question of that mask: does it contain one of the current object's positive clicks? Only when the
answer is no is the mask itself the answer to the request. A decoder pass is a two-way transformer
over the S/16 image grid, then a mask head at S/4: output upscaling (two 2x2 stride-2 transposed
convolutions, so each S/16 cell makes its own 4x4 block of S/4 pixels), RWKV-SAM's refine module (two
3x3 convolutions: a pixel depends on its 5x5 neighbourhood) and the hypernetwork dot product. The mask
head costs more than the transformer on a CPU (rwkvsam_t at 1024: ~100 ms against ~60 ms), and its
result at one pixel depends only on the transformer output in the 3x3 cells around that pixel's cell.

:func:`decode_click` therefore runs the prompt encoder and the transformer at once and keeps their
output. :meth:`ClickDecode.contains` runs the mask head on 12x12-pixel windows around the asked pixels
only (exact: a window reaches one S/16 cell past the pixel's own, more than the refine module's reach;
windows at the image border are zero-padded there, as the full convolution is). A value too close to
zero to trust its sign after the different summation order is settled by the full mask, so every
decision is the one the full mask gives. :meth:`ClickDecode.low_res` runs the mask head over the whole
grid with the same operations, in the same order, as ``model.decode`` (bit-identical logits).

Works with the models of ``rwkvsam_core.build_model`` (RWKV-SAM and SAM, "multimask" and "single"
decoders); any other model is decoded with its own ``decode`` (the full mask at once).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

#: a windowed logit within SIGN_TOLERANCE * (1 + the sum of its terms' magnitudes) of zero is settled
#: by the full mask (the windowed and the full values differ by < 1e-6 of that sum: rwkvsam_t, 256-1024)
SIGN_TOLERANCE = 1e-5

# S/4 pixels per S/16 cell, and how many cells around a pixel's own cell its window takes
_CELL = 4
_HALO = 1


class ClickDecode:
    """One positive click decoded alone: the best of its candidate masks (highest predicted IoU).

    Attributes:
        score: the chosen candidate's predicted IoU.
        full_decodes: how many times the mask head ran over the whole grid (0 or 1).
    """

    def __init__(self, score: float) -> None:
        self.score = float(score)
        self.full_decodes = 0
        self._low_res: torch.Tensor | None = None

    def low_res(self) -> torch.Tensor:
        """The chosen candidate's low-res logits (1, 1, S/4, S/4), computed once."""
        if self._low_res is None:
            self._low_res = self._full()
            self.full_decodes += 1
        return self._low_res

    def contains(self, pixels: np.ndarray) -> bool:
        """True when the mask (logit > 0) holds one of ``pixels`` ((P, 2) int rows, cols at S/4)."""
        if self._low_res is not None:
            low = self._low_res[0, 0]
            return any(bool(low[r, c] > 0) for r, c in pixels)
        uncertain = False
        for r, c in pixels:
            value, scale = self._logit_at(int(r), int(c))
            if abs(value) <= SIGN_TOLERANCE * (1.0 + scale):
                uncertain = True
            elif value > 0:
                return True
        if uncertain:  # a sign we cannot trust: decide on the full mask, exactly as before
            low = self.low_res()[0, 0]
            return any(bool(low[r, c] > 0) for r, c in pixels)
        return False

    def _full(self) -> torch.Tensor:
        raise NotImplementedError

    def _logit_at(self, row: int, col: int) -> tuple[float, float]:
        """(logit at one S/4 pixel, sum of the magnitudes of its terms)."""
        raise NotImplementedError


class _Decoded(ClickDecode):
    """A model without the SAM decoder layout: ``model.decode`` gave the whole mask."""

    def __init__(self, low_res: torch.Tensor, score: float) -> None:
        super().__init__(score)
        self._low_res = low_res
        self.full_decodes = 1


class _LazyHead(ClickDecode):
    """Transformer output kept; the mask head runs per window or over the whole grid on demand."""

    def __init__(
        self,
        model: Any,
        feats: dict[str, torch.Tensor],
        hs: torch.Tensor,
        keys: torch.Tensor,
        best: int,
        score: float,
    ) -> None:
        super().__init__(score)
        self.model = model
        self.feats = feats
        self.keys = keys  # (1, D, S/16, S/16) image side of the transformer output
        self.hs = hs  # (1, tokens, D) token side of the transformer output
        self.best = best  # index among the decoder's mask tokens
        self.hyper = model.mask_decoder.output_hypernetworks_mlps[best](hs[:, 1 + best])  # (1, D / 8)

    @staticmethod
    def _num_tokens(model: Any) -> int:
        return 1 if model.decoder_mode == "single" else model.mask_decoder.num_mask_tokens

    def _head(self, keys: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Upscaling + fuse (refine) of ``keys`` (1, D, h, w) -> mask features (1, D / 8, 4h, 4w)."""
        return self.model._fuse(self.model.mask_decoder.output_upscaling(keys), feats, None)

    @torch.no_grad()
    def _full(self) -> torch.Tensor:
        # the operations of PromptableSegmenter.decode, in its order: every token's mask at once
        dec = self.model.mask_decoder
        n = self._num_tokens(self.model)
        f = self._head(self.keys, self.feats)
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](self.hs[:, 1 + i]) for i in range(n)], dim=1)
        masks = (hyper @ f.flatten(2)).view(1, n, f.shape[-2], f.shape[-1])
        return masks[:, self.best : self.best + 1]

    @torch.no_grad()
    def _logit_at(self, row: int, col: int) -> tuple[float, float]:
        grid_h, grid_w = self.keys.shape[-2:]
        cy, cx = row // _CELL, col // _CELL
        y0, y1 = max(0, cy - _HALO), min(grid_h, cy + _HALO + 1)
        x0, x1 = max(0, cx - _HALO), min(grid_w, cx + _HALO + 1)
        # image-only terms at S/4 (the refine module's) are cut to the same window
        window = {
            k: v[..., y0 * _CELL : y1 * _CELL, x0 * _CELL : x1 * _CELL]
            if v.dim() == 4 and tuple(v.shape[-2:]) == (grid_h * _CELL, grid_w * _CELL)
            else v
            for k, v in self.feats.items()
        }
        f = self._head(self.keys[..., y0:y1, x0:x1], window)
        vec = f[0, :, row - y0 * _CELL, col - x0 * _CELL]
        terms = self.hyper[0] * vec
        return float(terms.sum()), float(terms.abs().sum())


def _has_sam_decoder(model: Any) -> bool:
    dec = getattr(model, "mask_decoder", None)
    return all(
        hasattr(obj, name)
        for obj, name in (
            (model, "prompt_encoder"),
            (model, "_fuse"),
            (model, "decoder_mode"),
            (dec, "transformer"),
            (dec, "output_upscaling"),
            (dec, "output_hypernetworks_mlps"),
            (dec, "iou_prediction_head"),
        )
    )


@torch.no_grad()
def decode_click(model: Any, feats: dict[str, torch.Tensor], coords: torch.Tensor) -> ClickDecode:
    """Decode one positive click alone; the mask head is left for later (see the module doc).

    Args:
        model: a model from ``rwkvsam_core.build_model`` (others are decoded with ``model.decode``).
        feats: the image's feature tensors (``ImageFeatures.tensors``, one image).
        coords: (1, 1, 2) x, y in the model's input frame.
    Returns:
        The best of the candidates that ``model.decode(..., multimask_output=True)`` gives.
    """
    labels = torch.ones((1, 1), dtype=torch.int, device=coords.device)
    if not _has_sam_decoder(model):
        low_res, iou = model.decode(feats, point_coords=coords, point_labels=labels, multimask_output=True)
        best = int(torch.argmax(iou[0]))
        return _Decoded(low_res[:, best : best + 1], float(iou[0, best]))
    # PromptableSegmenter.decode for one prompt, up to the transformer (same operations, same order)
    sparse, dense = model.prompt_encoder(points=(coords, labels), boxes=None, masks=None)
    emb = feats["embedding"]
    if emb.shape[0] != 1:
        raise ValueError(f"features of one image expected, got {emb.shape[0]}")
    dec = model.mask_decoder
    n_tokens = _LazyHead._num_tokens(model)
    out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight[:n_tokens]], dim=0)
    tokens = torch.cat([out_tokens.unsqueeze(0).expand(1, -1, -1), sparse], dim=1)
    src = emb.expand(1, -1, -1, -1) + dense
    pos = model.prompt_encoder.get_dense_pe().expand(1, -1, -1, -1)
    hs, keys = dec.transformer(src, pos, tokens)
    keys = keys.transpose(1, 2).reshape(1, emb.shape[1], emb.shape[2], emb.shape[3])
    iou = dec.iou_prediction_head(hs[:, 0])
    if n_tokens == 1:  # a single-token decoder has one mask
        best = 0
    else:  # multimask output: candidates 1..3, the best by predicted IoU
        best = 1 + int(torch.argmax(iou[0, 1:]))
    return _LazyHead(model, feats, hs, keys, best, float(iou[0, best]))
