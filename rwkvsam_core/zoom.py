"""Box prompts on small objects, decoded in a zoomed window around each box.

The model sees an image at ``image_size`` pixels (1024) on its longest side. A 25-pixel nucleus of a
512-pixel image then spans 50 input pixels, where the encoder's stride-16 grid gives it 3 cells and
the mask's boundary is placed to within a pixel or two. Zooming helps: crop a square window around
the box, ``side = long_box_side * image_size / target``, so the box spans about ``target`` input
pixels, encode the window, decode the box in it, and paste the mask back. A box that already spans
``target`` pixels in the whole image is decoded there (no zoom); a window never leaves the image.

``target`` = 384 (the box about three eighths of the input, the window about 2.7 box sides) was chosen
on the 20 training nuclei of the fine-tuning protocol (BENCHMARKS.md, "Zoomed box decoding"), not on
an evaluation set. On held-out data it helps nuclei (napari's: 89.2 -> 91.3 mIoU) and hurts tiny
specks and photos, so the tools leave it off unless asked. Each zoomed box costs one more
image-encoder pass: cheap on a GPU, about a second or more on a CPU.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_ZOOM_TARGET", "MIN_WINDOW", "zoom_window", "predict_boxes_zoomed"]

DEFAULT_ZOOM_TARGET = 384
#: smallest window side in image pixels (a guard against degenerate boxes: at most 32x magnification at 1024)
MIN_WINDOW = 32


def zoom_window(
    box: np.ndarray, image_hw: tuple[int, int], target: float = DEFAULT_ZOOM_TARGET, image_size: int = 1024
) -> tuple[int, int, int, int] | None:
    """The window ``(x0, y0, x1, y1)`` (end-exclusive, inside the image) to decode ``box`` in, or None.

    None when the whole image already shows the box at ``target`` input pixels or more (or the window
    would cover the whole image). The window is a square of side ``long_box_side * image_size /
    target`` (at least :data:`MIN_WINDOW`, at most the image side) centred on the box and shifted to
    lie inside the image, so it always contains the box.
    """
    if not target > 0:
        raise ValueError(f"zoom target must be > 0, got {target}")
    h, w = int(image_hw[0]), int(image_hw[1])
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    long_side = max(x1 - x0, y1 - y0) + 1.0
    if long_side * image_size / max(h, w) >= target:
        return None
    # never smaller than the box itself (a target above image_size would otherwise cut the box)
    side = max(MIN_WINDOW, math.ceil(long_side * image_size / target), math.ceil(long_side))
    if side >= max(h, w):
        return None
    sw, sh = min(side, w), min(side, h)

    def place(lo: float, hi: float, size: int, limit: int) -> int:
        start = round((lo + hi) / 2 - size / 2)
        return int(min(max(start, 0), limit - size))

    wx0, wy0 = place(x0, x1, sw, w), place(y0, y1, sh, h)
    return wx0, wy0, wx0 + sw, wy0 + sh


def predict_boxes_zoomed(
    predictor,
    image: np.ndarray,
    boxes: np.ndarray,
    target: float = DEFAULT_ZOOM_TARGET,
    contrast_limits=None,
    clip_to_box: bool = False,
    crop_predictor=None,
    image_is_set: bool = False,
    max_boxes: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """Single masks for ``boxes`` (N, 4) XYXY on ``image``, small boxes decoded in zoomed windows.

    Args:
        predictor: a :class:`~rwkvsam_core.predictor.Predictor`; boxes that need no zoom are decoded
            on the whole image with it (``set_image`` is called first unless ``image_is_set`` says it
            already holds this image's features).
        image: the image as given to ``Predictor.set_image`` (normalised once, as a whole, by
            ``to_rgb_uint8`` with ``contrast_limits``, so every window keeps the whole image's contrast).
        target: input pixels the box's long side should span (:data:`DEFAULT_ZOOM_TARGET`).
        clip_to_box: drop mask pixels outside each box (as ``Predictor.predict``).
        max_boxes: boxes decoded together on the whole image (the rest in further passes).
        crop_predictor: predictor used for the windows (default: a new one on the same model, without
            a cache, so windows never enter the embedding cache; ``predictor`` keeps its image).
    Returns:
        masks (N, H, W) bool and scores (N,) (the predicted IoU of each mask).
    """
    from .predictor import Predictor
    from .transforms import to_rgb_uint8

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise ValueError("boxes contain NaN or inf")
    rgb = to_rgb_uint8(image, contrast_limits)
    h, w = rgb.shape[:2]
    windows = [zoom_window(b, (h, w), target, int(predictor.model.image_size)) for b in boxes]
    masks = np.zeros((len(boxes), h, w), dtype=bool)
    scores = np.zeros(len(boxes), dtype=np.float32)
    whole = [i for i, win in enumerate(windows) if win is None]
    if whole:
        if not image_is_set:
            predictor.set_image(rgb)
        for start in range(0, len(whole), max_boxes):  # bounded decoder memory, as the tools' batches
            part = whole[start : start + max_boxes]
            m, s, _ = predictor.predict(box=boxes[part], multimask_output=False, clip_to_box=clip_to_box)
            m, s = np.asarray(m).reshape(len(part), -1, h, w), np.asarray(s).reshape(len(part), -1)
            masks[part], scores[part] = m[:, 0], s[:, 0]
    zoomed = [i for i, win in enumerate(windows) if win is not None]
    if zoomed:
        crop_predictor = crop_predictor if crop_predictor is not None else Predictor(predictor.model)
        for i in zoomed:
            wx0, wy0, wx1, wy1 = windows[i]
            crop_predictor.set_image(np.ascontiguousarray(rgb[wy0:wy1, wx0:wx1]))
            local = boxes[i] - np.array([wx0, wy0, wx0, wy0], dtype=np.float64)
            m, s, _ = crop_predictor.predict(box=local, multimask_output=False, clip_to_box=clip_to_box)
            masks[i, wy0:wy1, wx0:wx1] = np.asarray(m)[0]
            scores[i] = float(np.asarray(s)[0])
    return masks, scores
