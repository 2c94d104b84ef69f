"""Dataset readers: COCO instance JSON, DIS5K-style mask folders, Label Studio exports, SA-1B, image folders.

Every reader indexes its annotation files once (small) and decodes images and masks lazily in
``__getitem__``, yielding the same item dict as :class:`InstanceFolderDataset`. Unusable
annotations are dropped and counted in ``reader.skipped``; an unreadable image or an item left with
no usable annotation raises :class:`CorruptSampleError`, which training skips and counts.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from .base import IMAGE_EXTENSIONS, CorruptSampleError, Sample, SkipCounter, load_rgb, make_sample
from .codecs import coco_segmentation_to_mask, ls_brush_to_mask, polygons_to_mask

logger = logging.getLogger(__name__)

__all__ = [
    "CocoInstanceDataset",
    "MaskFolderDataset",
    "LabelStudioExportDataset",
    "SA1BDataset",
    "ImageFolderDataset",
]


def _load_json(path: str | Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read annotation file {path}: {exc}") from exc


class CocoInstanceDataset:
    """COCO-format instance segmentation (COCONut, EntitySeg, LVIS-style exports).

    Args:
        annotation_file: the instances JSON (``images``, ``annotations``, ``categories``).
        image_dir: folder the ``file_name`` entries are relative to.
        include_crowd: keep ``iscrowd`` annotations (dropped by default: their masks are regions).
        keep_empty: keep images without annotations (yield ``M = 0``) instead of skipping them.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        image_dir: str | Path,
        include_crowd: bool = False,
        keep_empty: bool = False,
    ) -> None:
        data = _load_json(annotation_file)
        self.image_dir = Path(image_dir)
        self.skipped = SkipCounter()
        self.categories = {int(c["id"]): str(c.get("name", c["id"])) for c in data.get("categories", [])}
        anns: dict[int, list[dict[str, Any]]] = {}
        for a in data.get("annotations", []):
            if not isinstance(a, dict) or "image_id" not in a or "segmentation" not in a:
                self.skipped.add("bad annotation", detail=a)
                continue
            if a.get("iscrowd", 0) and not include_crowd:
                continue
            anns.setdefault(int(a["image_id"]), []).append(a)
        self.images: list[dict[str, Any]] = []
        for im in data.get("images", []):
            try:
                entry = {
                    "id": int(im["id"]),
                    "file_name": str(im["file_name"]),
                    "height": int(im["height"]),
                    "width": int(im["width"]),
                }
            except (KeyError, TypeError, ValueError):
                self.skipped.add("bad image entry", detail=im)
                continue
            if entry["id"] not in anns and not keep_empty:
                continue
            self.images.append(entry)
        self._anns = anns

    def __len__(self) -> int:
        return len(self.images)

    def image_info(self, index: int) -> dict[str, Any]:
        """The COCO ``images`` entry of item ``index`` (id, file_name, height, width)."""
        return self.images[index]

    def annotations(self, index: int) -> list[dict[str, Any]]:
        """The raw COCO annotations of item ``index``."""
        return self._anns.get(self.images[index]["id"], [])

    def __getitem__(self, index: int) -> Sample:
        info = self.images[index]
        image = load_rgb(self.image_dir / info["file_name"])
        h, w = image.shape[:2]
        if (h, w) != (info["height"], info["width"]):
            raise CorruptSampleError(
                f"{info['file_name']}: image is {h}x{w}, JSON says {info['height']}x{info['width']}"
            )
        masks, labels = [], []
        for a in self.annotations(index):
            try:
                m = coco_segmentation_to_mask(a["segmentation"], h, w)
            except (ValueError, TypeError, KeyError) as exc:
                self.skipped.add("bad segmentation", detail=exc)
                continue
            if not m.any():
                self.skipped.add("empty mask")
                continue
            masks.append(m)
            labels.append(self.categories.get(int(a.get("category_id", -1)), "object"))
        if not masks and self.annotations(index):
            raise CorruptSampleError(f"{info['file_name']}: no usable annotation")
        return make_sample(image, masks, labels, Path(info["file_name"]).stem)


class MaskFolderDataset:
    """DIS5K-style folders: ``root/im/<stem>.<ext>`` images and ``root/gt/<stem>.png`` binary masks.

    Each pair is one instance (mask = gt > ``threshold``). Images without a gt file are skipped and counted.
    """

    def __init__(
        self, root: str | Path, image_subdir: str = "im", mask_subdir: str = "gt", threshold: int = 127
    ) -> None:
        self.root = Path(root)
        im_dir, gt_dir = self.root / image_subdir, self.root / mask_subdir
        if not im_dir.is_dir() or not gt_dir.is_dir():
            raise FileNotFoundError(f"{self.root} must hold {image_subdir}/ and {mask_subdir}/ folders")
        self.skipped = SkipCounter()
        self.threshold = threshold
        gts = {p.stem: p for p in gt_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
        self.pairs: list[tuple[Path, Path]] = []
        for p in sorted(im_dir.iterdir()):
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if p.stem not in gts:
                self.skipped.add("image without mask", detail=p)
                continue
            self.pairs.append((p, gts[p.stem]))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Sample:
        im_path, gt_path = self.pairs[index]
        image = load_rgb(im_path)
        from PIL import Image

        try:
            with Image.open(gt_path) as g:
                g.load()
                gt = np.asarray(g.convert("L"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise CorruptSampleError(f"cannot read mask {gt_path}: {exc}") from exc
        if gt.shape != image.shape[:2]:
            raise CorruptSampleError(f"{gt_path}: mask {gt.shape} does not match image {image.shape[:2]}")
        mask = gt > self.threshold
        if not mask.any():
            raise CorruptSampleError(f"{gt_path}: empty mask")
        return make_sample(image, [mask], ["object"], im_path.stem)


def _resolve_ls_image(ref: str, image_root: Path) -> Path:
    """Map a Label Studio task image reference to a local file under ``image_root``."""
    parsed = urllib.parse.urlparse(ref)
    query = urllib.parse.parse_qs(parsed.query)
    candidates: list[Path] = []
    if "d" in query:  # /data/local-files/?d=sub/dir/file.png
        candidates.append(image_root / query["d"][0])
        candidates.append(image_root / Path(query["d"][0]).name)
    path = urllib.parse.unquote(parsed.path)
    if path:
        candidates.append(Path(path))
        candidates.append(image_root / path.lstrip("/"))
        name = Path(path).name
        candidates.append(image_root / name)
        if "-" in name:  # uploads are stored as <8 hex>-<original name>
            candidates.append(image_root / name.split("-", 1)[1])
    for c in candidates:
        if c.is_file():
            return c
    raise CorruptSampleError(f"image {ref!r} not found under {image_root}")


class LabelStudioExportDataset:
    """A Label Studio JSON export (``exportType=JSON``): brush RLE, polygon and rectangle results.

    Args:
        export_json: path of the export (a list of tasks).
        image_root: folder holding the task images (matched by the path in ``data[image_key]``,
            its basename, or the name without the upload prefix).
        image_key: the task data field with the image (default: the first string field).
        include_rectangles: turn rectangle results into box-shaped masks (default True).

    Uses the last non-cancelled annotation of each task (falls back to predictions if none).
    """

    def __init__(
        self,
        export_json: str | Path,
        image_root: str | Path,
        image_key: str | None = None,
        include_rectangles: bool = True,
    ) -> None:
        tasks = _load_json(export_json)
        if isinstance(tasks, dict):
            tasks = [tasks]
        self.image_root = Path(image_root)
        self.image_key = image_key
        self.include_rectangles = include_rectangles
        self.skipped = SkipCounter()
        self.tasks: list[dict[str, Any]] = []
        for t in tasks:
            if not isinstance(t, dict) or not isinstance(t.get("data"), dict):
                self.skipped.add("bad task", detail=t)
                continue
            results = self._pick_results(t)
            if not results:
                self.skipped.add("task without annotation", detail=t.get("id"))
                continue
            self.tasks.append({"id": t.get("id"), "data": t["data"], "results": results})

    @staticmethod
    def _pick_results(task: dict[str, Any]) -> list[dict[str, Any]]:
        for key in ("annotations", "predictions"):
            entries = [a for a in task.get(key) or [] if isinstance(a, dict) and not a.get("was_cancelled")]
            for a in reversed(entries):
                res = [r for r in a.get("result") or [] if isinstance(r, dict)]
                if res:
                    return res
        return []

    def __len__(self) -> int:
        return len(self.tasks)

    def _image_ref(self, data: dict[str, Any]) -> str:
        if self.image_key is not None:
            return str(data[self.image_key])
        for v in data.values():
            if isinstance(v, str):
                return v
        raise CorruptSampleError("task data holds no image reference")

    def _result_mask(self, r: dict[str, Any], h: int, w: int) -> tuple[np.ndarray, str] | None:
        rtype = str(r.get("type", "")).lower()
        v = r.get("value") or {}
        label_lists = [v.get(k) for k in ("brushlabels", "polygonlabels", "rectanglelabels", "labels")]
        label = next((str(lst[0]) for lst in label_lists if isinstance(lst, list) and lst), "object")
        ow, oh = int(r.get("original_width", w)), int(r.get("original_height", h))
        if (oh, ow) != (h, w):
            raise ValueError(f"result made on a {ow}x{oh} image, the file is {w}x{h}")
        if rtype == "brushlabels" or (v.get("format") == "rle" and "rle" in v):
            return ls_brush_to_mask(v["rle"], h, w), label
        if rtype == "polygonlabels" or "points" in v:
            pts = np.asarray(v["points"], dtype=np.float64).reshape(-1, 2)
            pts = pts / 100.0 * np.array([w, h])
            return polygons_to_mask([pts.reshape(-1).tolist()], h, w), label
        if rtype == "rectanglelabels" and self.include_rectangles:
            x, y = float(v["x"]) / 100 * w, float(v["y"]) / 100 * h
            bw, bh = float(v["width"]) / 100 * w, float(v["height"]) / 100 * h
            a = math.radians(float(v.get("rotation", 0.0)))  # LS rotates about the top-left corner
            c, s = math.cos(a), math.sin(a)
            corners = [(0, 0), (bw, 0), (bw, bh), (0, bh)]
            poly = [coord for px, py in corners for coord in (x + px * c - py * s, y + px * s + py * c)]
            return polygons_to_mask([poly], h, w), label
        return None

    def __getitem__(self, index: int) -> Sample:
        task = self.tasks[index]
        path = _resolve_ls_image(self._image_ref(task["data"]), self.image_root)
        image = load_rgb(path)
        h, w = image.shape[:2]
        masks, labels = [], []
        for r in task["results"]:
            try:
                out = self._result_mask(r, h, w)
            except (ValueError, TypeError, KeyError) as exc:
                self.skipped.add("bad result", detail=exc)
                continue
            if out is None:
                continue
            if not out[0].any():
                self.skipped.add("empty mask")
                continue
            masks.append(out[0])
            labels.append(out[1])
        if not masks:
            raise CorruptSampleError(f"task {task['id']}: no usable mask result")
        return make_sample(image, masks, labels, f"task_{task['id']}_{path.stem}")


class SA1BDataset:
    """SA-1B layout: ``root/sa_<id>.jpg`` with ``root/sa_<id>.json`` (``image`` + ``annotations`` with RLE)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"SA-1B folder {self.root} does not exist")
        self.skipped = SkipCounter()
        self.items: list[tuple[Path, Path]] = []
        for js in sorted(self.root.glob("*.json")):
            img = next(
                (js.with_suffix(e) for e in (".jpg", ".jpeg", ".png") if js.with_suffix(e).exists()), None
            )
            if img is None:
                self.skipped.add("json without image", detail=js)
                continue
            self.items.append((img, js))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        img_path, js = self.items[index]
        try:
            data = _load_json(js)
            anns = data["annotations"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptSampleError(f"{js}: {exc}") from exc
        image = load_rgb(img_path)
        h, w = image.shape[:2]
        masks = []
        for a in anns:
            try:
                m = coco_segmentation_to_mask(a["segmentation"], h, w)
            except (ValueError, TypeError, KeyError) as exc:
                self.skipped.add("bad segmentation", detail=exc)
                continue
            if m.any():
                masks.append(m)
        if not masks:
            raise CorruptSampleError(f"{js}: no usable mask")
        return make_sample(image, masks, ["object"] * len(masks), img_path.stem)


class ImageFolderDataset:
    """Plain images under ``root`` (recursive), for distillation: items carry ``M = 0`` masks."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.skipped = SkipCounter()
        self.paths = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Sample:
        image = load_rgb(self.paths[index])
        return make_sample(image, [], [], self.paths[index].stem)
