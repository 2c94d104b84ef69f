"""Pure prompt/label conversions of the napari plugin: no Qt, no napari, no torch."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from napari_plugin._conversion import (
    PADDING,
    PromptError,
    Prompts,
    centre_boxes,
    choose_candidates,
    commit_masks,
    current_slice,
    extract_slice,
    group_prompts,
    masks_to_label_image,
    next_label_id,
    points_to_prompts,
    shapes_to_boxes,
    spatial_shape,
    undo_commit,
    write_changed_region,
)


def test_module_imports_neither_qt_nor_torch():
    import subprocess

    code = (
        "import sys, napari_plugin._conversion, napari_plugin;"
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_spatial_shape_and_slice():
    assert spatial_shape((5, 40, 60, 3), rgb=True) == (5, 40, 60)
    assert spatial_shape((40, 60), rgb=False) == (40, 60)
    with pytest.raises(PromptError):
        spatial_shape((60, 3), rgb=True)
    assert current_slice([2.4, 10.0, 3.0], (5, 40, 60)) == (2,)
    assert current_slice([99.0, 0.0, 0.0], (5, 40, 60)) == (4,)  # clipped into the stack
    assert current_slice([1.0, 3.0, 2.0, 5.0], (2, 4, 40, 60)) == (1, 3)
    assert current_slice([7.0, 5.0], (40, 60)) == ()


def test_extract_slice_numpy_and_multiscale():
    stack = np.arange(3 * 4 * 5).reshape(3, 4, 5)
    np.testing.assert_array_equal(extract_slice(stack, (1,)), stack[1])
    np.testing.assert_array_equal(extract_slice([stack, stack[:, ::2, ::2]], (2,)), stack[2])
    np.testing.assert_array_equal(extract_slice(stack[0], ()), stack[0])


def test_points_to_prompts_swaps_to_xy_and_filters_slice_and_outside():
    # (z, row, col) points on a (3, 40, 60) stack
    pts = np.array([[1, 10, 20], [1, 30, 5], [0, 10, 20], [1, 45, 5], [1.2, 2, 70]])
    labels = [1, 0, 1, 1, 1]
    coords, lab, notes = points_to_prompts(pts, labels, (1,), (40, 60))
    np.testing.assert_array_equal(coords, [[20, 10], [5, 30]])
    np.testing.assert_array_equal(lab, [1, 0])
    assert notes == ["2 point(s) outside the image ignored"]
    # 2-D points apply to every slice
    coords, lab, _ = points_to_prompts(np.array([[3.0, 4.0]]), [0], (2,), (40, 60))
    np.testing.assert_array_equal(coords, [[4.0, 3.0]])
    np.testing.assert_array_equal(lab, [0])
    empty, lab, notes = points_to_prompts(np.zeros((0, 3)), [], (0,), (40, 60))
    assert empty.shape == (0, 2) and lab.shape == (0,) and notes == []
    with pytest.raises(PromptError, match="1 \\(positive\\) or 0"):
        points_to_prompts(np.array([[1.0, 1.0]]), [2], (), (4, 4))
    with pytest.raises(PromptError, match="dimensions"):
        points_to_prompts(np.array([[1.0, 1.0, 1.0, 1.0]]), [1], (0,), (4, 4))


def test_shapes_to_boxes_rectangles_only_and_clipped():
    rect = np.array([[10, 20], [10, 50], [30, 50], [30, 20]], dtype=float)  # (row, col)
    outside = rect + 1000
    big = np.array([[-5, -5], [-5, 80], [50, 80], [50, -5]], dtype=float)
    ellipse = rect.copy()
    boxes, notes = shapes_to_boxes(
        [rect, ellipse, outside, big], ["rectangle", "ellipse", "rectangle", "rectangle"], (), (40, 60)
    )
    np.testing.assert_array_equal(boxes, [[20, 10, 50, 30], [-0.5, -0.5, 59.5, 39.5]])
    assert any("non-rectangle" in n for n in notes) and any("outside the image" in n for n in notes)
    # stacks: only the rectangles of the slice
    r3 = [np.c_[np.full(4, z), rect] for z in (0, 2)]
    boxes, _ = shapes_to_boxes(r3, ["rectangle"] * 2, (2,), (40, 60))
    np.testing.assert_array_equal(boxes, [[20, 10, 50, 30]])


def test_group_prompts_rules():
    pts = np.array([[5.0, 5.0], [25.0, 25.0], [90.0, 90.0]])
    lab = np.array([1, 0, 1])
    one = group_prompts(Prompts(pts, lab, np.zeros((0, 4))))
    assert one.num_objects == 1 and one.boxes is None and one.point_coords.shape == (1, 3, 2)
    with_box = group_prompts(Prompts(pts, lab, np.array([[0.0, 0, 50, 50]])))
    assert with_box.num_objects == 1 and with_box.point_coords.shape == (1, 3, 2)
    boxes = np.array([[0.0, 0, 50, 50], [20.0, 20, 30, 30], [60.0, 60, 70, 70]])
    many = group_prompts(Prompts(pts, lab, boxes))
    assert many.num_objects == 3
    # (5,5) only in box 0; (25,25) in boxes 0 and 1 -> the smaller box 1; (90,90) in none
    np.testing.assert_array_equal(many.point_labels, [[1], [0], [PADDING]])
    np.testing.assert_array_equal(many.point_coords[:2, 0], [[5, 5], [25, 25]])
    assert "1 point(s) outside every box" in many.messages[0]
    only_boxes = group_prompts(Prompts(np.zeros((0, 2)), np.zeros(0, int), boxes))
    assert only_boxes.point_coords is None and only_boxes.num_objects == 3
    assert group_prompts(Prompts()).num_objects == 0


def test_choose_candidates_best_and_cycled():
    scores = np.array([[0.1, 0.9, 0.3], [0.8, 0.2, 0.1]])
    np.testing.assert_array_equal(choose_candidates(scores, None), [1, 0])
    np.testing.assert_array_equal(choose_candidates(scores, 5), [2, 2])
    assert choose_candidates(scores, None).dtype == np.int64
    np.testing.assert_array_equal(choose_candidates(np.array([[0.3]]), 4), [0])


def test_centre_boxes_are_the_pixels_whose_centre_is_inside():
    boxes = np.array(
        [[2.0, 3.0, 5.0, 6.0], [2.4, 3.6, 5.2, 6.0], [-0.5, -0.5, 11.5, 9.5], [2.2, 1.0, 2.8, 4.0]]
    )
    pixel_boxes, empty = centre_boxes(boxes)
    np.testing.assert_array_equal(pixel_boxes, [[2, 3, 5, 6], [3, 4, 5, 6], [0, 0, 11, 9], [3, 1, 2, 4]])
    np.testing.assert_array_equal(empty, [False, False, False, True])  # no column centre in 2.2..2.8


def test_write_changed_region_writes_and_reports_only_the_changed_rectangle():
    plane = np.zeros((6, 8), dtype=np.uint8)
    new = np.zeros_like(plane)
    new[1:3, 2:5] = 1
    new[4, 3] = 2
    assert write_changed_region(plane, new) == (slice(1, 5), slice(2, 5))
    np.testing.assert_array_equal(plane, new)
    assert write_changed_region(plane, new) is None  # nothing changed: nothing to redraw
    new2 = new.copy()
    new2[4, 3] = 0
    assert write_changed_region(plane, new2) == (slice(4, 5), slice(3, 4))
    np.testing.assert_array_equal(plane, new2)
    assert write_changed_region(plane, None) == (slice(1, 3), slice(2, 5))  # cleared
    assert not plane.any()
    stack = np.zeros((2, 6, 8), dtype=np.uint8)
    assert write_changed_region(stack[1], new) is not None  # a view: writes into the stack
    assert stack[1].any() and not stack[0].any()


def test_masks_to_label_image_first_object_wins():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2] = True
    masks[1, 1:] = True
    lab = masks_to_label_image(masks)
    assert lab.dtype == np.uint8
    np.testing.assert_array_equal(lab[:, 0], [1, 1, 2, 2])


def test_commit_never_overwrites_unless_asked_and_undo_restores():
    labels = np.zeros((3, 6, 6), dtype=np.int32)
    labels[1, 0, 0] = 7  # an existing label
    mask = np.zeros((1, 6, 6), dtype=bool)
    mask[0, :2, :2] = True
    before = labels.copy()
    rec = commit_masks(labels, (1,), mask)
    assert rec.label_ids == [8]
    assert labels[1, 0, 0] == 7 and labels[1, 1, 1] == 8 and (labels[1] == 8).sum() == 3
    assert (labels[0] == 0).all() and (labels[2] == 0).all()  # other slices untouched
    rec2 = commit_masks(labels, (1,), mask, overwrite=True)
    assert rec2.label_ids == [9] and (labels[1, :2, :2] == 9).all()
    undo_commit(labels, rec2)
    undo_commit(labels, rec)
    np.testing.assert_array_equal(labels, before)


def test_commit_several_objects_get_distinct_ids_and_empty_masks_none():
    labels = np.zeros((5, 5), dtype=np.uint16)
    masks = np.zeros((3, 5, 5), dtype=bool)
    masks[0, 0] = True
    masks[2, 0:2] = True  # overlaps object 0 on row 0
    rec = commit_masks(labels, (), masks)
    assert rec.label_ids == [1, 2]
    np.testing.assert_array_equal(labels[0], [1] * 5)
    np.testing.assert_array_equal(labels[1], [2] * 5)
    assert next_label_id(labels) == 3
    with pytest.raises(PromptError, match="does not match"):
        commit_masks(labels, (), np.zeros((1, 4, 4), dtype=bool))
    with pytest.raises(PromptError, match="no room"):
        commit_masks(np.full((2, 2), 255, np.uint8), (), np.ones((1, 2, 2), bool))
