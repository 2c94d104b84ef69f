"""Embedding cache: an in-memory LRU plus an optional on-disk store shared between processes.

Keys combine a hash of the image content (bytes, shape, dtype), a fingerprint of the model weights
and config (which includes the input size and decoder mode). Disk entries are safetensors files
written atomically (temporary file + ``os.replace``), so concurrent readers never see a partial
entry and concurrent writers of the same key simply replace each other's identical result. An
entry that cannot be read is logged, removed and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .features import ImageFeatures

logger = logging.getLogger(__name__)

_FINGERPRINT_ATTR = "_rwkvsam_fingerprint"


def image_hash(image: np.ndarray) -> str:
    """sha256 of an image's bytes, shape and dtype (hex)."""
    arr = np.ascontiguousarray(image)
    h = hashlib.sha256()
    h.update(f"{arr.shape}|{arr.dtype.str}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the model's weights, buffers and config (computed once per model object, 24 hex chars).

    Call ``invalidate_fingerprint(model)`` after changing weights in place.
    """
    cached = getattr(model, _FINGERPRINT_ATTR, None)
    if cached is not None:
        return cached
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(getattr(model, "config", {}), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    fp = h.hexdigest()
    object.__setattr__(model, _FINGERPRINT_ATTR, fp)
    return fp


def invalidate_fingerprint(model: torch.nn.Module) -> None:
    """Forget the cached fingerprint (after an in-place weight change)."""
    if hasattr(model, _FINGERPRINT_ATTR):
        object.__delattr__(model, _FINGERPRINT_ATTR)


class EmbeddingCache:
    """LRU cache of ``ImageFeatures`` in memory, optionally backed by a directory on disk.

    Args:
        max_items: features kept in memory (each is ~20 MB for a 1024 input).
        cache_dir: directory for the on-disk store (created if missing); None keeps memory only.
    """

    def __init__(self, max_items: int = 8, cache_dir: str | os.PathLike | None = None) -> None:
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        self.max_items = max_items
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._memory: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.disk_hits = 0
        self.misses = 0

    def key(self, model: torch.nn.Module, image: np.ndarray) -> str:
        return f"{model_fingerprint(model)}-{image_hash(image)}"

    def _path(self, key: str) -> Path:
        fp, img = key.split("-", 1)
        return self.cache_dir / fp / img[:2] / f"{img}.safetensors"

    def get(self, key: str) -> ImageFeatures | None:
        """Features for ``key`` from memory or disk, or None."""
        with self._lock:
            feats = self._memory.get(key)
            if feats is not None:
                self._memory.move_to_end(key)
                self.hits += 1
                return feats
        if self.cache_dir is None:
            return None
        feats = self._read(self._path(key))
        if feats is not None:
            self.disk_hits += 1
            self._remember(key, feats)
        return feats

    def put(self, key: str, feats: ImageFeatures) -> None:
        """Store features in memory and (if configured) atomically on disk."""
        feats = feats.to("cpu")
        self._remember(key, feats)
        if self.cache_dir is not None:
            try:
                self._write(self._path(key), feats)
            except OSError as err:  # a full or read-only disk must not break segmentation
                logger.warning("could not write embedding cache entry %s: %s", key, err)

    def get_or_compute(
        self, model: torch.nn.Module, image: np.ndarray, compute: Callable[[np.ndarray], ImageFeatures]
    ) -> ImageFeatures:
        """Cached features of ``image`` for ``model``; ``compute(image)`` runs only on a miss."""
        key = self.key(model, image)
        feats = self.get(key)
        if feats is not None:
            return feats
        self.misses += 1
        feats = compute(image)
        self.put(key, feats)
        return feats

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._memory:
                return True
        return self.cache_dir is not None and self._path(key).is_file()

    def clear_memory(self) -> None:
        with self._lock:
            self._memory.clear()

    def _remember(self, key: str, feats: ImageFeatures) -> None:
        if self.max_items == 0:
            return
        with self._lock:
            self._memory[key] = feats
            self._memory.move_to_end(key)
            while len(self._memory) > self.max_items:
                self._memory.popitem(last=False)

    @staticmethod
    def _write(path: Path, feats: ImageFeatures) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "original_size": json.dumps(list(feats.original_size)),
            "input_size": json.dumps(list(feats.input_size)),
            "image_size": str(feats.image_size),
        }
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in feats.tensors.items()}, tmp, metadata=meta)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @staticmethod
    def _read(path: Path) -> ImageFeatures | None:
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
            feats = ImageFeatures(
                tensors,
                tuple(json.loads(meta["original_size"])),
                tuple(json.loads(meta["input_size"])),
                int(meta["image_size"]),
            )
            if "embedding" not in tensors:
                raise ValueError("no embedding tensor")
            return feats
        except Exception as err:  # corrupt, truncated or foreign file: recompute
            logger.warning("discarding unreadable embedding cache entry %s: %s", path, err)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
