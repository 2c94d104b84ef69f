"""decode() makes no host tensors when its inputs live on a device (CUDA-graph capturable, issue 3).

A CUDA graph cannot capture a host-to-device copy, and ``torch.tensor(data, device="cuda")`` is
one. Without a GPU the test runs ``decode`` on the ``meta`` device under two guards:
- a TorchFunctionMode that fails on every tensor built from host data (``torch.tensor``,
  ``torch.as_tensor`` of non-tensors, ``torch.from_numpy``): the dispatcher never sees the copy
  hidden inside these calls, so this is the only place to catch it;
- a TorchDispatchMode that fails on every op taking or returning a CPU tensor (a factory without
  ``device=``, ``.to(device)`` of a CPU tensor, a CPU tensor mixed into a device op).
Meta tensors also have no values, so any host synchronisation (``.item()``, ``bool(tensor)``) fails.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rwkvsam_core import build_model
from rwkvsam_core.modeling.prompt_encoder import PositionEmbeddingRandom

S = 128


class HostTensorError(AssertionError):
    pass


class _NoHostData(TorchFunctionMode):
    HOST_FACTORIES = (torch.tensor, torch.as_tensor, torch.asarray, torch.from_numpy)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.HOST_FACTORIES and not (args and isinstance(args[0], torch.Tensor)):
            raise HostTensorError(f"{func.__name__}() builds a tensor from host data")
        return func(*args, **kwargs)


class _NoCpuTensors(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves((args, kwargs))):
            raise HostTensorError(f"{func} got a CPU tensor")
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in tree_leaves(out)):
            raise HostTensorError(f"{func} made a CPU tensor")
        return out


class no_host_tensors:
    """Context manager: both guards at once."""

    def __enter__(self):
        self._modes = [_NoHostData(), _NoCpuTensors()]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc):
        for m in reversed(self._modes):
            m.__exit__(*exc)
        return False


def _meta_model(name: str = "rwkvsam_t", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(name, device="cpu", image_size=S, pretrained=False, **kw)
    return model.eval().to("meta")


def _meta_feats(model):
    e, r = S // 16, S // 4
    feats = {"embedding": torch.empty(1, 256, e, e, device="meta")}
    if hasattr(model, "refine"):
        feats["refine"] = torch.empty(1, 2 * model.refine.out_chans, r, r, device="meta")
    return feats


def test_guards_catch_host_copies():
    """The guards are not vacuous: each way of sneaking host data onto the device fails."""
    dev = torch.device("meta")
    x = torch.empty(2, device=dev)
    host = torch.ones(2)
    for make in (
        lambda: torch.tensor([1.0, 2.0], device=dev),
        lambda: torch.as_tensor([1.0, 2.0], device=dev),
        lambda: torch.zeros(2),
        lambda: host.to(dev),
        lambda: x + host,
        lambda: x.item(),
    ):
        with pytest.raises((HostTensorError, RuntimeError, NotImplementedError)), no_host_tensors():
            make()
    with no_host_tensors():  # building on the device is fine
        torch.arange(2, device=dev) + torch.zeros(2, device=dev) * 2.0


def _old_forward_with_coords(self, coords_input, image_size):
    """The implementation before issue 3 (divisor made with torch.tensor): the guard must fail on it."""
    h, w = image_size
    denom = torch.tensor([float(w), float(h)], device=coords_input.device, dtype=torch.float32)
    return self._pe_encoding(coords_input.to(torch.float32) / denom)


def test_old_coordinate_encoding_is_caught(monkeypatch):
    model = _meta_model()
    monkeypatch.setattr(PositionEmbeddingRandom, "forward_with_coords", _old_forward_with_coords)
    box = torch.empty(1, 4, device="meta")
    with pytest.raises(HostTensorError, match="tensor"), no_host_tensors(), torch.no_grad():
        model.decode(_meta_feats(model), boxes=box, multimask_output=False)


@pytest.mark.parametrize(
    "name,mode", [("rwkvsam_t", "multimask"), ("rwkvsam_t", "single"), ("sam_vit_b", None)]
)
def test_decode_makes_no_host_tensors(name, mode):
    kw = {} if mode is None else {"decoder_mode": mode}
    model = _meta_model(name, **kw)
    feats = _meta_feats(model)
    dev = torch.device("meta")
    n = 3
    boxes = torch.empty(n, 4, device=dev)
    coords = torch.empty(n, 2, 2, device=dev)
    labels = torch.empty(n, 2, dtype=torch.long, device=dev)
    masks = torch.empty(n, 1, S // 4, S // 4, device=dev)
    with no_host_tensors(), torch.no_grad():
        low, iou = model.decode(feats, boxes=boxes[:1], multimask_output=False)  # the benchmark's case
        assert low.device == dev and low.shape == (1, 1, S // 4, S // 4) and iou.shape == (1, 1)
        model.decode(feats, point_coords=coords, point_labels=labels)
        model.decode(feats, point_coords=coords, point_labels=labels, boxes=boxes, mask_input=masks)
        model.decode(feats, boxes=boxes, image_index=torch.zeros(n, dtype=torch.long, device=dev))


@pytest.mark.parametrize("size", [(1024, 1024), (768, 1024), (1024, 592), (100, 37)])
def test_coordinate_encoding_unchanged(size):
    """Same values, bit for bit, as dividing by torch.tensor([w, h]) (the code before issue 3)."""
    torch.manual_seed(0)
    pe = PositionEmbeddingRandom(128)
    h, w = size
    coords = torch.rand(5, 7, 2) * torch.tensor([w, h]) - 0.5
    expected = _old_forward_with_coords(pe, coords, size)
    assert torch.equal(pe.forward_with_coords(coords, size), expected)
    assert math.isfinite(expected.abs().max().item())
