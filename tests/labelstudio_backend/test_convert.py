"""Unit tests of the pure conversions (no Flask, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ls_helpers import CONFIG, POLYGON_CONFIG, keypoint, rect

from labelstudio_backend.convert import (
    Click,
    ConversionError,
    boxes_from_task,
    build_results,
    clamp_score,
    mask_to_polygon,
    mask_to_rle,
    masks_from_annotation,
    parse_context,
    parse_label_config,
    percent_to_pixel_point,
    pixel_to_percent_point,
    polygon_to_mask,
    rect_to_xyxy,
    rle_decode,
    rle_encode,
    rle_to_mask,
    select_object_clicks,
)

VECTORS = json.loads((Path(__file__).parent / "data" / "ls_rle_vectors.json").read_text())


def _from_runs(runs):
    return np.concatenate([np.full(n, v, np.uint8) for n, v in runs])


# ------------------------------------------------------------------------------------------ RLE
@pytest.mark.parametrize("case", VECTORS["masks"], ids=lambda c: c["name"])
def test_mask_rle_matches_label_studio_encoder(case):
    mask = _from_runs(case["runs"]).reshape(case["height"], case["width"]) > 0
    assert mask_to_rle(mask) == case["rle"]  # byte-identical to label_studio_sdk's mask2rle
    np.testing.assert_array_equal(rle_to_mask(case["rle"], case["height"], case["width"]), mask)


@pytest.mark.parametrize("case", VECTORS["arrays"], ids=lambda c: c["name"])
def test_raw_rle_matches_label_studio_encoder(case):
    values = _from_runs(case["runs"])
    assert rle_encode(values) == case["rle"]
    np.testing.assert_array_equal(rle_decode(case["rle"]), values)


def test_vectors_have_provenance():
    assert "label-studio-sdk" in VECTORS["provenance"]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 48), (257, 300)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 1.0])
def test_rle_round_trip_random_masks(shape, density):
    rng = np.random.default_rng(hash((shape, density)) % 2**32)
    mask = rng.random(shape) < density
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask), *shape), mask)


def test_rle_round_trip_arbitrary_bytes():
    rng = np.random.default_rng(0)
    values = np.repeat(rng.integers(0, 256, 500), rng.integers(1, 400, 500)).astype(np.uint8)
    np.testing.assert_array_equal(rle_decode(rle_encode(values)), values)


def test_rle_rejects_bad_input():
    rle = mask_to_rle(np.ones((20, 20), bool) ^ np.eye(20, dtype=bool))
    with pytest.raises(ConversionError, match="truncated"):
        rle_decode(rle[: len(rle) // 2])
    with pytest.raises(ConversionError):
        rle_decode([1, 2, 300, 4, 5, 6, 7])
    with pytest.raises(ConversionError):
        rle_decode("abc")
    with pytest.raises(ConversionError, match="expected"):
        rle_to_mask(rle, 10, 10)


# ------------------------------------------------------------------------------------------ geometry
def test_percent_pixel_round_trip():
    x, y = percent_to_pixel_point(25, 50, 640, 480)
    assert (x, y) == (160.0, 240.0)
    assert pixel_to_percent_point(x, y, 640, 480) == (25.0, 50.0)


def test_rect_to_xyxy_plain_and_clipped():
    np.testing.assert_allclose(
        rect_to_xyxy({"x": 10, "y": 20, "width": 30, "height": 40}, 200, 100), [20, 20, 80, 60]
    )
    np.testing.assert_allclose(
        rect_to_xyxy({"x": 90, "y": 90, "width": 30, "height": 40}, 200, 100), [180, 90, 200, 100]
    )


def test_rect_to_xyxy_rotation_is_around_top_left():
    # 90 degrees clockwise on screen around (x, y): the box extends to the LEFT of x, below y
    box = rect_to_xyxy({"x": 50, "y": 10, "width": 20, "height": 10, "rotation": 90}, 100, 100)
    np.testing.assert_allclose(box, [40, 10, 50, 30], atol=1e-9)


def test_rect_without_numbers_is_an_error():
    with pytest.raises(ConversionError):
        rect_to_xyxy({"x": "a", "y": 1, "width": 2, "height": 3}, 10, 10)


# ------------------------------------------------------------------------------------------ config
def test_parse_label_config():
    cfg = parse_label_config(CONFIG)
    assert (cfg.image_name, cfg.image_key) == ("image", "image")
    assert cfg.brush.name == "tag" and cfg.brush.labels == ["cat", "dog"]
    assert [r.name for r in cfg.rectangles] == ["rect"] and [k.name for k in cfg.keypoints] == ["kp"]
    assert cfg.polygon is None
    assert parse_label_config(POLYGON_CONFIG).polygon.name == "poly"


@pytest.mark.parametrize(
    "xml, msg",
    [
        ("", "empty"),
        ("<View><Image", "not valid XML"),
        ('<View><Text name="t" value="$text"/></View>', "no <Image"),
        ('<View><Image name="i" value="$img"/><Choices name="c" toName="i"/></View>', "no <BrushLabels>"),
    ],
)
def test_parse_label_config_errors(xml, msg):
    with pytest.raises(ConversionError, match=msg):
        parse_label_config(xml)


# ------------------------------------------------------------------------------------------ context
def test_parse_context_keypoints():
    ctx = {"result": [keypoint(10, 20), keypoint(50, 50, positive=False), keypoint(30, 40, positive=None)]}
    p = parse_context(ctx, 200, 100)
    assert [(c.x, c.y, c.positive) for c in p.clicks] == [(20, 20, True), (100, 50, False), (60, 40, True)]
    assert p.box is None and p.label == "cat"


def test_parse_context_uses_newest_rectangle_and_its_label():
    ctx = {"result": [rect(0, 0, 10, 10, "cat"), rect(50, 50, 20, 20, "dog")]}
    p = parse_context(ctx, 100, 100)
    np.testing.assert_allclose(p.box.box, [50, 50, 70, 70])
    assert p.label == "dog"


def test_parse_context_empty_and_bad():
    assert parse_context(None) is None
    assert parse_context({"result": []}) is None
    assert parse_context({"result": [{"type": "choices", "value": {}}]}) is None
    with pytest.raises(ConversionError):
        parse_context({"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 2}}]})  # no size at all
    with pytest.raises(ConversionError):
        parse_context({"result": "nope"})


def test_select_object_clicks_rule():
    h, w = 50, 50
    left = np.zeros((h, w), bool)
    left[:, :25] = True
    everything = np.ones((h, w), bool)
    a, b, c = Click(5, 5, True, "x"), Click(10, 10, True, "x"), Click(40, 40, True, "x")
    neg = Click(20, 20, False, "x")
    # c is the newest click; b lies outside mask(c) (right half) -> b and a belong to another object
    assert select_object_clicks([a, b, c], [None, ~left, None]) == [c]
    # b inside mask([c]) and a inside mask([b, c]) -> all three
    assert select_object_clicks([a, b, c], [everything, everything, None]) == [a, b, c]
    # negative clicks are kept while walking back; a positive click after only negatives is kept
    assert select_object_clicks([b, neg], [None, None]) == [b, neg]
    assert select_object_clicks([a, neg, c], [~left, None, None]) == [neg, c]


# ------------------------------------------------------------------------------------------ tasks
def test_boxes_from_task_prefers_newest_annotation_then_predictions():
    task = {
        "annotations": [
            {"id": 1, "updated_at": "2024-01-01", "result": [rect(0, 0, 10, 10, "cat")]},
            {
                "id": 2,
                "updated_at": "2024-02-01",
                "result": [rect(10, 10, 10, 10, "dog"), rect(10, 10, 10, 10, "dog")],
            },
            {"id": 3, "updated_at": "2024-03-01", "was_cancelled": True, "result": [rect(50, 50, 5, 5)]},
        ],
        "predictions": [{"id": 9, "result": [rect(70, 70, 10, 10)]}],
    }
    boxes = boxes_from_task(task)
    assert len(boxes) == 1 and boxes[0].label == "dog"  # duplicate dropped, cancelled ignored
    task["annotations"] = []
    boxes = boxes_from_task(task)
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0].box, [112, 84, 128, 96])
    assert boxes_from_task({"annotations": [], "predictions": []}) == []
    assert boxes_from_task({"predictions": [{"result": [rect(1, 1, 5, 5, name="other")]}]}, ["rect"]) == []


def test_masks_from_annotation_brush_and_polygon():
    m = np.zeros((30, 40), bool)
    m[5:15, 10:30] = True
    brush = {
        "type": "brushlabels",
        "from_name": "tag",
        "original_width": 40,
        "original_height": 30,
        "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["cat"]},
    }
    poly = {
        "type": "polygonlabels",
        "from_name": "poly",
        "original_width": 40,
        "original_height": 30,
        "value": {"points": [[0, 50], [50, 50], [50, 100]], "polygonlabels": ["dog"]},
    }
    bad = {
        "type": "brushlabels",
        "from_name": "tag",
        "original_width": 40,
        "original_height": 30,
        "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["cat"]},
    }
    masks, labels, size = masks_from_annotation([brush, poly, bad, rect(1, 1, 2, 2)])
    assert size == (30, 40) and labels == ["cat", "dog"] and len(masks) == 2
    np.testing.assert_array_equal(masks[0], m)
    assert masks[1][16, 19] and not masks[1][29, 1] and not masks[1][0, 39]


# ------------------------------------------------------------------------------------------ results
def test_build_results_brush_and_polygon():
    cfg = parse_label_config(POLYGON_CONFIG)
    m = np.zeros((30, 40), bool)
    m[5:15, 10:30] = True
    out = build_results(cfg, [m, np.zeros_like(m)], ["dog", "cat"], [0.9, 0.5])
    assert [r["type"] for r in out] == ["brushlabels", "polygonlabels"]  # empty mask dropped
    brush, poly = out
    assert brush["from_name"] == "tag" and brush["to_name"] == "image"
    assert brush["value"]["brushlabels"] == ["dog"] and brush["value"]["format"] == "rle"
    assert (brush["original_width"], brush["original_height"], brush["score"]) == (40, 30, 0.9)
    np.testing.assert_array_equal(rle_to_mask(brush["value"]["rle"], 30, 40), m)
    assert poly["value"]["polygonlabels"] == ["dog"] and poly["value"]["closed"]
    pts = np.array(poly["value"]["points"])
    np.testing.assert_allclose(
        sorted(map(tuple, pts)), sorted([(25, 100 / 6), (75, 100 / 6), (75, 50), (25, 50)])
    )


def test_build_results_maps_unknown_label_to_first_label():
    cfg = parse_label_config(CONFIG)
    out = build_results(cfg, [np.ones((4, 4), bool)], ["zebra"], [1.0])
    assert out[0]["value"]["brushlabels"] == ["cat"]


def test_mask_to_polygon_shapes():
    m = np.zeros((50, 60), bool)
    m[10:30, 5:40] = True
    m[20:45, 30:35] = True
    poly = mask_to_polygon(m)
    assert len(poly) == 8  # an L shape has 8 corners
    back = polygon_to_mask([[x / 60 * 100, y / 50 * 100] for x, y in poly], 60, 50)
    assert (back & m).sum() / (back | m).sum() > 0.9
    assert mask_to_polygon(np.zeros((5, 5), bool)).shape == (0, 2)
    # the largest component is the one outlined
    two = np.zeros((40, 40), bool)
    two[1:4, 1:4] = True
    two[10:30, 10:30] = True
    assert mask_to_polygon(two)[:, 0].min() == 10


def test_mask_to_polygon_downscales_big_masks():
    m = np.zeros((2000, 1000), bool)
    m[100:1900, 200:800] = True
    poly = mask_to_polygon(m, max_side=500)
    assert poly[:, 0].min() == pytest.approx(200, abs=4) and poly[:, 1].max() == pytest.approx(1900, abs=4)


def test_scores_are_clamped_for_label_studio():
    assert [clamp_score(x) for x in (-0.3, 0.25, 1.7, float("nan"))] == [0.0, 0.25, 1.0, 0.0]
    out = build_results(parse_label_config(POLYGON_CONFIG), [np.ones((6, 6), bool)], ["cat"], [-0.01])
    assert [r["score"] for r in out] == [0.0, 0.0]
