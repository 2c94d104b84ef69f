"""The Predictor computes the decoder's dense positional encoding once, with unchanged results."""

from __future__ import annotations

import copy
import pickle
import threading

import numpy as np
import pytest
import torch

from rwkvsam_core import Predictor, build_model, postprocess_masks
from rwkvsam_core.modeling.prompt_encoder import PositionEmbeddingRandom

S = 128


def fresh_model():
    torch.manual_seed(0)
    return build_model("rwkvsam_t", device="cpu", image_size=S)


@pytest.fixture
def model():
    return fresh_model()


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (90, 150, 3), dtype=np.uint8)


@pytest.fixture
def pe_calls(monkeypatch):
    """Counts computations of the dense encoding (the grid forward of the positional embedding)."""
    calls = []
    original = PositionEmbeddingRandom.forward

    def counting(self, size):
        calls.append(tuple(size) if not isinstance(size, int) else (size, size))
        return original(self, size)

    monkeypatch.setattr(PositionEmbeddingRandom, "forward", counting)
    return calls


def reference(predictor, box):
    """The same prediction from an identical model that never met a Predictor (no cache installed)."""
    model = fresh_model()
    assert "get_dense_pe" not in model.prompt_encoder.__dict__
    boxes = torch.as_tensor(predictor.transform.apply_boxes(np.asarray(box)[None], predictor.original_size))
    with torch.no_grad():
        low, iou = model.decode(predictor.features.tensors, boxes=boxes.float())
        masks = postprocess_masks(low, predictor.input_size, predictor.original_size, S) > 0
    return masks[0].numpy(), iou[0].numpy(), low[0].numpy()


def test_encoding_computed_once_and_results_unchanged(model, image, pe_calls):
    predictor = Predictor(model)
    predictor.set_image(image)
    pe_calls.clear()
    box = np.array([10, 10, 80, 60])
    results = [predictor.predict(box=box) for _ in range(3)]
    predictor.predict(point_coords=np.array([[20, 30]]), point_labels=np.array([1]))
    with torch.inference_mode():  # how the napari plugin decodes: a second entry, computed once
        predictor.predict(box=box)
        predictor.predict(box=box)
    assert pe_calls == [(S // 16, S // 16)] * 2
    pe_calls.clear()
    ref = reference(predictor, box)
    for masks, scores, low in results:
        np.testing.assert_array_equal(masks, ref[0])
        np.testing.assert_array_equal(scores, ref[1])
        np.testing.assert_array_equal(low, ref[2])


def test_with_gradients_enabled_it_is_computed_as_before(model, image, pe_calls):
    predictor = Predictor(model)  # installs the cache on the model's prompt encoder
    predictor.set_image(image)
    boxes = torch.as_tensor(
        predictor.transform.apply_boxes(np.array([[10, 10, 80, 60]]), predictor.original_size)
    )
    pe_calls.clear()
    for _ in range(2):  # training: every decode computes the encoding, a normal tensor for autograd
        low, _ = model.decode(predictor.features.tensors, boxes=boxes.float())
        assert low.requires_grad
    assert len(pe_calls) == 2
    assert not model.prompt_encoder.get_dense_pe().is_inference()
    pe_calls.clear()
    with torch.no_grad():  # evaluation code without a Predictor benefits too
        model.decode(predictor.features.tensors, boxes=boxes.float())
        model.decode(predictor.features.tensors, boxes=boxes.float())
    assert len(pe_calls) == 1


def test_cache_follows_changes_of_the_frequency_buffer(model, image, pe_calls):
    predictor = Predictor(model)
    predictor.set_image(image)
    box = np.array([10, 10, 80, 60])
    first = predictor.predict(box=box)[2]
    pe_calls.clear()
    # new weights loaded in place (load_state_dict copies into the buffer): computed again
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    state[key] = torch.randn_like(state[key])
    model.load_state_dict(state)
    changed = predictor.predict(box=box)[2]
    assert len(pe_calls) == 1
    assert not np.array_equal(first, changed)
    predictor.predict(box=box)
    assert len(pe_calls) == 1
    # the buffer replaced by another tensor (as .to() does): computed again
    buf = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix = buf.clone()
    np.testing.assert_array_equal(predictor.predict(box=box)[2], changed)
    assert len(pe_calls) == 2


def test_model_still_copies_pickles_and_decodes_from_threads(model, image, pe_calls):
    predictor = Predictor(model)
    predictor.set_image(image)
    box = np.array([10, 10, 80, 60])
    expected = predictor.predict(box=box)[2]
    clone = copy.deepcopy(model)
    restored = pickle.loads(pickle.dumps(model))
    for other in (clone, restored):
        p = Predictor(other)
        p.set_features(predictor.get_features())
        np.testing.assert_array_equal(p.predict(box=box)[2], expected)
        assert other.prompt_encoder.get_dense_pe.prompt_encoder is other.prompt_encoder
    out, errors = [], []

    def decode() -> None:
        try:
            p = Predictor(model)
            p.set_features(predictor.get_features())
            out.append(p.predict(box=box)[2])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=decode) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(out) == 3
    for low in out:
        np.testing.assert_array_equal(low, expected)
