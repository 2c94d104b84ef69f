"""Offline commands over a whole Label Studio project: pre-annotation and embedding pre-computation.

Label Studio gives "retrieve predictions" 100 s for a whole selection; these commands have no such
limit. They read tasks through the REST API, compute masks (``preannotate``) or image embeddings
(``precompute``, filling the same on-disk cache the server reads), and write predictions back with
``POST /api/projects/{id}/import/predictions``.

Resumable: each finished task id is appended to a progress file under
``MODEL_DIR/offline/``; a rerun skips those tasks and every task that already holds a prediction of
the current model version. Sharding: under ``torchrun --nproc-per-node N`` (or with RANK /
WORLD_SIZE set) rank r takes every task whose position modulo N is r, on GPU ``LOCAL_RANK`` when
GPUs exist.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from .convert import ConversionError, boxes_from_task, build_results, parse_label_config
from .images import ImageError, ImageLoader, LabelStudioAuth, task_image_url
from .model import get_manager
from .settings import Settings

logger = logging.getLogger(__name__)


class LabelStudioAPIError(RuntimeError):
    """Label Studio answered an API call with an error."""


class LabelStudioClient:
    """The few REST calls the offline commands need."""

    def __init__(self, settings: Settings, auth: LabelStudioAuth | None = None) -> None:
        if not settings.label_studio_url:
            raise LabelStudioAPIError("LABEL_STUDIO_URL is not set")
        if not settings.api_key:
            raise LabelStudioAPIError("LABEL_STUDIO_API_KEY is not set")
        self.base = settings.label_studio_url.rstrip("/")
        self.auth = auth or LabelStudioAuth(self.base, settings.api_key, timeout=120)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.auth.request(method, f"{self.base}{path}", **kwargs)
        if r.status_code >= 400:
            raise LabelStudioAPIError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:300]}")
        return r.json() if r.content else None

    def project(self, pid: int) -> dict[str, Any]:
        return self._call("GET", f"/api/projects/{pid}")

    def tasks(self, pid: int, page_size: int = 100) -> Iterator[dict[str, Any]]:
        """Every task of a project with its annotations and predictions, page by page."""
        page = 1
        while True:
            r = self.auth.request(
                "GET", f"{self.base}/api/tasks",
                params={"project": pid, "page": page, "page_size": page_size, "fields": "all"},
            )  # fmt: skip
            if r.status_code == 404 and page > 1:
                return
            if r.status_code >= 400:
                raise LabelStudioAPIError(
                    f"GET /api/tasks page {page} -> HTTP {r.status_code}: {r.text[:300]}"
                )
            data = r.json()
            items = data.get("tasks", data.get("results", [])) if isinstance(data, dict) else data
            if not items:
                return
            yield from items
            if len(items) < page_size:
                return
            page += 1

    def import_predictions(self, pid: int, predictions: list[dict[str, Any]]) -> Any:
        return self._call("POST", f"/api/projects/{pid}/import/predictions", json=predictions)


def shard() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment (0, 1, 0 without it)."""
    rank = int(os.environ.get("RANK", "0") or 0)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} outside WORLD_SIZE={world}")
    return rank, world, local


def _settings_for_rank(settings: Settings, local_rank: int, world: int) -> Settings:
    if settings.device is None and world > 1:
        import torch

        if torch.cuda.is_available():
            return replace(settings, device=f"cuda:{local_rank % torch.cuda.device_count()}")
    return settings


class _Progress:
    """Task ids finished by one (command, project, version, rank), appended to a text file."""

    def __init__(self, settings: Settings, command: str, pid: int, version: str, rank: int) -> None:
        folder = Path(settings.model_dir) / "offline"
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / f"{command}-project{pid}-{version}-rank{rank}.txt"
        self.done: set[int] = set()
        if self.path.is_file():
            for line in self.path.read_text().split():
                if line.isdigit():
                    self.done.add(int(line))

    def add(self, ids: list[int]) -> None:
        with open(self.path, "a") as fh:
            fh.write("".join(f"{i}\n" for i in ids))
            fh.flush()
            os.fsync(fh.fileno())
        self.done.update(ids)


def _iter_shard(tasks: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    ordered = sorted(tasks, key=lambda t: int(t.get("id", 0)))
    return [t for i, t in enumerate(ordered) if i % world == rank]


def preannotate(
    settings: Settings,
    pid: int,
    batch: int = 16,
    resume: bool = True,
    overwrite: bool = False,
    show_progress: bool = True,
    client: LabelStudioClient | None = None,
) -> dict[str, int]:
    """Masks for every rectangle of every task of project ``pid``, imported as predictions.

    Args:
        batch: predictions sent to Label Studio per import call.
        resume: skip tasks finished by an earlier run (progress file) of the same model version.
        overwrite: also redo tasks that already hold a prediction of the current model version.
    Returns:
        counts: tasks seen / done / skipped / failed / without boxes, masks written.
    """
    from tqdm import tqdm

    rank, world, local = shard()
    settings = _settings_for_rank(settings, local, world)
    client = client or LabelStudioClient(settings)
    config = parse_label_config(client.project(pid)["label_config"])
    manager = get_manager(settings)
    loader = ImageLoader(settings, client.auth)
    version = manager.version
    progress = _Progress(settings, "preannotate", pid, version, rank)
    tasks = _iter_shard(list(client.tasks(pid)), rank, world)
    counts = {"tasks": len(tasks), "done": 0, "skipped": 0, "failed": 0, "no_boxes": 0, "masks": 0}
    pending: list[dict[str, Any]] = []
    pending_ids: list[int] = []

    def flush() -> None:
        if pending:
            answer = client.import_predictions(pid, pending)
            created = answer.get("created") if isinstance(answer, dict) else None
            if isinstance(created, int) and created < len(pending):
                # Label Studio 1.23 drops predictions it finds invalid and still answers 201
                counts["failed"] += len(pending) - created
                counts["done"] -= len(pending) - created
                logger.error(
                    "Label Studio accepted %d of %d predictions (tasks %s); see its log for why",
                    created,
                    len(pending),
                    [p["task"] for p in pending],
                )
                pending_ids[:] = [i for i in pending_ids if i not in {p["task"] for p in pending}]
        if pending_ids:
            progress.add(pending_ids)
        pending.clear()
        pending_ids.clear()

    bar = tqdm(tasks, desc=f"preannotate p{pid} r{rank}/{world}", unit="task", disable=not show_progress)
    for task in bar:
        tid = int(task["id"])
        has_current = any(p.get("model_version") == version for p in task.get("predictions") or [])
        if (resume and tid in progress.done) or (has_current and not overwrite):
            counts["skipped"] += 1
            continue
        boxes = boxes_from_task(task, [t.name for t in config.rectangles] or None)
        if not boxes:
            counts["no_boxes"] += 1
            pending_ids.append(tid)
            continue
        try:
            image = loader.load(task_image_url(task, config.image_key))
            masks, labels, scores, version = manager.segment_boxes(image, boxes)
        except (ImageError, ConversionError, ValueError) as exc:
            counts["failed"] += 1
            logger.warning("task %s skipped: %s", tid, exc)
            continue
        result = build_results(config, masks, labels, scores)
        pending.append(
            {
                "task": tid,
                "result": result,
                "model_version": version,
                "score": float(sum(scores) / len(scores)) if scores else 0.0,
            }
        )
        pending_ids.append(tid)
        counts["done"] += 1
        counts["masks"] += len(masks)
        if len(pending) >= batch:
            flush()
        bar.set_postfix(masks=counts["masks"], failed=counts["failed"])
    flush()
    logger.info("preannotate project %s rank %d/%d: %s", pid, rank, world, counts)
    return counts


def precompute(
    settings: Settings, pid: int, show_progress: bool = True, client: LabelStudioClient | None = None
) -> dict[str, int]:
    """Compute and cache (on disk under MODEL_DIR) the embedding of every image of project ``pid``."""
    from tqdm import tqdm

    rank, world, local = shard()
    settings = _settings_for_rank(settings, local, world)
    client = client or LabelStudioClient(settings)
    config = parse_label_config(client.project(pid)["label_config"])
    manager = get_manager(settings)
    loader = ImageLoader(settings, client.auth)
    tasks = _iter_shard(list(client.tasks(pid)), rank, world)
    counts = {"tasks": len(tasks), "encoded": 0, "cached": 0, "failed": 0}
    t0 = time.perf_counter()
    for task in tqdm(tasks, desc=f"precompute p{pid} r{rank}/{world}", unit="img", disable=not show_progress):
        try:
            image = loader.load(task_image_url(task, config.image_key))
            before = manager.stats["encodes"]
            manager.predictor_for(image)
            counts["encoded" if manager.stats["encodes"] > before else "cached"] += 1
        except (ImageError, ConversionError, ValueError) as exc:
            counts["failed"] += 1
            logger.warning("task %s skipped: %s", task.get("id"), exc)
    logger.info("precompute project %s: %s in %.1f s", pid, counts, time.perf_counter() - t0)
    return counts
