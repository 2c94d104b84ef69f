"""The model side of the widget: loading models, computing embeddings, decoding prompts.

Everything that touches torch or ``rwkvsam_core`` lives here and is imported lazily by the widget
(napari imports the widget module when the Plugins menu opens; torch must not be imported then).

Threading: :func:`compute_features` runs in an embedding worker thread (one at a time, cancellable
between encoder blocks); :class:`Segmenter` decodes in one persistent :class:`LatestJobThread` (the
live preview) or on the GUI thread (explicit actions), from features handed over by the embedding
worker. They never share a Predictor, only the (stateless) model.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._conversion import PromptBatch

logger = logging.getLogger(__name__)

CACHE_ENV = "RWKVSAM_CACHE_DIR"


@dataclass(frozen=True)
class ModelSpec:
    """What identifies a loaded model: variant name, checkpoint path ('' = default), device, input size."""

    name: str
    checkpoint: str = ""
    device: str = "auto"
    image_size: int | None = None

    def label(self) -> str:
        ckpt = f", {Path(self.checkpoint).name}" if self.checkpoint else ""
        size = f", {self.image_size}px" if self.image_size else ""
        return f"{self.name}{ckpt}{size} on {self.device}"


def default_cache_dir() -> Path:
    """Directory of the on-disk embedding cache: ``$RWKVSAM_CACHE_DIR``, else the user cache dir."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("rwkvsam")) / "embeddings"
    except ImportError:
        return Path.home() / ".cache" / "rwkvsam" / "embeddings"


class EmbeddingCancelled(Exception):  # noqa: N818 (not an error: the job was stopped on purpose)
    """Raised inside :func:`compute_features` when its ``cancelled`` callback turns true."""


_MODELS: OrderedDict[ModelSpec, object] = OrderedDict()
_MODELS_MAX = 2
_LOCK = threading.Lock()
_CACHE = None


def embedding_cache():
    """The process-wide ``rwkvsam_core.EmbeddingCache`` (memory LRU + disk under :func:`default_cache_dir`)."""
    global _CACHE
    with _LOCK:
        if _CACHE is None:
            from rwkvsam_core import EmbeddingCache

            try:
                _CACHE = EmbeddingCache(max_items=8, cache_dir=default_cache_dir())
            except OSError as err:
                logger.warning(
                    "embedding disk cache unavailable (%s); keeping embeddings in memory only", err
                )
                _CACHE = EmbeddingCache(max_items=8)
        return _CACHE


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available else 'cpu'; 'cuda' without a GPU raises a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was chosen but PyTorch sees no CUDA GPU; choose 'cpu' or 'auto'")
    return device


def load_model(spec: ModelSpec):
    """Build (or reuse) the model for ``spec``; keeps the last two models loaded in the process."""
    with _LOCK:
        model = _MODELS.get(spec)
        if model is not None:
            _MODELS.move_to_end(spec)
            return model
    from rwkvsam_core import build_model

    if spec.checkpoint and not Path(spec.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint file not found: {spec.checkpoint}")
    logger.info("loading model %s", spec.label())
    model = build_model(
        spec.name,
        checkpoint=spec.checkpoint or None,
        device=resolve_device(spec.device),
        image_size=spec.image_size,
    )
    _install_cancel_points(model)
    with _LOCK:
        _MODELS[spec] = model
        while len(_MODELS) > _MODELS_MAX:
            _MODELS.popitem(last=False)
    return model


# --------------------------------------------------------------------------- cancellable embeddings
# The encoder is one long call into torch. To stop a stale embedding early, every encoder submodule
# gets a forward pre-hook that asks the calling thread's ``cancelled`` callback (if it set one) and
# raises EmbeddingCancelled. Decoding threads set no callback, so the hooks never stop a decode.
_THREAD_STATE = threading.local()
_HOOKED: weakref.WeakSet = weakref.WeakSet()
_DECODER_PARTS = ("prompt_encoder", "mask_decoder")


def _cancel_point(module, args) -> None:
    check = getattr(_THREAD_STATE, "cancelled", None)
    if check is not None and check():
        raise EmbeddingCancelled("stale embedding stopped")


def _install_cancel_points(model) -> None:
    """Add the cancellation pre-hook to every encoder submodule of ``model`` (once per model)."""
    with _LOCK:
        if model in _HOOKED:
            return
        for name, module in model.named_modules():
            if name and name.split(".")[0] not in _DECODER_PARTS:
                module.register_forward_pre_hook(_cancel_point)
        _HOOKED.add(model)


def compute_features(
    spec: ModelSpec,
    plane: np.ndarray,
    contrast_limits: tuple[float, float] | None,
    cancelled: Callable[[], bool] | None = None,
):
    """Features of one 2-D plane (``(H, W)`` or ``(H, W, C)``, any dtype), through the embedding cache.

    Runs in a worker thread. Returns ``rwkvsam_core.ImageFeatures`` (on the model's device).

    Args:
        cancelled: polled before every encoder block; when it returns True the computation stops with
            :class:`EmbeddingCancelled` (nothing is cached).
    """
    from rwkvsam_core import Predictor, to_rgb_uint8

    model = load_model(spec)
    rgb = to_rgb_uint8(np.asarray(plane), contrast_limits)
    predictor = Predictor(model, cache=embedding_cache())
    previous = getattr(_THREAD_STATE, "cancelled", None)
    _THREAD_STATE.cancelled = cancelled
    try:
        if cancelled is not None and cancelled():
            raise EmbeddingCancelled("stale embedding stopped")
        predictor.set_image(rgb)
    finally:
        _THREAD_STATE.cancelled = previous
    return predictor.get_features()


# ------------------------------------------------------------------------------- preview decoding
class LatestJobThread:
    """One persistent thread that runs submitted jobs, newest first: a job still waiting when a newer
    one arrives is dropped (only the latest prompts matter for a preview).

    The thread lives as long as the widget, so torch's per-thread state (the OpenMP thread team that
    serves the calling thread) is created once instead of once per decode. It runs at normal priority:
    a decode is interactive work (the embedding worker is the one that runs at lower priority).
    Jobs take no arguments and deliver their own results (they must not raise).
    """

    def __init__(self, name: str = "rwkvsam-decode") -> None:
        self._cond = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._running = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> bool:
        """Queue ``job``; returns True if it replaced a job that had not started yet."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode thread was closed")
            dropped = self._job is not None
            self._job = job
            self._cond.notify()
            return dropped

    @property
    def busy(self) -> bool:
        """True while a job waits or runs."""
        with self._cond:
            return self._running or self._job is not None

    def close(self, timeout: float | None = None) -> None:
        """Drop a waiting job, let a running one finish, end the thread (join up to ``timeout`` s)."""
        with self._cond:
            self._closed = True
            self._job = None
            self._cond.notify()
        if timeout is None or timeout > 0:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job, self._job = self._job, None
                self._running = True
            try:
                job()
            except Exception:  # a job must deliver its own errors; never let the thread die
                logger.exception("RWKV-SAM: a background decode failed")
            finally:
                with self._cond:
                    self._running = False


class Segmenter:
    """Decoder-only prediction from features computed elsewhere.

    Stateless between calls (a fresh ``Predictor`` per call shares the model), so it may run in a
    worker thread while the GUI thread uses it too.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = load_model(spec)

    def predict(self, features, batch: PromptBatch, multimask: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """All objects of ``batch`` in one ``predict_torch`` call on ``features`` (``ImageFeatures``).

        Returns:
            masks ``(N, K, H, W)`` bool at the plane's full resolution, scores ``(N, K)`` float32.
        """
        import torch

        from rwkvsam_core import Predictor

        p = Predictor(self.model)
        p.set_features(features)
        dev = p.device
        coords = labels = boxes = None
        if batch.point_coords is not None:
            coords = p.transform.apply_coords_torch(
                torch.as_tensor(batch.point_coords, dtype=torch.float32, device=dev), p.original_size
            )
            labels = torch.as_tensor(batch.point_labels, dtype=torch.int64, device=dev)
        if batch.boxes is not None:
            boxes = p.transform.apply_boxes_torch(
                torch.as_tensor(batch.boxes, dtype=torch.float32, device=dev), p.original_size
            )
        with torch.inference_mode():
            masks, iou, _ = p.predict_torch(coords, labels, boxes, None, multimask_output=multimask)
        return masks.cpu().numpy().astype(bool, copy=False), iou.float().cpu().numpy()
