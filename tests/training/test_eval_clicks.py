"""The first click of ``benchmarks/eval_starter.py --prompt click``: inside the object, farthest from its edge."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from eval_starter import first_clicks  # noqa: E402


def test_first_click_is_the_interior_point_farthest_from_the_boundary():
    masks = np.zeros((3, 40, 60), bool)
    masks[0, 10:31, 5:26] = True  # square: its centre
    masks[1, 0:9, 40:60] = True  # touches the image border, which counts as an edge
    yy, xx = np.mgrid[0:40, 0:60]  # a C shape: the centre of its bounding box is outside it
    ring = ((yy - 20) ** 2 + (xx - 30) ** 2 <= 15**2) & ((yy - 20) ** 2 + (xx - 30) ** 2 >= 8**2)
    masks[2] = ring & ~((xx > 30) & (abs(yy - 20) < 5))
    xy = first_clicks(masks)
    assert xy[0].tolist() == [15.0, 20.0]
    assert xy[1][1] == 4.0  # the middle row of the band
    for m, (x, y) in zip(masks, xy, strict=True):
        assert m[int(y), int(x)]
