import numpy as np
import pytest

from rwkvsam_core.metrics import (
    boundary_dilation,
    boundary_iou,
    mask_boundary,
    mask_iou,
    mask_iou_matrix,
    summarize_ious,
)


def square(top: int, left: int, size: int = 4, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def test_mask_iou_hand_values() -> None:
    gt = square(2, 2)
    assert mask_iou(gt, gt) == 1.0
    assert mask_iou(square(2, 3), gt) == pytest.approx(12 / 20)  # 12 shared of 20 pixels
    assert mask_iou(np.zeros((8, 8), bool), gt) == 0.0
    assert mask_iou(np.zeros((8, 8), bool), np.zeros((8, 8), bool)) == 1.0


def test_boundary_is_ring_and_boundary_iou_hand_value() -> None:
    gt = square(2, 2)
    ring = mask_boundary(gt)  # 8x8 image: d = max(1, round(0.02 * 11.3)) = 1
    assert ring.sum() == 12 and not ring[3:5, 3:5].any()
    # rings of the 4x4 square and its 1-px shift share 6 pixels (rows 2 and 5, cols 3-5) of 18
    assert boundary_iou(square(2, 3), gt) == pytest.approx(6 / 18)
    assert boundary_iou(gt, gt) == 1.0


def test_boundary_dilation_follows_definition() -> None:
    assert boundary_dilation((8, 8)) == 1
    assert boundary_dilation((1000, 1000)) == 28  # round(0.02 * 1414.2)
    big = np.zeros((1000, 1000), bool)
    big[100:900, 100:900] = True
    band = mask_boundary(big)
    assert band[500, 100:128].all() and not band[500, 128]  # 28 erosions leave a 28-px band


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="same shape"):
        mask_iou(np.zeros((4, 4)), np.zeros((4, 5)))


def test_iou_matrix_and_summary() -> None:
    a, b = square(2, 2), square(2, 3)
    m = mask_iou_matrix(np.stack([a, b]), np.stack([a]))
    assert m.shape == (2, 1) and m[0, 0] == 1.0 and m[1, 0] == pytest.approx(0.6)
    s = summarize_ious([1.0, 0.5], [0.5, 0.5])
    assert s == {"mIoU": 75.0, "mBIoU": 50.0, "instances": 2}


def test_coco_mask_ap_perfect_and_wrong() -> None:
    pytest.importorskip("pycocotools")
    from rwkvsam_core.data.codecs import coco_rle_encode
    from rwkvsam_core.metrics import coco_mask_ap

    masks = [np.zeros((40, 40), bool) for _ in range(2)]
    masks[0][5:20, 5:20] = True
    masks[1][22:38, 20:39] = True
    gt = {
        "images": [{"id": 1, "height": 40, "width": 40, "file_name": "x.png"}],
        "categories": [{"id": 1, "name": "o"}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 1,
                "category_id": 1,
                "iscrowd": 0,
                "area": float(m.sum()),
                "bbox": [0, 0, 40, 40],
                "segmentation": coco_rle_encode(m, compress=True),
            }
            for i, m in enumerate(masks)
        ],
    }
    perfect = [
        {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": coco_rle_encode(m, compress=True)}
        for m in masks
    ]
    res = coco_mask_ap(gt, perfect)
    assert res["AP"] == pytest.approx(100.0) and res["boundary_AP"] == pytest.approx(100.0)
    shifted = np.roll(masks[0], 3, axis=1)  # IoU 0.67: counts at AP50 only; boundary IoU lower still
    res = coco_mask_ap(
        gt,
        [
            {
                "image_id": 1,
                "category_id": 1,
                "score": 0.9,
                "segmentation": coco_rle_encode(shifted, compress=True),
            }
        ],
    )
    assert 0 < res["AP"] < 100 and res["boundary_AP"] < res["AP"]
