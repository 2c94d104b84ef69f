"""Import the official ``segment_anything`` package (PyPI ``segment-anything==1.0``) for tests.

segment_anything imports torchvision in its ``__init__`` (the predictor's transforms and the
automatic mask generator), and this project never installs torchvision. :func:`load` puts small
stand-ins for the three names it needs into ``sys.modules`` just for the import, then removes
them again, so nothing outside the tests ever sees a fake torchvision:

- ``torchvision.transforms.functional.resize`` / ``to_pil_image``, reproduced with PIL the way
  torchvision treats PIL images (bilinear, size given as (h, w));
- ``torchvision.ops.boxes.batched_nms`` / ``box_area``, in plain torch.

If a real torchvision is importable it is used instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import numpy as np
import pytest
import torch

_STUB_NAMES = (
    "torchvision",
    "torchvision.transforms",
    "torchvision.transforms.functional",
    "torchvision.ops",
    "torchvision.ops.boxes",
)


def _to_pil_image(pic: Any, mode: str | None = None) -> Any:
    from PIL import Image

    if isinstance(pic, torch.Tensor):
        arr = pic.detach().cpu().numpy()
        arr = np.transpose(arr, (1, 2, 0)) if arr.ndim == 3 else arr
        if arr.dtype != np.uint8 and np.issubdtype(arr.dtype, np.floating):
            arr = (arr * 255).astype(np.uint8)
    else:
        arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    # An (H, W, 3) uint8 array becomes an RGB image, as in torchvision.
    image = Image.fromarray(arr)
    return image.convert(mode) if mode and image.mode != mode else image


def _resize(
    img: Any, size: Any, interpolation: Any = None, max_size: Any = None, antialias: Any = True
) -> Any:
    from PIL import Image

    if not isinstance(img, Image.Image):
        raise TypeError("the torchvision stand-in only resizes PIL images")
    if isinstance(size, int):
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        size = (new_long, new_short) if w <= h else (new_short, new_long)
    h, w = int(size[0]), int(size[1])
    # torchvision: PIL images resize with img.resize((w, h), BILINEAR); antialias is implicit.
    return img.resize((w, h), Image.BILINEAR)


def _box_area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    order = torch.argsort(scores, descending=True)
    area = _box_area(boxes)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        lt = torch.maximum(boxes[idx, :2], boxes[:, :2])
        rb = torch.minimum(boxes[idx, 2:], boxes[:, 2:])
        wh = (rb - lt).clamp(min=0)
        inter = wh[:, 0] * wh[:, 1]
        iou = inter / (area[idx] + area - inter)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.long)
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    return _nms(boxes + offsets[:, None], scores, iou_threshold)


def _make_stubs() -> dict[str, types.ModuleType]:
    tv = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    ops = types.ModuleType("torchvision.ops")
    boxes = types.ModuleType("torchvision.ops.boxes")
    functional.resize = _resize  # type: ignore[attr-defined]
    functional.to_pil_image = _to_pil_image  # type: ignore[attr-defined]
    boxes.batched_nms = _batched_nms  # type: ignore[attr-defined]
    boxes.box_area = _box_area  # type: ignore[attr-defined]
    tv.transforms = transforms  # type: ignore[attr-defined]
    tv.ops = ops  # type: ignore[attr-defined]
    transforms.functional = functional  # type: ignore[attr-defined]
    ops.boxes = boxes  # type: ignore[attr-defined]
    return {
        "torchvision": tv,
        "torchvision.transforms": transforms,
        "torchvision.transforms.functional": functional,
        "torchvision.ops": ops,
        "torchvision.ops.boxes": boxes,
    }


def load() -> types.ModuleType:
    """Return the official ``segment_anything`` module (skips the test if it is not installed)."""
    if "segment_anything" in sys.modules:
        return sys.modules["segment_anything"]
    if importlib.util.find_spec("segment_anything") is None:
        pytest.skip("segment-anything==1.0 is not installed (pip install segment-anything==1.0)")
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("segment_anything")
    saved = {name: sys.modules.get(name) for name in _STUB_NAMES}
    sys.modules.update(_make_stubs())
    try:
        return importlib.import_module("segment_anything")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
