"""Kill a fine-tuning subprocess with SIGKILL mid-run, resume it, and compare with an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 5


def _cmd(data: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rwkvsam_core.finetune",
        "--data",
        str(data),
        "--out",
        str(out),
        "--steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--image-size",
        "64",
        "--save-every",
        "1",
        "--warmup-steps",
        "2",
        "--loss-points",
        "300",
        "--correction-rounds",
        "1",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--quiet",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["OMP_NUM_THREADS"] = "1"
    return env


def _done_steps(out: Path) -> int:
    try:
        return len(json.loads((out / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def test_resume_after_sigkill_matches_uninterrupted_run(instance_dir: Path, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    ref = subprocess.Popen(_cmd(instance_dir, full), cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(_cmd(instance_dir, killed), cwd=ROOT, env=_env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _done_steps(killed) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = _done_steps(killed)
    assert 2 <= done < STEPS, f"kill landed after {done} steps"
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(
        _cmd(instance_dir, killed), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-2000:]
    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    ha = json.loads((full / "history.json").read_text())
    hb = json.loads((killed / "history.json").read_text())
    assert [h["loss"] for h in ha] == [h["loss"] for h in hb]
    assert len(ha) == STEPS


def test_bad_arguments_give_one_error_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "rwkvsam_core.finetune",
            "--data",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--steps",
            "1",
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: FileNotFoundError")


@pytest.mark.slow
def test_ddp_two_cpu_processes_follow_single_process_curve(instance_dir: Path, tmp_path: Path) -> None:
    """torchrun (gloo, 2 processes) vs 1 process with the same global batch: same losses."""
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run(
        _cmd(instance_dir, one), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert r1.returncode == 0, r1.stderr[-2000:]
    cmd2 = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "rwkvsam_core.finetune",
        *_cmd(instance_dir, two)[3:],
    ]
    r2 = subprocess.run(cmd2, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    h1 = json.loads((one / "history.json").read_text())
    h2 = json.loads((two / "history.json").read_text())
    for a, b in zip(h1, h2, strict=True):
        assert a["count"] == b["count"]
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3, abs=1e-4)
