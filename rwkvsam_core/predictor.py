"""Predictor: SamPredictor's contract (set_image once, then many cheap prompts)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .transforms import ResizeLongestSide, to_rgb_uint8

MASK_THRESHOLD = 0.0


class _CachedDensePE:
    """Stands in for ``prompt_encoder.get_dense_pe`` (an instance attribute set by ``Predictor``).

    The dense positional encoding depends only on the embedding grid size and the frequency buffer,
    yet the decoder recomputes it (sin/cos over the whole grid) for every prompt. While autograd is off
    (``Predictor.predict_torch`` runs under ``no_grad``; inference mode too) the encoding is computed
    once per grid size, buffer (device, dtype, identity and in-place version: ``load_state_dict`` or
    ``.to()`` compute it again) and inference mode. With gradients enabled (training) and under
    ``torch.compile`` it is computed on every call, as before.
    """

    def __init__(self, prompt_encoder: torch.nn.Module) -> None:
        self.prompt_encoder = prompt_encoder
        self._entries: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def __call__(self) -> torch.Tensor:
        pe = self.prompt_encoder
        compute = type(pe).get_dense_pe
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute(pe)
        gauss = pe.pe_layer.positional_encoding_gaussian_matrix
        key = (tuple(pe.image_embedding_size), torch.is_inference_mode_enabled())
        entry = self._entries.get(key)
        if entry is not None and entry[0] is gauss and entry[1] == gauss._version:
            return entry[2]
        value = compute(pe)
        # holding the buffer itself keeps its identity meaningful (no address reuse after a free);
        # a new dict, not an update, so that threads decoding at the same time never see a torn one
        self._entries = {**self._entries, key: (gauss, gauss._version, value)}
        return value

    def __getstate__(self) -> dict:
        return {"prompt_encoder": self.prompt_encoder, "_entries": {}}


def _install_dense_pe_cache(model: torch.nn.Module) -> None:
    """Give ``model.prompt_encoder`` a cached ``get_dense_pe`` (once; a no-op for other models)."""
    pe = getattr(model, "prompt_encoder", None)
    if pe is None or not hasattr(type(pe), "get_dense_pe"):
        return
    if not isinstance(pe.__dict__.get("get_dense_pe"), _CachedDensePE):
        pe.get_dense_pe = _CachedDensePE(pe)


def postprocess_masks(
    low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int
) -> torch.Tensor:
    """Low-res logits (N, K, S/4, S/4) -> logits (N, K, H, W) at the original image size.

    Bilinear upsample to the padded input S x S, crop the valid (h, w) region, bilinear to (H, W).
    """
    masks = F.interpolate(low_res, (image_size, image_size), mode="bilinear", align_corners=False)
    masks = masks[..., : input_size[0], : input_size[1]]
    return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)


class Predictor:
    """Encode an image once, then answer point / box / mask prompts with the decoder only.

    Args:
        model: an RWKVSAM or SAM model from ``build_model``.
        cache: optional ``EmbeddingCache``; ``set_image`` then reuses features of images seen before.
    """

    def __init__(self, model: torch.nn.Module, cache=None) -> None:
        self.model = model
        self.cache = cache
        self.transform = ResizeLongestSide(model.image_size)
        _install_dense_pe_cache(model)
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ image
    def reset_image(self) -> None:
        """Forget the current image."""
        self.features: ImageFeatures | None = None
        self.is_image_set = False
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def set_image(self, image: np.ndarray, image_format: str = "RGB", contrast_limits=None) -> None:
        """Compute (or fetch from the cache) the features of ``image``.

        Args:
            image: (H, W, 3) uint8 RGB; also (H, W) / (H, W, 1) grayscale, (H, W, 4) RGBA, uint16,
                float or bool images, normalised by ``to_rgb_uint8`` (``contrast_limits`` optional).
            image_format: "RGB" or "BGR".
        """
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        rgb = to_rgb_uint8(image, contrast_limits)
        if image_format == "BGR":
            rgb = np.ascontiguousarray(rgb[..., ::-1])
        if self.cache is not None:
            feats = self.cache.get_or_compute(self.model, rgb, self.compute_features)
        else:
            feats = self.compute_features(rgb)
        self.set_features(feats)

    @torch.no_grad()
    def compute_features(self, rgb: np.ndarray) -> ImageFeatures:
        """Run the image encoder on an (H, W, 3) uint8 RGB image; does not change the predictor state."""
        resized = self.transform.apply_image(rgb)
        x = torch.from_numpy(np.array(resized)).to(self.device).permute(2, 0, 1)[None].float()
        return self._encode(x, tuple(rgb.shape[:2]))

    @torch.no_grad()
    def set_image_torch(self, transformed_image: torch.Tensor, original_image_size: tuple[int, int]) -> None:
        """Like SAM: ``transformed_image`` (1, 3, h, w) already resized with ``self.transform``."""
        if transformed_image.ndim != 4 or transformed_image.shape[:2] != (1, 3):
            raise ValueError(f"expected a (1, 3, h, w) tensor, got {tuple(transformed_image.shape)}")
        self.set_features(self._encode(transformed_image.to(self.device).float(), tuple(original_image_size)))

    def _encode(self, x: torch.Tensor, original_size: tuple[int, int]) -> ImageFeatures:
        input_size = (int(x.shape[-2]), int(x.shape[-1]))
        tensors = self.model.encode_image(self.model.preprocess(x))
        # contiguous (NCHW) like features restored from the disk cache, so that decoding gives
        # bit-identical results whichever way the features arrived
        return ImageFeatures(
            {k: v.detach().contiguous() for k, v in tensors.items()},
            (int(original_size[0]), int(original_size[1])),
            input_size,
            self.model.image_size,
        )

    def get_features(self) -> ImageFeatures:
        """The features of the current image (save them to restore later with ``set_features``)."""
        self._require_image()
        return self.features

    def set_features(self, features: ImageFeatures) -> None:
        """Restore features from ``get_features`` / the cache: no encoder run."""
        if features.image_size != self.model.image_size:
            raise ValueError(
                f"features were computed for input size {features.image_size}, model uses {self.model.image_size}"
            )
        self.features = features.to(self.device)
        self.original_size = tuple(features.original_size)
        self.input_size = tuple(features.input_size)
        self.is_image_set = True

    def get_image_embedding(self) -> torch.Tensor:
        """(1, 256, S/16, S/16) image embedding of the current image."""
        self._require_image()
        return self.features.tensors["embedding"]

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise RuntimeError("no image is set: call set_image() first")

    # ---------------------------------------------------------------- prompts
    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        clip_to_box: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one object, or for several boxes at once.

        Args:
            point_coords: (P, 2) x, y in original pixels, or (N, P, 2) for N objects (with N boxes or none).
            point_labels: (P,) 1 positive, 0 negative (or (N, P)).
            box: (4,) XYXY in original pixels, or (N, 4) for N objects in one decoder pass.
            mask_input: (1, S/4, S/4) low-res logits from a previous call (or (N, 1, S/4, S/4)).
            multimask_output: return 3 candidates (a single-token model returns 1).
            return_logits: return float logits instead of boolean masks.
            clip_to_box: with a box, drop every mask pixel outside it (pixel columns floor(x0) ..
                ceil(x1) and rows floor(y0) .. ceil(y1) are kept; logits outside get the lowest float).
                The box says where the object is, so a pixel outside it is wrong by definition;
                off by default, as in SAM. The low-res logits are never clipped.
        Returns:
            masks (K, H, W), scores (K,), low-res logits (K, S/4, S/4); with N > 1 objects (boxes or
            point sets) a leading N axis.
        """
        self._require_image()
        coords_t = labels_t = box_t = mask_t = None
        n = None
        batched = False  # N > 1 objects: keep the leading N axis in the results
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_labels must be given with point_coords")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            batched = coords.ndim == 3 and coords.shape[0] > 1
            if coords.ndim == 2:
                coords, labels = coords[None], labels[None]
            if coords.ndim != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(
                    f"point_coords must be (P, 2) with point_labels (P,); got {np.shape(point_coords)} "
                    f"and {np.shape(point_labels)}"
                )
            if not np.isfinite(coords).all():
                raise ValueError("point_coords contain NaN or inf")
            coords = self.transform.apply_coords(coords, self.original_size)
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=self.device)
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=self.device)
            n = coords_t.shape[0]
        if box is not None:
            boxes = np.asarray(box, dtype=np.float64)
            batched = batched or (boxes.ndim == 2 and boxes.shape[0] > 1)
            boxes = boxes.reshape(-1, 4) if boxes.size % 4 == 0 and boxes.ndim <= 2 else None
            if boxes is None or boxes.shape[0] == 0:
                raise ValueError(f"box must be (4,) or (N, 4) XYXY, got shape {np.shape(box)}")
            if not np.isfinite(boxes).all():
                raise ValueError("box contains NaN or inf")
            if n is not None and n not in (1, boxes.shape[0]):
                raise ValueError(f"{n} point sets for {boxes.shape[0]} boxes")
            if n == 1 and boxes.shape[0] > 1:
                coords_t = coords_t.expand(boxes.shape[0], -1, -1)
                labels_t = labels_t.expand(boxes.shape[0], -1)
            box_t = torch.as_tensor(
                self.transform.apply_boxes(boxes, self.original_size), dtype=torch.float, device=self.device
            )
            n = boxes.shape[0]
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            side = self.model.low_res_size
            if m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or m.shape[1:] != (1, side, side):
                raise ValueError(
                    f"mask_input must be (1, {side}, {side}) low-res logits, got {np.shape(mask_input)}"
                )
            mask_t = torch.as_tensor(m, device=self.device)
            if n is not None and mask_t.shape[0] == 1 and n > 1:
                mask_t = mask_t.expand(n, -1, -1, -1)
        masks, iou, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output=multimask_output, return_logits=return_logits
        )
        masks, iou, low_res = masks.cpu().numpy(), iou.float().cpu().numpy(), low_res.float().cpu().numpy()
        if clip_to_box and box is not None:
            masks = clip_masks_to_boxes(masks, boxes)
        if batched:
            return masks, iou, low_res
        return masks[0], iou[0], low_res[0]

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction with inputs already in the input frame (see ``self.transform``).

        Args:
            point_coords (N, P, 2), point_labels (N, P), boxes (N, 4), mask_input (N, 1, S/4, S/4).
        Returns:
            masks (N, K, H, W) bool (float logits if return_logits), iou (N, K), low-res logits
            (N, K, S/4, S/4).
        """
        self._require_image()
        low_res, iou = self.model.decode(
            self.features.tensors,
            point_coords=point_coords,
            point_labels=point_labels,
            boxes=boxes,
            mask_input=mask_input,
            multimask_output=multimask_output,
        )
        outputs = []
        # Full-resolution logits of many prompts on a large image can take gigabytes: go in chunks.
        h, w = self.original_size
        chunk = max(1, int(2**27 // max(1, h * w * low_res.shape[1])))
        for start in range(0, low_res.shape[0], chunk):
            logits = postprocess_masks(
                low_res[start : start + chunk], self.input_size, self.original_size, self.model.image_size
            )
            outputs.append(logits if return_logits else logits > MASK_THRESHOLD)
        return torch.cat(outputs), iou, low_res


def wants_candidates(point_labels: np.ndarray | None, has_box: bool) -> bool:
    """SAM's rule for one object: decode three candidate masks only for a single click without a box.

    One click is ambiguous (a part, the object, a group); a box or several clicks are not, and their
    single mask is the better output (BENCHMARKS.md, issue 7). Labels < 0 are padding.
    """
    if has_box or point_labels is None:
        return False
    return int((np.asarray(point_labels) >= 0).sum()) == 1


def clip_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Zero ``masks`` (N, K, H, W) outside ``boxes`` (N, 4) XYXY (or (1, 4) for every mask).

    Pixel columns floor(x0) .. ceil(x1) and rows floor(y0) .. ceil(y1) (inclusive) are kept, so a tight
    box from a mask's extreme pixels keeps all of it. Boolean masks get False, float logits the
    lowest finite value of their dtype. Returns a new array.
    """
    masks = np.asarray(masks)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if masks.ndim != 4 or boxes.shape[0] not in (1, masks.shape[0]):
        raise ValueError(f"masks (N, K, H, W) and boxes (N, 4) expected, got {masks.shape} and {boxes.shape}")
    h, w = masks.shape[-2:]
    fill = False if masks.dtype == bool else np.finfo(masks.dtype).min
    out = np.full_like(masks, fill)
    for i in range(masks.shape[0]):
        x0, y0, x1, y1 = boxes[min(i, boxes.shape[0] - 1)]
        c0, c1 = int(np.clip(np.floor(min(x0, x1)), 0, w)), int(np.clip(np.ceil(max(x0, x1)) + 1, 0, w))
        r0, r1 = int(np.clip(np.floor(min(y0, y1)), 0, h)), int(np.clip(np.ceil(max(y0, y1)) + 1, 0, h))
        out[i, :, r0:r1, c0:c1] = masks[i, :, r0:r1, c0:c1]
    return out
