"""The widget's model side without Qt: the preview decode thread and cancellable embeddings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from napari_plugin import _engine
from napari_plugin._engine import EmbeddingCancelled, LatestJobThread, ModelSpec, compute_features

TIMEOUT_S = 30


def test_latest_job_thread_runs_the_newest_job_and_drops_waiting_ones():
    worker = LatestJobThread(name="test-decode")
    try:
        release = threading.Event()
        started = threading.Event()
        ran = []
        done = threading.Event()

        def blocking() -> None:
            started.set()
            release.wait(TIMEOUT_S)
            ran.append("first")

        def job(name: str, last: bool = False):
            def run() -> None:
                ran.append(name)
                if last:
                    done.set()

            return run

        assert worker.submit(blocking) is False
        assert started.wait(TIMEOUT_S)
        assert worker.busy
        # three jobs arrive while the first runs: only the newest survives
        assert worker.submit(job("a")) is False
        assert worker.submit(job("b")) is True
        assert worker.submit(job("c", last=True)) is True
        release.set()
        assert done.wait(TIMEOUT_S)
        assert ran == ["first", "c"]
        names = set()
        worker.submit(lambda: names.add((threading.current_thread().name, worker.in_thread())) or done.set())
        done.clear()
        assert done.wait(TIMEOUT_S)
        assert names == {("test-decode", True)}  # one persistent thread, not one per job
        assert not worker.in_thread()
    finally:
        worker.close(timeout=TIMEOUT_S)
    assert not worker._thread.is_alive()
    with pytest.raises(RuntimeError):
        worker.submit(lambda: None)


def test_latest_job_thread_survives_a_failing_job():
    worker = LatestJobThread()
    try:
        failed = threading.Event()
        done = threading.Event()

        def fail() -> None:
            failed.set()
            raise ValueError("boom")

        worker.submit(fail)
        assert failed.wait(TIMEOUT_S)
        worker.submit(done.set)
        assert done.wait(TIMEOUT_S)  # the thread is still alive after the error
    finally:
        worker.close(timeout=TIMEOUT_S)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_engine.CACHE_ENV, str(tmp_path / "emb"))
    monkeypatch.setattr(_engine, "_CACHE", None)
    return tmp_path / "emb"


def test_compute_features_stops_between_encoder_blocks_and_caches_nothing(fresh_cache):
    spec = ModelSpec("rwkvsam_t", device="cpu", image_size=256)
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 255, (90, 120), dtype=np.uint8)
    polls = []

    def cancelled() -> bool:  # becomes true inside the encoder, after a few blocks ran
        polls.append(1)
        return len(polls) > 5

    with pytest.raises(EmbeddingCancelled):
        compute_features(spec, plane, (0.0, 255.0), cancelled=cancelled)
    assert len(polls) == 6  # polled before the encoder and before each block until it said stop
    cache = _engine.embedding_cache()
    assert not any(fresh_cache.rglob("*.safetensors"))

    # the same call without cancellation is a cache miss (nothing was stored) and works; a decode
    # from another thread is never stopped
    feats = compute_features(spec, plane, (0.0, 255.0), cancelled=lambda: False)
    assert feats.original_size == (90, 120)
    assert (cache.misses, cache.hits, cache.disk_hits) == (2, 0, 0)

    from napari_plugin._conversion import PromptBatch

    out = []
    thread = threading.Thread(
        target=lambda: out.append(
            _engine.Segmenter(spec).predict(
                feats, PromptBatch(None, None, np.array([[10.0, 10.0, 80.0, 60.0]]))
            )
        )
    )
    thread.start()
    thread.join(TIMEOUT_S)
    masks, scores = out[0]
    assert masks.shape[0] == 1 and masks.shape[-2:] == (90, 120) and scores.shape[0] == 1


def test_cancelled_before_the_encoder_starts(fresh_cache):
    spec = ModelSpec("rwkvsam_t", device="cpu", image_size=256)
    with pytest.raises(EmbeddingCancelled):
        compute_features(spec, np.zeros((32, 32), np.uint8), None, cancelled=lambda: True)


def test_latest_job_thread_never_drops_a_kept_job():
    worker = LatestJobThread()
    try:
        release = threading.Event()
        started = threading.Event()
        ran = []
        done = threading.Event()

        def blocking() -> None:
            started.set()
            release.wait(TIMEOUT_S)
            ran.append("preview 0")

        worker.submit(blocking)
        assert started.wait(TIMEOUT_S)
        # while a preview decodes: "segment all boxes" twice, and previews that replace each other
        assert worker.submit(lambda: ran.append("all 1"), replaceable=False) is False
        assert worker.submit(lambda: ran.append("preview 1")) is False
        assert worker.submit(lambda: ran.append("all 2"), replaceable=False) is False
        assert worker.submit(lambda: (ran.append("preview 2"), done.set())) is True
        assert worker.busy
        release.set()
        assert done.wait(TIMEOUT_S)
        # kept jobs in their order, then only the newest preview
        assert ran == ["preview 0", "all 1", "all 2", "preview 2"]
    finally:
        worker.close(timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def decoded():
    """A small model, the features of a random image and its predictor."""
    import torch

    from rwkvsam_core import Predictor

    spec = ModelSpec("rwkvsam_t", device="cpu", image_size=128)
    rng = np.random.default_rng(7)
    plane = rng.integers(0, 255, (90, 150, 3), dtype=np.uint8)
    feats = compute_features(spec, plane, None)
    predictor = Predictor(_engine.load_model(spec))
    predictor.set_features(feats)
    return spec, feats, predictor, torch


def test_mask_candidates_equal_predict_torch_and_upsample_only_what_is_shown(decoded):
    from napari_plugin._conversion import PromptBatch

    spec, feats, predictor, torch = decoded
    boxes = np.array([[10.0, 10.0, 80.0, 60.0], [50.0, 5.0, 140.0, 85.0], [0.0, 0.0, 149.0, 89.0]])
    batch = PromptBatch(
        np.array([[[30.0, 30.0]], [[90.0, 40.0]], [[0.0, 0.0]]]), np.array([[1], [0], [-1]]), boxes
    )
    candidates, scores = _engine.Segmenter(spec).predict(feats, batch)
    assert candidates.shape == (3, 3, 90, 150) and len(candidates) == 3
    best = np.argmax(scores, axis=1)
    assert sorted(candidates._full) == [(i, int(c)) for i, c in enumerate(best)]  # only the best so far
    t = predictor.transform
    with torch.inference_mode():
        ref_masks, ref_iou, _ = predictor.predict_torch(
            t.apply_coords_torch(
                torch.as_tensor(batch.point_coords, dtype=torch.float32), predictor.original_size
            ),
            torch.as_tensor(batch.point_labels),
            t.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32), predictor.original_size),
        )
    np.testing.assert_array_equal(scores, ref_iou.numpy())
    np.testing.assert_array_equal(candidates.all(), ref_masks.numpy())  # bit for bit, every candidate
    np.testing.assert_array_equal(candidates.get([2, 0, 1]), ref_masks.numpy()[[0, 1, 2], [2, 0, 1]])
    with pytest.raises(ValueError):
        candidates.get([0, 1])
    with pytest.raises(ValueError):
        candidates.get([0, 1, 3])
    single, single_scores = _engine.Segmenter(spec).predict(feats, batch, multimask=False)
    assert single.shape == (3, 1, 90, 150) and single_scores.shape == (3, 1)


def _centre_rule(masks, boxes):
    """The plugin's clipping rule written pixel by pixel: keep pixels whose centre lies in the box."""
    h, w = masks.shape[1:]
    rows, cols = np.mgrid[0:h, 0:w]
    out = np.zeros_like(masks)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        inside = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1)
        out[i] = masks[i] & inside
    return out


def test_clip_uses_the_core_with_napari_pixel_centres():
    from rwkvsam_core.predictor import clip_masks_to_boxes as core_clip

    rng = np.random.default_rng(3)
    h, w = 30, 40
    masks = rng.random((6, h, w)) > 0.3
    boxes = np.array(
        [
            [2.0, 3.0, 20.0, 16.0],  # integer corners
            [2.4, 3.6, 20.7, 16.2],  # a rectangle drawn with the mouse
            [-0.5, -0.5, w - 0.5, h - 0.5],  # the whole image (shapes_to_boxes clips to this)
            [10.2, 5.0, 10.8, 25.0],  # no pixel centre inside
            [35.5, 25.5, 39.5, 29.5],  # at the bottom-right corner
            [0.0, 0.0, 0.0, 0.0],  # one pixel
        ]
    )
    out = _engine.clip_masks_to_boxes(masks, boxes)
    np.testing.assert_array_equal(out, _centre_rule(masks, boxes))  # results as before the change
    assert _engine.clip_masks_to_boxes(masks, None) is masks
    # why the boxes are converted first: the core keeps floor(x0)..ceil(x1), up to one pixel more on
    # each side, i.e. pixels whose centre napari draws outside the rectangle
    raw = core_clip(masks[:, None], boxes)[:, 0]
    np.testing.assert_array_equal(raw[0], out[0])  # integer corners: both conventions agree
    assert (raw[1] & ~out[1]).any()
    rows, cols = np.nonzero(raw[1])
    assert rows.min() == 3 and cols.max() == 21  # row 3 (centre 3.0 < 3.6), column 21 (centre > 20.7)


_HEAP_PROBE = """
import json, resource, sys, threading
import numpy as np
from rwkvsam_core import tune_allocator
from napari_plugin import _engine
tune_allocator()
kept = _engine.keep_thread_heaps() if sys.argv[1] == "keep" else False
faults = []
def decode_like():  # six 20 MiB blocks (below the mmap threshold): two glibc heaps, freed newest first
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        blocks = [np.empty(20 << 20, np.uint8) for _ in range(6)]
        for block in blocks:
            block[::4096] = 1
        while blocks:
            blocks.pop()
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=decode_like)
thread.start()
thread.join()
print(json.dumps({"kept": kept, "faults": faults}))
"""


def test_decode_thread_memory_is_not_given_back_after_every_decode():
    import json
    import platform
    import subprocess
    import sys
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    root = str(Path(_engine.__file__).resolve().parents[1])

    def probe(mode: str) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True, cwd=root
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    default, kept = probe("default"), probe("keep")
    assert kept["kept"] and not default["kept"]
    again = sum(default["faults"][2:])
    if again == 0:
        pytest.skip("this glibc keeps thread heaps anyway: nothing to compare")
    # by default the second heap is unmapped whenever it empties and faulted in again later; with
    # keep_thread_heaps() it stays: once the memory is there, no page is faulted in again
    assert sum(kept["faults"][2:]) * 10 <= again, (default, kept)


def test_embedding_progress_counts_encoder_modules(fresh_cache):
    spec = ModelSpec("rwkvsam_t", device="cpu", image_size=128)
    plane = np.random.default_rng(8).integers(0, 255, (60, 80), dtype=np.uint8)
    seen = []

    def cancelled() -> bool:  # polled before every encoder module: watch the progress grow
        seen.append(progress.fraction)
        return False

    progress = _engine.EncoderProgress()
    assert progress.fraction == 0.0
    with _engine.tracking_progress(progress):
        compute_features(spec, plane, (0.0, 255.0), cancelled=cancelled)
    assert progress.total > 10
    assert progress.fraction > 0.9  # (modules that never run would keep it below 1)
    assert seen == sorted(seen) and seen[0] == 0.0 and 0.0 < seen[len(seen) // 2] < 1.0
    # from the cache: no encoder run, no progress; outside the block nothing is tracked
    cached = _engine.EncoderProgress()
    with _engine.tracking_progress(cached):
        compute_features(spec, plane, (0.0, 255.0))
    assert cached.fraction == 0.0
    assert getattr(_engine._THREAD_STATE, "progress", None) is None
