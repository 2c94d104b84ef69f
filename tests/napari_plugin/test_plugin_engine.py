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
        worker.submit(lambda: names.add(threading.current_thread().name) or done.set())
        done.clear()
        assert done.wait(TIMEOUT_S)
        assert names == {"test-decode"}  # one persistent thread, not one per job
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
