import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rwkvsam_core.data import (
    CocoInstanceDataset,
    CorruptSampleError,
    InstanceFolderDataset,
    LabelStudioExportDataset,
    MaskFolderDataset,
    SA1BDataset,
    open_dataset,
    write_instance_sample,
)
from rwkvsam_core.data.codecs import (
    coco_counts_from_string,
    coco_rle_decode,
    coco_rle_encode,
    ls_brush_to_mask,
    ls_rle_decode,
    mask_to_ls_brush,
)


def test_instance_folder_roundtrip_and_replace(tmp_path: Path, make_shapes) -> None:
    rng = np.random.default_rng(0)
    img, masks = make_shapes(rng, 30, 41)
    write_instance_sample(tmp_path, "one", img, masks, ["a", "b"])
    ds = InstanceFolderDataset(tmp_path)
    item = ds[0]
    assert item["name"] == "one" and item["labels"] == ["a", "b"]
    assert np.array_equal(item["image"], img) and np.array_equal(item["masks"], masks)
    write_instance_sample(tmp_path, "one", img, masks[:1])  # replace atomically
    again = InstanceFolderDataset(tmp_path)
    assert len(again) == 1 and again[0]["masks"].shape == (1, 30, 41) and again[0]["labels"] == ["object"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers
    with pytest.raises(ValueError):
        write_instance_sample(tmp_path, "../bad", img, masks)
    with pytest.raises(ValueError):
        write_instance_sample(tmp_path, "x", img, masks[:, :10])


def test_instance_folder_corrupt_sample(tmp_path: Path, make_shapes) -> None:
    rng = np.random.default_rng(0)
    img, masks = make_shapes(rng)
    write_instance_sample(tmp_path, "ok", img, masks)
    bad = write_instance_sample(tmp_path, "bad", img, masks)
    (bad / "masks.npz").write_bytes(b"garbage")
    ds = InstanceFolderDataset(tmp_path)
    assert ds[ds.names.index("ok")]["masks"].shape[0] == 2
    with pytest.raises(CorruptSampleError):
        ds[ds.names.index("bad")]


def test_coco_rle_codecs_known_value() -> None:
    # column-major: 2x3 mask with the middle column set -> runs [2, 2, 2]
    m = np.array([[0, 1, 0], [0, 1, 0]], bool)
    assert coco_rle_encode(m)["counts"] == [2, 2, 2]
    assert np.array_equal(coco_rle_decode({"size": [2, 3], "counts": [2, 2, 2]}), m)
    s = coco_rle_encode(m, compress=True)["counts"]
    assert coco_counts_from_string(s) == [2, 2, 2]
    with pytest.raises(ValueError):
        coco_rle_decode({"size": [2, 3], "counts": [2, 2]})


def test_coco_rle_matches_pycocotools() -> None:
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = rng.random((17, 23)) < rng.random()
        ref = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))["counts"].decode()
        assert coco_rle_encode(m, compress=True)["counts"] == ref
        assert np.array_equal(coco_rle_decode({"size": [17, 23], "counts": ref}), m)


def test_coco_reader_skips_and_counts(coco_set) -> None:
    path, root, gts = coco_set
    ds = CocoInstanceDataset(path, root)
    assert ds.skipped.counts.get("bad annotation") == 1 and ds.skipped.counts.get("bad image entry") == 1
    names = [ds.image_info(i)["file_name"] for i in range(len(ds))]
    assert names == ["im0.png", "im1.png", "missing.png"]
    a = ds[0]
    assert a["masks"].shape == (3, 48, 64) and a["labels"] == ["box", "disc", "box"]  # crowd dropped
    assert np.array_equal(a["masks"][0], gts[0][0]) and np.array_equal(a["masks"][1], gts[0][1])
    assert (a["masks"][2] == gts[0][0]).mean() > 0.97  # polygon raster of the same rectangle
    b = ds[1]  # compressed RLE + bad RLE + degenerate polygon
    assert b["masks"].shape[0] == 2 and np.array_equal(b["masks"][0], gts[1][0])
    assert ds.skipped.counts.get("bad segmentation") == 2
    with pytest.raises(CorruptSampleError):
        ds[2]
    assert len(CocoInstanceDataset(path, root, include_crowd=True)[0]["masks"]) == 4


def _bits(*fields: tuple[int, int]) -> list[int]:
    s = "".join(format(v, f"0{n}b") for v, n in fields)
    s += "0" * (-len(s) % 8)
    return [int(s[i : i + 8], 2) for i in range(0, len(s), 8)]


def test_ls_rle_decoder_hand_built_stream() -> None:
    # 6 words of 8 bits; rle field sizes 2,3,4,5 (stored minus 1); chunk 1: literal, size field 0,
    # length 3 -> words 7, 8, 9; chunk 2: repeat, size field 1, length 3 -> word 255 three times
    rle = _bits(
        (6, 32),
        (7, 5),
        (1, 4),
        (2, 4),
        (3, 4),
        (4, 4),
        (0, 1),
        (0, 2),
        (2, 2),
        (7, 8),
        (8, 8),
        (9, 8),
        (1, 1),
        (1, 2),
        (2, 3),
        (255, 8),
    )
    assert ls_rle_decode(rle).tolist() == [7, 8, 9, 255, 255, 255]
    with pytest.raises(ValueError, match="ends early"):
        ls_rle_decode(rle[:5])


def test_ls_brush_roundtrip() -> None:
    m = np.zeros((9, 13), bool)
    m[2:7, 3:11] = True
    assert np.array_equal(ls_brush_to_mask(mask_to_ls_brush(m), 9, 13), m)
    with pytest.raises(ValueError, match="RGBA"):
        ls_brush_to_mask(mask_to_ls_brush(m), 9, 12)


def test_label_studio_export(tmp_path: Path, make_shapes) -> None:
    rng = np.random.default_rng(4)
    img, masks = make_shapes(rng)
    Image.fromarray(img).save(tmp_path / "photo.png")
    ys, xs = np.nonzero(masks[0])
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    pct = lambda x, y: [100 * x / 64, 100 * y / 48]  # noqa: E731
    base = {"original_width": 64, "original_height": 48, "from_name": "tag", "to_name": "image"}
    results = [
        dict(
            base,
            type="brushlabels",
            value={"format": "rle", "rle": mask_to_ls_brush(masks[1]), "brushlabels": ["disc"]},
        ),
        dict(
            base,
            type="polygonlabels",
            value={"points": [pct(x0, y0), pct(x1, y0), pct(x1, y1), pct(x0, y1)], "polygonlabels": ["box"]},
        ),
        dict(
            base,
            type="rectanglelabels",
            value={
                "x": 100 * x0 / 64,
                "y": 100 * y0 / 48,
                "width": 100 * (x1 - x0) / 64,
                "height": 100 * (y1 - y0) / 48,
                "rotation": 0,
                "rectanglelabels": ["r"],
            },
        ),
        dict(base, type="brushlabels", value={"format": "rle", "rle": [1, 2, 3], "brushlabels": ["broken"]}),
    ]
    tasks = [
        {
            "id": 1,
            "data": {"image": "/data/upload/3/1a2b3c4d-photo.png"},
            "annotations": [
                {"result": [], "was_cancelled": True},
                {"result": results, "was_cancelled": False},
            ],
        },
        {"id": 2, "data": {"image": "/data/local-files/?d=sub/photo.png"}, "annotations": []},
        {
            "id": 3,
            "data": {"image": "/data/upload/3/zzz-missing.png"},
            "annotations": [{"result": results[:1]}],
        },
        "not a task",
    ]
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    ds = LabelStudioExportDataset(tmp_path / "export.json", tmp_path)
    assert len(ds) == 2 and ds.skipped.counts == {"task without annotation": 1, "bad task": 1}
    item = ds[0]
    assert item["labels"] == ["disc", "box", "r"] and ds.skipped.counts.get("bad result") == 1
    assert np.array_equal(item["masks"][0], masks[1])
    assert (item["masks"][1] == masks[0]).mean() > 0.97 and (item["masks"][2] == masks[0]).mean() > 0.97
    with pytest.raises(CorruptSampleError, match="not found"):
        ds[1]
    assert isinstance(open_dataset(tmp_path / "export.json", tmp_path), LabelStudioExportDataset)


def test_mask_folder_reader(mask_folder: Path) -> None:
    ds = MaskFolderDataset(mask_folder)
    assert len(ds) == 4 and ds.skipped.counts == {"image without mask": 1}
    ok = [ds[i] for i in range(len(ds)) if ds.pairs[i][0].stem != "broken"]
    assert len(ok) == 3 and all(it["masks"].shape == (1, 48, 64) for it in ok)
    broken = [i for i in range(len(ds)) if ds.pairs[i][0].stem == "broken"][0]
    with pytest.raises(CorruptSampleError):
        ds[broken]
    assert isinstance(open_dataset(mask_folder), MaskFolderDataset)


def test_sa1b_reader(tmp_path: Path, make_shapes) -> None:
    rng = np.random.default_rng(5)
    img, masks = make_shapes(rng)
    Image.fromarray(img).save(tmp_path / "sa_1.jpg")
    anns = [
        {
            "id": i,
            "segmentation": coco_rle_encode(m, compress=True),
            "bbox": [0, 0, 1, 1],
            "area": int(m.sum()),
        }
        for i, m in enumerate(masks)
    ]
    (tmp_path / "sa_1.json").write_text(
        json.dumps(
            {
                "image": {"image_id": 1, "file_name": "sa_1.jpg", "height": 48, "width": 64},
                "annotations": anns,
            }
        )
    )
    (tmp_path / "sa_2.json").write_text("{}")
    ds = SA1BDataset(tmp_path)
    assert len(ds) == 1 and ds.skipped.total == 1
    assert np.array_equal(ds[0]["masks"], masks)
    assert isinstance(open_dataset(tmp_path), SA1BDataset)
