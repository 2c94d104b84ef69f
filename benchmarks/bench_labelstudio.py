"""Label Studio backend latency and throughput, end to end through HTTP.

Starts the real backend server (gunicorn, 1 worker) on 127.0.0.1, serves a sample photo from a
local-files document root, and times POST /predict requests the way Label Studio sends them:

* first click on a new image (includes the image encoder),
* second click on the same image (decoder only: the embedding comes from the cache) -- target
  <= 300 ms on a 2-core CPU with rwkvsam_t at 1024. The click-grouping rule decodes a positive
  click alone (its mask head runs only in small windows around the first click, which is all the
  decision reads); when that mask holds the first click the two clicks are decoded together (2 decoder
  passes), else the click starts a new object and its own mask is the answer (1 pass); a negative
  click is decoded with the object's clicks (1 pass). The passes of each request are read from
  /metrics and the table splits the clicks by them (second clicks are placed at several distances
  from the first; with random weights which case happens is up to the model),
* one box on the same image,
* batch mode: one task holding N boxes, one decoder pass (boxes per second), warm and cold.

    python benchmarks/bench_labelstudio.py [--model rwkvsam_t --image-size 1024 --repeats 10 --boxes 16]

Prints a table; copy it with the machine and date into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from _machine import cpu_model  # benchmarks/_machine.py (run as a script)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="object"/></BrushLabels>
<RectangleLabels name="rect" toName="image" smart="true"><Label value="object"/></RectangleLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="object"/></KeyPointLabels></View>"""


def _photo(side: int, seed: int) -> np.ndarray:
    try:
        from skimage import data

        img = [data.astronaut, data.chelsea, data.coffee][seed % 3]()
    except ImportError:  # a synthetic picture keeps the benchmark runnable without scikit-image
        rng = np.random.default_rng(seed)
        img = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    pil = Image.fromarray(img).convert("RGB")
    scale = side / max(pil.size)
    return np.asarray(pil.resize((round(pil.size[0] * scale), round(pil.size[1] * scale)), Image.BILINEAR))


def _kp(x, y, positive, w, h):
    return {
        "type": "keypointlabels",
        "from_name": "kp",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "is_positive": positive,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["object"]},
    }


def _rect(x, y, bw, bh, w, h):
    return {
        "type": "rectanglelabels",
        "from_name": "rect",
        "to_name": "image",
        "original_width": w,
        "original_height": h,
        "value": {"x": x, "y": y, "width": bw, "height": bh, "rotation": 0, "rectanglelabels": ["object"]},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="rwkvsam_t")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--photo-side", type=int, default=1024, help="longest side of the test photos")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--boxes", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2, help="gunicorn threads of the one worker")
    args = ap.parse_args()
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        docs = tmp / "docs"
        docs.mkdir()
        photos = [_photo(args.photo_side, i) for i in range(3)]
        for i, p in enumerate(photos):
            Image.fromarray(p).save(docs / f"p{i}.png")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {
            **os.environ,
            "MODEL_DIR": str(tmp / "model_dir"),
            "LOCAL_FILES_DOCUMENT_ROOT": str(docs),
            "RWKVSAM_MODEL": args.model,
            "RWKVSAM_IMAGE_SIZE": str(args.image_size),
            "RWKVSAM_DEVICE": "cpu",
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",
            "LOG_LEVEL": "WARNING",
            "TRAIN_EVERY": "0",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        log = stack.enter_context(open(tmp / "server.log", "wb"))
        proc = subprocess.Popen(
            [sys.executable, "-m", "labelstudio_backend.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--threads", str(args.threads)],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True,
        )  # fmt: skip
        stack.callback(lambda: (proc.poll() is None and os.killpg(proc.pid, signal.SIGTERM), proc.wait()))
        base = f"http://127.0.0.1:{port}"
        for _ in range(240):
            with contextlib.suppress(requests.RequestException):
                if requests.get(base + "/health", timeout=2).ok:
                    break
            time.sleep(0.5)
        else:
            print((tmp / "server.log").read_text()[-2000:])
            return 1
        session = requests.Session()

        def predict(tasks, context=None) -> tuple[float, dict]:
            payload = {"tasks": tasks, "label_config": CONFIG, "project": "1.1"}
            if context:
                payload["params"] = {"context": context}
            t0 = time.perf_counter()
            r = session.post(base + "/predict", json=payload, timeout=600)
            dt = time.perf_counter() - t0
            r.raise_for_status()
            return dt, r.json()

        def decodes() -> int | None:  # decoder passes so far (None: a backend that does not count them)
            value = session.get(base + "/metrics", timeout=60).json().get("decodes")
            return None if value is None else int(value)

        h, w = photos[0].shape[:2]
        task = {"id": 1, "data": {"image": "/data/local-files/?d=p0.png"}}
        t_first, out = predict([task], {"result": [_kp(45, 42, True, w, h)]})
        assert out["results"][0]["result"], "no mask returned"
        second: dict[str, list[float]] = {"joins": [], "new object": [], "positive": [], "negative": []}
        rle_sizes: list[int] = []
        for i in range(args.repeats):
            positive = i % 2 == 0
            offset = (0.3, 1, 3, 8, 20)[(i // 2) % 5] + 0.05 * i  # percent; every request a new position
            ctx = {"result": [_kp(45, 42, True, w, h), _kp(45 + offset, 42 + offset / 2, positive, w, h)]}
            before = decodes()
            dt, answer = predict([task], ctx)
            rle_sizes.append(len(answer["results"][0]["result"][0]["value"]["rle"]))
            after = decodes()
            if not positive:
                second["negative"].append(dt)
            elif before is None or after is None:
                second["positive"].append(dt)
            else:
                second["joins" if after - before >= 2 else "new object"].append(dt)
        all_second = [t for ts in second.values() for t in ts]
        box = [
            predict([task], {"result": [_rect(20, 20, 40 + i % 3, 50, w, h)]})[0] for i in range(args.repeats)
        ]
        rng = np.random.default_rng(0)
        rects = []
        for _ in range(args.boxes):
            x, y = rng.uniform(0, 60, 2)
            rects.append(_rect(x, y, rng.uniform(10, 40), rng.uniform(10, 40), w, h))
        batch_task = {**task, "predictions": [{"id": 1, "result": rects}]}
        warm = [predict([batch_task])[0] for _ in range(max(1, args.repeats // 3))]
        n_out = len(predict([batch_task])[1]["results"][0]["result"])
        cold_task = {
            "id": 2,
            "data": {"image": "/data/local-files/?d=p1.png"},
            "predictions": [{"id": 1, "result": rects}],
        }
        cold = predict([cold_task])[0]

    med = statistics.median
    print(
        f"# Label Studio backend, {args.model} at {args.image_size}, photo {w}x{h}, "
        f"{cpu_model()}, {os.cpu_count()} cores, torch threads default, {time.strftime('%Y-%m-%d')}"
    )
    load_end = os.getloadavg()
    print(
        "# load averages (1, 5, 15 min) at the start: {} / at the end: {} (other processes count)".format(
            *(", ".join(f"{v:.2f}" for v in load) for load in (load_start, load_end))
        )
    )
    print("| request (HTTP, end to end) | median | min | max |")
    print("|---|---|---|---|")
    print(f"| first click on a new image (encoder + decoder) | {t_first * 1000:.0f} ms | - | - |")
    print(
        f"| second click, same image (decoder only), {len(all_second)} requests | {med(all_second) * 1000:.0f} ms"
        f" | {min(all_second) * 1000:.0f} ms | {max(all_second) * 1000:.0f} ms |"
    )
    names = {
        "joins": "positive, joins the first click's object (2 decoder passes)",
        "new object": "positive, starts a new object (1 decoder pass)",
        "positive": "positive (decoder passes not reported by this backend)",
        "negative": "negative (1 decoder pass)",
    }
    for key, vals in second.items():
        if vals:
            print(
                f"| - {names[key]}, {len(vals)} requests | {med(vals) * 1000:.0f} ms | {min(vals) * 1000:.0f} ms"
                f" | {max(vals) * 1000:.0f} ms |"
            )
    print(
        f"| one box, same image | {med(box) * 1000:.0f} ms | {min(box) * 1000:.0f} ms | {max(box) * 1000:.0f} ms |"
    )
    print(
        f"| batch: {args.boxes} boxes, cached embedding | {med(warm) * 1000:.0f} ms "
        f"({args.boxes / med(warm):.1f} boxes/s) | {min(warm) * 1000:.0f} ms | {max(warm) * 1000:.0f} ms |"
    )
    print(
        f"| batch: {args.boxes} boxes, new image (encoder included) | {cold * 1000:.0f} ms "
        f"({args.boxes / cold:.1f} boxes/s) | - | - |"
    )
    print(f"# {n_out} brush masks returned for {args.boxes} boxes")
    print(
        f"# brush RLE of a second-click answer: median {med(rle_sizes) / 1000:.0f} kB "
        "(noise masks of untrained weights; a compact object's mask takes a few kB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
