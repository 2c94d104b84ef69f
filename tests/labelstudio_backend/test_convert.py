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
    object_start,
    parse_context,
    parse_label_config,
    percent_to_pixel_point,
    pixel_to_percent_point,
    polygon_to_mask,
    rect_to_xyxy,
    rle_decode,
    rle_encode,
    rle_to_mask,
    touched_pixels,
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


def _previous_clip(mask, box):
    """The backend's own clip before it used the core's (kept as the reference)."""
    h, w = mask.shape
    x0, y0 = int(np.clip(np.floor(box[0]), 0, w)), int(np.clip(np.floor(box[1]), 0, h))
    x1, y1 = int(np.clip(np.ceil(box[2]), 0, w)), int(np.clip(np.ceil(box[3]), 0, h))
    out = np.zeros_like(mask, dtype=bool)
    out[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    return out


def test_clip_to_boxes_keeps_the_pixels_a_label_studio_box_touches():
    from labelstudio_backend.model import clip_to_boxes
    from rwkvsam_core.predictor import clip_masks_to_boxes

    np.testing.assert_array_equal(touched_pixels(np.array([10, 5, 20, 7.5])), [10, 5, 19, 7])
    np.testing.assert_array_equal(touched_pixels(np.array([10.2, 5.9, 20.3, 7.0])), [10, 5, 20, 6])
    full = np.ones((1, 1, 12, 30), bool)
    box = np.array([[10, 5, 20, 7.5]])  # pixel columns 10..19, rows 5..7: 10 x 3 pixels
    assert clip_to_boxes(full, box).sum() == 30
    # the core's convention reads the box as inclusive pixel indices: one more column and row
    assert clip_masks_to_boxes(full, box).sum() == 11 * 4
    # same pixels as the backend's previous clip, boxes at fractional and integer positions
    rng = np.random.default_rng(0)
    masks = rng.random((40, 1, 48, 64)) < 0.5
    x0, y0 = rng.uniform(-5, 60, 40), rng.uniform(-5, 44, 40)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1, 30, 40), y0 + rng.uniform(1, 30, 40)], 1)
    boxes[::3] = boxes[::3].round()
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, 64)  # clipped to the image like rect_to_xyxy's
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, 48)
    boxes = boxes[(boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)]  # not degenerate
    clipped = clip_to_boxes(masks[: len(boxes)], boxes)
    for m, b, c in zip(masks[: len(boxes)], boxes, clipped, strict=True):
        np.testing.assert_array_equal(c[0], _previous_clip(m[0], b))


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


def test_parse_context_bad_keypoints():
    for value in ({"x": float("nan"), "y": 5}, {"x": 5, "y": float("inf")}, {"x": "a", "y": 1}, {"y": 1}):
        item = {**keypoint(0, 0), "value": {**value, "keypointlabels": ["cat"]}}
        with pytest.raises(ConversionError):
            parse_context({"result": [item]}, 100, 100)
    with pytest.raises(ConversionError):
        parse_context({"result": [{**keypoint(0, 0), "value": "x"}]}, 100, 100)
    # clicks outside the image are not clicks on it: ignored, the others are kept
    p = parse_context(
        {"result": [keypoint(-5, 50), keypoint(50, 150), keypoint(100, 100), keypoint(20, 30)]}, 200, 100
    )
    assert [(c.x, c.y) for c in p.clicks] == [(200, 100), (40, 30)]
    assert parse_context({"result": [keypoint(120, 50)]}, 200, 100) is None


def test_pair_boxes_with_masks():
    from labelstudio_backend.convert import BoxPrompt, pair_boxes_with_masks

    def mask(x0, y0, x1, y1):
        m = np.zeros((100, 100), bool)
        m[y0:y1, x0:x1] = True
        return m

    a, b = mask(10, 10, 40, 40), mask(60, 60, 90, 95)
    box_a = BoxPrompt(np.array([8.0, 9, 42, 41]), "cat")
    box_b = BoxPrompt(np.array([58.0, 58, 92, 96]), "dog")
    loose = BoxPrompt(np.array([0.0, 0, 100, 100]), "cat")  # holds everything, but IoU with a is low
    tight = BoxPrompt(np.array([10.0, 10, 25, 40]), "cat")  # half of a sticks out
    out = pair_boxes_with_masks([a, b], ["cat", "dog"], [loose, tight, box_b, box_a])
    np.testing.assert_array_equal(out[0], box_a.box)
    np.testing.assert_array_equal(out[1], box_b.box)
    assert pair_boxes_with_masks([a, b], ["cat", "cat"], [box_b])[1] is None  # labels differ
    assert pair_boxes_with_masks([b], [None], [box_b])[0] is not None  # an unlabelled mask pairs by geometry
    twice = pair_boxes_with_masks([a, a], ["cat", "cat"], [box_a])
    assert sum(x is not None for x in twice) == 1  # one rectangle prompts one mask
    assert pair_boxes_with_masks([a], ["cat"], [loose, tight]) == [None]
    assert pair_boxes_with_masks([np.zeros((100, 100), bool)], ["cat"], [box_a]) == [None]


def _rule(clicks, single_masks):
    """object_start with ``single_masks[i]`` as the mask of click i alone; also returns the calls."""
    calls = []

    def joins(i, owners):
        calls.append(i)
        m = single_masks[i]
        return any(m[int(q.y), int(q.x)] for q in owners)

    start = object_start(clicks, joins)
    return clicks[start:], calls


def test_object_start_rule():
    h, w = 50, 50
    left = np.zeros((h, w), bool)
    left[:, :25] = True
    right, everything = ~left, np.ones((h, w), bool)
    a, a2 = Click(5, 5, True, "x"), Click(10, 30, True, "x")  # an object on the left
    b, c = Click(30, 10, True, "x"), Click(40, 40, True, "x")  # another object on the right
    neg_a, neg_b = Click(20, 20, False, "x"), Click(45, 5, False, "x")
    masks = {id(a): left, id(a2): left, id(b): right, id(c): right}  # Click is not hashable

    def kept(clicks):
        return _rule(clicks, [masks.get(id(k), everything) for k in clicks])[0]

    # two objects of the same label: the mask of b alone does not reach a -> b starts a new object
    assert kept([a, b, c]) == [b, c]
    assert kept([a, a2, b]) == [b]
    # clicks on one object stay together
    assert kept([a, a2]) == [a, a2]
    assert _rule([a, b, c], [everything] * 3)[0] == [a, b, c]
    # a negative click corrects the current object...
    assert kept([a, neg_a]) == [a, neg_a]
    assert kept([a, b, neg_b]) == [b, neg_b]
    assert kept([a, neg_a, a2, neg_b]) == [a, neg_a, a2, neg_b]
    # ...and stays with it when the next positive click starts another object
    assert kept([a, neg_a, b]) == [b]
    assert kept([a, neg_a, b, neg_b]) == [b, neg_b]
    # negative clicks before any positive one belong to the first object; no test is needed there
    clicks, calls = _rule([neg_a, a, a2], [everything] * 3)
    assert clicks == [neg_a, a, a2] and calls == [2]
    # the membership test runs once per positive click after the first, never for negative ones
    clicks = [a, neg_a, a2, neg_b, b]
    assert _rule(clicks, [masks.get(id(k), everything) for k in clicks]) == ([b], [2, 4])


def test_object_start_resumes_from_a_recorded_decision():
    a, b, c, d = (Click(x, x, True, "x") for x in (5, 15, 25, 35))
    same = {1: True, 2: False, 3: True}  # b joins a, c starts an object, d joins c
    seen = []
    record = []
    full = object_start(
        [a, b, c, d], lambda i, o: seen.append(i) or same[i], record=lambda j, s: record.append((j, s))
    )
    assert full == 2 and seen == [1, 2, 3] and record == [(2, 0), (3, 2), (4, 2)]
    # knowing that the object of [a, b, c] starts at 2, only d is tested
    seen.clear()
    assert object_start([a, b, c, d], lambda i, o: seen.append(i) or same[i], start=2, first=3) == 2
    assert seen == [3]


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
