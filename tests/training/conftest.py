"""Tiny generated datasets for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwkvsam_core.data import write_instance_sample


def shapes_sample(rng: np.random.Generator, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """An image with a bright rectangle and a dark disc on noise, and their two masks."""
    img = rng.integers(60, 180, (h, w, 3), dtype=np.uint8)
    masks = np.zeros((2, h, w), bool)
    y0, x0 = int(rng.integers(2, h // 3)), int(rng.integers(2, w // 3))
    masks[0, y0 : y0 + h // 3, x0 : x0 + w // 3] = True
    yy, xx = np.mgrid[:h, :w]
    cy, cx, r = int(rng.integers(h // 2, h - 8)), int(rng.integers(w // 2, w - 8)), 7
    masks[1] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    masks[1] &= ~masks[0]
    img[masks[0]] = (230, 220, 40)
    img[masks[1]] = (20, 30, 160)
    return img, masks


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("instances")
    rng = np.random.default_rng(0)
    for i in range(4):
        img, masks = shapes_sample(rng)
        write_instance_sample(root, f"img{i}", img, masks, ["box", "disc"])
    return root


@pytest.fixture(scope="session")
def mask_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIS5K layout with 3 good pairs, one image without gt and one corrupt image."""
    root = tmp_path_factory.mktemp("dis")
    (root / "im").mkdir()
    (root / "gt").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        img, masks = shapes_sample(rng)
        Image.fromarray(img).save(root / "im" / f"a{i}.jpg")
        Image.fromarray(masks[0].astype(np.uint8) * 255).save(root / "gt" / f"a{i}.png")
    Image.fromarray(img).save(root / "im" / "nogt.jpg")
    (root / "im" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    Image.fromarray(masks[1].astype(np.uint8) * 255).save(root / "gt" / "broken.png")
    return root


@pytest.fixture(scope="session")
def coco_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[np.ndarray]]:
    """COCO JSON with a polygon, an uncompressed RLE, a compressed RLE, a crowd region, bad entries."""
    from rwkvsam_core.data.codecs import coco_rle_encode

    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(2)
    images, anns, gts = [], [], []
    for i in range(2):
        img, masks = shapes_sample(rng)
        Image.fromarray(img).save(root / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "height": 48, "width": 64})
        gts.append(masks)
        anns.append(
            {
                "id": 10 * i + 1,
                "image_id": i + 1,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": coco_rle_encode(masks[0], compress=(i == 1)),
            }
        )
        anns.append(
            {
                "id": 10 * i + 2,
                "image_id": i + 1,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": coco_rle_encode(masks[1]),
            }
        )
    ys, xs = np.nonzero(gts[0][0])  # the same rectangle as a polygon on image 1
    poly = [
        float(xs.min()),
        float(ys.min()),
        float(xs.max() + 1),
        float(ys.min()),
        float(xs.max() + 1),
        float(ys.max() + 1),
        float(xs.min()),
        float(ys.max() + 1),
    ]
    anns.append({"id": 3, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": [poly]})
    anns.append(
        {"id": 4, "image_id": 1, "category_id": 1, "iscrowd": 1, "segmentation": coco_rle_encode(gts[0][1])}
    )
    anns.append(
        {
            "id": 5,
            "image_id": 2,
            "category_id": 1,
            "iscrowd": 0,
            "segmentation": {"size": [48, 64], "counts": [5, 3]},
        }
    )
    anns.append({"id": 6, "image_id": 2, "category_id": 1, "iscrowd": 0, "segmentation": [[1.0, 2.0]]})
    anns.append(
        {"id": 7, "image_id": 3, "category_id": 1, "iscrowd": 0, "segmentation": coco_rle_encode(gts[0][0])}
    )
    anns.append({"bad": True})
    images.append({"id": 3, "file_name": "missing.png", "height": 48, "width": 64})
    images.append({"id": 4, "file_name": "nothing.png"})
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "box"}, {"id": 2, "name": "disc"}],
    }
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path, root, gts


@pytest.fixture(scope="session")
def make_shapes():
    """The :func:`shapes_sample` generator, for tests that need their own images."""
    return shapes_sample
