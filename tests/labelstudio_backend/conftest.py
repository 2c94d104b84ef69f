"""Fixtures of the Label Studio backend tests: document root with images, settings, Flask client."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from ls_helpers import scene
from PIL import Image


@pytest.fixture
def doc_root(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    (root / "imgs").mkdir(parents=True)
    Image.fromarray(scene()).save(root / "imgs" / "a.png")
    Image.fromarray(scene(seed=1)).save(root / "imgs" / "b.png")
    data = (root / "imgs" / "a.png").read_bytes()
    (root / "imgs" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "imgs" / "garbage.png").write_bytes(b"this is not an image")
    return root


@pytest.fixture
def settings(tmp_path: Path, doc_root: Path):
    from labelstudio_backend.settings import Settings

    return Settings(
        model_dir=tmp_path / "model_dir",
        document_root=doc_root,
        image_size=256,
        label_studio_url="http://127.0.0.1:9",
        train_every=0,
        device="cpu",
    )


@pytest.fixture
def app(settings):
    pytest.importorskip("flask")
    from labelstudio_backend.server import create_app

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        app = create_app(settings)
    yield app
    app.extensions["rwkvsam_backend"].webhooks.shutdown(wait=True)


@pytest.fixture
def client(app):
    return app.test_client()
