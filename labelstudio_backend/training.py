"""Fine-tuning from accepted annotations: dataset store, training runs, weight swap.

Layout under ``MODEL_DIR``::

    projects.json          projects the backend was set up for (id -> labeling config)
    dataset/<sample>/      one instance-folder sample per annotation (rwkvsam_core.data format;
                           meta.json also holds "boxes": per mask, the XYXY pixel box of the
                           annotation's rectangle that prompted it, or null)
    train_state.json       annotations stored since the last run, the run in progress ("active"),
                           run history, annotations not stored and why ("skipped")
    runs/<run>/            work folder and log of each fine-tuning run
    models/<version>.safetensors   fine-tuned weights (written by the engine, moved here atomically)
    state.json             the weights every worker serves and their version (see model.py)
    train.lock             held (flock) by the process that runs training

Every piece of state lives on disk so several gunicorn workers agree; a training run is started by
whichever worker takes ``train.lock`` and runs ``python -m labelstudio_backend.finetune`` (the
core's engine, with the stored boxes as the box prompts of their masks) as a child process (through
:mod:`labelstudio_backend.train_child`, which ends it when that worker dies), so predictions keep
being served. A failed run changes nothing but the log.

A worker that dies while training (killed, out of memory) releases ``train.lock`` with its process,
but leaves ``active`` in ``train_state.json``. Any worker that then takes the lock (at start-up or
before its next run) sees the record and recovers: a run whose final checkpoint exists (written
atomically by the engine, so it is complete) is swapped in; otherwise the run is recorded as
abandoned, its annotations count again and a new run starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .convert import (
    ConversionError,
    LabelConfig,
    masks_from_annotation,
    pair_boxes_with_masks,
    parse_label_config,
    rectangles_from_results,
)
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
    """Environment of the training process: ours, with rwkvsam_core and this package importable."""
    import rwkvsam_core

    env = dict(os.environ)
    dirs = {str(Path(m.__file__).resolve().parent.parent) for m in (rwkvsam_core, sys.modules[__package__])}
    env["PYTHONPATH"] = os.pathsep.join([*sorted(dirs), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _process_running(pid: int, marker: str) -> bool:
    """True when process ``pid`` runs and its command line holds ``marker`` (guards against pid reuse)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z" and marker in cmdline


def _stop_process(pid: int, marker: str, wait: float = 15.0) -> None:
    """SIGTERM (then SIGKILL) the process ``pid`` if it still runs ``marker``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _process_running(pid, marker):
            return
        with contextlib.suppress(OSError):
            os.kill(pid, sig)
        end = time.monotonic() + wait
        while time.monotonic() < end and _process_running(pid, marker):
            time.sleep(0.1)


def _add_boxes(folder: Path, boxes: list[np.ndarray | None]) -> None:
    """Record each mask's box prompt in the sample's meta.json ("boxes": XYXY pixels or null)."""
    meta_path = folder / "meta.json"
    meta = read_json(meta_path)
    if meta is None:
        raise OSError(f"{meta_path} is missing or unreadable")
    meta["boxes"] = [None if b is None else [round(float(v), 2) for v in b] for b in boxes]
    atomic_write_json(meta_path, meta)


def _checkpoint_progress(path: Path) -> tuple[int, bool] | None:
    """(steps, finished) from a fine-tuning checkpoint's metadata; None when it does not say."""
    from rwkvsam_core.checkpoint import read_config

    try:
        config = read_config(path) or {}
        return int(config["steps"]), bool(config["finished"])
    except Exception:  # not our checkpoint format, or written without progress
        return None


class Trainer:
    """Stores accepted annotations and runs fine-tuning in the background."""

    #: the module run (as ``__main__``) in the training child process: the core's engine with the
    #: stored boxes as box prompts (same options as ``python -m rwkvsam_core.finetune``)
    FINETUNE_MODULE = "labelstudio_backend.finetune"

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

    def _count_skip(self, reason: str) -> None:
        def bump(s: dict[str, Any]) -> None:
            skipped = s.setdefault("skipped", {})
            skipped[reason] = int(skipped.get(reason, 0)) + 1

        self._update_state(bump)

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
        results = annotation.get("result") or []
        if not isinstance(results, list):
            raise ConversionError("annotation.result is not a list")
        names = [t.name for t in config.output_tags]
        masks, labels, size = masks_from_annotation(results, names)
        if not masks:
            # A rectangle is a prompt, not a mask: an annotation without brush or polygon regions
            # gives no training target. Drop what an earlier version of it may have stored.
            rects = len(rectangles_from_results(results, [t.name for t in config.rectangles] or None))
            removed = self.delete_annotation(pid, task, annotation).endswith("removed")
            self._count_skip("no_mask")
            why = (
                f"{rects} rectangle(s) but no brush or polygon mask" if rects else "no brush or polygon mask"
            )
            msg = f"{name}: {why}: no training target, not stored"
            logger.info("%s%s", msg, " (its earlier version was removed)" if removed else "")
            return msg
        image = self.loader.load(task_image_url(task, config.image_key))
        h, w = image.shape[:2]
        if size != (h, w):
            from PIL import Image

            logger.warning("%s: masks are %s but the image is %sx%s: resizing masks", name, size, h, w)
            masks = [np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in masks]
        # the rectangles are in percent: read them at the image's size, like the masks now are
        sized = [{**r, "original_width": w, "original_height": h} for r in results if isinstance(r, dict)]
        rects = rectangles_from_results(sized, [t.name for t in config.rectangles] or None)
        boxes = pair_boxes_with_masks(masks, labels, rects)
        from rwkvsam_core.data import write_instance_sample

        folder = write_instance_sample(
            self.dataset, name, image, np.stack(masks), [lab or "object" for lab in labels]
        )
        _add_boxes(folder, boxes)
        state = self._update_state(lambda s: s.__setitem__("new", int(s.get("new", 0)) + 1))
        paired = sum(b is not None for b in boxes)
        logger.info(
            "%s: stored %d mask(s) (%d with the rectangle that prompted it); %d new since the last training",
            name,
            len(masks),
            paired,
            state["new"],
        )
        if self.settings.train_every and state["new"] >= self.settings.train_every:
            self.start_training(reason=f"{state['new']} new annotations")
        return f"{name}: stored {len(masks)} mask(s), {paired} with a box"

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
            self._recover_locked()
            while True:
                consumed = self._begin_run()
                try:
                    self.run_once(reason, consumed=consumed)
                except Exception:  # a failed run must never take the worker down
                    logger.exception("fine-tuning run crashed; the previous model keeps serving")
                finally:
                    self._update_state(lambda s: s.pop("active", None))
                state = self.state()
                if not state.get("pending"):
                    break
                reason = "annotations arrived during the previous run"

    def _begin_run(self) -> int:
        """Reset the new-annotation count and the pending flag; returns the count consumed."""
        consumed = [0]

        def begin(s: dict[str, Any]) -> None:
            consumed[0] = int(s.get("new", 0))
            s["pending"], s["new"] = False, 0

        self._update_state(begin)
        return consumed[0]

    # ------------------------------------------------------------------ recovery
    def recover_stale(self) -> str | None:
        """Recover from a worker that died while training (see the module docstring).

        Does nothing while a live worker holds ``train.lock``. When a run was abandoned, a new one
        is started. Returns what was done (for logs), or None when there was nothing to do.
        """
        if not self.state().get("active"):
            return None
        with _flock(self.root / "train.lock", blocking=False) as held:
            if held is None:
                return None  # a live worker is training: its record is not stale
            done = self._recover_locked()
        if done and self.state().get("pending"):
            self.start_training(reason="the run of a worker that died")
        return done

    def _recover_locked(self) -> str | None:
        """With ``train.lock`` held: settle a run left ``active`` by a dead worker."""
        for tmp in (self.root / "models").glob(".*.tmp"):
            tmp.unlink(missing_ok=True)  # a copy interrupted in swap_in
        active = self.state().get("active")
        if not active:
            return None
        run_dir = str(active.get("run_dir", ""))
        child = active.get("child_pid")
        if child and run_dir:
            _stop_process(int(child), run_dir)  # an orphan that outlived its worker must not race on
        final = Path(run_dir) / "out" / "model.safetensors"
        generation = int(active.get("generation", 0))
        record = {k: v for k, v in active.items() if k not in ("consumed",)}
        record["seconds"] = round(time.time() - float(active.get("started", time.time())), 1)
        worker = active.get("worker_pid")
        if final.is_file() and generation == current_served(self.settings).generation + 1:
            record["recovered"] = f"finished run adopted after worker {worker} died"
            version = self.swap_in(final, generation, record)
            self._update_state(lambda s: s.pop("active", None))
            msg = f"run {run_dir} of worker {worker} (dead) had finished: swapped in as {version}"
        else:
            record["rc"] = None
            record["error"] = f"abandoned: worker {worker} died while training"

            def settle(s: dict[str, Any]) -> None:
                s.setdefault("runs", []).append(record)
                s["new"] = int(s.get("new", 0)) + int(active.get("consumed", 0))
                s["pending"] = True
                s.pop("active", None)

            self._update_state(settle)
            msg = f"run {run_dir} was abandoned by worker {worker} (dead): a new run will be started"
        logger.warning("training recovery: %s", msg)
        return msg

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

    def run_once(self, reason: str, consumed: int = 0) -> bool:
        """One fine-tuning run in a child process; on success the new weights become the served ones.

        ``consumed``: annotations this run answers for (they count again if the run is abandoned).
        """
        served = current_served(self.settings)
        generation = served.generation + 1
        run_dir = self.root / "runs" / f"gen{generation:04d}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir.mkdir(parents=True, exist_ok=True)
        base = self._base_checkpoint(served.checkpoint)
        cmd = [
            sys.executable, "-m", "labelstudio_backend.train_child", str(os.getpid()), self.FINETUNE_MODULE,
            "--data", str(self.dataset),
            "--model", self.settings.model_name,
            "--checkpoint", base,
            "--out", str(run_dir / "out"),
            "--steps", str(self.settings.train_steps),
            "--quiet",
            *self._time_limit_args(),
            *shlex.split(self.settings.train_args),
        ]  # fmt: skip
        logger.info("fine-tuning generation %d (%s): %s", generation, reason, shlex.join(cmd))
        started = time.time()
        log_path = run_dir / "train.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(run_dir), env=_child_env()
            )
            active = {
                "generation": generation,
                "reason": reason,
                "run_dir": str(run_dir),
                "log": str(log_path),
                "started": started,
                "worker_pid": os.getpid(),
                "child_pid": proc.pid,
                "consumed": consumed,
            }
            self._update_state(lambda s: s.__setitem__("active", active))
            try:
                rc = proc.wait(timeout=self.settings.train_timeout)
            except subprocess.TimeoutExpired:
                logger.error(
                    "fine-tuning ran over TRAIN_TIMEOUT=%ss: stopping it", self.settings.train_timeout
                )
                rc = -1
            finally:
                if proc.poll() is None:  # timed out, or this thread is being torn down
                    proc.terminate()
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()
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
        progress = _checkpoint_progress(final)
        if progress is not None:
            record["steps"], record["finished"] = progress
            if not record["finished"]:
                logger.warning(
                    "fine-tuning reached its time limit after %d of %d steps (TRAIN_TIMEOUT=%ss): serving "
                    "the weights trained so far; fewer TRAIN_STEPS or TRAIN_ARGS='--max-instances 4 "
                    "--correction-rounds 0' make a run fit",
                    record["steps"],
                    self.settings.train_steps,
                    self.settings.train_timeout,
                )
        self.swap_in(Path(produced[-1]), generation, record)
        return True

    def _time_limit_args(self) -> list[str]:
        """``--time-limit`` for the training child: TRAIN_TIMEOUT less a grace period to save and exit.

        A run that would overrun (a CPU, many masks per image) then stops itself with its weights saved
        and served, instead of being killed at TRAIN_TIMEOUT with hours of training lost. TRAIN_ARGS
        that set ``--time-limit`` themselves win.
        """
        user = shlex.split(self.settings.train_args)
        if any(a == "--time-limit" or a.startswith("--time-limit=") for a in user):
            return []
        timeout = float(self.settings.train_timeout)
        grace = min(600.0, max(30.0, 0.05 * timeout))
        return ["--time-limit", str(max(1, int(timeout - grace)))]

    def swap_in(self, checkpoint: Path, generation: int, record: dict[str, Any] | None = None) -> str:
        """Make ``checkpoint`` the served model under a new version; returns the version."""
        from .model import _file_digest

        digest = _file_digest(checkpoint)[:8]
        version = f"{self.settings.model_name}-ft{generation}-{digest}"
        models = self.root / "models"
        models.mkdir(parents=True, exist_ok=True)
        final = models / f"{version}.safetensors"
        tmp = models / f".{version}.{os.getpid()}.tmp"
        try:
            shutil.copyfile(checkpoint, tmp)
            os.replace(tmp, final)  # readers see the whole file or none
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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
        task, annotation = payload.get("task") or {}, payload.get("annotation") or {}
        if not isinstance(task, dict) or not isinstance(annotation, dict):
            return f"{action}: task and annotation must be JSON objects: ignored"
        pid = project_id(payload.get("project"))
        if pid is None:
            pid = project_id(annotation.get("project"))
        if self.projects.get(pid) is None:
            return f"{action}: project {pid} was not set up with this backend: ignored"
        try:
            if action in ("ANNOTATION_CREATED", "ANNOTATION_UPDATED"):
                return self.store_annotation(pid, task, annotation)
            if action == "ANNOTATIONS_DELETED" or action == "ANNOTATION_DELETED":
                anns = payload.get("annotations") or [annotation]
                if not isinstance(anns, list) or not all(isinstance(a, dict) for a in anns):
                    return f"{action}: annotations must be a list of objects: ignored"
                return "; ".join(self.delete_annotation(pid, task or {"id": a.get("task")}, a) for a in anns)
            if action == "START_TRAINING":
                started = self.start_training(reason="START_TRAINING")
                return "training started" if started else "training not started (running or no data)"
        except (ImageError, ConversionError, ValueError, OSError) as exc:
            logger.warning("%s for project %s not stored: %s", action, pid, exc)
            return f"{action}: {exc}"
        return f"{action}: nothing to do"
