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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .convert import (
    BoxPrompt,
    Click,
    InteractivePrompt,
    box_is_degenerate,
    clamp_score,
    clicks_inside_box,
    select_object_clicks,
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
        self.stats = {"interactive": 0, "batch_boxes": 0, "encodes": 0, "reloads": 0}

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
        return predictor, version

    # ------------------------------------------------------------------ segmentation
    def segment_interactive(
        self, image: np.ndarray, prompt: InteractivePrompt
    ) -> tuple[np.ndarray | None, float, str]:
        """One mask for the object the user is working on.

        Returns:
            (mask (H, W) bool or None when there is nothing to segment, score, model version).
        """
        h, w = image.shape[:2]
        predictor, version = self.predictor_for(image)
        self.stats["interactive"] += 1
        if prompt.box is not None:
            box = prompt.box.box
            if box_is_degenerate(box):
                logger.info("interactive box %s is degenerate: empty result", box.tolist())
                return None, 0.0, version
            clicks = clicks_inside_box(prompt.clicks, box)
            coords, labels = _click_arrays(clicks)
            masks, scores, _ = predictor.predict(
                point_coords=coords, point_labels=labels, box=box, multimask_output=False
            )
            mask, score = masks[0], clamp_score(scores[0])
            if self.settings.clip_to_box:
                mask = clip_to_box(mask, box)
            return mask, score, version
        clicks = prompt.clicks[-self.settings.max_clicks :]
        if not any(c.positive for c in clicks):
            logger.info("only negative clicks: nothing to segment")
            return None, 0.0, version
        kept, low_res, score = self.object_clicks(predictor, clicks)
        if low_res is not None and len(kept) > 1:  # the batched pass already decoded the kept clicks
            from rwkvsam_core import postprocess_masks

            logits = postprocess_masks(
                low_res, predictor.input_size, predictor.original_size, predictor.model.image_size
            )
            return (logits[0, 0] > 0).cpu().numpy(), clamp_score(score), version
        coords, labels = _click_arrays(kept)  # one click: ask for 3 candidates, keep the best
        masks, scores, _ = predictor.predict(point_coords=coords, point_labels=labels, multimask_output=True)
        best = int(np.argmax(scores))
        return masks[best], clamp_score(scores[best]), version

    @staticmethod
    def object_clicks(predictor: Any, clicks: list[Click]) -> tuple[list[Click], Any, float | None]:
        """Apply :func:`convert.select_object_clicks` with ONE batched decoder pass.

        Every suffix ``clicks[k:]`` holding a positive click goes through the decoder at once
        (padded with label -1, SAM's "not a point"); the rule reads click membership on the
        low-resolution logits (no full-size masks are made), and the kept clicks' own row is the
        answer, so a request costs one decoder pass (two when only the newest click is kept).

        Returns:
            (kept clicks, low-res logits (1, 1, S/4, S/4) of the kept clicks or None when a single
            click was given, their predicted IoU or None).
        """
        import torch

        n = len(clicks)
        if n == 1:
            return clicks, None, None
        starts = [k for k in range(n) if any(c.positive for c in clicks[k:])]
        if not starts:
            raise ValueError("object_clicks needs at least one positive click")
        p = n - starts[0]
        coords = np.zeros((len(starts), p, 2))
        labels = -np.ones((len(starts), p), dtype=np.int64)
        for row, k in enumerate(starts):
            suffix = clicks[k:]
            coords[row, : len(suffix)] = [(c.x, c.y) for c in suffix]
            labels[row, : len(suffix)] = [1 if c.positive else 0 for c in suffix]
        size = predictor.original_size
        device = predictor.device
        _, iou, low_res = predictor.predict_torch(
            torch.as_tensor(
                predictor.transform.apply_coords(coords, size), dtype=torch.float32, device=device
            ),
            torch.as_tensor(labels, dtype=torch.int, device=device),
            multimask_output=False,
            return_logits=True,
        )
        low = (low_res[:, 0] > 0).cpu().numpy()  # (rows, S/4, S/4) in the padded input frame
        scale = low.shape[-1] / predictor.model.image_size
        xy = predictor.transform.apply_coords(np.array([[c.x, c.y] for c in clicks]), size) * scale
        scaled = [
            Click(float(x), float(y), c.positive, c.label) for (x, y), c in zip(xy, clicks, strict=True)
        ]
        row_of = {k: row for row, k in enumerate(starts)}
        masks_of_suffixes = [low[row_of[i + 1]] if i + 1 in row_of else None for i in range(n - 1)]
        kept = select_object_clicks(scaled, masks_of_suffixes)
        start = n - len(kept)
        row = row_of[start]  # the kept clicks always include a positive one
        return clicks[start:], low_res[row : row + 1], float(iou[row, 0])

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
        for start in range(0, len(good), chunk):
            part = good[start : start + chunk]
            arr = np.stack([b.box for b in part])
            masks, scores, _ = predictor.predict(box=arr, multimask_output=False)
            masks = np.asarray(masks).reshape(len(part), -1, *image.shape[:2])
            scores = np.asarray(scores).reshape(len(part), -1)
            for b, m, s in zip(part, masks, scores, strict=True):
                out_m.append(clip_to_box(m[0], b.box) if self.settings.clip_to_box else m[0])
                out_s.append(clamp_score(s[0]))
        self.stats["batch_boxes"] += len(good)
        return out_m, [b.label for b in good], out_s, version


def _click_arrays(clicks: list[Click]) -> tuple[np.ndarray | None, np.ndarray | None]:
    if not clicks:
        return None, None
    coords = np.array([[c.x, c.y] for c in clicks], dtype=np.float64)
    labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
    return coords, labels


def clip_to_box(mask: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Zero a (H, W) mask outside the XYXY box (every pixel the box touches is kept)."""
    h, w = mask.shape
    x0 = int(np.clip(np.floor(box[0]), 0, w))
    y0 = int(np.clip(np.floor(box[1]), 0, h))
    x1 = int(np.clip(np.ceil(box[2]), 0, w))
    y1 = int(np.clip(np.ceil(box[3]), 0, h))
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


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
