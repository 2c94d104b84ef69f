"""The model side of the widget: loading models, computing embeddings, decoding prompts.

Everything that touches torch or ``rwkvsam_core`` lives here and is imported lazily by the widget
(napari imports the widget module when the Plugins menu opens; torch must not be imported then).

Threading: :func:`compute_features` runs in an embedding thread (one at a time, cancellable between
encoder blocks, started for each embedding and ended with it); :class:`Segmenter` decodes in one
persistent :class:`LatestJobThread` (the live preview, "segment all boxes", and the torch work of
explicit actions, which the GUI thread waits for), from features handed over by the embedding
thread. They never share a Predictor, only the (stateless) model.

Why the GUI thread runs no torch op and the embedding thread ends: PyTorch's CPU ops run on GNU
OpenMP here, which keeps a team of worker threads for every thread that ran a parallel op. When it
manages more threads than there are CPUs it stops spin-waiting between parallel regions (its
"throttled" mode), so every op of a decode wakes its workers with a system call: with a second team
alive, one decode took 190-240 ms instead of 130-165 ms on a 2-core VM (~50 involuntary context
switches per decode instead of ~1).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._conversion import PromptBatch, centre_boxes

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


def keep_thread_heaps() -> bool:
    """Stop glibc from giving the decode thread's memory back to the kernel after every decode.

    Threads other than the main one allocate from their own glibc arenas, made of 64 MiB heaps; a heap
    that becomes entirely free is unmapped at once, whatever the trim threshold that
    ``rwkvsam_core.tune_allocator`` raised (that one only governs the main arena and the shrinking of
    a heap's top). A decode allocates and frees tens of MiB, so every preview decode in the decode
    thread page-faulted 8-64 MiB of fresh memory back in: 2,000-16,000 page faults, 30-40 ms of a
    ~200 ms decode on a 2-core VM (the same decode on the main thread: none after the first). A top pad
    of 128 MiB (``M_TOP_PAD``, more than a heap) makes glibc keep those heaps. Like ``tune_allocator``
    it is a setting of the whole process, and its cost is resident memory: the freed memory of each
    thread arena stays with the process, as it does for the main arena. Off with
    ``RWKVSAM_TUNE_ALLOCATOR=0``, or off Linux/glibc.

    Returns True if the setting is in effect.
    """
    from rwkvsam_core.allocator import keep_thread_heaps as keep

    return keep()


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
    keep_thread_heaps()
    with _LOCK:
        _MODELS[spec] = model
        while len(_MODELS) > _MODELS_MAX:
            _MODELS.popitem(last=False)
    return model


# --------------------------------------------------------------------------- cancellable embeddings
# The encoder is one long call into torch. To stop a stale embedding early, every encoder submodule
# gets a forward pre-hook that asks the calling thread's ``cancelled`` callback (if it set one) and
# raises EmbeddingCancelled. Decoding threads set no callback, so the hooks never stop a decode.
# The same hooks count the encoder modules that have run, for a progress bar (EncoderProgress).
_THREAD_STATE = threading.local()
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> number of hooked modules
_DECODER_PARTS = ("prompt_encoder", "mask_decoder")


class EncoderProgress:
    """How far an embedding has got: the share of the encoder's modules that have run so far.

    Written by the embedding thread (see :func:`tracking_progress`), read by the GUI thread.
    """

    def __init__(self) -> None:
        self.total = 0
        self._seen: set[int] = set()

    @property
    def fraction(self) -> float:
        """0.0 .. 1.0 (stays 0.0 when the features come from the cache)."""
        return min(1.0, len(self._seen) / self.total) if self.total else 0.0


@contextlib.contextmanager
def tracking_progress(progress: EncoderProgress | None):
    """Within this block, embeddings computed by the calling thread report to ``progress``."""
    previous = getattr(_THREAD_STATE, "progress", None)
    _THREAD_STATE.progress = progress
    try:
        yield progress
    finally:
        _THREAD_STATE.progress = previous


def _cancel_point(module, args) -> None:
    progress = getattr(_THREAD_STATE, "progress", None)
    if progress is not None:
        progress._seen.add(id(module))
    check = getattr(_THREAD_STATE, "cancelled", None)
    if check is not None and check():
        raise EmbeddingCancelled("stale embedding stopped")


def _install_cancel_points(model) -> None:
    """Add the cancellation pre-hook to every encoder submodule of ``model`` (once per model).

    The progress total is the number of those modules one encoder pass really calls (containers and
    modules whose weights are used without calling them never run), counted on a 64 x 64 input.
    """
    with _LOCK:
        if model in _HOOKED:
            return
        count = 0
        for name, module in model.named_modules():
            if name and name.split(".")[0] not in _DECODER_PARTS:
                module.register_forward_pre_hook(_cancel_point)
                count += 1
        _HOOKED[model] = count
        probe = EncoderProgress()
        try:
            import torch

            with tracking_progress(probe), torch.inference_mode():
                model.encode_image(torch.zeros(1, 3, 64, 64, device=model.device))
        except Exception:  # noqa: BLE001 - an estimate is enough for a progress bar
            logger.debug("progress probe failed; counting every encoder module", exc_info=True)
        else:
            _HOOKED[model] = len(probe._seen) or count


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

    Progress goes to the :class:`EncoderProgress` of an enclosing :func:`tracking_progress` block.
    """
    from rwkvsam_core import Predictor, to_rgb_uint8

    model = load_model(spec)
    progress = getattr(_THREAD_STATE, "progress", None)
    if progress is not None:
        progress.total = _HOOKED.get(model, 0)
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
    """One persistent thread that runs submitted jobs, newest first: a replaceable job still waiting
    when a newer one arrives is dropped (only the latest prompts matter for a preview).

    Jobs submitted with ``replaceable=False`` (an explicit action such as "segment all boxes") are
    never dropped: they run in submission order, before a waiting replaceable job.

    The thread lives as long as the widget, so torch's per-thread state (the OpenMP thread team that
    serves the calling thread) is created once instead of once per decode. It runs at normal priority:
    a decode is interactive work (the embedding worker is the one that runs at lower priority).
    Jobs take no arguments and deliver their own results (they must not raise).
    """

    def __init__(self, name: str = "rwkvsam-decode") -> None:
        self._cond = threading.Condition()
        self._job: Callable[[], None] | None = None
        self._kept: list[Callable[[], None]] = []
        self._running = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None], replaceable: bool = True) -> bool:
        """Queue ``job``; returns True if it replaced a replaceable job that had not started yet."""
        with self._cond:
            if self._closed:
                raise RuntimeError("the decode thread was closed")
            if not replaceable:
                self._kept.append(job)
                self._cond.notify()
                return False
            dropped = self._job is not None
            self._job = job
            self._cond.notify()
            return dropped

    def in_thread(self) -> bool:
        """True when called from this decode thread (a job)."""
        return threading.current_thread() is self._thread

    @property
    def busy(self) -> bool:
        """True while a job waits or runs."""
        with self._cond:
            return self._running or self._job is not None or bool(self._kept)

    def close(self, timeout: float | None = None) -> None:
        """Drop the waiting jobs, let a running one finish, end the thread (join up to ``timeout`` s)."""
        with self._cond:
            self._closed = True
            self._job = None
            self._kept.clear()
            self._cond.notify()
        if timeout is None or timeout > 0:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._job is None and not self._kept and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                if self._kept:
                    job = self._kept.pop(0)
                else:
                    job, self._job = self._job, None
                self._running = True
            try:
                job()
            except Exception:  # a job must deliver its own errors; never let the thread die
                logger.exception("RWKV-SAM: a background decode failed")
            finally:
                with self._cond:
                    self._running = False


class MaskCandidates:
    """Candidate masks of N objects (K each) at the image's full resolution, upsampled on demand.

    The decoder answers with low-resolution logits ``(N, K, S/4, S/4)``; upsampling a candidate to the
    image (two bilinear resizes of a float map, then a threshold) costs as much for each candidate,
    and grows with the image. Only the candidates that are shown or committed are upsampled (the best
    one of each object right after the decode, in the decode thread), the others when asked for
    (next mask). The masks equal ``Predictor.predict_torch``'s, bit for bit.

    Thread-safe: the decode thread fills it, the GUI thread reads it afterwards.
    """

    def __init__(self, low_res, input_size: tuple[int, int], original_size: tuple[int, int], image_size: int):
        self._low_res = low_res  # torch.Tensor (N, K, s, s) on the model's device
        self._input_size = tuple(input_size)
        self._original_size = tuple(original_size)
        self._image_size = int(image_size)
        self._full: dict[tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, K, H, W)``, the shape of all candidates at full resolution."""
        n, k = self._low_res.shape[:2]
        return (int(n), int(k), *self._original_size)

    def __len__(self) -> int:
        return int(self._low_res.shape[0])

    def missing(self, chosen: Sequence[int]) -> bool:
        """True if ``get(chosen)`` has to upsample (torch work), False if it only looks them up."""
        with self._lock:
            return any((i, int(c)) not in self._full for i, c in enumerate(chosen))

    def get(self, chosen: Sequence[int]) -> np.ndarray:
        """Candidate ``chosen[i]`` of every object ``i``: ``(N, H, W)`` bool (upsampled if needed)."""
        import torch

        from rwkvsam_core import postprocess_masks
        from rwkvsam_core.predictor import MASK_THRESHOLD

        chosen = [int(c) for c in chosen]
        n, k, h, w = self.shape
        if len(chosen) != n or any(not 0 <= c < k for c in chosen):
            raise ValueError(f"need one candidate index in 0..{k - 1} for each of {n} objects, got {chosen}")
        with self._lock:
            missing = [(i, c) for i, c in enumerate(chosen) if (i, c) not in self._full]
            # as Predictor.predict_torch: full-resolution float maps of many objects go in chunks
            chunk = max(1, int(2**27 // max(1, h * w)))
            for start in range(0, len(missing), chunk):
                part = missing[start : start + chunk]
                with torch.inference_mode():
                    rows = torch.as_tensor([i for i, _ in part], device=self._low_res.device)
                    cols = torch.as_tensor([c for _, c in part], device=self._low_res.device)
                    logits = postprocess_masks(
                        self._low_res[rows, cols][:, None],
                        self._input_size,
                        self._original_size,
                        self._image_size,
                    )
                    masks = (logits[:, 0] > MASK_THRESHOLD).cpu().numpy()
                for (i, c), mask in zip(part, masks, strict=True):
                    self._full[(i, c)] = mask
            out = np.empty((n, h, w), dtype=bool)
            for i, c in enumerate(chosen):
                out[i] = self._full[(i, c)]
        return out

    def all(self) -> np.ndarray:
        """Every candidate: ``(N, K, H, W)`` bool."""
        n, k = self.shape[:2]
        return np.stack([self.get([c] * n) for c in range(k)], axis=1)


def clip_masks_to_boxes(masks: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """Zero every mask outside its box: the pixels whose centre lies inside the box are kept.

    Args:
        masks: ``(N, H, W)`` bool.
        boxes: ``(N, 4)`` XYXY in napari's pixel convention (integer = pixel centre), or None (no
            clipping: ``masks`` is returned as is).

    The core's ``clip_masks_to_boxes`` keeps every pixel the box touches in SAM's convention (columns
    floor(x0) .. ceil(x1)), up to one pixel more on each side than napari draws the rectangle; the
    boxes are first turned into the inclusive pixel ranges whose centres lie inside them
    (:func:`~napari_plugin._conversion.centre_boxes`), on which both conventions agree.
    """
    if boxes is None:
        return masks
    from rwkvsam_core.predictor import clip_masks_to_boxes as core_clip

    masks = np.asarray(masks, dtype=bool)
    if len(boxes) != len(masks):
        raise ValueError(f"{len(masks)} masks but {len(boxes)} boxes")
    pixel_boxes, empty = centre_boxes(boxes)
    out = core_clip(masks[:, None], pixel_boxes)[:, 0]
    out[empty] = False
    return out


class FixedMasks:
    """Masks already at full resolution, one candidate an object: the same interface as
    :class:`MaskCandidates` (what zoomed decoding returns: each box decoded in its own window)."""

    def __init__(self, masks: np.ndarray) -> None:
        self._masks = np.asarray(masks, dtype=bool)  # (N, 1, H, W)
        if self._masks.ndim != 4 or self._masks.shape[1] != 1:
            raise ValueError(f"expected (N, 1, H, W) masks, got {self._masks.shape}")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(v) for v in self._masks.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return int(self._masks.shape[0])

    def missing(self, chosen: Sequence[int]) -> bool:
        return False

    def get(self, chosen: Sequence[int]) -> np.ndarray:
        chosen = [int(c) for c in chosen]
        if len(chosen) != len(self) or any(c != 0 for c in chosen):
            raise ValueError(f"need candidate 0 for each of {len(self)} objects, got {chosen}")
        return self._masks[:, 0].copy()

    def all(self) -> np.ndarray:
        return self._masks.copy()


def zoomable(batch: PromptBatch) -> bool:
    """True when ``batch`` is boxes alone (no clicks): what zoomed decoding handles."""
    return batch.boxes is not None and batch.point_coords is None and len(batch.boxes) > 0


class Segmenter:
    """Decoder-only prediction from features computed elsewhere.

    Stateless between calls (a fresh ``Predictor`` per call shares the model), so it may run in a
    worker thread while the GUI thread uses it too.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.model = load_model(spec)

    def predict(
        self, features, batch: PromptBatch, multimask: bool = True
    ) -> tuple[MaskCandidates, np.ndarray]:
        """All objects of ``batch`` in one decoder pass on ``features`` (``ImageFeatures``).

        Returns:
            masks: the ``(N, K, H, W)`` candidates at the plane's full resolution
                (:class:`MaskCandidates`; the best-scored candidate of each object is upsampled
                already), scores ``(N, K)`` float32.
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
            low_res, iou = self.model.decode(
                p.features.tensors,
                point_coords=coords,
                point_labels=labels,
                boxes=boxes,
                multimask_output=multimask,
            )
        scores = iou.float().cpu().numpy()
        masks = MaskCandidates(low_res, p.input_size, p.original_size, self.model.image_size)
        masks.get(np.argmax(scores, axis=1))
        return masks, scores

    def predict_zoomed(
        self, features, plane: np.ndarray, contrast_limits, batch: PromptBatch, target: float | None = None
    ) -> tuple[FixedMasks, np.ndarray]:
        """Boxes alone, each small one decoded in a window zoomed so it spans ``target`` input pixels
        (default ``rwkvsam_core.zoom.DEFAULT_ZOOM_TARGET``; one encoder pass per zoomed box, windows
        never cached); boxes that need no zoom are decoded on ``features`` (the plane's). ``plane`` and
        ``contrast_limits`` are what the features were computed from. Returns masks ``(N, 1, H, W)``
        and scores ``(N, 1)``."""
        from rwkvsam_core import Predictor
        from rwkvsam_core.zoom import DEFAULT_ZOOM_TARGET, predict_boxes_zoomed

        if not zoomable(batch):
            raise ValueError("zoomed decoding takes boxes alone (no clicks)")
        p = Predictor(self.model)
        p.set_features(features)
        target = DEFAULT_ZOOM_TARGET if target is None else target
        masks, scores = predict_boxes_zoomed(
            p,
            np.asarray(plane),
            batch.boxes,
            target=target,
            contrast_limits=contrast_limits,
            image_is_set=True,
        )
        return FixedMasks(masks[:, None]), scores[:, None].astype(np.float32)
