"""Synthetic compositions with exact instance masks.

Each sample is a background (a photograph crop, a texture or a procedural pattern) onto which
objects are pasted with a *binary* footprint, back to front:

- real objects cut out by their real masks (VOC sample, stardist nuclei), at random scale,
  rotation, colour and blur;
- procedural shapes (ellipses, polygons, stars, rings, rounded rectangles, blobs, thin strokes,
  silhouettes) filled with photograph crops or procedural textures.

An object's mask is its footprint minus the footprints of the objects pasted after it, so every
mask is exact: the pixels under ``masks[i]`` are the pixels of object ``i`` (up to the optional
global blur, applied after compositing, which softens edges as real defocus does). A third of the
samples (``micro_fraction``) imitate fluorescence / H&E microscopy: many small nuclei, cut-out or
procedural, on a dark or stained background; a few (``real_fraction``) are the real images with
their real masks under a random crop, scale and flip.

Randomness: sample ``i`` of seed ``s`` uses ``numpy.random.default_rng([s, i])``, so a dataset is
the same whatever the number of workers or the order in which samples are written.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "SynthConfig",
    "Cutout",
    "SourcePool",
    "Composition",
    "compose",
    "procedural_texture",
    "random_shape_mask",
]


@dataclass
class SynthConfig:
    """Knobs of the generator (defaults are what the starter weights are trained on).

    Attributes:
        size: long side of the output image in pixels.
        min_objects, max_objects: objects per photo-style sample.
        micro_min_objects, micro_max_objects: nuclei per microscopy-style sample.
        micro_fraction: share of microscopy-style samples.
        micro_scale: nucleus size of a microscopy-style sample as a fraction of the long side (min, max).
        real_fraction: share of real images with real masks (augmented).
        cutout_prob: in photo-style samples, chance that an object is a real cut-out (else a shape).
        object_scale: object long side as a fraction of the canvas long side (min, max).
        min_area: masks with fewer visible pixels are dropped.
        min_visible: masks whose visible part is below this fraction of their footprint are dropped.
        max_rotation: degrees.
        object_blur_prob, max_object_blur: chance / max Gaussian sigma of blurring one object.
        global_blur_prob, max_global_blur: same for the whole image after compositing.
        colour_jitter: strength of per-object gain / offset / saturation changes.
        noise_prob: chance of adding Gaussian pixel noise to the final image.
        parts_prob: chance that a shape object gets 1-4 inner parts with other fills (a face on a
            head, a label on a box): its mask stays the whole silhouette, so inner edges are not
            object boundaries.
        shading_prob: chance that a shape object is lit by a smooth gradient (light from one side).
        camouflage_prob: chance that a shape object is filled from the same picture as the
            background, so its boundary has little contrast and only its shape tells it apart.
    """

    size: int = 1024
    min_objects: int = 2
    max_objects: int = 10
    micro_min_objects: int = 15
    micro_max_objects: int = 70
    micro_fraction: float = 0.3
    micro_scale: tuple[float, float] = (0.015, 0.18)
    real_fraction: float = 0.05
    cutout_prob: float = 0.5
    object_scale: tuple[float, float] = (0.06, 0.55)
    min_area: int = 32
    min_visible: float = 0.25
    max_rotation: float = 180.0
    object_blur_prob: float = 0.3
    max_object_blur: float = 2.0
    global_blur_prob: float = 0.5
    max_global_blur: float = 1.2
    colour_jitter: float = 0.25
    noise_prob: float = 0.2
    parts_prob: float = 0.0
    shading_prob: float = 0.0
    camouflage_prob: float = 0.0


@dataclass
class Cutout:
    """A real object: ``rgb`` (h, w, 3) uint8 cropped to ``mask`` (h, w) bool's box, with its label."""

    rgb: np.ndarray
    mask: np.ndarray
    label: str
    kind: str


@dataclass
class Composition:
    """One generated sample.

    Attributes:
        image: (H, W, 3) uint8.
        masks: (M, H, W) bool, visible part of each kept object.
        labels: M strings such as ``"voc:person"``, ``"nucleus"``, ``"shape:ring"``.
        style: ``"photo"``, ``"microscopy"`` or ``"real"``.
        layers: only with ``return_layers``: per pasted object (kept or not) its full-canvas RGB
            (H, W, 3) and footprint (H, W), back to front, plus ``kept`` (index into ``masks`` or -1).
    """

    image: np.ndarray
    masks: np.ndarray
    labels: list[str]
    style: str
    layers: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SourcePool:
    """What compositions are made of.

    Attributes:
        pictures: photographs (H, W, 3) uint8 (backgrounds and fills).
        textures: texture images (H, W, 3) uint8.
        cutouts: real objects cut by their masks.
        real: real images with masks for ``real`` samples: dicts(image, masks, labels, kind).
        shapes: binary silhouettes (h, w) bool with a label.
    """

    pictures: list[np.ndarray]
    textures: list[np.ndarray] = field(default_factory=list)
    cutouts: list[Cutout] = field(default_factory=list)
    real: list[dict[str, Any]] = field(default_factory=list)
    shapes: list[tuple[np.ndarray, str]] = field(default_factory=list)

    @classmethod
    def from_arrays(
        cls,
        pictures: list[np.ndarray],
        objects: list[dict[str, Any]],
        textures: list[np.ndarray] | None = None,
        shapes: list[tuple[np.ndarray, str]] | None = None,
        min_area: int = 16,
    ) -> SourcePool:
        """Build a pool from images and object dicts(image (H,W,3), masks (M,H,W), labels, kind,
        cutout_only=False). Every mask with at least ``min_area`` pixels becomes a cut-out."""
        cutouts = []
        real = []
        for obj in objects:
            img = np.asarray(obj["image"], dtype=np.uint8)
            masks = np.asarray(obj["masks"], dtype=bool)
            for m, lab in zip(masks, obj["labels"], strict=True):
                if int(m.sum()) < min_area:
                    continue
                ys, xs = np.nonzero(m)
                y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
                cutouts.append(
                    Cutout(img[y0:y1, x0:x1].copy(), m[y0:y1, x0:x1].copy(), str(lab), obj["kind"])
                )
            if not obj.get("cutout_only", False) and len(masks):
                real.append(
                    {"image": img, "masks": masks, "labels": list(obj["labels"]), "kind": obj["kind"]}
                )
        if not pictures:
            raise ValueError("a source pool needs at least one picture")
        return cls(list(pictures), list(textures or []), cutouts, real, list(shapes or []))

    @classmethod
    def from_pack(cls, pack_dir: Path, max_side: int | None = None) -> SourcePool:
        """Load a pack written by ``training.data_sources.build_pack`` (no registry access)."""
        from training.data_sources.pack import load_objects_npz

        pack_dir = Path(pack_dir)
        index = json.loads((pack_dir / "pictures.json").read_text())
        pictures, textures = [], []
        for e in index:
            img = cv2.imread(str(pack_dir / "pictures" / e["file"]), cv2.IMREAD_COLOR)
            if img is None:
                raise FileNotFoundError(pack_dir / "pictures" / e["file"])
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
            if max_side and max(img.shape[:2]) > max_side:
                s = max_side / max(img.shape[:2])
                img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
            (textures if e["role"] == "texture" else pictures).append(img)
        objects = [load_objects_npz(p) for p in sorted((pack_dir / "objects").glob("*.npz"))]
        shapes = []
        for p in sorted((pack_dir / "shapes").glob("*.png")):
            shapes.append((cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 127, p.stem))
        return cls.from_arrays(pictures, objects, textures, shapes)


# ---------------------------------------------------------------------------------------------
# textures and backgrounds


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1], (h, w, channels) float32."""
    g = rng.random((max(2, cells), max(2, cells), channels), dtype=np.float32)
    out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    if out.ndim == 2:
        out = out[..., None]
    return np.clip(out, 0.0, 1.0)


def procedural_texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random procedural pattern (H, W, 3) uint8: solid, gradient, smooth noise, stripes, checker."""
    kind = rng.integers(5)
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    if kind == 0:
        t = np.zeros((h, w, 1), np.float32)
    elif kind == 1:
        a = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(a) * xx + np.sin(a) * yy)[..., None]
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    elif kind == 2:
        t = _smooth_noise(rng, h, w, int(rng.integers(2, 24)))
    elif kind == 3:
        a = rng.uniform(0, np.pi)
        period = rng.uniform(4, max(5.0, min(h, w) / 3))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = ((np.cos(a) * xx + np.sin(a) * yy) / period % 1.0 < 0.5).astype(np.float32)[..., None]
    else:
        p = int(rng.integers(4, max(5, min(h, w) // 3)))
        yy, xx = np.mgrid[0:h, 0:w]
        t = (((yy // p) + (xx // p)) % 2).astype(np.float32)[..., None]
    img = c0 * (1 - t) + c1 * t
    if rng.random() < 0.5:
        img = img + rng.normal(0, rng.uniform(2, 20), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_crop(rng: np.random.Generator, img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Random crop of ``img`` at a random scale, resized to (h, w), randomly flipped."""
    ih, iw = img.shape[:2]
    scale = rng.uniform(0.3, 1.0)
    ch = max(2, int(min(ih, iw * h / w) * scale))
    cw = max(2, int(ch * w / h))
    cw = min(cw, iw)
    ch = min(ch, ih)
    y = int(rng.integers(0, ih - ch + 1))
    x = int(rng.integers(0, iw - cw + 1))
    crop = img[y : y + ch, x : x + cw]
    interp = cv2.INTER_AREA if ch > h else cv2.INTER_LINEAR
    out = cv2.resize(crop, (w, h), interpolation=interp)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def _fill(rng: np.random.Generator, pool: SourcePool, h: int, w: int) -> np.ndarray:
    r = rng.random()
    if r < 0.5 and pool.pictures:
        return _random_crop(rng, pool.pictures[int(rng.integers(len(pool.pictures)))], h, w)
    if r < 0.65 and pool.textures:
        return _random_crop(rng, pool.textures[int(rng.integers(len(pool.textures)))], h, w)
    return procedural_texture(rng, h, w)


def _background(rng: np.random.Generator, pool: SourcePool, h: int, w: int) -> np.ndarray:
    r = rng.random()
    if r < 0.7:
        return _random_crop(rng, pool.pictures[int(rng.integers(len(pool.pictures)))], h, w)
    if r < 0.8 and pool.textures:
        return _random_crop(rng, pool.textures[int(rng.integers(len(pool.textures)))], h, w)
    return procedural_texture(rng, h, w)


# ---------------------------------------------------------------------------------------------
# shapes


def random_shape_mask(
    rng: np.random.Generator, size: int, silhouettes: list[tuple[np.ndarray, str]] | None = None
) -> tuple[np.ndarray, str]:
    """A random binary shape inside a (size, size) patch, and its name.

    Kinds: ellipse, polygon, star, ring, rounded rectangle, blob, stroke, and the silhouettes given.
    Drawn without anti-aliasing, so the mask is exactly the pixels the shape covers.
    """
    size = max(8, int(size))
    m = np.zeros((size, size), np.uint8)
    c = size / 2.0
    names = ["ellipse", "polygon", "star", "ring", "roundrect", "blob", "stroke"]
    if silhouettes:
        names.append("silhouette")
    kind = names[int(rng.integers(len(names)))]
    if kind == "ellipse":
        ax = (max(2, int(c * rng.uniform(0.5, 0.98))), max(2, int(c * rng.uniform(0.2, 0.98))))
        cv2.ellipse(m, (int(c), int(c)), ax, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
    elif kind in ("polygon", "star"):
        n = int(rng.integers(3, 9)) if kind == "polygon" else int(rng.integers(4, 9)) * 2
        ang = (
            np.sort(rng.uniform(0, 2 * np.pi, n))
            if kind == "polygon"
            else np.linspace(0, 2 * np.pi, n, endpoint=False)
        )
        rad = rng.uniform(0.5, 0.98, n) * c
        if kind == "star":
            rad[1::2] *= rng.uniform(0.3, 0.6)
        pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1).round().astype(np.int32)
        cv2.fillPoly(m, [pts], 1, cv2.LINE_8)
    elif kind == "ring":
        r_out = max(3, int(c * rng.uniform(0.6, 0.98)))
        cv2.circle(m, (int(c), int(c)), r_out, 1, -1, cv2.LINE_8)
        cv2.circle(m, (int(c), int(c)), max(1, int(r_out * rng.uniform(0.3, 0.8))), 0, -1, cv2.LINE_8)
    elif kind == "roundrect":
        hw, hh = c * rng.uniform(0.4, 0.95), c * rng.uniform(0.2, 0.95)
        r = int(min(hw, hh) * rng.uniform(0.0, 0.9))
        x0, y0, x1, y1 = int(c - hw), int(c - hh), int(c + hw), int(c + hh)
        cv2.rectangle(m, (x0 + r, y0), (x1 - r, y1), 1, -1)
        cv2.rectangle(m, (x0, y0 + r), (x1, y1 - r), 1, -1)
        for cx, cy in ((x0 + r, y0 + r), (x1 - r, y0 + r), (x0 + r, y1 - r), (x1 - r, y1 - r)):
            cv2.circle(m, (cx, cy), r, 1, -1, cv2.LINE_8)
    elif kind == "blob":
        n = _smooth_noise(rng, size, size, int(rng.integers(3, 7)))[..., 0]
        yy, xx = np.mgrid[0:size, 0:size]
        fall = 1.0 - np.hypot(yy - c, xx - c) / c
        lab_in = ((n * 0.6 + fall * 0.8) > 0.55).astype(np.uint8)
        count, lab = cv2.connectedComponents(lab_in, connectivity=8)
        if count > 1:
            sizes = np.bincount(lab.ravel())[1:]
            m = (lab == 1 + int(np.argmax(sizes))).astype(np.uint8)
        else:
            cv2.circle(m, (int(c), int(c)), max(2, int(c / 2)), 1, -1, cv2.LINE_8)
    elif kind == "stroke":
        k = int(rng.integers(3, 7))
        pts = (rng.uniform(0.05, 0.95, (k, 2)) * size).round().astype(np.int32)
        thick = int(max(2, size * rng.uniform(0.02, 0.08)))
        cv2.polylines(m, [pts], False, 1, thick, cv2.LINE_8)
    else:
        sil, name = silhouettes[int(rng.integers(len(silhouettes)))]  # type: ignore[index]
        ys, xs = np.nonzero(sil)
        crop = sil[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(np.uint8)
        s = (size - 1) / max(crop.shape)
        crop = cv2.resize(
            crop,
            (max(1, int(crop.shape[1] * s)), max(1, int(crop.shape[0] * s))),
            interpolation=cv2.INTER_NEAREST,
        )
        m[: crop.shape[0], : crop.shape[1]] = crop
        kind = name
    return m.astype(bool), kind


# ---------------------------------------------------------------------------------------------
# objects


def _jitter_colour(rng: np.random.Generator, rgb: np.ndarray, strength: float) -> np.ndarray:
    if strength <= 0:
        return rgb
    x = rgb.astype(np.float32)
    gain = rng.uniform(1 - strength, 1 + strength, 3).astype(np.float32)
    offset = rng.uniform(-60 * strength, 60 * strength, 3).astype(np.float32)
    grey = x.mean(axis=2, keepdims=True)
    sat = np.float32(rng.uniform(1 - strength * 2, 1 + strength))
    x = grey + (x - grey) * sat
    return np.clip(x * gain + offset, 0, 255).astype(np.uint8)


def _transform_object(
    rng: np.random.Generator, rgb: np.ndarray, mask: np.ndarray, long_side: int, max_rotation: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale to ``long_side`` and rotate: RGB bilinear, mask nearest, both on the same grid."""
    h, w = mask.shape
    s = long_side / max(h, w)
    ang = float(rng.uniform(-max_rotation, max_rotation))
    if rng.random() < 0.5:
        rgb, mask = rgb[:, ::-1], mask[:, ::-1]
    # output canvas big enough for any rotation
    diag = int(np.ceil(np.hypot(h, w) * s)) + 2
    mat = cv2.getRotationMatrix2D((w / 2.0, h / 2.0), ang, s)
    mat[0, 2] += diag / 2.0 - w / 2.0
    mat[1, 2] += diag / 2.0 - h / 2.0
    interp = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    out_rgb = cv2.warpAffine(
        np.ascontiguousarray(rgb), mat, (diag, diag), flags=interp, borderMode=cv2.BORDER_REPLICATE
    )
    out_m = cv2.warpAffine(
        np.ascontiguousarray(mask).astype(np.uint8), mat, (diag, diag), flags=cv2.INTER_NEAREST, borderValue=0
    ).astype(bool)
    ys, xs = np.nonzero(out_m)
    if ys.size == 0:
        return out_rgb[:1, :1], out_m[:1, :1]
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    return out_rgb[y0:y1, x0:x1], out_m[y0:y1, x0:x1]


def _add_parts(rng: np.random.Generator, pool: SourcePool, rgb: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paint 1-4 smaller shapes with other fills inside ``mask`` (the object's mask is unchanged)."""
    out = rgb.copy()
    size = mask.shape[0]
    ys, xs = np.nonzero(mask)
    if ys.size < 16:
        return out
    for _ in range(int(rng.integers(1, 5))):
        ps = max(4, int(size * rng.uniform(0.12, 0.5)))
        pm, _ = random_shape_mask(rng, ps)
        i = int(rng.integers(ys.size))  # centre the part on a pixel of the object
        y0, x0 = ys[i] - ps // 2, xs[i] - ps // 2
        canvas = np.zeros((size, size), bool)
        cy0, cx0, cy1, cx1 = max(0, y0), max(0, x0), min(size, y0 + ps), min(size, x0 + ps)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        canvas[cy0:cy1, cx0:cx1] = pm[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
        canvas &= mask
        if rng.random() < 0.5:
            fill = _fill(rng, pool, size, size)
        else:  # a flat colour (a print, an eye)
            fill = np.broadcast_to(rng.integers(0, 256, 3).astype(np.uint8), (size, size, 3))
        out[canvas] = fill[canvas]
    return out


def _shade(rng: np.random.Generator, rgb: np.ndarray) -> np.ndarray:
    """Multiply by a smooth linear/radial illumination (0.45..1.25)."""
    h, w = rgb.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    t = (np.cos(a) * (xx / max(1, w - 1) - 0.5) + np.sin(a) * (yy / max(1, h - 1) - 0.5)) + 0.5
    if rng.random() < 0.5:  # radial highlight
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        t = 1.0 - np.sqrt(((yy - cy) / h) ** 2 + ((xx - cx) / w) ** 2) * 1.4
    lo, hi = rng.uniform(0.45, 0.8), rng.uniform(1.0, 1.25)
    g = lo + (hi - lo) * np.clip(t, 0, 1)
    return np.clip(rgb.astype(np.float32) * g[..., None], 0, 255).astype(np.uint8)


def _make_object(
    rng: np.random.Generator,
    pool: SourcePool,
    cfg: SynthConfig,
    long_side: int,
    micro: bool,
    background: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """One object patch: rgb (h, w, 3) uint8, mask (h, w) bool, label (``background``: the canvas,
    for camouflaged fills)."""
    long_side = max(8, int(long_side))
    nuclei = [c for c in pool.cutouts if c.kind == "microscopy"]
    photos = [c for c in pool.cutouts if c.kind != "microscopy"]
    use_cut = rng.random() < (0.6 if micro else cfg.cutout_prob)
    cands = nuclei if micro else photos
    if use_cut and cands:
        cut = cands[int(rng.integers(len(cands)))]
        rgb, mask = _transform_object(rng, cut.rgb, cut.mask, long_side, cfg.max_rotation)
        label = cut.label
    else:
        if micro:
            if rng.random() < 0.3:  # any shape: irregular, dividing or damaged nuclei
                m, _ = random_shape_mask(rng, long_side)
            else:  # the usual nucleus: an ellipse
                m8 = np.zeros((long_side, long_side), np.uint8)
                c = long_side / 2
                axes = (max(2, int(c * 0.95)), max(2, int(c * rng.uniform(0.5, 0.95))))
                cv2.ellipse(m8, (int(c), int(c)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1, cv2.LINE_8)
                m = m8.astype(bool)
            tex = _smooth_noise(rng, long_side, long_side, int(rng.integers(2, 6)))[..., 0]
            level = rng.uniform(120, 255)
            g = np.clip(level * (0.75 + 0.35 * tex), 0, 255)
            rgb = np.repeat(g[..., None], 3, axis=2).astype(np.uint8)
            label = "nucleus"
        else:
            m, kind = random_shape_mask(rng, long_side, pool.shapes)
            if background is not None and cfg.camouflage_prob and rng.random() < cfg.camouflage_prob:
                rgb = _random_crop(rng, background, long_side, long_side)
            else:
                rgb = _fill(rng, pool, long_side, long_side)
            if cfg.parts_prob and rng.random() < cfg.parts_prob:
                rgb = _add_parts(rng, pool, rgb, m)
            if cfg.shading_prob and rng.random() < cfg.shading_prob:
                rgb = _shade(rng, rgb)
            label = f"shape:{kind}"
        ys, xs = np.nonzero(m)
        if ys.size == 0:
            m = np.ones((2, 2), bool)
            ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        rgb, mask = rgb[y0:y1, x0:x1], m[y0:y1, x0:x1]
    if micro:  # nuclei vary in brightness and contrast
        gain, offset = rng.uniform(0.7, 1.6), rng.uniform(-20, 20)
        rgb = np.clip(rgb.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    else:
        rgb = _jitter_colour(rng, rgb, cfg.colour_jitter)
    if rng.random() < cfg.object_blur_prob:
        rgb = cv2.GaussianBlur(rgb, (0, 0), float(rng.uniform(0.3, cfg.max_object_blur)))
    return np.ascontiguousarray(rgb), np.ascontiguousarray(mask), label


def _paste_all(
    rng: np.random.Generator,
    canvas: np.ndarray,
    objects: list[tuple[np.ndarray, np.ndarray, str]],
    cfg: SynthConfig,
    return_layers: bool,
) -> Composition:
    """Paste objects back to front at random positions; masks = footprint minus later footprints."""
    h, w = canvas.shape[:2]
    feet: list[np.ndarray] = []
    layers: list[dict[str, Any]] = []
    labels: list[str] = []
    for rgb, mask, label in objects:
        oh, ow = mask.shape
        # allow objects to leave the canvas by up to half their size
        y = int(rng.integers(-oh // 2, max(-oh // 2 + 1, h - oh // 2)))
        x = int(rng.integers(-ow // 2, max(-ow // 2 + 1, w - ow // 2)))
        cy0, cx0 = max(0, y), max(0, x)
        cy1, cx1 = min(h, y + oh), min(w, x + ow)
        if cy1 <= cy0 or cx1 <= cx0:
            continue
        sub_m = mask[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
        sub_rgb = rgb[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
        foot = np.zeros((h, w), bool)
        foot[cy0:cy1, cx0:cx1] = sub_m
        if not foot.any():
            continue
        region = canvas[cy0:cy1, cx0:cx1]
        region[sub_m] = sub_rgb[sub_m]
        feet.append(foot)
        labels.append(label)
        if return_layers:
            full = np.zeros((h, w, 3), np.uint8)
            full[cy0:cy1, cx0:cx1][sub_m] = sub_rgb[sub_m]
            layers.append({"rgb": full, "footprint": foot.copy(), "kept": -1})
    # visible parts: remove what later objects cover
    covered = np.zeros((h, w), bool)
    visible: list[np.ndarray] = [np.empty(0)] * len(feet)
    for i in range(len(feet) - 1, -1, -1):
        visible[i] = feet[i] & ~covered
        covered |= feet[i]
    masks, kept_labels = [], []
    for i, (foot, vis) in enumerate(zip(feet, visible, strict=True)):
        area = int(vis.sum())
        if area >= cfg.min_area and area >= cfg.min_visible * int(foot.sum()):
            if return_layers:
                layers[i]["kept"] = len(masks)
            masks.append(vis)
            kept_labels.append(labels[i])
    arr = np.stack(masks) if masks else np.zeros((0, h, w), bool)
    return Composition(canvas, arr, kept_labels, "photo", layers)


def _canvas_size(rng: np.random.Generator, size: int) -> tuple[int, int]:
    aspect = float(rng.choice([1.0, 1.0, 4 / 3, 3 / 2, 16 / 9]))
    short = max(16, int(round(size / aspect)))
    return (size, short) if rng.random() < 0.5 else (short, size)


def _finish(rng: np.random.Generator, comp: Composition, cfg: SynthConfig) -> Composition:
    img = comp.image
    if rng.random() < cfg.global_blur_prob:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.3, cfg.max_global_blur)))
    if rng.random() < cfg.noise_prob:
        img = np.clip(img.astype(np.float32) + rng.normal(0, rng.uniform(1, 8), img.shape), 0, 255).astype(
            np.uint8
        )
    comp.image = np.ascontiguousarray(img)
    return comp


def _compose_photo(
    rng: np.random.Generator, pool: SourcePool, cfg: SynthConfig, return_layers: bool
) -> Composition:
    h, w = _canvas_size(rng, cfg.size)
    canvas = _background(rng, pool, h, w).copy()
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    lo, hi = cfg.object_scale
    objs = [
        _make_object(
            rng,
            pool,
            cfg,
            max(8, int(max(h, w) * np.exp(rng.uniform(np.log(lo), np.log(hi))))),
            False,
            background=canvas,
        )
        for _ in range(n)
    ]
    return _paste_all(rng, canvas, objs, cfg, return_layers)


def _micro_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(0, 40)
    g = base + rng.uniform(0, 30) * _smooth_noise(rng, h, w, int(rng.integers(2, 8)))[..., 0]
    return np.repeat(np.clip(g, 0, 255)[..., None], 3, axis=2).astype(np.uint8)


def _compose_micro(
    rng: np.random.Generator, pool: SourcePool, cfg: SynthConfig, return_layers: bool
) -> Composition:
    h, w = _canvas_size(rng, cfg.size)
    canvas = _micro_background(rng, h, w)
    # nucleus size of this image: from ndev-like specks (1.5 % of the side) to napari-like large nuclei
    base = max(h, w) * float(np.exp(rng.uniform(np.log(cfg.micro_scale[0]), np.log(cfg.micro_scale[1]))))
    fit = max(cfg.micro_min_objects, int(0.5 * h * w / (base * base)))  # at most ~half the area covered
    n = int(rng.integers(cfg.micro_min_objects, min(cfg.micro_max_objects, fit) + 1))
    objs = [_make_object(rng, pool, cfg, max(6, int(base * rng.uniform(0.7, 1.4))), True) for _ in range(n)]
    comp = _paste_all(rng, canvas, objs, cfg, return_layers)
    comp.style = "microscopy"
    r = rng.random()
    mul = np.ones(3, np.float32)
    invert = False
    if r < 0.35:  # fluorescence seen through one colour channel
        mul = np.array([rng.uniform(0.2, 1), rng.uniform(0.2, 1), rng.uniform(0.2, 1)], np.float32)
        mul[int(rng.integers(3))] = 1.0
    elif r < 0.55:  # brightfield / H&E-like: inverted and stained
        mul = np.array([rng.uniform(0.5, 0.9), rng.uniform(0.2, 0.6), rng.uniform(0.5, 0.9)], np.float32)
        invert = True

    def recolour(x: np.ndarray) -> np.ndarray:
        y = x.astype(np.float32) * mul
        return np.clip(255.0 - y if invert else y, 0, 255).astype(np.uint8)

    comp.image = recolour(comp.image)
    for lay in comp.layers:  # per-pixel map, so layers stay consistent with the image
        lay["rgb"] = recolour(lay["rgb"])
    return comp


def _compose_real(rng: np.random.Generator, pool: SourcePool, cfg: SynthConfig) -> Composition:
    src = pool.real[int(rng.integers(len(pool.real)))]
    img, masks = src["image"], src["masks"]
    ih, iw = img.shape[:2]
    s = rng.uniform(0.5, 1.5) * cfg.size / max(ih, iw)
    nh, nw = max(16, int(ih * s)), max(16, int(iw * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    ms = np.stack(
        [cv2.resize(m.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST) for m in masks]
    ).astype(bool)
    ch, cw = min(nh, cfg.size), min(nw, cfg.size)
    y, x = int(rng.integers(0, nh - ch + 1)), int(rng.integers(0, nw - cw + 1))
    img, ms = img[y : y + ch, x : x + cw], ms[:, y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        img, ms = img[:, ::-1], ms[:, :, ::-1]
    keep = [i for i in range(len(ms)) if int(ms[i].sum()) >= cfg.min_area]
    labels = [src["labels"][i] for i in keep]
    arr = ms[keep] if keep else np.zeros((0, ch, cw), bool)
    return Composition(np.ascontiguousarray(img), np.ascontiguousarray(arr), labels, "real")


def compose(
    rng: np.random.Generator,
    pool: SourcePool,
    cfg: SynthConfig | None = None,
    style: str | None = None,
    return_layers: bool = False,
    max_tries: int = 8,
) -> Composition:
    """Generate one sample (see the module docstring).

    Args:
        rng: the sample's generator (``default_rng([seed, index])`` for reproducible datasets).
        pool: sources.
        cfg: generator settings.
        style: force ``"photo"``, ``"microscopy"`` or ``"real"`` (default: drawn from the config).
        return_layers: also return each pasted object's full-canvas RGB and footprint (tests); the
            final global blur / noise is then skipped so pixels can be compared exactly.
        max_tries: a sample whose objects were all dropped is redrawn, up to this many times.

    Returns:
        ``Composition`` with image (H, W, 3) uint8 and masks (M, H, W) bool, M >= 1.
    """
    cfg = cfg or SynthConfig()
    for _ in range(max_tries):
        st = style
        if st is None:
            r = rng.random()
            st = (
                "real"
                if (r < cfg.real_fraction and pool.real)
                else ("microscopy" if r < cfg.real_fraction + cfg.micro_fraction else "photo")
            )
        if st == "real":
            comp = _compose_real(rng, pool, cfg)
        elif st == "microscopy":
            comp = _compose_micro(rng, pool, cfg, return_layers)
        else:
            comp = _compose_photo(rng, pool, cfg, return_layers)
        if len(comp.masks):
            return comp if return_layers else _finish(rng, comp, cfg)
    raise RuntimeError(f"could not generate a sample with at least one mask in {max_tries} tries")
