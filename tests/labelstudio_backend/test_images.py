"""Image fetching rules: where images may come from, tokens, size limits, broken files."""

from __future__ import annotations

import io
import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from labelstudio_backend.images import (
    ImageError,
    ImageLoader,
    LabelStudioAuth,
    looks_like_jwt,
    task_image_url,
)

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"


class FakeResponse:
    def __init__(self, status=200, body=b"", json=None):
        self.status_code = status
        self._body = body
        self._json = json
        self.content = body or (b"{}" if json is not None else b"")

    def json(self):
        return self._json

    def iter_content(self, n):
        for i in range(0, len(self._body), n):
            yield self._body[i : i + n]

    def close(self):
        pass


class FakeSession:
    """Records requests; answers from a list of responses (last one repeats)."""

    def __init__(self, responses):
        self.responses = list(responses)
        self.calls = []

    def _next(self):
        return self.responses.pop(0) if len(self.responses) > 1 else self.responses[0]

    def request(self, method, url, headers=None, **kw):
        self.calls.append((method, url, dict(headers or {}), kw))
        return self._next()

    def get(self, url, headers=None, **kw):
        return self.request("GET", url, headers=headers, **kw)

    def post(self, url, json=None, **kw):
        self.calls.append(("POST", url, {}, {"json": json, **kw}))
        return self._next()


def _png(w=20, h=10, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode in ("L", "I;16") else (10, 20, 30)[: len(mode)]).save(
        buf, format="PNG"
    )
    return buf.getvalue()


def test_resolve_rules(settings, doc_root):
    loader = ImageLoader(
        replace(settings, label_studio_url="http://ls:8080", allowed_hosts=("img.example.org",))
    )
    assert loader.resolve("/data/upload/3/a.png") == ("http", "http://ls:8080/data/upload/3/a.png", True)
    kind, path, token = loader.resolve("/data/local-files/?d=imgs/a.png")
    assert kind == "file" and path == (doc_root / "imgs" / "a.png").resolve() and not token
    assert loader.resolve("http://ls:8080/data/x.png")[2] is True  # Label Studio itself: with the token
    assert loader.resolve("https://img.example.org/x.png") == ("http", "https://img.example.org/x.png", False)
    for bad in (
        "http://169.254.169.254/latest",
        "http://ls:9999/x.png",
        "https://evil.example.org/x.png",
        "file:///etc/passwd",
        "s3://bucket/x.png",
        "//ls:8080/x.png",
        "",
        "ftp://ls/x.png",
    ):
        with pytest.raises(ImageError):
            loader.resolve(bad)


def test_local_files_refuse_traversal_and_symlinks(settings, doc_root, tmp_path):
    loader = ImageLoader(settings)
    for bad in ("../secret.png", "imgs/../../secret.png", "/etc/passwd", "imgs/%2e%2e/%2e%2e/x"):
        with pytest.raises(ImageError):
            loader.resolve(f"/data/local-files/?d={bad}")
    outside = tmp_path / "outside.png"
    outside.write_bytes(_png())
    os.symlink(outside, doc_root / "imgs" / "link.png")
    with pytest.raises(ImageError, match="outside the document root"):
        loader.resolve("/data/local-files/?d=imgs/link.png")
    with pytest.raises(ImageError, match="not found"):
        loader.resolve("/data/local-files/?d=imgs/nope.png")


def test_local_files_fall_back_to_label_studio_without_document_root(settings):
    loader = ImageLoader(replace(settings, document_root=None, label_studio_url="http://ls:8080"))
    kind, url, token = loader.resolve("/data/local-files/?d=imgs/a.png")
    assert (kind, url, token) == ("http", "http://ls:8080/data/local-files/?d=imgs/a.png", True)
    with pytest.raises(ImageError, match="LABEL_STUDIO_URL"):
        ImageLoader(replace(settings, label_studio_url="")).resolve("/data/upload/1/a.png")


def test_legacy_token_and_redirects(settings):
    session = FakeSession([FakeResponse(200, _png())])
    auth = LabelStudioAuth("http://ls:8080", "abc123", session=session)
    loader = ImageLoader(replace(settings, label_studio_url="http://ls:8080"), auth)
    img = loader.load("/data/upload/1/a.png")
    assert img.shape == (10, 20, 3) and img.dtype == np.uint8
    method, url, headers, kw = session.calls[0]
    assert headers["Authorization"] == "Token abc123" and kw["allow_redirects"] is False
    session.responses = [FakeResponse(302)]
    with pytest.raises(ImageError, match="redirect"):
        loader.load("/data/upload/1/a.png")
    session.responses = [FakeResponse(404)]
    with pytest.raises(ImageError, match="404"):
        loader.load("/data/upload/1/a.png")


def test_allow_listed_hosts_never_get_the_token(settings):
    session = FakeSession([FakeResponse(200, _png())])
    auth = LabelStudioAuth("http://ls:8080", "abc123", session=session)
    loader = ImageLoader(
        replace(settings, label_studio_url="http://ls:8080", allowed_hosts=("cdn.example.org",)), auth
    )
    loader.load("https://cdn.example.org/a.png")
    assert "Authorization" not in session.calls[0][2]


def test_personal_access_token_refresh_and_retry_on_401():
    assert looks_like_jwt(JWT) and not looks_like_jwt("abcdef0123")
    session = FakeSession(
        [
            FakeResponse(200, json={"access": "A1"}),  # refresh
            FakeResponse(401),  # the access token expired
            FakeResponse(200, json={"access": "A2"}),  # refresh again
            FakeResponse(200, b"ok"),
        ]
    )
    auth = LabelStudioAuth("http://ls:8080", JWT, session=session)
    r = auth.request("GET", "http://ls:8080/api/projects/1")
    assert r.status_code == 200
    posts = [c for c in session.calls if c[0] == "POST"]
    assert [p[1] for p in posts] == ["http://ls:8080/api/token/refresh"] * 2
    assert posts[0][3]["json"] == {"refresh": JWT}
    gets = [c for c in session.calls if c[0] == "GET"]
    assert [g[2]["Authorization"] for g in gets] == ["Bearer A1", "Bearer A2"]
    bad = LabelStudioAuth("http://ls:8080", JWT, session=FakeSession([FakeResponse(401)]))
    with pytest.raises(ImageError, match="LABEL_STUDIO_API_KEY"):
        bad.headers()


def test_size_limits(settings, doc_root):
    loader = ImageLoader(replace(settings, max_image_pixels=100))
    with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS"):
        loader.load("/data/local-files/?d=imgs/a.png")
    loader = ImageLoader(replace(settings, max_image_bytes=100))
    with pytest.raises(ImageError, match="MAX_IMAGE_BYTES"):
        loader.load("/data/local-files/?d=imgs/a.png")
    session = FakeSession([FakeResponse(200, b"x" * 5000)])
    loader = ImageLoader(
        replace(settings, max_image_bytes=1000), LabelStudioAuth("http://127.0.0.1:9", "t", session=session)
    )
    with pytest.raises(ImageError, match="MAX_IMAGE_BYTES"):
        loader.load("/data/upload/1/big.png")


def test_decode_modes_and_broken_files(settings, doc_root):
    loader = ImageLoader(settings)
    for mode in ("RGB", "RGBA", "L", "I;16"):
        img = loader.decode(_png(mode=mode))
        assert img.shape == (10, 20, 3) and img.dtype == np.uint8, mode
    for name in ("truncated.png", "garbage.png"):
        with pytest.raises(ImageError, match="cannot be decoded"):
            loader.load(f"/data/local-files/?d=imgs/{name}")
    with pytest.raises(ImageError, match="empty"):
        loader.decode(b"")


def test_task_image_url():
    assert task_image_url({"data": {"image": "/x.png"}}, "image") == "/x.png"
    assert task_image_url({"data": {"img": "/y.png"}}, "image") == "/y.png"  # the only string value
    with pytest.raises(ImageError):
        task_image_url({"data": {"a": "1", "b": "2"}}, "image")
    with pytest.raises(ImageError):
        task_image_url({"data": "nope"}, "image")


def test_decoded_images_are_reused_only_for_the_same_bytes(settings, doc_root):
    loader = ImageLoader(settings)
    url = "/data/local-files/?d=imgs/a.png"
    first = loader.load(url)
    assert loader.load(url) is first and loader.decoded_hits == 1  # same bytes: no second decode
    with pytest.raises(ValueError):
        first[0, 0, 0] = 1  # shared, so read-only
    Image.new("RGB", (20, 10), (1, 2, 3)).save(doc_root / "imgs" / "a.png")  # the file changes
    changed = loader.load(url)
    assert changed.shape == (10, 20, 3) and changed[0, 0].tolist() == [1, 2, 3]
    for i in range(ImageLoader.DECODED_ITEMS + 2):  # bounded
        Image.new("RGB", (4, 4), (i, 0, 0)).save(doc_root / "imgs" / f"n{i}.png")
        loader.load(f"/data/local-files/?d=imgs/n{i}.png")
    assert len(loader._decoded) == ImageLoader.DECODED_ITEMS
