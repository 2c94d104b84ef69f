"""The backend's fine-tuning run uses the boxes stored with the masks as their box prompts."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ls_helpers import CONFIG, IMAGE_H, IMAGE_W, local, rect

from labelstudio_backend.convert import mask_to_rle
from labelstudio_backend.finetune import (
    StoredBoxDataset,
    StoredBoxPrompts,
    StoredBoxTransform,
    main,
    read_boxes,
    run_finetune_with_boxes,
)
from labelstudio_backend.training import Trainer

CAT_BOX = [24, 14.4, 96, 62.4]  # rect(15, 12, 45, 40) on the 160 x 120 image, in pixels


def _brush(mask, label):
    return {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": IMAGE_W,
        "original_height": IMAGE_H,
        "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]},
    }


@pytest.fixture
def dataset(settings):
    """A dataset stored by the webhook handler: a cat mask with its rectangle, a dog mask without."""
    trainer = Trainer(settings)
    trainer.projects.register(3, CONFIG)
    cat = np.zeros((IMAGE_H, IMAGE_W), bool)
    cat[20:60, 30:90] = True
    dog = np.zeros((IMAGE_H, IMAGE_W), bool)
    dog[80:110, 100:150] = True
    results = [_brush(cat, "cat"), _brush(dog, "dog"), rect(15, 12, 45, 40, "cat")]
    task = {"id": 1, "data": {"image": local("a.png")}}
    assert trainer.store_annotation(3, task, {"id": 9, "result": results}).endswith("1 with a box")
    return trainer.dataset


def _draw_box_prompts(smp):
    """The engine's prompt drawing with every prompt a box (stand-in for SegmentationTask.sample_prep)."""
    from rwkvsam_core.finetune import PromptConfig, sample_instance_prompts

    rng = np.random.default_rng(smp["seed"])
    smp["prompts"] = [sample_instance_prompts(m, PromptConfig(), rng, mode="box") for m in smp["masks"]]


def test_read_boxes_tolerates_missing_and_bad_entries():
    boxes = read_boxes({"boxes": [[1, 2, 5, 6], None, [3, 3, 2, 5], ["a", 1, 2, 3], [1, 2, 3]]}, 5)
    np.testing.assert_array_equal(boxes[0], [1, 2, 5, 6])
    assert boxes[1:] == [None] * 4
    assert read_boxes({"boxes": [[1, 2, 5, 6]]}, 2) == [None, None]  # wrong length: ignored
    assert read_boxes({}, 1) == [None]  # samples stored before boxes were


def test_stored_box_reaches_the_dataset_item_and_the_prompt(dataset):
    from rwkvsam_core.data import InstanceFolderDataset, TrainTransform

    item = StoredBoxDataset(dataset)[0]
    np.testing.assert_allclose(item["boxes"][0], CAT_BOX)
    assert item["boxes"][1] is None
    plain = InstanceFolderDataset(dataset)[0]
    np.testing.assert_array_equal(item["masks"], plain["masks"])

    # no augmentation: the 160 x 120 image is scaled by 2 to 320 x 240; the box touches pixel
    # columns 24..95 and rows 14..62, which become columns 48..191 and rows 28..125
    transform = TrainTransform(image_size=320, augment=False)
    out = StoredBoxTransform(transform)(item, np.random.default_rng(0))
    np.testing.assert_array_equal(out["masks"], transform(plain, np.random.default_rng(0))["masks"])
    np.testing.assert_array_equal(out["boxes"][0], [48, 28, 192, 126])
    assert out["boxes"][1] is None

    smp = {**out, "seed": 3}
    StoredBoxPrompts(_draw_box_prompts)(smp)
    np.testing.assert_array_equal(smp["prompts"][0]["box"], [48, 28, 192, 126])  # the annotator's box
    drawn = {**out, "seed": 3}
    _draw_box_prompts(drawn)
    np.testing.assert_array_equal(smp["prompts"][1]["box"], drawn["prompts"][1]["box"])  # the mask's own
    assert not np.array_equal(smp["prompts"][0]["box"], drawn["prompts"][0]["box"])


@pytest.mark.parametrize("rot90", [False, True])
def test_stored_box_follows_the_augmentation(dataset, rot90):
    """Random resize, crop, flip (and quarter turns): same output as the engine's transform, the box
    still holds its mask."""
    from rwkvsam_core.data import TrainTransform

    item = StoredBoxDataset(dataset)[0]
    transform = TrainTransform(image_size=128, scale_range=(0.5, 2.0), min_mask_pixels=8, rot90=rot90)
    seen = 0
    for seed in range(12):
        out = StoredBoxTransform(transform)(item, np.random.default_rng(seed))
        ref = transform(item, np.random.default_rng(seed))
        np.testing.assert_array_equal(out["image"], ref["image"])
        np.testing.assert_array_equal(out["masks"], ref["masks"])
        assert out["labels"] == ref["labels"] and len(out["boxes"]) == len(out["masks"])
        for mask, label, box in zip(out["masks"], out["labels"], out["boxes"], strict=True):
            if label == "dog":
                assert box is None
                continue
            seen += 1
            ys, xs = np.nonzero(mask)  # the whole cat mask lies inside its rectangle, so it still does
            assert box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]
    assert seen


def test_stored_box_is_the_box_the_decoder_gets(dataset, tmp_path, monkeypatch):
    """One real training step: the decoder's box prompt of the cat mask is its stored rectangle."""
    import torch

    from rwkvsam_core import build_model
    from rwkvsam_core.finetune import FinetuneConfig, PromptConfig

    model = build_model("rwkvsam_t", image_size=160, device="cpu")  # the shipped weights
    boxes_seen = []
    real_decode = type(model).decode

    def spy(self, feats, **kw):
        if kw.get("boxes") is not None:
            boxes_seen.append(kw["boxes"].detach().cpu().numpy().copy())
        return real_decode(self, feats, **kw)

    monkeypatch.setattr(type(model), "decode", spy)
    cfg = FinetuneConfig(
        steps=1,
        batch_size=1,
        augment=False,
        correction_rounds=0,
        device="cpu",
        progress=False,
        tensorboard=False,
        prompt=PromptConfig(mode_probs=(1.0, 0.0, 0.0)),
    )
    torch.manual_seed(0)
    result = run_finetune_with_boxes(model, StoredBoxDataset(dataset), cfg, tmp_path / "run")
    assert result.checkpoint.is_file()
    (boxes,) = boxes_seen  # cat and dog, one pass, at the image's own size (160 x 120)
    np.testing.assert_array_equal(boxes[0], [24, 14, 96, 63])
    assert not np.array_equal(boxes[1], [0, 0, 0, 0])  # the dog's box is drawn from its mask


def test_the_training_child_module_runs_the_engine(dataset, tmp_path, capsys):
    import warnings

    args = ["--data", str(dataset), "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "1"]
    args += ["--image-size", "64", "--device", "cpu", "--quiet", "--correction-rounds", "0"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("done: 1 steps")
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["steps"] == 1
    assert main(["--data", str(tmp_path / "no-such-folder"), "--out", str(tmp_path / "run2")]) == 1
    assert capsys.readouterr().err.startswith("error: FileNotFoundError")
