"""RWKV-SAM: promptable segmentation with a linear-time RWKV backbone.

Public API::

    from rwkvsam_core import build_model, Predictor
    model = build_model("rwkvsam_t", checkpoint=None, device="cpu")
    predictor = Predictor(model)
    predictor.set_image(image)                       # (H, W, 3) uint8 RGB
    masks, scores, low_res = predictor.predict(box=np.array([x0, y0, x1, y1]))
"""

from .allocator import tune_allocator
from .build import DEFAULT_MODEL, MODEL_NAMES, build_model, default_checkpoint
from .cache import EmbeddingCache, image_hash, model_fingerprint
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .features import ImageFeatures
from .predictor import Predictor, postprocess_masks
from .transforms import ResizeLongestSide, to_rgb_uint8

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_NAMES",
    "CheckpointError",
    "EmbeddingCache",
    "ImageFeatures",
    "Predictor",
    "ResizeLongestSide",
    "build_model",
    "default_checkpoint",
    "image_hash",
    "load_checkpoint",
    "model_fingerprint",
    "postprocess_masks",
    "save_checkpoint",
    "to_rgb_uint8",
    "tune_allocator",
    "__version__",
]
