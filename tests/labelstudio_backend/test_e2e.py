"""End to end against a REAL Label Studio 1.23.2 server and the backend's real HTTP server.

Both run on 127.0.0.1, started by this file. Label Studio comes from its own virtualenv
(``scripts/ci_deps_labelstudio.sh`` creates it at ``$RWKVSAM_LS_VENV``, default
``~/.cache/rwkvsam/ls-venv``). Without it the test fails when ``CI=true`` and is skipped elsewhere.

Checks: (a) an interactive request with a box and points returns a mask inside the box,
(b) "retrieve predictions" over all tasks fills a brush mask for every box, (c) posted annotations
trigger fine-tuning and the model version Label Studio sees changes, (d) a JSON export holds the masks,
(e) the offline ``preannotate`` command writes predictions of the new version for every task and a
second run resumes (skips them all).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ls_helpers import CONFIG, keypoint, rect, shipped_version

from labelstudio_backend.convert import rle_to_mask

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LS_VENV = Path(os.environ.get("RWKVSAM_LS_VENV", Path.home() / ".cache" / "rwkvsam" / "ls-venv"))
LS_BIN = LS_VENV / "bin" / "label-studio"


def _need(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the e2e test must run; run scripts/ci_deps_labelstudio.sh)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import requests

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the process group this test started
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class LS:
    def __init__(self, base: str, token: str) -> None:
        import requests

        self.base = base
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Token {token}"

    def __call__(self, method: str, path: str, expect: tuple[int, ...] = (200, 201), **kw):
        r = self.s.request(method, self.base + path, timeout=kw.pop("timeout", 120), **kw)
        assert r.status_code in expect, f"{method} {path} -> {r.status_code}: {r.text[:500]}"
        return r.json() if r.content else None


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict]:
    _need(LS_BIN.is_file(), f"label-studio is not installed in {LS_VENV}")
    pytest.importorskip("requests")
    pytest.importorskip("gunicorn")
    skdata = pytest.importorskip("skimage.data", reason="scikit-image provides the sample photos")
    tmp = tmp_path_factory.mktemp("ls_e2e")
    token = secrets.token_hex(16)
    ls_port, be_port = _free_port(), _free_port()
    docs = tmp / "docs"
    docs.mkdir()
    ls_env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(tmp / "ls_data"),
        "LABEL_STUDIO_USERNAME": "e2e@example.com",
        "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
        "LABEL_STUDIO_USER_TOKEN": token,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
        "LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_ML_BLOCK_LOCAL_IP": "false",
        "LABEL_STUDIO_SSRF_PROTECTION_ENABLED": "false",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(docs),
    }
    ls_env.pop("PYTHONPATH", None)
    logs = contextlib.ExitStack()
    ls_log = tmp / "ls.log"
    ls_proc = subprocess.Popen(
        [str(LS_BIN), "start", "--no-browser", "--port", str(ls_port), "--internal-host", "127.0.0.1"],
        env=ls_env, stdout=logs.enter_context(open(ls_log, "wb")),  # noqa: SIM115
        stderr=subprocess.STDOUT, cwd=tmp, start_new_session=True,
    )  # fmt: skip
    be_env = {
        **os.environ,
        "LABEL_STUDIO_URL": f"http://127.0.0.1:{ls_port}",
        "LABEL_STUDIO_API_KEY": token,
        "MODEL_DIR": str(tmp / "model_dir"),
        "RWKVSAM_MODEL": "rwkvsam_t",
        "RWKVSAM_IMAGE_SIZE": "256",
        "RWKVSAM_DEVICE": "cpu",
        "TRAIN_EVERY": "2",
        "TRAIN_STEPS": "1",
        "TRAIN_ARGS": "--num-workers 0 --no-augment --batch-size 1",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    be_log = tmp / "backend.log"
    be_proc = subprocess.Popen(
        [sys.executable, "-m", "labelstudio_backend.cli", "serve", "--host", "127.0.0.1", "--port", str(be_port),
         "--workers", "1", "--threads", "4"],
        env=be_env, stdout=logs.enter_context(open(be_log, "wb")),  # noqa: SIM115
        stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{be_port}/health", be_proc, 120, be_log)
        _wait_http(f"http://127.0.0.1:{ls_port}/health", ls_proc, 480, ls_log)  # migrations: ~40 s idle
        from PIL import Image

        images = []
        for name in ("astronaut", "coffee", "chelsea"):
            img = Image.fromarray(getattr(skdata, name)()).convert("RGB")
            img.thumbnail((320, 320))
            path = tmp / f"{name}.png"
            img.save(path)
            images.append(path)
        yield {
            "ls": LS(f"http://127.0.0.1:{ls_port}", token),
            "backend": f"http://127.0.0.1:{be_port}",
            "images": images,
            "be_log": be_log,
            "model_dir": tmp / "model_dir",
            "env": be_env,
        }
    finally:
        _stop(be_proc)
        _stop(ls_proc)
        logs.close()


def _box_pixels(item: dict) -> tuple[float, float, float, float]:
    v, w, h = item["value"], item["original_width"], item["original_height"]
    return (
        v["x"] * w / 100,
        v["y"] * h / 100,
        (v["x"] + v["width"]) * w / 100,
        (v["y"] + v["height"]) * h / 100,
    )


def _outside(mask: np.ndarray, box: tuple[float, float, float, float]) -> int:
    inside = np.zeros_like(mask)
    inside[int(np.floor(box[1])) : int(np.ceil(box[3])), int(np.floor(box[0])) : int(np.ceil(box[2]))] = True
    return int((mask & ~inside).sum())


def _decode(item: dict) -> np.ndarray:
    return rle_to_mask(item["value"]["rle"], item["original_height"], item["original_width"])


def test_label_studio_end_to_end(stack):
    ls = stack["ls"]
    project = ls("POST", "/api/projects", json={"title": "rwkvsam e2e", "label_config": CONFIG})
    pid = project["id"]
    for path in stack["images"]:  # one file per request: a repeated field name keeps only the last file
        with open(path, "rb") as fh:
            ls("POST", f"/api/projects/{pid}/import", files={"file": (path.name, fh, "image/png")})
    tasks = ls("GET", "/api/tasks", params={"project": pid, "fields": "all", "page_size": 100})["tasks"]
    assert len(tasks) == 3
    sizes = {}
    for t, path in zip(sorted(tasks, key=lambda t: t["id"]), stack["images"], strict=True):
        from PIL import Image

        with Image.open(path) as im:
            sizes[t["id"]] = im.size
    # boxes from "another model" for batch mode: two per task
    boxes = {
        tid: [rect(10, 10, 35, 40, "cat", ow=w, oh=h), rect(50, 30, 40, 60, "dog", ow=w, oh=h)]
        for tid, (w, h) in sizes.items()
    }
    ls(
        "POST",
        f"/api/projects/{pid}/import/predictions",
        json=[{"task": tid, "model_version": "detector", "result": r} for tid, r in boxes.items()],
    )
    ml = ls(
        "POST",
        "/api/ml",
        json={"url": stack["backend"], "project": pid, "title": "rwkvsam", "is_interactive": True},
    )
    ml_id, v0 = ml["id"], ml["model_version"]
    assert ml["state"] == "CO" and v0 == shipped_version()  # the shipped weights by default

    # (a) interactive: a box and points -> one mask inside the box, with the box's label
    tid = min(sizes)
    w, h = sizes[tid]
    box = rect(20, 15, 50, 60, "dog", ow=w, oh=h)
    context = {
        "result": [box, keypoint(40, 40, True, "dog", ow=w, oh=h), keypoint(45, 50, False, "dog", ow=w, oh=h)]
    }
    out = ls("POST", f"/api/ml/{ml_id}/interactive-annotating", json={"task": tid, "context": context})
    (item,) = out["data"]["result"]
    assert item["type"] == "brushlabels" and item["value"]["brushlabels"] == ["dog"]
    mask = _decode(item)
    assert mask.shape == (h, w) and mask.any()
    assert _outside(mask, _box_pixels(box)) == 0

    # (b) retrieve predictions for the whole project: a brush mask for every box of every task
    res = ls(
        "POST",
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": pid},
        json={"selectedItems": {"all": True, "excluded": []}},
        timeout=200,
    )
    assert res["processed_items"] == 3
    for t in tasks:
        preds = ls("GET", f"/api/tasks/{t['id']}")["predictions"]
        ours = [p for p in preds if p["model_version"] == v0]
        assert len(ours) == 1, preds
        brushes = [r for r in ours[0]["result"] if r["type"] == "brushlabels"]
        assert [b["value"]["brushlabels"] for b in brushes] == [["cat"], ["dog"]]
        for b, r in zip(brushes, boxes[t["id"]], strict=True):
            m = _decode(b)
            assert m.any() and _outside(m, _box_pixels(r)) == 0

    # (c) two accepted annotations (TRAIN_EVERY=2) -> fine-tuning -> the version LS sees changes
    annotated = {}
    for t in sorted(tasks, key=lambda t: t["id"])[:2]:
        w, h = sizes[t["id"]]
        m = np.zeros((h, w), bool)
        m[h // 4 : 3 * h // 4, w // 5 : w // 2] = True
        from labelstudio_backend.convert import mask_to_rle

        result = [
            {
                "type": "brushlabels",
                "from_name": "tag",
                "to_name": "image",
                "original_width": w,
                "original_height": h,
                "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["cat"]},
            }
        ]
        ls("POST", f"/api/tasks/{t['id']}/annotations/", json={"result": result})
        annotated[t["id"]] = m
    deadline = time.time() + 240
    version = v0
    while time.time() < deadline and version == v0:
        time.sleep(2)
        version = ls("GET", f"/api/ml/{ml_id}")["model_version"]
    assert version != v0, f"model version never changed; backend log:\n{stack['be_log'].read_text()[-3000:]}"
    assert version.startswith("rwkvsam_t-ft1-")
    samples = sorted(p.name for p in (stack["model_dir"] / "dataset").iterdir() if not p.name.startswith("."))
    assert len(samples) == 2

    # (d) the JSON export holds the annotated masks
    export = ls("GET", f"/api/projects/{pid}/export", params={"exportType": "JSON"})
    by_id = {t["id"]: t for t in export}
    for tid, m in annotated.items():
        (ann,) = by_id[tid]["annotations"]
        (brush,) = [r for r in ann["result"] if r["type"] == "brushlabels"]
        np.testing.assert_array_equal(_decode(brush), m)

    # (e) offline pre-annotation through the REST API with the fine-tuned model, then a resumed run
    cmd = [
        sys.executable,
        "-m",
        "labelstudio_backend.cli",
        "preannotate",
        "--project",
        str(pid),
        "--no-progress",
    ]
    for expected in ("done=3", "skipped=3"):
        run = subprocess.run(cmd, env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert expected in run.stdout, run.stdout + run.stderr[-2000:]
    for t in tasks:
        preds = ls("GET", f"/api/tasks/{t['id']}")["predictions"]
        new = [p for p in preds if p["model_version"] == version]
        assert len(new) == 1, (version, [(p["model_version"], len(p["result"])) for p in preds], run.stdout)
        (new,) = new
        assert [r["value"]["brushlabels"] for r in new["result"] if r["type"] == "brushlabels"] == [
            ["cat"],
            ["dog"],
        ]
