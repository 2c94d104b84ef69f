"""EmbeddingCache: LRU, disk persistence, keys, corruption, concurrent processes."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch

from rwkvsam_core import EmbeddingCache, Predictor, build_model, model_fingerprint

S = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("rwkvsam_t", device="cpu", image_size=S, pretrained=False)


def _img(seed):
    return np.random.default_rng(seed).integers(0, 256, (40, 50, 3), dtype=np.uint8)


class Counter:
    def __init__(self, predictor):
        self.calls = 0
        self.inner = predictor.compute_features

    def __call__(self, image):
        self.calls += 1
        return self.inner(image)


def test_memory_lru(model):
    cache = EmbeddingCache(max_items=2)
    p = Predictor(model, cache=cache)
    count = Counter(p)
    p.compute_features = count
    for seed in (0, 1, 0, 2, 0, 1):
        cache.get_or_compute(model, _img(seed), count)
    # 0 miss, 1 miss, 0 hit, 2 miss (evicts 1), 0 hit, 1 miss
    assert count.calls == 4 and cache.hits == 2


def test_disk_round_trip_and_new_process_view(model, tmp_path):
    cache = EmbeddingCache(max_items=0, cache_dir=tmp_path)
    p = Predictor(model, cache=cache)
    p.set_image(_img(0))
    ref = p.predict(box=np.array([2, 2, 30, 30]))[2]
    fresh = EmbeddingCache(max_items=4, cache_dir=tmp_path)
    p2 = Predictor(model, cache=fresh)
    p2.compute_features = lambda image: pytest.fail("must come from disk")
    p2.set_image(_img(0))
    assert fresh.disk_hits == 1
    np.testing.assert_array_equal(p2.predict(box=np.array([2, 2, 30, 30]))[2], ref)


def test_keys_depend_on_image_weights_and_size(model):
    cache = EmbeddingCache()
    img = _img(0)
    k = cache.key(model, img)
    assert cache.key(model, img.copy()) == k
    img2 = img.copy()
    img2[0, 0, 0] ^= 1
    assert cache.key(model, img2) != k
    assert cache.key(model, img[:, :, :1].copy()) != k
    other_size = build_model("rwkvsam_t", device="cpu", image_size=2 * S)
    other_size.load_state_dict(model.state_dict())
    assert model_fingerprint(other_size) != model_fingerprint(model)
    other_weights = build_model("rwkvsam_t", device="cpu", image_size=S, pretrained=False)  # new draw
    assert model_fingerprint(other_weights) != model_fingerprint(model)
    shipped = build_model("rwkvsam_t", device="cpu", image_size=S)
    assert model_fingerprint(shipped) != model_fingerprint(model)


def test_corrupt_entry_is_recomputed(model, tmp_path):
    cache = EmbeddingCache(max_items=0, cache_dir=tmp_path)
    img = _img(3)
    p = Predictor(model, cache=cache)
    p.set_image(img)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    files[0].write_bytes(files[0].read_bytes()[:100])  # truncated
    count = Counter(p)
    feats = cache.get_or_compute(model, img, count)
    assert count.calls == 1 and feats.tensors["embedding"].shape == (1, 256, S // 16, S // 16)
    assert cache.get(cache.key(model, img)) is not None  # rewritten, readable again


def _worker(args):
    cache_dir, seed, rounds = args
    torch.manual_seed(0)
    model = build_model("rwkvsam_t", device="cpu", image_size=S, pretrained=False)
    cache = EmbeddingCache(max_items=0, cache_dir=cache_dir)
    p = Predictor(model, cache=cache)
    sums = []
    for i in range(rounds):
        p.set_image(_img((seed + i) % 3))
        sums.append(float(p.get_image_embedding().sum()))
    return sums


def test_concurrent_processes_share_the_disk_cache(tmp_path):
    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.map(_worker, [(str(tmp_path), 0, 6), (str(tmp_path), 1, 6)])
    # same images give the same features whoever computed or read them
    by_image = {}
    for seed, sums in zip((0, 1), results, strict=True):
        for i, s in enumerate(sums):
            by_image.setdefault((seed + i) % 3, set()).add(round(s, 3))
    assert all(len(v) == 1 for v in by_image.values()), by_image
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
    assert not list(tmp_path.rglob(".tmp-*"))
