"""Pure conversions between napari layer data and SAM prompts / label images.

Nothing here imports Qt, napari or torch: every function takes and returns numpy arrays so it can be
tested on its own. Conventions:

* napari stores points and shape vertices as ``(row, col)`` (``(..., row, col)`` for stacks) in data
  coordinates, with integer coordinates at pixel centres. SAM's prompts are ``(x, y)`` in pixels of the
  original image with the same "integer = pixel index" convention, so ``x = col`` and ``y = row``.
* Boxes are XYXY (``x0, y0, x1, y1``); a pixel belongs to a box when its centre lies inside it.
* A *slice index* is the tuple of integer indices of the leading (non-displayed) axes of a stack;
  ``()`` for a plain 2-D image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

POSITIVE = 1
NEGATIVE = 0
PADDING = -1

SliceIndex = tuple[int, ...]


class PromptError(ValueError):
    """Prompts or layers that cannot be turned into a prediction (message is shown to the user)."""


# --------------------------------------------------------------------------------------------- images
def spatial_shape(data_shape: Sequence[int], rgb: bool) -> tuple[int, ...]:
    """Shape of an image layer without its colour axis: ``(..., H, W)``."""
    shape = tuple(int(s) for s in data_shape)
    if rgb:
        shape = shape[:-1]
    if len(shape) < 2:
        raise PromptError(f"an image needs at least 2 spatial axes, got shape {tuple(data_shape)}")
    return shape


def current_slice(data_point: Sequence[float], shape: Sequence[int]) -> SliceIndex:
    """Slice index of the leading axes for a position in data coordinates.

    Args:
        data_point: position of the viewer in the image's data coordinates, one value per spatial axis
            (``layer.world_to_data(viewer.dims.point)``); only the leading ``len(shape) - 2`` matter.
        shape: spatial shape ``(..., H, W)`` of the image.

    Returns:
        Tuple of ``len(shape) - 2`` ints, rounded and clipped into the stack.
    """
    n_lead = len(shape) - 2
    point = list(data_point)[-len(shape) :] if len(shape) else []
    out = []
    for axis in range(n_lead):
        value = point[axis] if axis < len(point) else 0.0
        out.append(int(np.clip(np.rint(value), 0, shape[axis] - 1)))
    return tuple(out)


def extract_slice(data: np.ndarray, slice_index: SliceIndex) -> np.ndarray:
    """The 2-D plane (``(H, W)`` or ``(H, W, C)``) of ``data`` at ``slice_index`` as a numpy array.

    ``data`` is anything indexable like an array (numpy, dask, zarr); a multiscale list takes its
    full-resolution level 0.
    """
    if isinstance(data, list | tuple):
        if not data:
            raise PromptError("the image layer has no data")
        data = data[0]
    return np.asarray(data[tuple(slice_index)])


# -------------------------------------------------------------------------------------------- prompts
@dataclass
class Prompts:
    """Prompts of one slice in SAM's convention.

    Attributes:
        point_coords: ``(P, 2)`` float64 ``(x, y)`` pixels.
        point_labels: ``(P,)`` int64, 1 positive, 0 negative.
        boxes: ``(N, 4)`` float64 XYXY pixels.
        messages: human-readable notes about prompts that were dropped or clipped.
    """

    point_coords: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))
    point_labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), dtype=np.int64))
    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    messages: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return len(self.point_coords) == 0 and len(self.boxes) == 0


def _on_slice(leading: np.ndarray, slice_index: SliceIndex) -> np.ndarray:
    """Bool mask of rows of ``leading`` ``(M, n_lead)`` that round to ``slice_index``."""
    if leading.shape[1] == 0:
        return np.ones(leading.shape[0], dtype=bool)
    return np.all(np.rint(leading) == np.asarray(slice_index, dtype=np.float64)[None, :], axis=1)


def _split_leading(
    coords: np.ndarray, slice_index: SliceIndex, what: str
) -> tuple[np.ndarray, np.ndarray, SliceIndex]:
    """Split ``(M, D)`` coordinates into leading axes, the last two (row, col) and the index to match."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise PromptError(f"{what} must have shape (M, D>=2), got {coords.shape}")
    n_lead = coords.shape[1] - 2
    if n_lead not in (0, len(slice_index)):
        raise PromptError(
            f"{what} have {coords.shape[1]} dimensions but the image slice needs 2 or {len(slice_index) + 2}"
        )
    lead_index = slice_index if n_lead else ()
    return coords[:, :n_lead], coords[:, n_lead:], lead_index


def points_to_prompts(
    points: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    slice_index: SliceIndex,
    image_hw: tuple[int, int],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Points layer data -> SAM point prompts of one slice.

    Args:
        points: ``(M, D)`` napari point coordinates ``(..., row, col)``; ``D`` is 2 or the image's
            spatial dimensionality.
        labels: ``(M,)`` 1 positive / 0 negative per point.
        slice_index: the slice being segmented (points on other slices are ignored).
        image_hw: ``(H, W)`` of the slice; points whose centre falls outside are dropped with a note.

    Returns:
        ``(coords (P, 2) float64 xy, labels (P,) int64, messages)``.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.size == 0:
        return np.zeros((0, 2)), np.zeros((0,), dtype=np.int64), []
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(points):
        raise PromptError(f"{len(points)} points but {len(labels)} point labels")
    leading, rc, lead_index = _split_leading(points, slice_index, "points")
    keep = _on_slice(leading, lead_index)
    rc, labels = rc[keep], labels[keep]
    bad_labels = ~np.isin(labels, (POSITIVE, NEGATIVE))
    if bad_labels.any():
        raise PromptError(
            f"point labels must be 1 (positive) or 0 (negative), got {sorted(set(labels[bad_labels]))}"
        )
    h, w = image_hw
    inside = (rc[:, 0] >= -0.5) & (rc[:, 0] < h - 0.5) & (rc[:, 1] >= -0.5) & (rc[:, 1] < w - 0.5)
    messages = []
    if not inside.all():
        messages.append(f"{int((~inside).sum())} point(s) outside the image ignored")
    rc, labels = rc[inside], labels[inside]
    return rc[:, ::-1].copy(), labels.astype(np.int64), messages


def shapes_to_boxes(
    shapes: Sequence[np.ndarray],
    shape_types: Sequence[str],
    slice_index: SliceIndex,
    image_hw: tuple[int, int],
) -> tuple[np.ndarray, list[str]]:
    """Shapes layer rectangles -> SAM boxes of one slice.

    Rectangles (rotated ones by their axis-aligned bounding box) become XYXY boxes clipped to the
    image; other shape types, boxes on other slices and boxes entirely outside the image are skipped
    (the latter two with a note).

    Args:
        shapes: list of ``(V, D)`` vertex arrays in napari order ``(..., row, col)``.
        shape_types: napari shape type per shape (``"rectangle"``, ``"ellipse"``...).
        slice_index: slice being segmented.
        image_hw: ``(H, W)`` of the slice.

    Returns:
        ``(boxes (N, 4) float64 XYXY, messages)``.
    """
    if len(shapes) != len(shape_types):
        raise PromptError(f"{len(shapes)} shapes but {len(shape_types)} shape types")
    h, w = image_hw
    boxes, messages = [], []
    n_other = n_outside = 0
    for verts, kind in zip(shapes, shape_types, strict=True):
        if kind != "rectangle":
            n_other += 1
            continue
        leading, rc, lead_index = _split_leading(verts, slice_index, "shape vertices")
        if not _on_slice(leading[:1], lead_index)[0]:
            continue
        r0, c0 = rc.min(axis=0)
        r1, c1 = rc.max(axis=0)
        x0, x1 = max(c0, -0.5), min(c1, w - 0.5)
        y0, y1 = max(r0, -0.5), min(r1, h - 0.5)
        if x1 <= x0 or y1 <= y0:
            n_outside += 1
            continue
        boxes.append((x0, y0, x1, y1))
    if n_other:
        messages.append(f"{n_other} non-rectangle shape(s) ignored (draw rectangles for boxes)")
    if n_outside:
        messages.append(f"{n_outside} box(es) outside the image ignored")
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return arr, messages


@dataclass
class PromptBatch:
    """Prompts grouped into N objects for one batched decoder call (SAM's ``predict_torch`` layout).

    Attributes:
        point_coords: ``(N, P, 2)`` xy or None; rows padded with label -1.
        point_labels: ``(N, P)`` or None.
        boxes: ``(N, 4)`` XYXY or None.
        messages: notes about points that could not be assigned to a box.
    """

    point_coords: np.ndarray | None
    point_labels: np.ndarray | None
    boxes: np.ndarray | None
    messages: list[str] = field(default_factory=list)

    @property
    def num_objects(self) -> int:
        if self.boxes is not None:
            return len(self.boxes)
        return 0 if self.point_coords is None else len(self.point_coords)


def group_prompts(prompts: Prompts) -> PromptBatch:
    """Group the prompts of one slice into objects.

    * No box: all points form one object.
    * One box: the box and all points form one object.
    * Several boxes: one object per box; each point joins the smallest box containing it, points in
      no box are ignored with a note. Rows are padded to equal length with label -1 (SAM's
      "not a point").
    """
    coords, labels, boxes = prompts.point_coords, prompts.point_labels, prompts.boxes
    if prompts.empty:
        return PromptBatch(None, None, None)
    if len(boxes) == 0:
        return PromptBatch(coords[None].copy(), labels[None].copy(), None)
    if len(boxes) == 1:
        if len(coords) == 0:
            return PromptBatch(None, None, boxes.copy())
        return PromptBatch(coords[None].copy(), labels[None].copy(), boxes.copy())
    owners = []
    messages = []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for x, y in coords:
        inside = (boxes[:, 0] <= x) & (x <= boxes[:, 2]) & (boxes[:, 1] <= y) & (y <= boxes[:, 3])
        owners.append(int(np.argmin(np.where(inside, areas, np.inf))) if inside.any() else -1)
    owners_arr = np.asarray(owners, dtype=np.int64)
    n_loose = int((owners_arr < 0).sum())
    if n_loose:
        messages.append(
            f"{n_loose} point(s) outside every box ignored (with several boxes, points refine the box they lie in)"
        )
    per_box = [np.flatnonzero(owners_arr == i) for i in range(len(boxes))]
    width = max((len(ix) for ix in per_box), default=0)
    if width == 0:
        return PromptBatch(None, None, boxes.copy(), messages)
    pc = np.zeros((len(boxes), width, 2), dtype=np.float64)
    pl = np.full((len(boxes), width), PADDING, dtype=np.int64)
    for i, ix in enumerate(per_box):
        pc[i, : len(ix)] = coords[ix]
        pl[i, : len(ix)] = labels[ix]
    return PromptBatch(pc, pl, boxes.copy(), messages)


# ---------------------------------------------------------------------------------------------- masks
def choose_candidates(scores: np.ndarray, choice: int | None) -> np.ndarray:
    """Which candidate to show for each object.

    Args:
        scores: ``(N, K)`` predicted IoU.
        choice: None for the best-scored candidate of each object, else candidate ``choice % K``.

    Returns:
        ``(N,)`` int64 candidate indices.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"expected scores (N, K), got {scores.shape}")
    n, k = scores.shape
    chosen = np.argmax(scores, axis=1) if choice is None else np.full(n, int(choice) % max(k, 1))
    return chosen.astype(np.int64)


def centre_boxes(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """XYXY boxes -> the inclusive pixel ranges whose pixel centres lie inside them.

    napari draws pixel ``i`` over ``[i - 0.5, i + 0.5]``, so the pixels a rectangle covers by their
    centres are columns ``ceil(x0) .. floor(x1)`` and rows ``ceil(y0) .. floor(y1)``. The result has
    integer corners, so any "inclusive pixel box" convention (``rwkvsam_core``'s keeps columns
    floor(x0) .. ceil(x1)) selects exactly these pixels.

    Args:
        boxes: ``(N, 4)`` XYXY.

    Returns:
        ``(pixel_boxes (N, 4) float64 XYXY with integer values, empty (N,) bool)``: ``empty`` marks
        boxes that contain no pixel centre (their pixel box is meaningless).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.stack(
        [np.ceil(boxes[:, 0]), np.ceil(boxes[:, 1]), np.floor(boxes[:, 2]), np.floor(boxes[:, 3])], axis=1
    )
    empty = (out[:, 0] > out[:, 2]) | (out[:, 1] > out[:, 3])
    return out, empty


def masks_to_label_image(masks: np.ndarray, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """``(N, H, W)`` bool -> ``(H, W)`` labels 1..N (earlier objects win where masks overlap)."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros(masks.shape[1:], dtype=dtype)
    for i in range(len(masks) - 1, -1, -1):
        out[masks[i]] = i + 1
    return out


def write_changed_region(plane: np.ndarray, new: np.ndarray | None) -> tuple[slice, slice] | None:
    """Make ``plane`` equal ``new`` (None: all zeros) in place, writing only where they differ.

    Args:
        plane: ``(H, W)`` array, typically a view into a label layer's data.
        new: ``(H, W)`` values, or None for zeros.

    Returns:
        The smallest ``(rows, cols)`` slices that hold every changed pixel, or None if nothing changed.
    """
    changed = plane != 0 if new is None else plane != new
    rows = np.flatnonzero(changed.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(changed.any(axis=0))
    region = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    plane[region] = 0 if new is None else new[region]
    return region


# --------------------------------------------------------------------------------------------- labels
@dataclass
class CommitRecord:
    """What one commit changed, enough to undo it.

    Attributes:
        slice_index: slice of the labels stack that was written.
        flat_index: ``(M,)`` flat indices into that 2-D slice.
        old_values: ``(M,)`` values before the commit.
        label_ids: ids given to the committed objects.
    """

    slice_index: SliceIndex
    flat_index: np.ndarray
    old_values: np.ndarray
    label_ids: list[int]


def next_label_id(labels: np.ndarray) -> int:
    """Smallest id above every id present in ``labels`` (1 for an empty layer)."""
    labels = np.asarray(labels)
    return int(labels.max()) + 1 if labels.size else 1


def commit_masks(
    labels: np.ndarray, slice_index: SliceIndex, masks: np.ndarray, overwrite: bool = False
) -> CommitRecord:
    """Write object masks into ``labels`` in place, each under a new id.

    Args:
        labels: ``(..., H, W)`` integer label image (the whole stack).
        slice_index: slice of the leading axes to write into.
        masks: ``(N, H, W)`` bool, one per object; empty masks get no id.
        overwrite: when False (default) pixels that already carry a label keep it, so existing labels
            are never overwritten; objects of the same commit never overwrite each other either.

    Returns:
        A :class:`CommitRecord` for :func:`undo_commit`.
    """
    masks = np.asarray(masks, dtype=bool)
    plane = labels[tuple(slice_index)]
    if plane.shape != masks.shape[1:]:
        raise PromptError(f"mask shape {masks.shape[1:]} does not match the labels slice {plane.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise PromptError(f"a labels layer must hold integers, got dtype {labels.dtype}")
    start = next_label_id(labels)
    if start + len(masks) - 1 > np.iinfo(labels.dtype).max:
        raise PromptError(f"the labels layer's dtype {labels.dtype} has no room for new ids")
    taken = plane != 0
    written = np.zeros(plane.shape, dtype=bool)
    new_values = plane.copy()
    ids = []
    for mask in masks:
        target = mask & ~written if overwrite else mask & ~taken & ~written
        if not target.any():
            continue
        label_id = start + len(ids)
        new_values[target] = label_id
        written |= target
        ids.append(label_id)
    flat = np.flatnonzero(written)
    old = plane.reshape(-1)[flat].copy()
    plane[written] = new_values[written]  # plane is a view: this writes into labels
    return CommitRecord(tuple(slice_index), flat, old, ids)


def undo_commit(labels: np.ndarray, record: CommitRecord) -> None:
    """Restore the pixels a :func:`commit_masks` call changed (in place)."""
    plane = labels[tuple(record.slice_index)]
    rows, cols = np.unravel_index(record.flat_index, plane.shape)
    plane[rows, cols] = record.old_values
