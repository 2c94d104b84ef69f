"""Mask codecs: COCO RLE (uncompressed and compressed strings), polygons, Label Studio brush RLE.

Pure numpy + Pillow, so the core never needs pycocotools (it is used when installed, for speed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "coco_rle_decode",
    "coco_rle_encode",
    "coco_counts_from_string",
    "coco_counts_to_string",
    "polygons_to_mask",
    "coco_segmentation_to_mask",
    "ls_rle_decode",
    "ls_rle_encode",
    "ls_brush_to_mask",
    "mask_to_ls_brush",
]


def coco_counts_from_string(s: str | bytes) -> list[int]:
    """Decode COCO's compressed RLE string (LEB128-like, 6 bits a char, deltas from count m-2)."""
    data = s.encode("ascii") if isinstance(s, str) else bytes(s)
    counts: list[int] = []
    p = 0
    while p < len(data):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(data):
                raise ValueError("truncated COCO RLE string")
            c = data[p] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def coco_counts_to_string(counts: Sequence[int]) -> str:
    """Inverse of :func:`coco_counts_from_string`."""
    out = bytearray()
    for i, c in enumerate(counts):
        x = int(c)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not (ch & 0x10)) or (x == -1 and (ch & 0x10)))
            if more:
                ch |= 0x20
            out.append(ch + 48)
    return out.decode("ascii")


def coco_rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE dict ``{"size": [h, w], "counts": list | str}`` -> ``(h, w)`` bool mask (column-major runs)."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = coco_counts_from_string(counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any() or counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def coco_rle_encode(mask: np.ndarray, compress: bool = False) -> dict[str, Any]:
    """``(h, w)`` bool mask -> COCO RLE dict (uncompressed list of counts, or a compressed string)."""
    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    flat = mask.T.reshape(-1)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    return {"size": [h, w], "counts": coco_counts_to_string(runs) if compress else runs}


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """COCO polygons ``[[x0, y0, x1, y1, ...], ...]`` (pixel coordinates) -> ``(height, width)`` bool mask."""
    img = Image.new("L", (int(width), int(height)), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
        if len(pts) < 3 or not np.isfinite(pts).all():
            raise ValueError("polygon needs at least 3 finite points")
        draw.polygon([tuple(p) for p in pts.tolist()], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


def coco_segmentation_to_mask(seg: Any, height: int, width: int) -> np.ndarray:
    """Any COCO ``segmentation`` field (polygons, RLE list or compressed string) -> bool mask.

    Uses pycocotools when it is installed (fast C decoder), the pure-numpy codecs otherwise.
    """
    if isinstance(seg, list):
        return polygons_to_mask(seg, height, width)
    if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
        raise ValueError("segmentation is neither polygons nor RLE")
    if [int(v) for v in seg["size"]] != [int(height), int(width)]:
        raise ValueError(f"RLE size {seg['size']} does not match image {height}x{width}")
    counts = seg["counts"]
    runs = coco_counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if min(runs, default=0) < 0 or sum(runs) != int(height) * int(width):
        raise ValueError(f"RLE counts sum to {sum(runs)}, expected {int(height) * int(width)}")
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        return coco_rle_decode(seg)
    rle = dict(seg)
    if isinstance(rle["counts"], list):
        rle = mask_utils.frPyObjects(rle, int(height), int(width))
    elif isinstance(rle["counts"], str):
        rle["counts"] = rle["counts"].encode("ascii")
    return mask_utils.decode(rle).astype(bool)


# ---------------------------------------------------------------------------------------------
# Label Studio brush RLE. Bit format (MSB first): 32 bits value count, 5 bits word size - 1, four
# 4-bit run-length field sizes - 1; then chunks: 1 bit "repeat" flag, 2 bits which size field, that
# many bits of (run length - 1); a repeat chunk holds one word, a literal chunk run-length words.
# The decoded words are an RGBA image of the mask (4 bytes a pixel).


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
        self.pos = 0

    def read(self, n: int) -> int:
        if self.pos + n > self.bits.size:
            raise ValueError("Label Studio RLE ends early")
        v = 0
        for b in self.bits[self.pos : self.pos + n]:
            v = (v << 1) | int(b)
        self.pos += n
        return v


def ls_rle_decode(rle: Sequence[int] | bytes) -> np.ndarray:
    """Label Studio brush RLE (list of byte values) -> flat uint8/uint16/uint32 array of decoded words."""
    data = bytes(bytearray(int(v) & 0xFF for v in rle)) if not isinstance(rle, bytes) else rle
    r = _BitReader(data)
    num = r.read(32)
    word = r.read(5) + 1
    sizes = [r.read(4) + 1 for _ in range(4)]
    dtype = np.uint8 if word <= 8 else (np.uint16 if word <= 16 else np.uint32)
    out = np.zeros(num, dtype=dtype)
    i = 0
    while i < num:
        repeat = r.read(1)
        j = min(num, i + 1 + r.read(sizes[r.read(2)]))
        if repeat:
            out[i:j] = r.read(word)
        else:
            for t in range(i, j):
                out[t] = r.read(word)
        i = j
    return out


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def write(self, value: int, n: int) -> None:
        self.bits.extend((value >> (n - 1 - k)) & 1 for k in range(n))

    def tobytes(self) -> bytes:
        return np.packbits(np.asarray(self.bits, dtype=np.uint8)).tobytes()


def ls_rle_encode(values: np.ndarray, word_size: int = 8) -> list[int]:
    """Encode a flat array of words as Label Studio brush RLE (repeat runs only; any valid reader decodes it)."""
    values = np.asarray(values).reshape(-1)
    sizes = [3, 6, 10, 16]
    w = _BitWriter()
    w.write(values.size, 32)
    w.write(word_size - 1, 5)
    for s in sizes:
        w.write(s - 1, 4)
    i = 0
    n = values.size
    while i < n:
        j = i + 1
        while j < n and values[j] == values[i] and j - i < (1 << sizes[-1]):
            j += 1
        run = j - i
        idx = next(k for k, s in enumerate(sizes) if run <= (1 << s))
        w.write(1, 1)
        w.write(idx, 2)
        w.write(run - 1, sizes[idx])
        w.write(int(values[i]), word_size)
        i = j
    return list(w.tobytes())


def ls_brush_to_mask(rle: Sequence[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush result RLE -> ``(height, width)`` bool mask (alpha channel > 0)."""
    flat = ls_rle_decode(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height * width * 4} (RGBA)")
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def mask_to_ls_brush(mask: np.ndarray) -> list[int]:
    """``(H, W)`` bool mask -> Label Studio brush RLE of the RGBA image (255 inside)."""
    m = np.asarray(mask).astype(bool)
    return ls_rle_encode(np.repeat(m.reshape(-1).astype(np.uint8) * 255, 4))
