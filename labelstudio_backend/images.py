"""Fetch task images safely: Label Studio uploads, local files, and allow-listed URLs.

Rules (no server-side request forgery):
* ``/data/...`` paths are fetched from ``LABEL_STUDIO_URL`` with the API token.
* ``/data/local-files/?d=<path>`` is read from the shared document root when one is configured
  (the resolved path must stay inside the root: ``..`` and symlinks out of it are refused);
  otherwise it is fetched from Label Studio like an upload.
* Absolute http(s) URLs are fetched only when they point at ``LABEL_STUDIO_URL``'s host (then with
  the token) or at a host of the ``ALLOWED_IMAGE_HOSTS`` allow-list (never with the token).
* Redirects are never followed; other schemes (file:, s3:, gs:, data: ...) are refused.
* Downloads stop at ``MAX_IMAGE_BYTES``; images over ``MAX_IMAGE_PIXELS`` are refused before they
  are decoded; truncated or undecodable files raise :class:`ImageError`.

The bytes are fetched on every call (a file or URL may change), but decoding is skipped when the
same bytes were decoded recently: interactive requests on one image then cost a read, not a PNG
or JPEG decode.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit

import numpy as np

from .settings import Settings

logger = logging.getLogger(__name__)


class ImageError(RuntimeError):
    """The image of a task cannot be used (not allowed, not found, too large, undecodable)."""


def looks_like_jwt(token: str) -> bool:
    """Personal access tokens are JWT refresh tokens (three base64url parts); legacy tokens are hex."""
    parts = token.split(".")
    return len(parts) == 3 and all(parts) and token.startswith("eyJ")


class LabelStudioAuth:
    """Authorization headers for Label Studio: legacy ``Token`` or personal access token.

    A personal access token (a JWT refresh token) is exchanged at ``POST /api/token/refresh`` for a
    short-lived access token sent as ``Authorization: Bearer``; it is refreshed on expiry or 401.
    """

    def __init__(self, base_url: str, token: str, timeout: float = 10.0, session: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._session = session
        self._access: str | None = None
        self._access_time = 0.0
        self._lock = threading.Lock()

    @property
    def session(self) -> Any:
        if self._session is None:
            import requests

            self._session = requests.Session()
        return self._session

    def headers(self, force_refresh: bool = False) -> dict[str, str]:
        """Headers to send to Label Studio (empty without a token)."""
        if not self.token:
            return {}
        if not looks_like_jwt(self.token):
            return {"Authorization": f"Token {self.token}"}
        with self._lock:
            if force_refresh or self._access is None or time.monotonic() - self._access_time > 240:
                self._access = self._refresh()
                self._access_time = time.monotonic()
            return {"Authorization": f"Bearer {self._access}"}

    def _refresh(self) -> str:
        if not self.base_url:
            raise ImageError("LABEL_STUDIO_URL is not set: cannot exchange the personal access token")
        url = f"{self.base_url}/api/token/refresh"
        try:
            r = self.session.post(
                url, json={"refresh": self.token}, timeout=self.timeout, allow_redirects=False
            )
        except Exception as exc:  # network errors of any client library
            raise ImageError(f"token refresh at {url} failed: {exc}") from exc
        if r.status_code != 200:
            raise ImageError(f"token refresh at {url} answered {r.status_code}: check LABEL_STUDIO_API_KEY")
        access = (r.json() or {}).get("access")
        if not access:
            raise ImageError(f"token refresh at {url} returned no access token")
        return str(access)

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        """An HTTP request with the auth headers; retried once with a fresh token on 401."""
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        extra = kwargs.pop("headers", {}) or {}
        r = self.session.request(method, url, headers={**extra, **self.headers()}, **kwargs)
        if r.status_code == 401 and looks_like_jwt(self.token):
            r = self.session.request(
                method, url, headers={**extra, **self.headers(force_refresh=True)}, **kwargs
            )
        return r


def _host_port(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


class ImageLoader:
    """Load task images as (H, W, 3) uint8 RGB arrays, following the rules of this module."""

    #: decoded images kept per process, keyed by a digest of their bytes (bounded by both limits)
    DECODED_ITEMS = 8
    DECODED_BYTES = 256 * 1024 * 1024

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None = None) -> None:
        self.settings = settings
        self.auth = auth or LabelStudioAuth(
            settings.label_studio_url, settings.api_key, settings.fetch_timeout
        )
        self._decoded: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._decoded_lock = threading.Lock()
        self.decoded_hits = 0

    # --------------------------------------------------------------------------- resolving
    def resolve(self, url: str) -> tuple[str, str | Path, bool]:
        """Decide where an image comes from.

        Returns:
            ("file", path, False) for a local file, or ("http", absolute_url, send_token).
        Raises:
            ImageError: the URL is not allowed.
        """
        if not isinstance(url, str) or not url.strip():
            raise ImageError("task has no image URL")
        url = url.strip()
        base = self.settings.label_studio_url
        parts = urlsplit(url)
        if parts.scheme == "" and url.startswith("/"):
            if url.startswith("//"):
                raise ImageError(f"protocol-relative URL refused: {url!r}")
            if parts.path.rstrip("/") == "/data/local-files":
                local = self._local_file(parts.query)
                if local is not None:
                    return "file", local, False
            if not base:
                raise ImageError(f"image {url!r} is on Label Studio but LABEL_STUDIO_URL is not set")
            return "http", urljoin(base + "/", url.lstrip("/")), True
        if parts.scheme in ("http", "https"):
            target = _host_port(url)
            if base and target == _host_port(base):
                return "http", url, True
            host, port = target[1], target[2]
            allowed = self.settings.allowed_hosts
            if host and (host in allowed or f"{host}:{port}" in allowed):
                return "http", url, False
            raise ImageError(
                f"image URL {url!r} refused: only LABEL_STUDIO_URL and ALLOWED_IMAGE_HOSTS are fetched"
            )
        raise ImageError(f"image URL scheme {parts.scheme or '(none)'!r} is not supported: {url!r}")

    def _local_file(self, query: str) -> Path | None:
        root = self.settings.document_root
        values = parse_qs(query).get("d")
        if not values:
            raise ImageError("local-files URL without ?d=")
        rel = unquote(values[0])
        if root is None or not Path(root).is_dir():
            return None
        root_r = Path(root).resolve()
        candidate = (root_r / rel.lstrip("/")).resolve()
        if candidate != root_r and root_r not in candidate.parents:
            raise ImageError(f"local file {rel!r} is outside the document root: refused")
        if not candidate.is_file():
            raise ImageError(f"local file {rel!r} not found under the document root")
        return candidate

    # --------------------------------------------------------------------------- loading
    def fetch_bytes(self, url: str) -> bytes:
        """The raw bytes of an image (size-limited)."""
        kind, where, with_token = self.resolve(url)
        limit = self.settings.max_image_bytes
        if kind == "file":
            path = Path(where)
            size = path.stat().st_size
            if size > limit:
                raise ImageError(f"image {path.name} has {size} bytes, over MAX_IMAGE_BYTES={limit}")
            return path.read_bytes()
        target = str(where)
        try:
            if with_token:
                r = self.auth.request("GET", target, stream=True)
            else:
                r = self.auth.session.get(
                    target, stream=True, timeout=self.settings.fetch_timeout, allow_redirects=False
                )
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"could not download {target}: {exc}") from exc
        try:
            if 300 <= r.status_code < 400:
                raise ImageError(
                    f"{target} answered a redirect ({r.status_code}); redirects are not followed"
                )
            if r.status_code != 200:
                raise ImageError(f"{target} answered HTTP {r.status_code}")
            chunks, total = [], 0
            for chunk in r.iter_content(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise ImageError(f"image at {target} is larger than MAX_IMAGE_BYTES={limit}")
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            r.close()

    def decode(self, data: bytes, name: str = "image") -> np.ndarray:
        """Decode image bytes to (H, W, 3) uint8 RGB (EXIF orientation applied)."""
        from PIL import Image, ImageOps

        from rwkvsam_core import to_rgb_uint8

        if not data:
            raise ImageError(f"{name} is empty")
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > self.settings.max_image_pixels:
                    raise ImageError(
                        f"{name} is {w}x{h} = {w * h} pixels, over MAX_IMAGE_PIXELS={self.settings.max_image_pixels}"
                    )
                im.load()
                im = ImageOps.exif_transpose(im)
                if im.mode in ("RGB", "L", "RGBA", "P", "LA", "CMYK", "YCbCr", "1"):
                    arr = np.asarray(im.convert("RGB"))
                else:
                    arr = to_rgb_uint8(np.asarray(im))
        except ImageError:
            raise
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            raise ImageError(f"{name} cannot be decoded: {exc}") from exc
        return np.ascontiguousarray(arr, dtype=np.uint8)

    def load(self, url: str) -> np.ndarray:
        """Fetch and decode the image at ``url`` -> (H, W, 3) uint8 RGB, read-only.

        The array is shared with later calls that fetch the same bytes (it is read-only so that no
        caller can change what the others see).
        """
        data = self.fetch_bytes(url)
        digest = hashlib.blake2b(data, digest_size=20).digest() + len(data).to_bytes(8, "little")
        with self._decoded_lock:
            image = self._decoded.get(digest)
            if image is not None:
                self._decoded.move_to_end(digest)
                self.decoded_hits += 1
                return image
        image = self.decode(data, name=url)
        image.flags.writeable = False
        if image.nbytes <= self.DECODED_BYTES:
            with self._decoded_lock:
                self._decoded[digest] = image
                total = sum(a.nbytes for a in self._decoded.values())
                while len(self._decoded) > self.DECODED_ITEMS or total > self.DECODED_BYTES:
                    total -= self._decoded.popitem(last=False)[1].nbytes
        return image


def task_image_url(task: dict[str, Any], key: str) -> str:
    """The image URL of a task (``task["data"][key]``, falling back to the only string value)."""
    data = task.get("data") or {}
    if not isinstance(data, dict):
        raise ImageError("task.data is not an object")
    url = data.get(key)
    if url is None:
        strings = [v for v in data.values() if isinstance(v, str)]
        if len(strings) == 1:
            url = strings[0]
    if not isinstance(url, str) or not url:
        raise ImageError(f"task {task.get('id')} has no image under data.{key}")
    return url
