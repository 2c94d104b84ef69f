"""Backend configuration from environment variables (Label Studio's conventional names) and flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _env_int(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from exc


def _env_zoom(name: str) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise ValueError(
            f"environment variable {name} must be 0 (off) or a positive number of pixels, got {raw!r}"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """Everything the backend reads from its environment.

    Environment variables (flags of ``rwkvsam-labelstudio serve`` override them):

    =============================== ============================================================
    LABEL_STUDIO_URL                base URL of Label Studio (images under /data/... come from it)
    LABEL_STUDIO_API_KEY            legacy token or personal access token (JWT refresh token)
    MODEL_DIR                       state: embedding cache, dataset, fine-tuned weights, logs
    BASIC_AUTH_USER / _PASS         HTTP basic auth for every route but /health and /webhook
    LOG_LEVEL                       DEBUG, INFO (default), WARNING...
    WORKERS / THREADS               gunicorn worker processes / threads per worker
    RWKVSAM_MODEL                   model name (default rwkvsam_t)
    RWKVSAM_CHECKPOINT              weights file (default: the package's shipped weights if any)
    RWKVSAM_IMAGE_SIZE              model input side (default: from the checkpoint, else 1024)
    RWKVSAM_DEVICE                  cpu / cuda / cuda:1 (default: cuda when available)
    LOCAL_FILES_DOCUMENT_ROOT       shared document root for /data/local-files/?d=
                                    (LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT is read too)
    ALLOWED_IMAGE_HOSTS             comma-separated extra hosts (host or host:port) images may
                                    come from; anything else except LABEL_STUDIO_URL is refused
    MAX_IMAGE_PIXELS / _BYTES       larger images are refused (default 100 MP / 200 MB)
    CLIP_TO_BOX                     clip box-prompted masks to their box (default 1)
    ZOOM_TARGET                     decode a box alone (no clicks) in a window zoomed so the box
                                    spans this many input pixels (``rwkvsam_core.zoom``; 384 is
                                    the measured choice for nuclei); 0 or unset: off (default)
    TRAIN_EVERY                     fine-tune after this many new annotations (0: only on
                                    START_TRAINING; default 10)
    TRAIN_STEPS                     fine-tuning steps per run (default 200)
    TRAIN_ARGS                      extra arguments for ``python -m labelstudio_backend.finetune``
                                    (e.g. ``--batch-size 4 --lr 5e-5``)
    TRAIN_TIMEOUT                   seconds before a training run is killed (default 6 h)
    EMBEDDING_CACHE_ITEMS           features kept in memory per process (default 8)
    FETCH_TIMEOUT                   seconds for one image download (default 30)
    =============================== ============================================================
    """

    label_studio_url: str = ""
    api_key: str = ""
    model_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "rwkvsam" / "labelstudio")
    basic_auth_user: str = ""
    basic_auth_pass: str = ""
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 4
    model_name: str = "rwkvsam_t"
    checkpoint: str | None = None
    image_size: int | None = None
    device: str | None = None
    document_root: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_image_pixels: int = 100_000_000
    max_image_bytes: int = 200 * 1024 * 1024
    clip_to_box: bool = True
    zoom_target: float = 0.0
    train_every: int = 10
    train_steps: int = 200
    train_args: str = ""
    train_timeout: int = 6 * 3600
    cache_items: int = 8
    fetch_timeout: float = 30.0
    max_clicks: int = 32

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Read the environment; keyword arguments (non-None) win over it."""
        doc_root = os.environ.get("LOCAL_FILES_DOCUMENT_ROOT") or os.environ.get(
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"
        )
        hosts = tuple(
            h.strip().lower() for h in os.environ.get("ALLOWED_IMAGE_HOSTS", "").split(",") if h.strip()
        )
        s = cls(
            label_studio_url=os.environ.get("LABEL_STUDIO_URL", "").rstrip("/"),
            api_key=os.environ.get("LABEL_STUDIO_API_KEY", "")
            or os.environ.get("LABEL_STUDIO_ACCESS_TOKEN", ""),
            model_dir=Path(os.environ["MODEL_DIR"]) if os.environ.get("MODEL_DIR") else cls().model_dir,
            basic_auth_user=os.environ.get("BASIC_AUTH_USER", ""),
            basic_auth_pass=os.environ.get("BASIC_AUTH_PASS", ""),
            log_level=os.environ.get("LOG_LEVEL", "INFO").upper(),
            workers=_env_int("WORKERS", 1) or 1,
            threads=_env_int("THREADS", 4) or 4,
            model_name=os.environ.get("RWKVSAM_MODEL", "rwkvsam_t"),
            checkpoint=os.environ.get("RWKVSAM_CHECKPOINT") or None,
            image_size=_env_int("RWKVSAM_IMAGE_SIZE", None),
            device=os.environ.get("RWKVSAM_DEVICE") or None,
            document_root=Path(doc_root) if doc_root else None,
            allowed_hosts=hosts,
            max_image_pixels=_env_int("MAX_IMAGE_PIXELS", 100_000_000) or 100_000_000,
            max_image_bytes=_env_int("MAX_IMAGE_BYTES", 200 * 1024 * 1024) or 200 * 1024 * 1024,
            clip_to_box=_env_bool("CLIP_TO_BOX", True),
            zoom_target=_env_zoom("ZOOM_TARGET"),
            train_every=_env_int("TRAIN_EVERY", 10) or 0,
            train_steps=_env_int("TRAIN_STEPS", 200) or 200,
            train_args=os.environ.get("TRAIN_ARGS", ""),
            train_timeout=_env_int("TRAIN_TIMEOUT", 6 * 3600) or 6 * 3600,
            cache_items=_env_int("EMBEDDING_CACHE_ITEMS", 8) or 8,
            fetch_timeout=float(os.environ.get("FETCH_TIMEOUT", "30") or 30),
        )
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings (for gunicorn workers)."""
        env = {
            "LABEL_STUDIO_URL": self.label_studio_url,
            "LABEL_STUDIO_API_KEY": self.api_key,
            "MODEL_DIR": str(self.model_dir),
            "BASIC_AUTH_USER": self.basic_auth_user,
            "BASIC_AUTH_PASS": self.basic_auth_pass,
            "LOG_LEVEL": self.log_level,
            "WORKERS": str(self.workers),
            "THREADS": str(self.threads),
            "RWKVSAM_MODEL": self.model_name,
            "RWKVSAM_CHECKPOINT": self.checkpoint or "",
            "RWKVSAM_IMAGE_SIZE": str(self.image_size or ""),
            "RWKVSAM_DEVICE": self.device or "",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root or ""),
            "ALLOWED_IMAGE_HOSTS": ",".join(self.allowed_hosts),
            "MAX_IMAGE_PIXELS": str(self.max_image_pixels),
            "MAX_IMAGE_BYTES": str(self.max_image_bytes),
            "CLIP_TO_BOX": "1" if self.clip_to_box else "0",
            "ZOOM_TARGET": f"{self.zoom_target:g}",
            "TRAIN_EVERY": str(self.train_every),
            "TRAIN_STEPS": str(self.train_steps),
            "TRAIN_ARGS": self.train_args,
            "TRAIN_TIMEOUT": str(self.train_timeout),
            "EMBEDDING_CACHE_ITEMS": str(self.cache_items),
            "FETCH_TIMEOUT": str(self.fetch_timeout),
        }
        return env
