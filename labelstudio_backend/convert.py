"""Pure conversions between Label Studio's JSON and the model's prompts and masks.

Nothing here imports Flask, torch or the network: every function is a plain transformation that
the unit tests exercise directly.

Conventions
-----------
* Label Studio stores geometry in percent of the original image size: ``x``/``width`` in percent of
  ``original_width``, ``y``/``height`` in percent of ``original_height``. Rectangles rotate (degrees,
  clockwise on screen) around their top-left corner ``(x, y)``.
* The model takes pixels of the original image, ``(x, y)`` points and XYXY boxes (SAM's convention).
* Brush masks travel as Label Studio's "rle": the mask is rendered as an RGBA image (4 bytes per
  pixel, 255 inside, 0 outside), flattened row-major, and compressed with the bit-packed run-length
  format of the thi.ng ``rle-pack`` library that the Label Studio frontend decodes:
  header = 32-bit value count, 5-bit (word size - 1), four 4-bit (run-size width - 1) fields;
  then chunks of ``flag (1 bit) | size index (2 bits) | count - 1 (rle_sizes[index] bits)``
  followed by one word (flag 1: a run of ``count`` copies) or ``count`` words (flag 0: literals).
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

RLE_SIZES: tuple[int, int, int, int] = (3, 4, 8, 16)
WORD_SIZE = 8


class ConversionError(ValueError):
    """Raised for Label Studio data that cannot be converted (bad RLE, bad geometry, bad config)."""


# --------------------------------------------------------------------------------------------------
# percent <-> pixel
# --------------------------------------------------------------------------------------------------
def percent_to_pixel_point(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """Convert a Label Studio point in percent to pixels of an image of ``width`` x ``height``."""
    return float(x) / 100.0 * width, float(y) / 100.0 * height


def pixel_to_percent_point(x: float, y: float, width: int, height: int) -> tuple[float, float]:
    """Convert a pixel point to Label Studio percent coordinates."""
    return float(x) * 100.0 / width, float(y) * 100.0 / height


def rect_to_xyxy(value: dict[str, Any], width: int, height: int) -> np.ndarray:
    """Convert a Label Studio rectangle value to an XYXY pixel box, shape (4,) float64.

    ``value`` holds ``x, y, width, height`` in percent and an optional ``rotation`` in degrees
    around the top-left corner; a rotated rectangle gives its axis-aligned bounding box. The box is
    clipped to the image.
    """
    try:
        x0, y0 = percent_to_pixel_point(value["x"], value["y"], width, height)
        w = float(value["width"]) / 100.0 * width
        h = float(value["height"]) / 100.0 * height
    except (KeyError, TypeError, ValueError) as exc:
        raise ConversionError(f"rectangle value lacks numeric x/y/width/height: {value!r}") from exc
    rot = math.radians(float(value.get("rotation", 0.0) or 0.0))
    corners = np.array([[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]])
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        corners = corners @ np.array([[c, s], [-s, c]])
    corners += (x0, y0)
    box = np.array(
        [corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()],
        dtype=np.float64,
    )
    box[[0, 2]] = box[[0, 2]].clip(0, width)
    box[[1, 3]] = box[[1, 3]].clip(0, height)
    if not np.all(np.isfinite(box)):
        raise ConversionError(f"rectangle has non-finite coordinates: {value!r}")
    return box


def box_is_degenerate(box: np.ndarray, min_side: float = 1.0) -> bool:
    """True when an XYXY box (4,) is narrower or lower than ``min_side`` pixels."""
    return bool(box[2] - box[0] < min_side or box[3] - box[1] < min_side)


def touched_pixels(box: np.ndarray) -> np.ndarray:
    """The pixels an XYXY pixel box (4,) of Label Studio touches, as an inclusive pixel box (4,).

    Label Studio's boxes are continuous (pixel i spans [i, i + 1)): the box touches columns
    floor(x0) .. ceil(x1) - 1 and rows floor(y0) .. ceil(y1) - 1, given here as
    ``[floor(x0), floor(y0), ceil(x1) - 1, ceil(y1) - 1]`` (the convention of a mask's extreme
    pixels, which ``rwkvsam_core.predictor.clip_masks_to_boxes`` reads). For boxes at least one pixel
    wide and high.
    """
    b = np.asarray(box, dtype=np.float64)
    return np.array([np.floor(b[0]), np.floor(b[1]), np.ceil(b[2]) - 1, np.ceil(b[3]) - 1])


# --------------------------------------------------------------------------------------------------
# RLE codec (Label Studio brush format)
# --------------------------------------------------------------------------------------------------
def _size_index(counts_minus_one: np.ndarray) -> np.ndarray:
    idx = np.zeros(counts_minus_one.shape, dtype=np.int64)
    for bits in RLE_SIZES[:-1]:
        idx += counts_minus_one >= (1 << bits)
    return idx


def rle_encode(values: np.ndarray) -> list[int]:
    """Encode a flat uint8 array with Label Studio's brush RLE.

    Runs of one value become one-word literal chunks and longer runs become repeat chunks (split
    every 2**16 values) with the narrowest count field that fits, and the bit stream is padded with
    1..8 zero bits: the same choices as Label Studio's Python encoder
    (``label_studio_sdk.converter.brush.encode_rle``), so the bytes are identical.

    Args:
        values: (N,) uint8, e.g. an RGBA mask image flattened row-major (N = 4*H*W).
    Returns:
        The RLE bytes as a list of ints (what goes into ``value.rle``).
    """
    arr = np.ascontiguousarray(values, dtype=np.uint8).ravel()
    lengths, run_vals = _runs(arr)
    return _encode_runs(arr.size, lengths, run_vals)


def _runs(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths and values of a flat array (both (R,) int64)."""
    if arr.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.flatnonzero(arr[1:] != arr[:-1]) + 1
    starts = np.concatenate(([0], change))
    lengths = np.diff(np.concatenate((starts, [arr.size])))
    return lengths.astype(np.int64), arr[starts].astype(np.int64)


def _encode_runs(n: int, lengths: np.ndarray, run_vals: np.ndarray) -> list[int]:
    """Bit-pack runs (lengths, values) of an n-value array into Label Studio's RLE bytes."""
    fields = ((n, 32), (WORD_SIZE - 1, 5), *((s - 1, 4) for s in RLE_SIZES))
    header = "".join(format(v, f"0{w}b") for v, w in fields)
    header_bits = np.frombuffer(header.encode(), dtype=np.uint8) - ord("0")
    if lengths.size:
        limit = 1 << RLE_SIZES[-1]
        pieces = (lengths + limit - 1) // limit
        vals_rep = np.repeat(run_vals, pieces)
        last = np.cumsum(pieces) - 1
        chunk_len = np.full(vals_rep.size, limit, dtype=np.int64)
        chunk_len[last] = lengths - (pieces - 1) * limit
        long_run = np.repeat(lengths > (1 << RLE_SIZES[2]), pieces)
        flag = ((chunk_len > 1) | long_run).astype(np.int64)
        cm1 = chunk_len - 1
        # every piece of a long run keeps the widest count field, as Label Studio's encoder does
        idx = np.where(long_run, 3, _size_index(cm1))
        cw = np.asarray(RLE_SIZES, dtype=np.int64)[idx]
        # one chunk = flag (1 bit) | size index (2) | count - 1 (cw) | value (8): at most 27 bits,
        # left-aligned in a big-endian 32-bit word whose first 11 + cw bits are kept
        width = 11 + cw
        chunk = (flag << (10 + cw)) | (idx << (8 + cw)) | (cm1 << 8) | (vals_rep & 0xFF)
        words = (chunk << (32 - width)).astype(">u4")
        bits = np.unpackbits(words.view(np.uint8).reshape(-1, 4), axis=1)
        body = bits[np.arange(32) < width[:, None]]
        stream = np.concatenate((header_bits, body))
    else:
        stream = header_bits
    out = np.packbits(stream).tolist()
    if stream.size % 8 == 0:
        out.append(0)  # Label Studio's encoder always pads with 1..8 zero bits
    return out


def rle_decode(rle: Sequence[int] | np.ndarray) -> np.ndarray:
    """Decode Label Studio's brush RLE to a flat uint8 array of the encoded length, shape (N,).

    Raises:
        ConversionError: truncated or malformed data.
    """
    try:
        data = np.asarray(rle, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ConversionError("RLE must be a list of byte values") from exc
    if data.ndim != 1 or data.size < 7 or data.min(initial=0) < 0 or data.max(initial=0) > 255:
        raise ConversionError("RLE must be a flat list of at least 7 byte values in 0..255")
    bits = np.unpackbits(data.astype(np.uint8))
    nbits = bits.size
    pos = 0

    def read(width: int) -> int:
        nonlocal pos
        if pos + width > nbits:
            raise ConversionError("RLE data is truncated")
        v = 0
        for b in bits[pos : pos + width]:
            v = (v << 1) | int(b)
        pos += width
        return v

    n = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    if n > 4 * 20000 * 20000:
        raise ConversionError(f"RLE declares an implausible {n} values")
    out = np.empty(n, dtype=np.uint8)
    i = 0
    while i < n:
        flag = read(1)
        count = read(sizes[read(2)]) + 1
        j = min(i + count, n)
        if flag:
            out[i:j] = read(word)
        else:
            for k in range(i, j):
                out[k] = read(word)
        i = j
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Encode a binary mask (H, W) as Label Studio brush RLE (RGBA, 255 inside)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ConversionError(f"mask must be 2-D (H, W), got shape {m.shape}")
    # The RGBA image repeats each pixel 4 times, so its runs are the mask's runs, 4 times longer.
    lengths, run_vals = _runs(m.ravel().view(np.uint8))
    return _encode_runs(4 * m.size, 4 * lengths, run_vals * 255)


def rle_to_mask(rle: Sequence[int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Decode a Label Studio brush RLE into a bool mask (H, W) (a pixel is inside when alpha > 0)."""
    flat = rle_decode(rle)
    if flat.size != height * width * 4:
        raise ConversionError(
            f"RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 0


# --------------------------------------------------------------------------------------------------
# labeling config
# --------------------------------------------------------------------------------------------------
@dataclass
class ControlTag:
    """One control tag of a labeling config (BrushLabels, RectangleLabels, ...)."""

    tag: str
    name: str
    to_name: str
    labels: list[str] = field(default_factory=list)


@dataclass
class LabelConfig:
    """What this backend needs from a labeling config: one Image and its control tags."""

    image_name: str
    image_key: str
    brush: ControlTag | None = None
    polygon: ControlTag | None = None
    rectangles: list[ControlTag] = field(default_factory=list)
    keypoints: list[ControlTag] = field(default_factory=list)

    @property
    def output_tags(self) -> list[ControlTag]:
        """The tags that receive masks: BrushLabels and/or PolygonLabels."""
        return [t for t in (self.brush, self.polygon) if t is not None]

    def default_label(self) -> str | None:
        for tag in self.output_tags:
            if tag.labels:
                return tag.labels[0]
        return None

    def output_label(self, label: str | None, tag: ControlTag) -> str | None:
        """Map a prompt's label to one of ``tag``'s labels (same name, else the tag's first label)."""
        if label is not None and (not tag.labels or label in tag.labels):
            return label
        return tag.labels[0] if tag.labels else label


_CONTROL_TAGS = {"brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels"}


def parse_label_config(xml: str) -> LabelConfig:
    """Parse a labeling config XML into a :class:`LabelConfig`.

    Raises:
        ConversionError: the XML is malformed, or it has no Image tag, or no BrushLabels or
            PolygonLabels tag pointing at an Image.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise ConversionError("labeling config is empty")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ConversionError(f"labeling config is not valid XML: {exc}") from exc
    images: dict[str, str] = {}
    controls: list[ControlTag] = []
    for el in root.iter():
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if tag == "image" and el.get("name") and el.get("value", "").startswith("$"):
            images[el.get("name", "")] = el.get("value", "")[1:]
        elif tag in _CONTROL_TAGS and el.get("name") and el.get("toName"):
            labels = [c.get("value", "") for c in el if isinstance(c.tag, str) and c.tag.lower() == "label"]
            controls.append(ControlTag(tag, el.get("name", ""), el.get("toName", ""), labels))
    if not images:
        raise ConversionError('labeling config has no <Image name=... value="$..."> tag')
    for image_name, key in images.items():
        mine = [c for c in controls if image_name in c.to_name.split(",")]
        brush = next((c for c in mine if c.tag == "brushlabels"), None)
        polygon = next((c for c in mine if c.tag == "polygonlabels"), None)
        if brush is None and polygon is None:
            continue
        return LabelConfig(
            image_name=image_name,
            image_key=key,
            brush=brush,
            polygon=polygon,
            rectangles=[c for c in mine if c.tag == "rectanglelabels"],
            keypoints=[c for c in mine if c.tag == "keypointlabels"],
        )
    raise ConversionError("labeling config has no <BrushLabels> or <PolygonLabels> for an <Image>")


# --------------------------------------------------------------------------------------------------
# context -> prompts
# --------------------------------------------------------------------------------------------------
@dataclass
class Click:
    """One keypoint in original pixels; ``positive`` is False for negative clicks."""

    x: float
    y: float
    positive: bool
    label: str | None


@dataclass
class BoxPrompt:
    """One rectangle as an XYXY pixel box (4,) with its label."""

    box: np.ndarray
    label: str | None


@dataclass
class InteractivePrompt:
    """The prompts of one interactive request, in original pixels."""

    clicks: list[Click]
    box: BoxPrompt | None
    label: str | None
    width: int | None
    height: int | None


def _first_label(value: dict[str, Any], key: str) -> str | None:
    labels = value.get(key) or []
    return str(labels[0]) if isinstance(labels, list) and labels else None


def _size_of(item: dict[str, Any]) -> tuple[int | None, int | None]:
    w, h = item.get("original_width"), item.get("original_height")
    try:
        return (int(w), int(h)) if w and h else (None, None)
    except (TypeError, ValueError):
        return None, None


def parse_context(
    context: dict[str, Any] | None, width: int | None = None, height: int | None = None
) -> InteractivePrompt | None:
    """Turn an interactive request's ``params.context`` into prompts.

    Keypoints (``keypointlabels``, ``is_positive`` absent means positive) keep their order; the
    newest is last, as the frontend sends them. Of the rectangles only the newest (the last one) is
    kept: Label Studio resends earlier rectangles of the same label, and a rectangle request always
    means the box just drawn. ``width``/``height`` are the image size in pixels; when None, the
    items' ``original_width``/``original_height`` are used. Keypoints outside the image are ignored
    (logged); rectangles are clipped to it.

    Returns:
        None when the context holds no keypoint or rectangle.
    Raises:
        ConversionError: an item misses its coordinates or no image size is known.
    """
    if not context or not isinstance(context, dict):
        return None
    items = context.get("result") or []
    if not isinstance(items, list):
        raise ConversionError("context.result must be a list")
    clicks: list[Click] = []
    boxes: list[BoxPrompt] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("type", "")).lower()
        value = item.get("value") or {}
        if kind not in ("keypointlabels", "rectanglelabels"):
            continue
        w, h = (width, height) if width and height else _size_of(item)
        if not w or not h:
            raise ConversionError("context item has no original_width/original_height")
        if kind == "keypointlabels":
            try:
                px, py = percent_to_pixel_point(value["x"], value["y"], w, h)
            except (KeyError, TypeError, ValueError) as exc:
                raise ConversionError(f"keypoint without numeric x/y: {value!r}") from exc
            if not (math.isfinite(px) and math.isfinite(py)):
                raise ConversionError(f"keypoint has non-finite coordinates: {value!r}")
            if not (0 <= px <= w and 0 <= py <= h):
                logger.info("keypoint %s lies outside the %dx%d image: ignored", item.get("id"), w, h)
                continue
            positive = item.get("is_positive", value.get("is_positive", True))
            clicks.append(
                Click(px, py, positive is not False and positive != 0, _first_label(value, "keypointlabels"))
            )
        else:
            boxes.append(BoxPrompt(rect_to_xyxy(value, w, h), _first_label(value, "rectanglelabels")))
    if not clicks and not boxes:
        return None
    box = boxes[-1] if boxes else None
    if box is not None:
        label = box.label
    else:
        label = next((c.label for c in reversed(clicks) if c.positive and c.label), None)
        label = label or next((c.label for c in reversed(clicks) if c.label), None)
    if width is None or height is None:
        for item in items:
            if isinstance(item, dict):
                width, height = _size_of(item)
                if width:
                    break
    return InteractivePrompt(clicks=clicks, box=box, label=label, width=width, height=height)


def clicks_inside_box(clicks: Iterable[Click], box: np.ndarray) -> list[Click]:
    """The clicks that fall inside an XYXY box (4,), which are combined with that box."""
    return [c for c in clicks if box[0] <= c.x <= box[2] and box[1] <= c.y <= box[3]]


def object_start(
    clicks: Sequence[Click],
    joins: Callable[[int, list[Click]], bool],
    start: int = 0,
    first: int = 1,
    record: Callable[[int, int], None] | None = None,
) -> int:
    """Apply the grouping rule: where the object of the newest click starts in ``clicks``.

    Rule (documented in the README): the clicks are read oldest first and grouped into objects
    as they were made. A negative click joins the current object (it corrects it). A positive
    click joins the current object when the object has no positive click yet, or when
    ``joins(i, owners)`` says so: the mask of click ``i`` alone contains one of ``owners``, the
    object's positive clicks. Otherwise the click starts a new object, and every click before it
    (negative ones included) belongs to earlier objects.

    Args:
        clicks: the request's clicks, oldest first.
        joins: the membership test, called only for positive clicks of a started object.
        start, first: resume from a known decision: the object of ``clicks[:first]`` starts at
            ``start`` (the defaults start from the first click).
        record: called as ``record(j, start)`` after each decision: the object of ``clicks[:j]``
            starts at ``start`` (the caller may remember it).
    Returns:
        The index of the first click of the current object: ``clicks[start:]`` are its clicks.
    """
    for i in range(first, len(clicks)):
        owners = [c for c in clicks[start:i] if c.positive]
        if clicks[i].positive and owners and not joins(i, owners):
            start = i
        if record is not None:
            record(i + 1, start)
    return start


def prefix_digests(clicks: Sequence[Click]) -> list[bytes]:
    """``out[j]`` names the click list ``clicks[:j + 1]`` (positions to 0.01 px and polarity).

    Equal prefixes give equal digests, so a click list can be looked up by each of its prefixes.
    """
    out: list[bytes] = []
    h = hashlib.blake2b(digest_size=16)
    for c in clicks:
        h.update(f"{c.x:.2f},{c.y:.2f},{int(bool(c.positive))};".encode())
        out.append(h.copy().digest())
    return out


def rectangles_from_results(results: Any, rect_names: Iterable[str] | None = None) -> list[BoxPrompt]:
    """The rectangles of one annotation's (or prediction's) results, as pixel boxes with labels.

    Exact duplicates are dropped. Rectangles whose sizes are not known (no ``original_width`` /
    ``original_height``) or whose geometry is not numeric are skipped with a log line.
    """
    names = set(rect_names) if rect_names is not None else None
    out: list[BoxPrompt] = []
    seen: set[tuple] = set()
    for item in results if isinstance(results, list) else []:
        if not isinstance(item, dict) or str(item.get("type", "")).lower() != "rectanglelabels":
            continue
        if names is not None and item.get("from_name") not in names:
            continue
        w, h = _size_of(item)
        if not w or not h:
            logger.warning("skipping rectangle %s: no original size", item.get("id"))
            continue
        value = item.get("value") or {}
        try:
            box = rect_to_xyxy(value if isinstance(value, dict) else {}, w, h)
        except ConversionError as exc:
            logger.warning("skipping rectangle %s: %s", item.get("id"), exc)
            continue
        label = _first_label(value, "rectanglelabels")
        key = (*np.round(box, 3).tolist(), label)
        if key in seen:
            continue
        seen.add(key)
        out.append(BoxPrompt(box, label))
    return out


def boxes_from_task(task: dict[str, Any], rect_names: Iterable[str] | None = None) -> list[BoxPrompt]:
    """Collect the rectangles of a task for batch mode, as pixel boxes with their labels.

    Source: the newest annotation (not cancelled) that holds rectangles; when none does, the newest
    prediction that holds rectangles. See :func:`rectangles_from_results`.
    """
    names = list(rect_names) if rect_names is not None else None
    annotations = [
        a for a in task.get("annotations") or [] if isinstance(a, dict) and not a.get("was_cancelled")
    ]
    for ann in sorted(
        annotations, key=lambda a: (str(a.get("updated_at") or ""), a.get("id") or 0), reverse=True
    ):
        found = rectangles_from_results(ann.get("result"), names)
        if found:
            return found
    predictions = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    for pred in sorted(
        predictions, key=lambda p: (str(p.get("created_at") or ""), p.get("id") or 0), reverse=True
    ):
        found = rectangles_from_results(pred.get("result"), names)
        if found:
            return found
    return []


def pair_boxes_with_masks(
    masks: Sequence[np.ndarray],
    labels: Sequence[str | None],
    rects: Sequence[BoxPrompt],
    min_inside: float = 0.9,
    min_iou: float = 0.5,
) -> list[np.ndarray | None]:
    """The rectangle that prompted each mask of an annotation, or None.

    Label Studio keeps no link between a smart rectangle and the brush region made from it, so
    they are matched by geometry: a rectangle fits a mask when their labels agree (or one has
    none), at least ``min_inside`` of the mask's pixels lie inside it (pixels the box touches count)
    and the IoU of the rectangle with the mask's bounding box is at least ``min_iou``. Pairs are
    made one to one, best IoU first.

    Args:
        masks: (H, W) bool masks; labels: their labels; rects: pixel boxes of the same image.
    Returns:
        One (4,) XYXY pixel box or None per mask.
    """
    candidates = []
    for i, (mask, label) in enumerate(zip(masks, labels, strict=True)):
        ys, xs = np.nonzero(mask)
        if xs.size == 0:
            continue
        mbox = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)
        for j, rect in enumerate(rects):
            if label and rect.label and label != rect.label:
                continue
            b = rect.box
            x0, y0 = int(np.floor(b[0])), int(np.floor(b[1]))
            x1, y1 = int(np.ceil(b[2])), int(np.ceil(b[3]))
            inside = np.count_nonzero((xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)) / xs.size
            iw = max(0.0, min(mbox[2], b[2]) - max(mbox[0], b[0]))
            ih = max(0.0, min(mbox[3], b[3]) - max(mbox[1], b[1]))
            union = (mbox[2] - mbox[0]) * (mbox[3] - mbox[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
            iou = iw * ih / union if union > 0 else 0.0
            if inside >= min_inside and iou >= min_iou:
                candidates.append((iou, i, j))
    out: list[np.ndarray | None] = [None] * len(masks)
    used: set[int] = set()
    for _, i, j in sorted(candidates, key=lambda c: -c[0]):
        if out[i] is None and j not in used:
            out[i] = np.asarray(rects[j].box, dtype=np.float64)
            used.add(j)
    return out


def masks_from_annotation(
    results: Iterable[dict[str, Any]], brush_names: Iterable[str] | None = None
) -> tuple[list[np.ndarray], list[str], tuple[int, int] | None]:
    """Decode the brush (RLE) and polygon regions of an annotation to masks for training.

    Returns:
        (masks, labels, (H, W)): masks are (H, W) bool, one per region; regions with another
        size than the first one, empty regions and undecodable RLE are skipped with a log line.
    """
    names = set(brush_names) if brush_names is not None else None
    masks: list[np.ndarray] = []
    labels: list[str] = []
    size: tuple[int, int] | None = None
    for item in results:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("type", "")).lower()
        if kind not in ("brushlabels", "polygonlabels"):
            continue
        if names is not None and item.get("from_name") not in names:
            continue
        w, h = _size_of(item)
        if not w or not h:
            continue
        if size is not None and size != (h, w):
            logger.warning("region %s has size %sx%s, expected %s: skipped", item.get("id"), w, h, size)
            continue
        value = item.get("value") or {}
        try:
            if kind == "brushlabels":
                if value.get("format", "rle") != "rle" or "rle" not in value:
                    continue
                mask = rle_to_mask(value["rle"], h, w)
            else:
                mask = polygon_to_mask(value.get("points") or [], w, h)
        except ConversionError as exc:
            logger.warning("region %s not decodable: %s", item.get("id"), exc)
            continue
        if not mask.any():
            continue
        size = (h, w)
        masks.append(mask)
        labels.append(_first_label(value, kind) or "")
    return masks, labels, size


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------
def clamp_score(score: float) -> float:
    """A score Label Studio accepts: within [0, 1] (the predicted IoU can leave it; NaN -> 0)."""
    score = float(score)
    return 0.0 if not math.isfinite(score) else min(1.0, max(0.0, score))


def _region_id() -> str:
    return uuid.uuid4().hex[:10]


def brush_result(
    mask: np.ndarray, label: str | None, tag: ControlTag, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """One ``brushlabels`` result for a (H, W) bool mask."""
    h, w = mask.shape
    value: dict[str, Any] = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": []}
    out_label = tag.labels[0] if label is None and tag.labels else label
    if out_label is not None:
        value["brushlabels"] = [out_label]
    return {
        "id": region_id or _region_id(),
        "from_name": tag.name,
        "to_name": tag.to_name,
        "type": "brushlabels",
        "original_width": int(w),
        "original_height": int(h),
        "image_rotation": 0,
        "value": value,
        "score": clamp_score(score),
        "readonly": False,
    }


def polygon_result(
    points_px: np.ndarray, label: str | None, tag: ControlTag, width: int, height: int, score: float
) -> dict[str, Any]:
    """One ``polygonlabels`` result from a (P, 2) array of pixel (x, y) vertices."""
    pts = [[float(x) * 100.0 / width, float(y) * 100.0 / height] for x, y in points_px]
    value: dict[str, Any] = {"points": pts, "closed": True, "polygonlabels": []}
    out_label = tag.labels[0] if label is None and tag.labels else label
    if out_label is not None:
        value["polygonlabels"] = [out_label]
    return {
        "id": _region_id(),
        "from_name": tag.name,
        "to_name": tag.to_name,
        "type": "polygonlabels",
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": clamp_score(score),
    }


def build_results(
    config: LabelConfig, masks: Sequence[np.ndarray], labels: Sequence[str | None], scores: Sequence[float]
) -> list[dict[str, Any]]:
    """Results for a task: per mask, a brush region and/or a polygon (whatever the config has).

    Empty masks are dropped (logged). ``labels`` are mapped onto each output tag's labels.
    """
    out: list[dict[str, Any]] = []
    for mask, label, score in zip(masks, labels, scores, strict=True):
        if not mask.any():
            logger.info("empty mask for label %r dropped", label)
            continue
        h, w = mask.shape
        if config.brush is not None:
            out.append(brush_result(mask, config.output_label(label, config.brush), config.brush, score))
        if config.polygon is not None:
            poly = mask_to_polygon(mask)
            if len(poly) >= 3:
                out.append(
                    polygon_result(
                        poly, config.output_label(label, config.polygon), config.polygon, w, h, score
                    )
                )
    return out


# --------------------------------------------------------------------------------------------------
# polygons
# --------------------------------------------------------------------------------------------------
def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a (H, W) bool mask (breadth-first search)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    flat = mask.ravel()
    lab = labels.ravel()
    for start in np.flatnonzero(flat):
        if lab[start]:
            continue
        current += 1
        lab[start] = current
        queue = deque([int(start)])
        size = 0
        while queue:
            p = queue.popleft()
            size += 1
            y, x = divmod(p, w)
            for q, ok in ((p - 1, x > 0), (p + 1, x < w - 1), (p - w, y > 0), (p + w, y < h - 1)):
                if ok and flat[q] and not lab[q]:
                    lab[q] = current
                    queue.append(q)
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _trace_outline(mask: np.ndarray) -> np.ndarray:
    """Outer boundary of a single component on the pixel-corner grid, (P, 2) corner (x, y)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask

    def inside(x: int, y: int) -> bool:  # pixel (x, y) of the unpadded mask
        return bool(padded[y + 1, x + 1])

    ys, xs = np.nonzero(mask)
    order = np.lexsort((xs, ys))
    y0, x0 = int(ys[order[0]]), int(xs[order[0]])
    # Walk along pixel edges keeping the inside on the right. Directions: 0 E, 1 S, 2 W, 3 N.
    dx = (1, 0, -1, 0)
    dy = (0, 1, 0, -1)
    x, y, d = x0, y0, 0  # start at the top-left corner of the top-left pixel, heading east
    pts = [(x, y)]
    limit = 4 * (h + 2) * (w + 2)
    for _ in range(limit):
        # the pixel ahead-right and ahead-left of the corner (x, y) when heading d
        if d == 0:
            right, left = inside(x, y), inside(x, y - 1)
        elif d == 1:
            right, left = inside(x - 1, y), inside(x, y)
        elif d == 2:
            right, left = inside(x - 1, y - 1), inside(x - 1, y)
        else:
            right, left = inside(x, y - 1), inside(x - 1, y - 1)
        if left and right:
            d = (d - 1) % 4
        elif not right:
            d = (d + 1) % 4
        else:
            x, y = x + dx[d], y + dy[d]
            if (x, y) == (x0, y0):
                break
            pts.append((x, y))
    return np.asarray(pts, dtype=np.float64)


def _simplify(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker simplification of a closed polygon (P, 2)."""
    if len(points) <= 4:
        return points
    keep = np.zeros(len(points), dtype=bool)
    far = int(np.argmax(((points - points[0]) ** 2).sum(1)))
    keep[[0, far]] = True
    stack = [(0, far), (far, len(points))]
    while stack:
        a, b = stack.pop()
        seg = points[a : b + 1] if b < len(points) else np.vstack([points[a:], points[:1]])
        if len(seg) <= 2:
            continue
        p, q = seg[0], seg[-1]
        d = q - p
        norm = math.hypot(*d)
        rel = seg[1:-1] - p
        dist = np.abs(d[0] * rel[:, 1] - d[1] * rel[:, 0]) / norm if norm else np.hypot(rel[:, 0], rel[:, 1])
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            mid = a + 1 + k
            keep[mid] = True
            stack += [(a, mid), (mid, b)]
    return points[keep]


def mask_to_polygon(mask: np.ndarray, tolerance: float = 1.0, max_side: int = 512) -> np.ndarray:
    """Outline of the largest component of a (H, W) bool mask as a polygon (P, 2) in pixels.

    Big masks are traced on a nearest-neighbour downscale (longest side ``max_side``) and scaled
    back; vertices are simplified with Douglas-Peucker at ``tolerance`` pixels of the traced grid.
    Returns an empty (0, 2) array for an empty mask.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.zeros((0, 2))
    h, w = m.shape
    scale = max(h, w) / max_side if max(h, w) > max_side else 1.0
    if scale > 1.0:
        ys = np.minimum((np.arange(int(round(h / scale))) * scale).astype(int), h - 1)
        xs = np.minimum((np.arange(int(round(w / scale))) * scale).astype(int), w - 1)
        m = m[ys][:, xs]
        if not m.any():
            return np.zeros((0, 2))
    outline = _trace_outline(_largest_component(m))
    poly = _simplify(outline, tolerance) * scale
    poly[:, 0] = poly[:, 0].clip(0, w)
    poly[:, 1] = poly[:, 1].clip(0, h)
    return poly


def polygon_to_mask(points_percent: Sequence[Sequence[float]], width: int, height: int) -> np.ndarray:
    """Rasterise a Label Studio polygon (points in percent) to a (H, W) bool mask."""
    from PIL import Image, ImageDraw

    if len(points_percent) < 3:
        raise ConversionError("a polygon needs at least 3 points")
    try:
        pts = [(float(x) / 100.0 * width, float(y) / 100.0 * height) for x, y in points_percent]
    except (TypeError, ValueError) as exc:
        raise ConversionError("polygon points must be [x, y] pairs") from exc
    img = Image.new("1", (width, height), 0)
    ImageDraw.Draw(img).polygon(pts, fill=1, outline=1)
    return np.asarray(img, dtype=bool)
