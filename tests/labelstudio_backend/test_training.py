"""Training data from annotations and the life of a background training run.

The worker-death test runs a real worker process (a Trainer in its own Python process) and kills
it while its training child runs; the child is a stand-in fine-tuning module (``fake_finetune``,
written below) so that the test controls how long a run lasts and does not train a model.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from ls_helpers import CONFIG, IMAGE_H, IMAGE_W, local, rect

from labelstudio_backend.convert import mask_to_rle
from labelstudio_backend.training import Trainer

REPO = Path(__file__).resolve().parents[2]

FAKE_FINETUNE = '''
"""Stand-in for rwkvsam_core.finetune: record the pid (and the arguments, to FAKE_ARGV if set), sleep
FAKE_SLEEP s, copy --checkpoint to out/ (or, with FAKE_META, write a small safetensors file whose
rwkvsam_config metadata is FAKE_META)."""
import argparse, json, os, shutil, sys, time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--checkpoint", required=True)
args, _ = ap.parse_known_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
Path(os.environ["FAKE_PIDFILE"]).write_text(str(os.getpid()))
if os.environ.get("FAKE_ARGV"):
    Path(os.environ["FAKE_ARGV"]).write_text(json.dumps(sys.argv[1:]))
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
if os.environ.get("FAKE_META"):
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(out / ".partial"), metadata={"rwkvsam_config": os.environ["FAKE_META"]})
else:
    shutil.copyfile(args.checkpoint, out / ".partial")
os.replace(out / ".partial", out / "model.safetensors")
'''


def _brush(mask, label="cat"):
    return {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": IMAGE_W,
        "original_height": IMAGE_H,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }


@pytest.fixture
def trainer(settings):
    t = Trainer(settings)
    t.projects.register(3, CONFIG)
    return t


def _task(tid=1):
    return {"id": tid, "data": {"image": local("a.png")}}


def test_rectangle_only_annotation_is_logged_counted_and_not_stored(trainer, caplog):
    m = np.zeros((IMAGE_H, IMAGE_W), bool)
    m[20:60, 30:90] = True
    sample = trainer.dataset / "p3_t1_a7"
    assert "stored 1 mask" in trainer.store_annotation(3, _task(), {"id": 7, "result": [_brush(m)]})
    assert (sample / "meta.json").exists() and trainer.state()["new"] == 1
    # the annotation is updated: its brush region is gone, only the rectangle remains
    caplog.set_level("INFO", logger="labelstudio_backend.training")
    msg = trainer.store_annotation(3, _task(), {"id": 7, "result": [rect(10, 10, 40, 40)]})
    assert "1 rectangle(s) but no brush or polygon mask" in msg and "not stored" in msg
    assert not sample.exists()  # the earlier version of the annotation is not trained on any more
    assert "earlier version was removed" in caplog.text
    assert "not stored" in trainer.store_annotation(3, _task(2), {"id": 8, "result": []})
    state = trainer.state()
    assert state["skipped"] == {"no_mask": 2} and state["new"] == 1
    assert trainer.num_samples() == 0


def test_brush_masks_keep_the_rectangle_that_prompted_them(trainer):
    from rwkvsam_core.data import InstanceFolderDataset

    cat = np.zeros((IMAGE_H, IMAGE_W), bool)
    cat[20:60, 30:90] = True  # inside rect(15, 12, 45, 40) = x 24..96, y 14.4..62.4 px
    dog = np.zeros((IMAGE_H, IMAGE_W), bool)
    dog[80:110, 100:150] = True  # no dog rectangle fits it
    results = [
        _brush(cat, "cat"),
        _brush(dog, "dog"),
        rect(15, 12, 45, 40, "cat"),
        rect(60, 65, 35, 30, "cat"),  # around the dog mask, but with another label
        rect(1, 1, 5, 5, "dog"),  # the dog's label, elsewhere
    ]
    msg = trainer.store_annotation(3, _task(), {"id": 9, "result": results})
    assert msg.endswith("stored 2 mask(s), 1 with a box")
    meta = json.loads((trainer.dataset / "p3_t1_a9" / "meta.json").read_text())
    assert meta["labels"] == ["cat", "dog"]
    np.testing.assert_allclose(meta["boxes"][0], [24, 14.4, 96, 62.4])
    assert meta["boxes"][1] is None
    item = InstanceFolderDataset(trainer.dataset)[0]  # the core still reads the sample
    np.testing.assert_array_equal(item["masks"][0], cat)


def test_rectangle_only_annotation_through_the_webhook(client, settings):
    assert client.post("/setup", json={"project": "4.1", "schema": CONFIG}).status_code == 200
    payload = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 4},
        "task": _task(),
        "annotation": {"id": 1, "result": [rect(10, 10, 30, 30)]},
    }
    assert client.post("/webhook", json=payload).status_code == 201
    end = time.time() + 30
    while time.time() < end and not client.get("/metrics").get_json()["annotations_not_stored"]:
        time.sleep(0.05)
    metrics = client.get("/metrics").get_json()
    assert (
        metrics["annotations_not_stored"] == {"no_mask": 1} and metrics["annotations_pending_training"] == 0
    )
    assert not (settings.model_dir / "dataset" / "p4_t1_a1").exists()


# ---------------------------------------------------------------------------------- runs
def _fake_env(tmp_path: Path, sleep: float) -> dict[str, str]:
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    (fake / "fake_finetune.py").write_text(FAKE_FINETUNE)
    return {
        "PYTHONPATH": os.pathsep.join([str(fake), str(REPO)]),
        "FAKE_PIDFILE": str(tmp_path / "child.pid"),
        "FAKE_SLEEP": str(sleep),
    }


def _prepare(settings) -> None:
    from rwkvsam_core.data import write_instance_sample

    write_instance_sample(
        settings.model_dir / "dataset", "p1_t1_a1", np.zeros((8, 8, 3), np.uint8), np.ones((1, 8, 8), bool)
    )
    base = settings.model_dir / "models" / "base.safetensors"  # the served weights the run starts from
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_bytes(b"base weights")


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] == "Z"
    except OSError:
        return True


def _cleanup(proc: subprocess.Popen, child: int | None) -> None:
    """End what a test started, also when it failed: its process and that process's training child."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if child is not None and not _gone(child):
        os.kill(child, signal.SIGKILL)


def _wait(cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_worker_killed_while_training_is_recovered_by_the_next_worker(settings, tmp_path, monkeypatch):
    _prepare(settings)
    env = {**os.environ, **_fake_env(tmp_path, sleep=300)}
    worker_code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from labelstudio_backend.settings import Settings
        from labelstudio_backend.training import Trainer
        t = Trainer(Settings(model_dir=Path({str(settings.model_dir)!r}), train_every=0, train_steps=1))
        t.FINETUNE_MODULE = "fake_finetune"
        assert t.start_training("test")
        time.sleep(600)
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", worker_code], env=env, cwd=REPO)
    child = None
    try:
        pidfile = tmp_path / "child.pid"
        assert _wait(pidfile.exists, 60), "the training child did not start"
        child = int(pidfile.read_text())
        trainer = Trainer(settings)
        active = trainer.state()["active"]
        assert active["child_pid"] == child and active["worker_pid"] == worker.pid
        assert trainer.recover_stale() is None  # the worker is alive and holds train.lock: hands off
        worker.send_signal(signal.SIGKILL)
        worker.wait(30)
        assert _wait(lambda: _gone(child), 15), "the training child outlived its worker"
    finally:
        _cleanup(worker, child)
    run_dir = Path(active["run_dir"])
    assert not (run_dir / "out" / "model.safetensors").exists()
    assert not (settings.model_dir / "state.json").exists()  # nothing was swapped in

    # the next worker: the lock is free but the state says a run is active -> recover and rerun
    for key, value in _fake_env(tmp_path, sleep=0).items():
        monkeypatch.setenv(key, value)
    pidfile.unlink()
    nxt = Trainer(settings)
    nxt.FINETUNE_MODULE = "fake_finetune"
    msg = nxt.recover_stale()
    assert msg is not None and "abandoned" in msg
    assert _wait(lambda: nxt.state().get("runs") and len(nxt.state()["runs"]) == 2, 120)
    assert _wait(lambda: not nxt.running, 120)
    state = nxt.state()
    abandoned, rerun = state["runs"]
    assert abandoned["generation"] == 1 and "died" in abandoned["error"]
    assert rerun["generation"] == 1 and rerun["rc"] == 0 and rerun["version"].startswith("rwkvsam_t-ft1-")
    assert "active" not in state and not state.get("pending")
    served = json.loads((settings.model_dir / "state.json").read_text())
    base = Path(nxt._base_checkpoint(None)).read_bytes()  # the shipped weights (the stand-in copies them)
    assert served["version"] == rerun["version"] and Path(served["checkpoint"]).read_bytes() == base


def test_a_run_that_finished_before_its_worker_died_is_adopted(settings, tmp_path):
    _prepare(settings)
    run_dir = settings.model_dir / "runs" / "gen0001-x"
    (run_dir / "out").mkdir(parents=True)
    (run_dir / "out" / "model.safetensors").write_bytes(b"trained weights")
    trainer = Trainer(settings)
    (settings.model_dir / "models" / ".rwkvsam_t-ft1-deadbeef.123.tmp").write_bytes(b"half a copy")
    active = {
        "generation": 1,
        "run_dir": str(run_dir),
        "worker_pid": 999999,
        "started": time.time(),
        "consumed": 2,
    }
    trainer._update_state(lambda s: s.__setitem__("active", active))
    msg = trainer.recover_stale()
    assert "swapped in" in msg
    state = trainer.state()
    assert "active" not in state and state["runs"][-1]["recovered"]
    served = json.loads((settings.model_dir / "state.json").read_text())
    assert served["generation"] == 1 and Path(served["checkpoint"]).read_bytes() == b"trained weights"
    assert not list((settings.model_dir / "models").glob(".*.tmp"))  # the interrupted copy is cleaned up


def test_recovery_leaves_a_live_run_alone(settings):
    trainer = Trainer(settings)
    trainer._update_state(lambda s: s.__setitem__("active", {"generation": 1, "run_dir": "/nowhere"}))
    lock = settings.model_dir / "train.lock"
    with open(lock, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a live worker trains
        assert trainer.recover_stale() is None
        assert trainer.state()["active"]["run_dir"] == "/nowhere"
    assert "abandoned" in trainer.recover_stale()  # its holder is gone now


def test_interrupted_swap_in_leaves_nothing_half_written(settings, tmp_path, monkeypatch):
    import shutil

    trainer = Trainer(settings)
    ckpt = tmp_path / "new.safetensors"
    ckpt.write_bytes(b"x" * 1000)

    def broken_copy(src, dst):
        Path(dst).write_bytes(b"x" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(shutil, "copyfile", broken_copy)
    with pytest.raises(OSError):
        trainer.swap_in(ckpt, generation=1)
    assert not list((settings.model_dir / "models").iterdir())
    assert not (settings.model_dir / "state.json").exists()


def test_train_child_ends_with_its_parent(tmp_path):
    """The wrapper alone: a parent that dies takes its (sleeping) child with it."""
    env = {**os.environ, **_fake_env(tmp_path, sleep=300)}
    parent_code = textwrap.dedent(
        """
        import os, subprocess, sys, time
        subprocess.Popen([sys.executable, "-m", "labelstudio_backend.train_child", str(os.getpid()),
                          "fake_finetune", "--out", sys.argv[1], "--checkpoint", sys.argv[2]])
        time.sleep(600)
        """
    )
    ckpt = tmp_path / "c.bin"
    ckpt.write_bytes(b"c")
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, str(tmp_path / "out"), str(ckpt)], env=env, cwd=REPO
    )
    child = None
    try:
        assert _wait((tmp_path / "child.pid").exists, 60)
        child = int((tmp_path / "child.pid").read_text())
        assert not _gone(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(30)
        assert _wait(lambda: _gone(child), 15)
    finally:
        _cleanup(parent, child)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_failed_run_with_replaced_settings_keeps_state_clean(settings, tmp_path, monkeypatch):
    """A run whose child fails leaves no 'active' record and a run entry with the error."""
    _, state = _run_fake(replace(settings, train_args="--checkpoint /no/such/file"), tmp_path, monkeypatch)
    assert "active" not in state and state["runs"][-1]["rc"] != 0
    assert "No such file" in state["runs"][-1]["error"]
    assert not (settings.model_dir / "state.json").exists()


def _run_fake(settings, tmp_path, monkeypatch, **env):
    """One run of the stand-in child with extra environment; returns (trainer, its state)."""
    _prepare(settings)
    for key, value in {**_fake_env(tmp_path, sleep=0), **env}.items():
        monkeypatch.setenv(key, value)
    trainer = Trainer(settings)
    trainer.FINETUNE_MODULE = "fake_finetune"
    assert trainer.start_training("test")
    assert _wait(lambda: not trainer.running, 60)
    return trainer, trainer.state()


def _time_limits(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--time-limit"]


def test_run_stops_itself_before_train_timeout(settings, tmp_path, monkeypatch):
    """The child gets --time-limit = TRAIN_TIMEOUT less a grace period (5 %, 30 s to 10 min), so a
    run that would overrun saves its weights instead of being killed; TRAIN_ARGS' own limit wins."""
    argv_file = tmp_path / "argv.json"
    settings = replace(settings, train_timeout=6 * 3600)
    _, state = _run_fake(settings, tmp_path, monkeypatch, FAKE_ARGV=str(argv_file))
    assert state["runs"][-1]["rc"] == 0
    assert _time_limits(json.loads(argv_file.read_text())) == [str(6 * 3600 - 600)]

    settings = replace(settings, train_timeout=300)
    _run_fake(settings, tmp_path, monkeypatch, FAKE_ARGV=str(argv_file))
    assert _time_limits(json.loads(argv_file.read_text())) == ["270"]

    settings = replace(settings, train_args="--time-limit 50 --lr 1e-4")
    _run_fake(settings, tmp_path, monkeypatch, FAKE_ARGV=str(argv_file))
    assert _time_limits(json.loads(argv_file.read_text())) == ["50"]


def test_run_stopped_by_its_time_limit_is_served_and_recorded(settings, tmp_path, monkeypatch, caplog):
    """Weights of a run that stopped at its time limit are served (a new version) and the run's record
    says how far it got; a run that finished says so too."""
    caplog.set_level("WARNING", logger="labelstudio_backend.training")
    meta = json.dumps({"steps": 3, "finished": False})
    trainer, state = _run_fake(settings, tmp_path, monkeypatch, FAKE_META=meta)
    run = state["runs"][-1]
    assert run["rc"] == 0 and run["steps"] == 3 and run["finished"] is False
    assert run["version"].startswith(f"{settings.model_name}-ft1-")
    assert any("time limit after 3 of" in r.getMessage() for r in caplog.records)

    caplog.clear()
    _, state = _run_fake(
        settings, tmp_path, monkeypatch, FAKE_META=json.dumps({"steps": 200, "finished": True})
    )
    run = state["runs"][-1]
    assert (
        run["steps"] == 200
        and run["finished"] is True
        and run["version"].startswith(f"{settings.model_name}-ft2-")
    )
    assert not any("time limit" in r.getMessage() for r in caplog.records)
