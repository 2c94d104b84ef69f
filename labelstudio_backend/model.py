"""Process-level model cache and the segmentation logic of the backend.

One :class:`ModelManager` per process (``get_manager``). The model is built lazily on the first
prediction (never in /setup, never before gunicorn forks). The served weights and the model
version live in ``MODEL_DIR/state.json`` so every worker process agrees on them; after a
fine-tuning run rewrites that file, each process loads the new weights on its next request while
the old model keeps answering until the new one is ready.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .click_decode import ClickDecode
from .convert import (
    BoxPrompt,
    Click,
    InteractivePrompt,
    box_is_degenerate,
    clamp_score,
    clicks_inside_box,
    object_start,
    prefix_digests,
    touched_pixels,
)
from .settings import Settings

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"


def atomic_write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` atomically (temporary file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _file_digest(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_identity(settings: Settings) -> str:
    """A string naming the configured base model (name, checkpoint, input size)."""
    return f"{settings.model_name}|{settings.checkpoint or ''}|{settings.image_size or ''}"


def base_version(settings: Settings) -> str:
    """Model version of the configured base weights, computed without loading the model.

    ``<name>-<first 8 hex of the checkpoint's sha256>``, or ``<name>-init`` for the deterministic
    random initialisation used when no weights exist.
    """
    from rwkvsam_core import default_checkpoint

    ckpt = settings.checkpoint or default_checkpoint(settings.model_name)
    size = f"-{settings.image_size}" if settings.image_size else ""
    if ckpt is None:
        return f"{settings.model_name}{size}-init"
    return f"{settings.model_name}{size}-{_file_digest(ckpt)[:8]}"


@dataclass
class ServedModel:
    """What a worker serves right now: the weights file (None = base) and their version."""

    version: str
    checkpoint: str | None
    generation: int = 0


def current_served(settings: Settings) -> ServedModel:
    """The model every worker should serve, from ``MODEL_DIR/state.json`` (or the base model)."""
    state = read_json(Path(settings.model_dir) / STATE_FILE) or {}
    if state.get("base") == base_identity(settings) and state.get("version") and state.get("checkpoint"):
        if Path(state["checkpoint"]).is_file():
            return ServedModel(
                str(state["version"]), str(state["checkpoint"]), int(state.get("generation", 0))
            )
        logger.error("fine-tuned weights %s are missing: serving the base model", state["checkpoint"])
    return ServedModel(base_version(settings), settings.checkpoint, 0)


class ModelManager:
    """Lazily built model + embedding cache + per-image locks, shared by the threads of a process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._model: Any = None
        self._served: ServedModel | None = None
        self._state_stamp: tuple[float, int] | None = None
        self._image_locks: dict[str, threading.Lock] = {}
        self._cache: Any = None
        # click grouping decisions: (image key, digest of a click list) -> start of its current object
        self._groups: OrderedDict[tuple[str, bytes], int] = OrderedDict()
        self._groups_lock = threading.Lock()
        self.stats = {"interactive": 0, "batch_boxes": 0, "encodes": 0, "reloads": 0, "decodes": 0}

    # ------------------------------------------------------------------ model
    def _state_changed(self) -> bool:
        path = Path(self.settings.model_dir) / STATE_FILE
        try:
            st = path.stat()
            stamp = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        changed = stamp != self._state_stamp
        self._state_stamp = stamp
        return changed

    @property
    def version(self) -> str:
        """The version of the weights served now (does not load the model)."""
        if self._served is None or self._state_changed():
            self._served = current_served(self.settings)
        return self._served.version

    def _build(self, served: ServedModel) -> Any:
        import torch

        from rwkvsam_core import build_model

        logger.info(
            "loading %s (version %s, weights %s)",
            self.settings.model_name,
            served.version,
            served.checkpoint or "none",
        )
        with torch.random.fork_rng(devices=[]):
            # Without weights the model is randomly initialised: seed it so every worker and every
            # restart serves the same model under the same "-init" version.
            torch.manual_seed(0)
            model = build_model(
                self.settings.model_name,
                checkpoint=served.checkpoint,
                device=self.settings.device,
                image_size=self.settings.image_size,
            )
        return model

    def get_model(self) -> tuple[Any, str]:
        """The model to use now and its version; builds it on first use, reloads after fine-tuning."""
        version = self.version
        if self._model is not None and self._model_version == version:
            return self._model, version
        with self._lock:
            served = self._served or current_served(self.settings)
            if self._model is None or self._model_version != served.version:
                try:
                    model = self._build(served)
                except Exception:
                    if self._model is None:
                        raise
                    logger.exception(
                        "loading %s failed: keeping version %s", served.version, self._model_version
                    )
                    return self._model, self._model_version
                if self._model is not None:
                    self.stats["reloads"] += 1
                self._model, self._model_version = model, served.version
            return self._model, self._model_version

    _model_version: str = ""

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from rwkvsam_core import EmbeddingCache

            with self._lock:
                if self._cache is None:
                    self._cache = EmbeddingCache(
                        max_items=self.settings.cache_items,
                        cache_dir=Path(self.settings.model_dir) / "embeddings",
                    )
        return self._cache

    def predictor_for(self, image: np.ndarray) -> tuple[Any, str]:
        """A fresh Predictor with ``image`` set (features from the cache when possible).

        Each request gets its own Predictor (they are cheap: the model is shared), so concurrent
        requests never race on predictor state. A per-image lock makes concurrent requests for the
        same new image wait for one encoder pass instead of each computing it.
        """
        predictor, version, _ = self._predictor_and_key(image)
        return predictor, version

    def _predictor_and_key(self, image: np.ndarray) -> tuple[Any, str, str]:
        """:meth:`predictor_for` plus the key naming (model version, image) for per-image memos."""
        from rwkvsam_core import Predictor, image_hash

        model, version = self.get_model()
        key = f"{version}-{image_hash(image)}"
        with self._lock:
            lock = self._image_locks.setdefault(key, threading.Lock())
            if len(self._image_locks) > 256:
                for k in list(self._image_locks)[:128]:
                    if k != key and not self._image_locks[k].locked():
                        del self._image_locks[k]
        predictor = Predictor(model, cache=self.cache)
        with lock:
            misses = self.cache.misses
            predictor.set_image(image)
            if self.cache.misses != misses:
                self.stats["encodes"] += 1
        return predictor, version, key

    # ------------------------------------------------------------------ segmentation
    def segment_interactive(
        self, image: np.ndarray, prompt: InteractivePrompt
    ) -> tuple[np.ndarray | None, float, str]:
        """One mask for the object the user is working on.

        A box is combined with the clicks inside it (one decoder pass). Clicks alone are grouped
        by :meth:`object_clicks`; the object's clicks are decoded together, or, when the object has
        a single click, that click's best of three candidate masks is the answer.

        Returns:
            (mask (H, W) bool or None when there is nothing to segment, score, model version).
        """
        predictor, version, key = self._predictor_and_key(image)
        self.stats["interactive"] += 1
        if prompt.box is not None:
            box = prompt.box.box
            if box_is_degenerate(box):
                logger.info("interactive box %s is degenerate: empty result", box.tolist())
                return None, 0.0, version
            clicks = clicks_inside_box(prompt.clicks, box)
            if not clicks and self.settings.zoom_target > 0:
                masks, scores = self._zoomed(predictor, image, box[None])
            else:
                coords, labels = _click_arrays(clicks)
                masks, scores, _ = predictor.predict(
                    point_coords=coords, point_labels=labels, box=box, multimask_output=False
                )
                self.stats["decodes"] += 1
            mask, score = masks[0], clamp_score(scores[0])
            if self.settings.clip_to_box:
                mask = clip_to_boxes(mask[None, None], box[None])[0, 0]
            return mask, score, version
        clicks = prompt.clicks
        if not any(c.positive for c in clicks):
            logger.info("only negative clicks: nothing to segment")
            return None, 0.0, version
        kept, single = self.object_clicks(predictor, clicks, key, window=self.settings.max_clicks)
        kept = kept[-self.settings.max_clicks :]
        if not any(c.positive for c in kept):
            logger.info("the newest %d clicks are negative: nothing to segment", len(kept))
            return None, 0.0, version
        if len(kept) == 1:  # one click: the best of its three candidates (maybe decoded already)
            decoded = single if single is not None else self.decode_click(predictor, kept[0])
            from rwkvsam_core import postprocess_masks

            logits = postprocess_masks(
                decoded.low_res(), predictor.input_size, predictor.original_size, predictor.model.image_size
            )
            return (logits[0, 0] > 0).cpu().numpy(), clamp_score(decoded.score), version
        coords, labels = _click_arrays(kept)
        masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=False)
        self.stats["decodes"] += 1
        return masks[0], clamp_score(scores[0]), version

    def decode_click(self, predictor: Any, click: Click) -> ClickDecode:
        """One click alone, decoded once: the best (highest predicted IoU) of its three candidates.

        One decoder pass, whose mask head runs only where it is asked (see :mod:`.click_decode`):
        ``.contains(pixels)`` decides membership from a few small windows, ``.low_res()`` gives the
        whole low-res mask (1, 1, S/4, S/4), bit-identical to ``model.decode``; ``.score`` is the
        candidate's predicted IoU.
        """
        import torch

        from .click_decode import decode_click

        coords = predictor.transform.apply_coords(np.array([[[click.x, click.y]]]), predictor.original_size)
        decoded = decode_click(
            predictor.model,
            predictor.get_features().tensors,
            torch.as_tensor(coords, dtype=torch.float32, device=predictor.device),
        )
        self.stats["decodes"] += 1
        return decoded

    @staticmethod
    def low_res_pixels(predictor: Any, clicks: list[Click]) -> np.ndarray:
        """(P, 2) int rows, cols of the low-res (S/4) mask pixels under ``clicks``."""
        side = predictor.model.image_size // 4
        xy = predictor.transform.apply_coords(
            np.array([[c.x, c.y] for c in clicks], dtype=np.float64), predictor.original_size
        ) * (side / predictor.model.image_size)
        return np.array(
            [[min(max(int(y), 0), side - 1), min(max(int(x), 0), side - 1)] for x, y in xy], dtype=np.int64
        ).reshape(-1, 2)

    def click_joins(self, predictor: Any, decoded: ClickDecode, owners: list[Click]) -> bool:
        """True when the mask of a click alone (``decoded``) contains one of ``owners``."""
        return decoded.contains(self.low_res_pixels(predictor, owners))

    def object_clicks(
        self, predictor: Any, clicks: list[Click], image_key: str, window: int | None = None
    ) -> tuple[list[Click], ClickDecode | None]:
        """Which clicks belong to the object the user is working on (the rule of the README).

        Rule: the clicks are read oldest first and grouped into objects as they were made. A
        negative click joins the current object (it corrects it). A positive click joins the
        current object when the mask of that click alone (the best of its three candidates)
        contains one of the object's positive clicks, or when the object has no positive click
        yet; otherwise it starts a new object, and the clicks before it (negative ones included)
        belong to earlier objects. The object of the newest click is the answer.

        Cost: each positive click is decoded alone once, when it is new: the decision for every
        prefix of the click list is remembered per image and model version, so a request that adds
        one click to the previous request's clicks decodes that click alone (positive clicks
        only), and when it starts a new object its mask is the answer. A request whose earlier
        clicks were never seen by this process (another worker, a restart) decodes its earlier
        positive clicks one by one, with the same result (up to ``window`` clicks).

        Args:
            clicks: the request's clicks, oldest first, at least one positive.
            image_key: names the model version and the image (decisions are remembered under it).
            window: when no earlier decision is known, only the newest ``window`` clicks are
                decided (the oldest of them starts the object): bounds the work of a cold request.
        Returns:
            (the current object's clicks oldest first, the :class:`ClickDecode` of the click that
            starts the object when it was decoded here, else None).
        """
        n = len(clicks)
        if not any(c.positive for c in clicks):
            raise ValueError("object_clicks needs at least one positive click")
        digests = prefix_digests(clicks)  # digests[j - 1] names clicks[:j]
        start, first = 0, 1
        with self._groups_lock:
            for j in range(n, 1, -1):
                known = self._groups.get((image_key, digests[j - 1]))
                if known is not None:
                    self._groups.move_to_end((image_key, digests[j - 1]))
                    start, first = known, j
                    break
        if first == 1 and window and n > window:
            start, first = n - window, n - window + 1
        decoded: dict[int, ClickDecode] = {}

        def joins(i: int, owners: list[Click]) -> bool:
            dec = self.decode_click(predictor, clicks[i])
            if self.click_joins(predictor, dec, owners):
                return True
            decoded.clear()  # only the newest click that starts an object can be the answer
            decoded[i] = dec
            return False

        def record(j: int, s: int) -> None:
            with self._groups_lock:
                self._groups[(image_key, digests[j - 1])] = s
                self._groups.move_to_end((image_key, digests[j - 1]))
                while len(self._groups) > self.GROUP_MEMO:
                    self._groups.popitem(last=False)

        start = object_start(clicks, joins, start=start, first=first, record=record)
        return list(clicks[start:]), decoded.get(start)

    GROUP_MEMO = 4096

    def segment_boxes(
        self, image: np.ndarray, boxes: list[BoxPrompt], chunk: int = 64
    ) -> tuple[list[np.ndarray], list[str | None], list[float], str]:
        """Masks for many boxes on one image: one decoder pass per ``chunk`` boxes.

        Degenerate boxes are skipped (logged). Returns (masks, labels, scores, version).
        """
        predictor, version = self.predictor_for(image)
        good = [b for b in boxes if not box_is_degenerate(b.box)]
        if len(good) < len(boxes):
            logger.info("%d degenerate box(es) skipped", len(boxes) - len(good))
        out_m: list[np.ndarray] = []
        out_s: list[float] = []
        if good and self.settings.zoom_target > 0:  # small boxes each in their own zoomed window
            arr = np.stack([b.box for b in good])
            masks, scores = self._zoomed(predictor, image, arr)
            if self.settings.clip_to_box:
                masks = clip_to_boxes(masks[:, None], arr)[:, 0]
            out_m, out_s = list(masks), [clamp_score(s) for s in scores]
        else:
            for start in range(0, len(good), chunk):
                part = good[start : start + chunk]
                arr = np.stack([b.box for b in part])
                masks, scores, _ = predictor.predict(box=arr, multimask_output=False)
                self.stats["decodes"] += 1
                masks = np.asarray(masks).reshape(len(part), -1, *image.shape[:2])
                scores = np.asarray(scores).reshape(len(part), -1)
                if self.settings.clip_to_box:
                    masks = clip_to_boxes(masks[:, :1], arr)
                for m, s in zip(masks, scores, strict=True):
                    out_m.append(m[0])
                    out_s.append(clamp_score(s[0]))
        self.stats["batch_boxes"] += len(good)
        return out_m, [b.label for b in good], out_s, version

    def _zoomed(self, predictor: Any, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Single masks of ``boxes`` decoded in zoomed windows (``ZOOM_TARGET``; boxes that need no
        zoom use ``predictor``, which holds ``image``). Windows are encoded without the cache."""
        from rwkvsam_core.zoom import predict_boxes_zoomed

        masks, scores = predict_boxes_zoomed(
            predictor, image, boxes, target=self.settings.zoom_target, image_is_set=True
        )
        self.stats["decodes"] += len(boxes)
        return masks, scores


def _click_arrays(clicks: list[Click]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not clicks:
        return None, None
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float64)
    labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
    return coords, labels


def clip_to_boxes(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Clear the pixels of masks (N, K, H, W) that their Label Studio box (N, 4) does not touch.

    A Label Studio rectangle is continuous geometry (pixel i spans [i, i + 1)), so a box touches
    pixel columns floor(x0) .. ceil(x1) - 1. The core's ``clip_masks_to_boxes`` reads a box as
    inclusive pixel indices (a mask's extreme pixels, as SAM's boxes), which would keep one more
    column and row for these boxes: it is given the touched pixels (:func:`touched_pixels`).
    Boxes must be at least one pixel wide and high (degenerate boxes are refused before).
    """
    from rwkvsam_core.predictor import clip_masks_to_boxes

    return clip_masks_to_boxes(masks, np.stack([touched_pixels(b) for b in np.reshape(boxes, (-1, 4))]))


_MANAGERS: dict[tuple, ModelManager] = {}
_MANAGERS_LOCK = threading.Lock()


def get_manager(settings: Settings) -> ModelManager:
    """The process-level :class:`ModelManager` for these settings (created on first use)."""
    key = (os.getpid(), settings)
    with _MANAGERS_LOCK:
        manager = _MANAGERS.get(key)
        if manager is None:
            manager = _MANAGERS[key] = ModelManager(settings)
        return manager
