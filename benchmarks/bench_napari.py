"""Benchmark of the napari widget (issue 4): responsiveness during an embedding, prompt-to-preview latency.

Runs a real napari viewer (starts Xvfb when there is no DISPLAY), docks the RWKV-SAM widget from its
manifest, opens the sample photograph and measures:

* the embedding time and the longest gap between ticks of a 5 ms QTimer on the GUI thread while the
  embedding runs in the worker (the longest time the GUI thread was blocked, upper bound). The widget
  starts an embedding only after napari has painted the newly opened image, so the window "during
  the embedding" runs from the moment the widget started its worker (timed by wrapping
  ``_start_worker``; a widget that starts it inside the opening is measured from there) to the end;
  the whole timer gap in which the start fell is printed too. napari's first paint of the image is
  reported separately, with the embedding and without it (reference), and so is the longest gap from
  opening the image to ready (this benchmark's window before 2026-11-27 09:00 UTC, which includes
  that first paint);
* the time from a prompt change (a point added, a box added) to the preview layer updated
  (the widget's ``preview_updated`` signal, emitted after the layer was refreshed); the GUI thread
  waits for it in a Qt event loop, idle like a real session (no polling loop competing for the CPU);
  and to the next frame napari's canvas drew after that (the preview on screen);
* "segment all boxes" (3 boxes): time until the labels are committed, and the longest gap between
  ticks of a 5 ms QTimer meanwhile (the decode runs in the decode thread);
* undo of a commit: time until the label is reverted and the prompts and preview are back;
* a contrast change: time until the image is embedded again and the preview redrawn (includes the
  widget's debounce);
* re-opening the same image: time to "ready" when the embedding comes from the disk cache.

The machine's 1-minute load average is printed next to every measurement: on a 2-core machine other
processes distort every timing, so read the numbers together with it.

Usage: python benchmarks/bench_napari.py [--model rwkvsam_t] [--size 1024] [--repeats 20] [--wait-ms MS]
       [--embed-nice N] [--embedding-only]
Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
from _machine import cpu_model  # benchmarks/_machine.py (run as a script)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
MANIFEST = ROOT / "napari_plugin" / "napari.yaml"


def start_display() -> subprocess.Popen | None:
    """Start Xvfb and set DISPLAY when no display exists (napari needs OpenGL; 'offscreen' fails)."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")
    if os.environ.get("DISPLAY"):
        return None
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        sys.exit("no DISPLAY and no Xvfb: run scripts/ci_deps_napari.sh")
    read_fd, write_fd = os.pipe()

    def die_with_parent() -> None:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: Xvfb ends with this process

    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        os.environ["DISPLAY"] = ":" + pipe.readline().strip()
    return proc


def register_plugin() -> None:
    """Register the manifest with npe2 unless the package is installed (then its entry point did)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    manifest = PluginManifest.from_file(MANIFEST)
    if manifest.name not in pm:
        pm.register(manifest)


def wait_for(app, predicate, timeout: float) -> None:
    end = time.perf_counter() + timeout
    while not predicate():
        if time.perf_counter() > end:
            raise TimeoutError("timed out")
        app.processEvents()
        time.sleep(0.001)


def load1() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def wait_signal(signal, already: list, timeout_s: float) -> None:
    """Run a Qt event loop until ``signal`` fires (or ``already`` is non-empty): the GUI thread idles."""
    from qtpy.QtCore import QEventLoop, QTimer

    if already:
        return
    loop = QEventLoop()
    signal.connect(loop.quit)
    QTimer.singleShot(int(timeout_s * 1000), loop.quit)
    try:
        if not already:
            loop.exec()
    finally:
        signal.disconnect(loop.quit)
    if not already:
        raise TimeoutError("timed out")


def summary(values_ms: list[float]) -> str:
    arr = np.asarray(values_ms)
    return f"{np.median(arr):.0f} / {np.percentile(arr, 90):.0f} / {arr.max():.0f}" if len(arr) else "n/a"


def decoder_only(args: argparse.Namespace) -> None:
    """The widget's decode path without napari: ``Segmenter.predict`` (decoder + full-size masks).

    Used where napari cannot be installed (e.g. to compare with an idle CPU limited to N threads).
    """
    import torch

    from napari_plugin._conversion import PromptBatch
    from napari_plugin._engine import ModelSpec, Segmenter, compute_features

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec(args.model, device="cpu", image_size=args.size)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    t = time.perf_counter()
    segmenter = Segmenter(spec)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    features = compute_features(spec, image, None)
    embed_s = time.perf_counter() - t
    one = PromptBatch(np.array([[[300.0, 200.0]]]), np.array([[1]]), np.array([[150.0, 100.0, 450.0, 300.0]]))
    three = PromptBatch(
        None, None, np.array([[20.0, 30, 150, 120], [200, 150, 400, 300], [400, 250, 590, 390]])
    )
    rows = []
    for name, batch in (("1 object (box + point)", one), ("3 boxes, one call", three)):
        segmenter.predict(features, batch)  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            segmenter.predict(features, batch)
            times.append((time.perf_counter() - t) * 1000)
        rows.append((name, summary(times)))
    load = os.getloadavg()
    print(
        f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {cpu_model()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); "
        f"load average {load[0]:.1f}"
    )
    print(
        f"model {args.model} ({weights_note(args.model)}), input {args.size}: build {build_s:.1f} s, "
        f"embedding {embed_s:.1f} s (400x600 image)"
    )
    print("| decode path (Segmenter.predict) | median / p90 / max ms |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def weights_note(name: str) -> str:
    from rwkvsam_core import default_checkpoint

    return "shipped weights" if default_checkpoint(name) is not None else "random weights"


def print_header(args, napari, torch, widget, build_s: float) -> None:
    load = os.getloadavg()
    print(f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), napari {napari.__version__}, Qt platform xcb on Xvfb"
    )
    print(f"load average at the end (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    nice = getattr(sys.modules.get("napari_plugin._widget"), "BACKGROUND_NICE", "?")
    print(
        f"model: {args.model} ({weights_note(args.model)}), input {args.size}, image 400x600 RGB (sample), "
        f"model build {build_s:.1f} s (once, not counted below), preview_wait_ms {widget.preview_wait_ms}, "
        f"embedding thread nice +{nice}"
    )
    print()
    print("| measurement | value | target | load (1 min) |")
    print("|---|---|---|---|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rwkvsam_t")
    parser.add_argument("--size", type=int, default=1024, help="model input side")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--decoder-only", action="store_true", help="no GUI: time the decode path only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for --decoder-only")
    parser.add_argument(
        "--wait-ms",
        type=int,
        default=None,
        help="the widget's preview_wait_ms (how long a prompt change waits for its decode; 0 = never)",
    )
    parser.add_argument(
        "--embed-nice",
        type=int,
        default=None,
        help="niceness of the embedding thread (the widget's BACKGROUND_NICE)",
    )
    parser.add_argument(
        "--embedding-only",
        action="store_true",
        help="stop after the embedding measurements (and their reference)",
    )
    args = parser.parse_args()
    if args.decoder_only:
        decoder_only(args)
        return

    start_display()
    cache_dir = tempfile.mkdtemp(prefix="rwkvsam-bench-cache-")
    os.environ["RWKVSAM_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message="RWKV-SAM: no weights")

    import napari
    import torch
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_plugin import _engine, _widget
    from napari_plugin._widget import CONTRAST_DEBOUNCE_MS

    if args.embed_nice is not None:
        _widget.BACKGROUND_NICE = args.embed_nice

    register_plugin()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    app = QApplication.instance()
    _, widget = viewer.window.add_plugin_dock_widget("rwkvsam", "RWKV-SAM")
    widget.model_combo.setCurrentText(args.model)
    widget.size_combo.setCurrentText(str(args.size))
    widget.device_combo.setCurrentText("cpu")
    if args.wait_ms is not None:
        widget.preview_wait_ms = args.wait_ms

    # the model is built once (not part of the embedding timing), in a thread that ends, as the widget
    # does: a torch op on this GUI thread would give it an OpenMP team of its own, which slows every
    # later decode (napari_plugin/_engine.py says why)
    t = time.perf_counter()
    builder = threading.Thread(target=_engine.load_model, args=(widget._model_spec(),))
    builder.start()
    builder.join()
    build_s = time.perf_counter() - t

    # napari's first layer is slow to add (imports, unit registry): warm it up outside the timings
    viewer.add_image(np.zeros((8, 8), dtype=np.uint8), name="warm-up")
    app.processEvents()
    viewer.layers.remove("warm-up")
    app.processEvents()
    # the widget embeds the warm-up image too: the idle baseline below must not run beside it
    wait_for(app, lambda: not widget.is_embedding, 600)

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    # ---- idle baseline of the same probe: what this machine's load alone does to a 5 ms timer
    tb = time.perf_counter()
    ticks.clear()
    wait_for(app, lambda: time.perf_counter() - tb > 5.0, 30)
    idle_gaps = np.diff([tb, *ticks]) * 1000

    frames: list[float] = []  # when napari's canvas finished a frame (QOpenGLWidget.frameSwapped)
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.frameSwapped.connect(lambda: frames.append(time.perf_counter()))

    # ---- embedding: GUI-thread responsiveness while the worker computes it
    loads = {"idle": load1()}
    started: list[float] = []  # when the widget started the embedding's worker (GUI thread)
    start_worker = widget._start_worker  # wrapped, not its signal: widgets older than it compare too

    def timed_start(*a, **k):
        out = start_worker(*a, **k)
        started.append(time.perf_counter())
        return out

    widget._start_worker = timed_start
    tc = time.perf_counter()
    viewer.open_sample("rwkvsam", "coffee")  # GUI work: the image layer + the widget's 3 layers
    t0 = time.perf_counter()
    open_ms = (t0 - tc) * 1000
    if not widget.is_embedding:
        sys.exit("the embedding did not start")
    ticks.clear()
    frames.clear()
    wait_for(app, lambda: not widget.is_embedding, 1800)
    t1 = time.perf_counter()
    timer.stop()
    widget._start_worker = start_worker
    if len(started) != 1 or not tc <= started[0] <= t1:
        sys.exit(f"expected one embedding start while opening the image, saw {len(started)}")
    ts = started[0]
    embed_s = t1 - ts
    # from the image opened to the embedding done (the window of this benchmark before 2026-11-27 09 UTC)
    gaps = np.diff([t0, *ticks, t1]) * 1000
    longest_gap = float(gaps.max())
    # the first gap is napari's first redraw of the layers just added (GL programs, textures, layer
    # list icons): GUI work of opening an image, measured again below without any embedding
    first_redraw = float(gaps[0])
    first_frame_ms = (frames[0] - t0) * 1000 if frames else float("nan")
    start_ms = (ts - t0) * 1000  # negative: the embedding started inside open_sample
    # during the embedding: the GUI thread's blocks between its start and its end
    after_start = [t for t in ticks if t > ts]
    during = np.diff([ts, *after_start, t1]) * 1000
    longest_during = float(during.max())
    longest_at = float(([ts, *after_start, t1][int(during.argmax())] - ts) * 1000)  # when it began
    during_p99 = float(np.percentile(during, 99))
    # the whole timer gap in which the start fell, and how much of it came before the start
    tick_before = max([t for t in ticks if t <= ts], default=min(t0, ts))
    tick_after = after_start[0] if after_start else t1
    start_gap = ((tick_after - tick_before) * 1000, (ts - tick_before) * 1000)
    before_first_frame = not frames or ts < frames[0]
    loads["embedding"] = load1()
    wait_for(app, lambda: widget.is_ready, 60)
    ready_s = time.perf_counter() - t0

    # reference: the first redraw after opening an image with no embedding at all
    widget.auto_embed_check.setChecked(False)
    timer.start()
    viewer.add_image(np.zeros((8, 8), dtype=np.uint8), name="probe")  # not selected by the widget
    viewer.open_sample("rwkvsam", "coffee")
    tr = time.perf_counter()
    ticks.clear()
    wait_for(app, lambda: len(ticks) >= 1, 30)
    timer.stop()
    redraw_ref = (ticks[0] - tr) * 1000
    viewer.layers.remove("probe")
    viewer.layers.remove(viewer.layers[-1])  # the second coffee layer
    widget.auto_embed_check.setChecked(True)
    app.processEvents()

    embedding_rows = [
        f"| embedding, worker thread (its start to done) / image opened -> ready | {embed_s:.1f} / {ready_s:.1f} s "
        f"| - | {loads['embedding']} |",
        f"| embedding started after the image was opened (negative: inside the opening) / first canvas frame "
        f"| {start_ms:.0f} / {first_frame_ms:.0f} ms | - | |",
        f"| **longest GUI-thread block during the embedding** (5 ms timer gaps from its start to its end) | "
        f"{longest_during:.0f} ms (p99 {during_p99:.0f} ms, {len(during)} gaps; the longest began "
        f"{longest_at:.0f} ms after the start) | <= 100 ms | {loads['embedding']} |",
        f"| ... the timer gap the start fell in (of it before the start); started before the first canvas frame | "
        f"{start_gap[0]:.0f} ({start_gap[1]:.0f}) ms; {'yes' if before_first_frame else 'no'} | - | |",
        f"| longest GUI block from opening the image to ready / of which the first redraw | "
        f"{longest_gap:.0f} / {first_redraw:.0f} ms | - | {loads['embedding']} |",
        f"| first redraw after opening the image, no embedding (reference) | {redraw_ref:.0f} ms | - | |",
        f"| same probe with the GUI idle, no embedding (machine-load baseline) | {idle_gaps.max():.0f} ms "
        f"(p99 {np.percentile(idle_gaps, 99):.0f} ms) | - | {loads['idle']} |",
        f"| opening the image (napari adds it + the widget's 3 layers, GUI thread) | {open_ms:.0f} ms | - | |",
    ]
    if args.embedding_only:
        print_header(args, napari, torch, widget, build_s)
        print("\n".join(embedding_rows))
        widget.shutdown()
        viewer.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
        return

    # ---- prompt change -> preview updated
    rng = np.random.default_rng(0)
    h, w = viewer.layers["coffee"].data.shape[:2]
    updated = []
    widget.preview_updated.connect(lambda: updated.append(time.perf_counter()))
    decode_ms: list[float] = []
    decode_end: list[float] = []
    original_predict = widget._segmenter.predict

    def timed_predict(*a, **k):
        s = time.perf_counter()
        out = original_predict(*a, **k)
        decode_end.append(time.perf_counter())
        decode_ms.append((decode_end[-1] - s) * 1000)
        return out

    widget._segmenter.predict = timed_predict

    def settle() -> None:
        """Clear the prompts and let napari finish redrawing before the next prompt."""
        widget.clear()
        wait_for(app, lambda: not widget.is_decoding, 60)
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.01)

    drawn: dict[str, list[float]] = {"point": [], "box": []}

    def measure(change, kind: str | None = None) -> float:
        updated.clear()
        start = time.perf_counter()
        change()  # may already draw the preview (the widget waits up to preview_wait_ms for it)
        wait_signal(widget.preview_updated, updated, 60)
        if kind is not None:
            wait_for(app, lambda: any(f >= updated[0] for f in frames), 10)
            drawn[kind].append((min(f for f in frames if f >= updated[0]) - start) * 1000)
        return (updated[0] - start) * 1000

    point_ms, box_ms, boxes3_ms = [], [], []
    for _ in range(args.repeats):
        settle()
        y, x = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        point_ms.append(measure(lambda y=y, x=x: widget.points_layer.add([y, x]), "point"))
    loads["point"] = load1()
    for _ in range(args.repeats):
        settle()
        r0, c0 = rng.uniform(0, 0.5) * h, rng.uniform(0, 0.5) * w
        box_ms.append(
            measure(
                lambda r0=r0, c0=c0: widget.boxes_layer.add_rectangles(
                    np.array([[r0, c0], [r0 + h / 3, c0 + w / 3]])
                ),
                "box",
            )
        )
    loads["box"] = load1()
    decode_single = list(decode_ms)
    decode_ms.clear()
    for _ in range(max(3, args.repeats // 4)):
        settle()
        rects = [np.array([[r, c], [r + 80, c + 120]]) for r, c in ((20, 30), (150, 200), (260, 400))]
        boxes3_ms.append(measure(lambda rects=rects: widget.boxes_layer.add_rectangles(rects)))
    loads["boxes3"] = load1()
    decode_three = list(decode_ms)

    # ---- segment all boxes: committed in the background, the GUI thread keeps ticking while it decodes
    seg_all_ms, seg_all_gap, seg_all_decode = [], [], []
    for _ in range(max(3, args.repeats // 4)):
        settle()
        measure(lambda rects=rects: widget.boxes_layer.add_rectangles(rects))
        wait_for(app, lambda: not widget.is_decoding, 60)
        done: list[float] = []

        def on_committed(ids, done=done) -> None:
            done.append(time.perf_counter())

        widget.committed.connect(on_committed)
        ticks.clear()
        timer.start()
        start = time.perf_counter()
        widget.segment_all_boxes()
        wait_signal(widget.committed, done, 60)
        timer.stop()
        widget.committed.disconnect(on_committed)
        seg_all_ms.append((done[0] - start) * 1000)
        end = decode_end[-1]  # the decode thread's pass for the boxes
        seg_all_decode.append((end - start) * 1000)
        seg_all_gap.append(float(np.diff([start, *[t for t in ticks if t <= end], end]).max() * 1000))
        widget.undo()
    loads["segment_all"] = load1()

    # ---- undo: the label goes, the prompts and the preview come back (no decode needed)
    undo_ms = []
    for _ in range(max(3, args.repeats // 4)):
        settle()
        measure(lambda: widget.boxes_layer.add_rectangles(np.array([[60.0, 150.0], [260.0, 420.0]])))
        widget.points_layer.add([150.0, 280.0])
        wait_for(app, lambda: not widget.is_decoding, 60)
        widget.commit()
        app.processEvents()
        start = time.perf_counter()
        widget.undo()
        undo_ms.append((time.perf_counter() - start) * 1000)
        assert len(widget.boxes_layer.data) == 1 and widget.preview_layer.data.any()
    loads["undo"] = load1()

    # ---- contrast change -> embedded again -> preview redrawn (float copy of the sample, grey)
    settle()
    grey = viewer.add_image(viewer.layers["coffee"].data.mean(axis=2).astype(np.float32), name="grey")
    widget.image_combo.setCurrentIndex(widget.image_combo.count() - 1)
    wait_for(app, lambda: widget.is_ready, 600)
    measure(lambda: widget.boxes_layer.add_rectangles(np.array([[60.0, 150.0], [260.0, 420.0]])))
    contrast_ms = []
    for hi in (200.0, 180.0):
        updated.clear()
        start = time.perf_counter()
        grey.contrast_limits = (0.0, hi)
        wait_signal(widget.preview_updated, updated, 600)
        contrast_ms.append((time.perf_counter() - start) * 1000)
    loads["contrast"] = load1()
    widget.clear()
    viewer.layers.remove(grey)

    # ---- re-open the same image: embedding from the disk cache (fresh cache object, widget copy dropped)
    _engine._CACHE = None
    widget._features.clear()
    viewer.layers.remove("coffee")
    app.processEvents()
    t2 = time.perf_counter()
    viewer.open_sample("rwkvsam", "coffee")
    wait_for(app, lambda: widget.is_ready, 600)
    reopen_ms = (time.perf_counter() - t2) * 1000
    disk_hits = _engine.embedding_cache().disk_hits
    loads["reopen"] = load1()

    print_header(args, napari, torch, widget, build_s)
    print("\n".join(embedding_rows))
    print(
        f"| point added -> preview updated, median / p90 / max | {summary(point_ms)} ms | <= 200 ms | "
        f"{loads['point']} |"
    )
    print(
        f"| box added -> preview updated, median / p90 / max | {summary(box_ms)} ms | <= 200 ms | {loads['box']} |"
    )
    print(
        f"| point added -> preview on screen (next canvas frame), median / p90 / max | "
        f"{summary(drawn['point'])} ms | - | {loads['point']} |"
    )
    print(
        f"| box added -> preview on screen (next canvas frame), median / p90 / max | "
        f"{summary(drawn['box'])} ms | - | {loads['box']} |"
    )
    print(
        f"| 3 boxes added -> preview updated (one batched decoder pass) | {summary(boxes3_ms)} ms | - | "
        f"{loads['boxes3']} |"
    )
    print(
        f"| segment all boxes (3 boxes) -> labels committed, median (of which the decode thread's pass) | "
        f"{statistics.median(seg_all_ms):.0f} ({statistics.median(seg_all_decode):.0f}) ms | - | "
        f"{loads['segment_all']} |"
    )
    print(
        f"| ... longest GUI-thread block (5 ms timer gap) while it decodes, median / max | "
        f"{statistics.median(seg_all_gap):.0f} / {max(seg_all_gap):.0f} ms | <= 100 ms | {loads['segment_all']} |"
    )
    print(
        f"| of which decoder + upsampling of the shown masks (1 object / 3 objects), median | "
        f"{statistics.median(decode_single):.0f} / {statistics.median(decode_three):.0f} ms | - | |"
    )
    print(
        f"| undo: label reverted, prompts and preview back, median / p90 / max | {summary(undo_ms)} ms | - | "
        f"{loads['undo']} |"
    )
    print(
        f"| contrast limits changed -> embedded again -> preview redrawn (incl. "
        f"{CONTRAST_DEBOUNCE_MS} ms debounce) | {' / '.join(f'{v / 1000:.1f}' for v in contrast_ms)} s | - | "
        f"{loads['contrast']} |"
    )
    print(
        f"| re-open the same image, ready from the disk cache | {reopen_ms:.0f} ms (disk hits: {disk_hits}) | "
        f"instant | {loads['reopen']} |"
    )

    widget.shutdown()
    viewer.close()
    shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
