"""Fine-tuning from accepted annotations: dataset store, training runs, weight swap.

Layout under ``MODEL_DIR``::

    projects.json          projects the backend was set up for (id -> labeling config)
    dataset/<sample>/      one instance-folder sample per annotation (rwkvsam_core.data format)
    train_state.json       annotations stored since the last run, run history
    runs/<run>/            work folder and log of each fine-tuning run
    models/<version>.safetensors   fine-tuned weights (written by the engine, moved here atomically)
    state.json             the weights every worker serves and their version (see model.py)
    train.lock             held (flock) by the process that runs training

Every piece of state lives on disk so several gunicorn workers agree; a training run is started by
whichever worker takes ``train.lock`` and runs ``python -m rwkvsam_core.finetune`` as a child
process, so predictions keep being served. A failed run changes nothing but the log.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .convert import ConversionError, LabelConfig, masks_from_annotation, parse_label_config
from .images import ImageError, ImageLoader, task_image_url
from .model import STATE_FILE, atomic_write_json, base_identity, current_served, get_manager, read_json
from .settings import Settings

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"
PROJECTS = "projects.json"


@contextlib.contextmanager
def _flock(path: Path, blocking: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held for the duration of the context
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield fh
    finally:
        fh.close()


def project_id(value: Any) -> int | None:
    """Project id from Label Studio's forms: 7, "7", "7.1712345678", {"id": 7}."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value:
        head = value.split(".", 1)[0]
        if head.isdigit():
            return int(head)
    return None


class ProjectRegistry:
    """Projects the backend was set up for (/setup), shared by all workers through a JSON file."""

    def __init__(self, model_dir: Path) -> None:
        self.path = Path(model_dir) / PROJECTS
        self._lockfile = Path(model_dir) / ".projects.lock"

    def register(self, pid: int, label_config: str, extra: dict[str, Any] | None = None) -> None:
        with _flock(self._lockfile):
            data = read_json(self.path) or {}
            data[str(pid)] = {"label_config": label_config, "setup_at": time.time(), **(extra or {})}
            atomic_write_json(self.path, data)

    def get(self, pid: int | None) -> dict[str, Any] | None:
        if pid is None:
            return None
        return (read_json(self.path) or {}).get(str(pid))

    def config(self, pid: int | None) -> LabelConfig | None:
        entry = self.get(pid)
        if not entry:
            return None
        try:
            return parse_label_config(entry.get("label_config", ""))
        except ConversionError:
            return None


def _child_env() -> dict[str, str]:
    """Environment of the training process: ours, with the folder holding rwkvsam_core importable."""
    import rwkvsam_core

    env = dict(os.environ)
    src = str(Path(rwkvsam_core.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


class Trainer:
    """Stores accepted annotations and runs fine-tuning in the background."""

    def __init__(self, settings: Settings, loader: ImageLoader | None = None) -> None:
        self.settings = settings
        self.root = Path(settings.model_dir)
        self.dataset = self.root / "dataset"
        self.loader = loader or ImageLoader(settings)
        self.projects = ProjectRegistry(self.root)
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    # ------------------------------------------------------------------ state
    def _update_state(self, fn) -> dict[str, Any]:
        with _flock(self.root / ".train_state.lock"):
            state = read_json(self.root / TRAIN_STATE) or {"new": 0, "runs": []}
            fn(state)
            atomic_write_json(self.root / TRAIN_STATE, state)
            return state

    def state(self) -> dict[str, Any]:
        return read_json(self.root / TRAIN_STATE) or {"new": 0, "runs": []}

    # ------------------------------------------------------------------ annotations
    @staticmethod
    def sample_name(pid: int, task_id: Any, annotation_id: Any) -> str:
        return f"p{int(pid)}_t{int(task_id)}_a{int(annotation_id)}"

    def store_annotation(self, pid: int, task: dict[str, Any], annotation: dict[str, Any]) -> str:
        """Turn an accepted annotation into a training sample; returns what happened (for logs)."""
        config = self.projects.config(pid)
        if config is None:
            return f"project {pid} has no usable labeling config"
        try:
            name = self.sample_name(pid, task.get("id"), annotation.get("id"))
        except (TypeError, ValueError):
            return "annotation without task/annotation id"
        if annotation.get("was_cancelled"):
            self.delete_annotation(pid, task, annotation)
            return f"{name}: skipped (cancelled)"
        names = [t.name for t in config.output_tags]
        masks, labels, size = masks_from_annotation(annotation.get("result") or [], names)
        if not masks:
            return f"{name}: no brush or polygon masks"
        image = self.loader.load(task_image_url(task, config.image_key))
        h, w = image.shape[:2]
        if size != (h, w):
            from PIL import Image

            logger.warning("%s: masks are %s but the image is %sx%s: resizing masks", name, size, h, w)
            masks = [np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in masks]
        from rwkvsam_core.data import write_instance_sample

        write_instance_sample(self.dataset, name, image, np.stack(masks), [lab or "object" for lab in labels])
        state = self._update_state(lambda s: s.__setitem__("new", int(s.get("new", 0)) + 1))
        logger.info("%s: stored %d mask(s); %d new since the last training", name, len(masks), state["new"])
        if self.settings.train_every and state["new"] >= self.settings.train_every:
            self.start_training(reason=f"{state['new']} new annotations")
        return f"{name}: stored {len(masks)} mask(s)"

    def delete_annotation(self, pid: int, task: dict[str, Any], annotation: dict[str, Any]) -> str:
        try:
            name = self.sample_name(pid, task.get("id") or annotation.get("task"), annotation.get("id"))
        except (TypeError, ValueError):
            return "annotation without ids"
        folder = self.dataset / name
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            return f"{name}: removed"
        return f"{name}: not stored"

    def num_samples(self) -> int:
        if not self.dataset.is_dir():
            return 0
        return sum(1 for p in self.dataset.iterdir() if p.is_dir() and not p.name.startswith("."))

    # ------------------------------------------------------------------ training
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_training(self, reason: str) -> bool:
        """Start a background run unless one is running (in any worker); True when started."""
        with self._mutex:
            if self.running:
                self._update_state(lambda s: s.__setitem__("pending", True))
                logger.info("training already running in this process: a new run will follow (%s)", reason)
                return False
            if self.num_samples() == 0:
                logger.info("training requested (%s) but the dataset is empty", reason)
                return False
            self._thread = threading.Thread(
                target=self._run_guarded, args=(reason,), name="rwkvsam-train", daemon=True
            )
            self._thread.start()
            return True

    def _run_guarded(self, reason: str) -> None:
        with _flock(self.root / "train.lock", blocking=False) as held:
            if held is None:
                self._update_state(lambda s: s.__setitem__("pending", True))
                logger.info("another worker is training: a new run will follow (%s)", reason)
                return
            while True:
                self._update_state(lambda s: (s.__setitem__("pending", False), s.__setitem__("new", 0)))
                try:
                    self.run_once(reason)
                except Exception:  # a failed run must never take the worker down
                    logger.exception("fine-tuning run crashed; the previous model keeps serving")
                state = self.state()
                if not state.get("pending"):
                    break
                reason = "annotations arrived during the previous run"

    def _base_checkpoint(self, served_ckpt: str | None) -> str:
        """A checkpoint file of the model served now (the base random init is saved once)."""
        if served_ckpt:
            return served_ckpt
        from rwkvsam_core import default_checkpoint, save_checkpoint

        shipped = default_checkpoint(self.settings.model_name)
        if shipped is not None:
            return str(shipped)
        path = self.root / "models" / "base.safetensors"
        if not path.is_file():
            model, version = get_manager(self.settings).get_model()
            save_checkpoint(model, path, metadata={"version": version})
        return str(path)

    def run_once(self, reason: str) -> bool:
        """One fine-tuning run in a child process; on success the new weights become the served ones."""
        served = current_served(self.settings)
        generation = served.generation + 1
        run_dir = self.root / "runs" / f"gen{generation:04d}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=True)
        base = self._base_checkpoint(served.checkpoint)
        cmd = [
            sys.executable, "-m", "rwkvsam_core.finetune",
            "--data", str(self.dataset),
            "--model", self.settings.model_name,
            "--checkpoint", base,
            "--out", str(run_dir / "out"),
            "--steps", str(self.settings.train_steps),
            "--quiet",
            *shlex.split(self.settings.train_args),
        ]  # fmt: skip
        logger.info("fine-tuning generation %d (%s): %s", generation, reason, shlex.join(cmd))
        started = time.time()
        log_path = run_dir / "train.log"
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.run(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=self.settings.train_timeout,
                    cwd=str(run_dir),
                    env=_child_env(),
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = -1
        record: dict[str, Any] = {
            "generation": generation,
            "reason": reason,
            "started": started,
            "seconds": round(time.time() - started, 1),
            "log": str(log_path),
            "rc": rc,
        }
        if rc != 0:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            record["error"] = tail[-1] if tail else "no output"
            logger.error(
                "fine-tuning failed (exit %s); keeping model %s. Last lines of %s:\n%s",
                rc,
                served.version,
                log_path,
                "\n".join(tail),
            )
            self._update_state(lambda s: s.setdefault("runs", []).append(record))
            return False
        final = run_dir / "out" / "model.safetensors"  # the engine's final checkpoint
        produced = [final] if final.is_file() else []
        if not produced:
            record["error"] = "the run wrote no .safetensors checkpoint"
            logger.error(
                "fine-tuning exited 0 but wrote no checkpoint under %s; keeping %s", run_dir, served.version
            )
            self._update_state(lambda s: s.setdefault("runs", []).append(record))
            return False
        self.swap_in(Path(produced[-1]), generation, record)
        return True

    def swap_in(self, checkpoint: Path, generation: int, record: dict[str, Any] | None = None) -> str:
        """Make ``checkpoint`` the served model under a new version; returns the version."""
        from .model import _file_digest

        digest = _file_digest(checkpoint)[:8]
        version = f"{self.settings.model_name}-ft{generation}-{digest}"
        models = self.root / "models"
        models.mkdir(parents=True, exist_ok=True)
        final = models / f"{version}.safetensors"
        tmp = models / f".{version}.tmp"
        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, final)
        atomic_write_json(
            self.root / STATE_FILE,
            {
                "base": base_identity(self.settings),
                "version": version,
                "checkpoint": str(final),
                "generation": generation,
                "updated_at": time.time(),
            },
        )
        rec = dict(record or {}, version=version, checkpoint=str(final))
        self._update_state(lambda s: s.setdefault("runs", []).append(rec))
        logger.info("fine-tuned weights swapped in: model version %s", version)
        return version

    def handle_webhook(self, payload: dict[str, Any]) -> str:
        """Act on one webhook payload (called off the request thread). Returns a log line."""
        action = payload.get("action")
        pid = project_id(payload.get("project"))
        if pid is None:
            annotation = payload.get("annotation") or {}
            pid = project_id(annotation.get("project"))
        if self.projects.get(pid) is None:
            return f"{action}: project {pid} was not set up with this backend: ignored"
        try:
            if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
                return self.store_annotation(pid, payload.get("task") or {}, payload.get("annotation") or {})
            if action == "ANNOTATIONS_DELETED" or action == "ANNOTATION_DELETED":
                anns = payload.get("annotations") or [payload.get("annotation") or {}]
                return "; ".join(
                    self.delete_annotation(pid, payload.get("task") or {"id": a.get("task")}, a) for a in anns
                )
            if action == "START_TRAINING":
                started = self.start_training(reason="START_TRAINING")
                return "training started" if started else "training not started (running or no data)"
        except (ImageError, ConversionError, ValueError, OSError) as exc:
            logger.warning("%s for project %s not stored: %s", action, pid, exc)
            return f"{action}: {exc}"
        return f"{action}: nothing to do"
