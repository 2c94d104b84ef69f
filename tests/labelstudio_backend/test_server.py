"""The HTTP layer through Flask's test client, with the real core model (rwkvsam_t at 256, shipped weights).

At input 256 the starter weights run far below the size they were trained at: these tests check
protocol, geometry (masks inside their boxes), labels, error handling and caching, not mask quality.
"""

from __future__ import annotations

import base64
import threading
import time

import numpy as np
import pytest
from ls_helpers import CONFIG, IMAGE_H, IMAGE_W, POLYGON_CONFIG, keypoint, local, rect, shipped_version

from labelstudio_backend.convert import rle_to_mask
from labelstudio_backend.model import get_manager


def _predict(client, tasks, context=None, config=CONFIG, **kw):
    payload = {"tasks": tasks, "label_config": config, "project": "1.1700000000"}
    if context is not None:
        payload["params"] = {"context": context}
    r = client.post("/predict", json=payload, **kw)
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()["results"]


def _mask(result):
    return rle_to_mask(result["value"]["rle"], result["original_height"], result["original_width"])


def _box_px(result):
    """A Label Studio rectangle result (percent of the image) as x0, y0, x1, y1 in pixels."""
    v = result["value"]
    return (
        v["x"] * IMAGE_W / 100,
        v["y"] * IMAGE_H / 100,
        (v["x"] + v["width"]) * IMAGE_W / 100,
        (v["y"] + v["height"]) * IMAGE_H / 100,
    )


def _outside_box(mask, box_px):
    x0, y0, x1, y1 = box_px
    inside = np.zeros_like(mask)
    inside[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
    return int((mask & ~inside).sum())


def test_health_and_metrics(client):
    assert client.get("/health").get_json()["status"] == "UP"
    assert client.get("/").status_code == 200
    assert "model_version" in client.get("/metrics").get_json()


def test_setup_answers_version_without_loading_the_model(client, settings):
    r = client.post(
        "/setup",
        json={"project": "7.1712345678", "schema": CONFIG, "hostname": "http://x", "access_token": "abc"},
    )
    assert r.status_code == 200
    assert r.get_json()["model_version"] == shipped_version()  # the shipped weights by default
    assert get_manager(settings)._model is None  # lazily loaded, never in /setup


def test_setup_refuses_unusable_config(client):
    r = client.post("/setup", json={"project": "7.1", "schema": '<View><Text name="t" value="$t"/></View>'})
    assert r.status_code == 400 and "Image" in r.get_json()["error"]


def test_malformed_json_is_a_400(client):
    for route in ("/predict", "/setup", "/webhook"):
        r = client.post(route, data="{not json", content_type="application/json")
        assert r.status_code == 400, route
        assert r.get_json()["status"] == "error"
    assert client.post("/predict", json=[1, 2]).status_code == 400
    assert client.post("/predict", json={"tasks": "x", "label_config": CONFIG}).status_code == 400
    assert client.post("/predict", json={"tasks": []}).status_code == 400  # no config, unknown project


def test_basic_auth_on_every_route_but_health_and_webhook(settings):
    from dataclasses import replace

    from labelstudio_backend.server import create_app

    app = create_app(replace(settings, basic_auth_user="u", basic_auth_pass="p"))
    c = app.test_client()
    good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode()}
    bad = {"Authorization": "Basic " + base64.b64encode(b"u:wrong").decode()}
    assert c.get("/health").status_code == 200
    assert c.post("/webhook", json={"action": "PROJECT_UPDATED"}).status_code == 200
    for headers, code in (({}, 401), (bad, 401), (good, 200)):
        assert (
            c.post("/setup", json={"project": "1.1", "schema": CONFIG}, headers=headers).status_code == code
        )
        assert c.get("/metrics", headers=headers).status_code == code
    assert c.post("/predict", json={"tasks": []}).status_code == 401
    app.extensions["rwkvsam_backend"].webhooks.shutdown(wait=True)


def test_interactive_box_gives_labelled_mask_inside_the_box(client):
    ctx = {"result": [rect(5, 5, 10, 10, "cat"), rect(20, 25, 40, 50, "dog")]}  # newest box last
    (res,) = _predict(client, [{"id": 1, "data": {"image": local("a.png")}}], ctx)
    assert res["model_version"] == shipped_version()
    (item,) = res["result"]
    assert item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
    assert item["value"]["brushlabels"] == ["dog"]
    assert (item["original_width"], item["original_height"]) == (IMAGE_W, IMAGE_H)
    mask = _mask(item)
    box = (0.2 * IMAGE_W, 0.25 * IMAGE_H, 0.6 * IMAGE_W, 0.75 * IMAGE_H)
    assert mask.any()
    assert _outside_box(mask, box) == 0
    assert item["score"] >= 0.0 and isinstance(res["score"], float)


def test_interactive_clicks_and_cache(client, settings):
    task = {"id": 1, "data": {"image": local("b.png")}}
    manager = get_manager(settings)
    (first,) = _predict(client, [task], {"result": [keypoint(30, 50)]})
    assert len(first["result"]) == 1 and first["result"][0]["value"]["brushlabels"] == ["cat"]
    encodes = manager.stats["encodes"]
    ctx = {"result": [keypoint(30, 50), keypoint(35, 55, positive=False), keypoint(70, 30, label="cat")]}
    (second,) = _predict(client, [task], ctx)
    assert len(second["result"]) == 1
    assert manager.stats["encodes"] == encodes  # later clicks on the same image are decoder-only
    (neg,) = _predict(client, [task], {"result": [keypoint(30, 50, positive=False)]})
    assert neg["result"] == []  # only negative clicks: nothing to segment


def test_box_and_clicks_are_combined(client, settings):
    task = {"id": 1, "data": {"image": local("a.png")}}
    ctx = {"result": [rect(10, 10, 50, 50, "cat"), keypoint(20, 20), keypoint(90, 90)]}
    (res,) = _predict(client, [task], ctx)
    assert _outside_box(_mask(res["result"][0]), (16, 12, 96, 72)) == 0


def test_degenerate_box_gives_empty_result(client):
    (res,) = _predict(
        client, [{"id": 1, "data": {"image": local("a.png")}}], {"result": [rect(10, 10, 0, 30)]}
    )
    assert res["result"] == []


def test_batch_masks_for_every_box_one_decoder_pass(client, settings, monkeypatch):
    boxes = [rect(5, 5, 30, 40, "cat"), rect(50, 20, 40, 60, "dog"), rect(60, 60, 20, 20, "cat")]
    task = {
        "id": 4,
        "data": {"image": local("a.png")},
        "annotations": [{"id": 1, "result": boxes}],
        "predictions": [{"id": 2, "result": [rect(1, 1, 5, 5)]}],
    }
    manager = get_manager(settings)
    manager.get_model()
    calls = []
    real = manager.predictor_for

    def spy(image):
        predictor, version = real(image)
        orig = predictor.predict

        def predict(*a, **k):
            calls.append(np.shape(k.get("box")))
            return orig(*a, **k)

        predictor.predict = predict
        return predictor, version

    monkeypatch.setattr(manager, "predictor_for", spy)
    (res,) = _predict(client, [task])
    assert calls == [(3, 4)]  # all boxes of the image in one decoder pass
    assert [r["value"]["brushlabels"] for r in res["result"]] == [["cat"], ["dog"], ["cat"]]
    for r, b in zip(res["result"], boxes, strict=True):
        m = _mask(r)
        assert m.any() and _outside_box(m, _box_px(b)) == 0


def test_batch_polygons_when_config_asks(client):
    task = {
        "id": 4,
        "data": {"image": local("a.png")},
        "predictions": [{"id": 2, "result": [rect(10, 10, 50, 50)]}],
    }
    (res,) = _predict(client, [task], config=POLYGON_CONFIG)
    types = [r["type"] for r in res["result"]]
    assert types == ["brushlabels", "polygonlabels"]
    pts = np.array(res["result"][1]["value"]["points"])
    assert pts.shape[1] == 2 and len(pts) >= 3
    assert pts.min() >= 10 - 1e-6 and pts.max() <= 60 + 1e-6  # polygon inside the box (percent)


def test_bad_images_give_empty_results_and_others_still_work(client, tmp_path):
    ann = [{"id": 1, "result": [rect(10, 10, 50, 50)]}]
    tasks = [
        {"id": 1, "data": {"image": local("missing.png")}, "annotations": ann},
        {"id": 2, "data": {"image": local("truncated.png")}, "annotations": ann},
        {"id": 3, "data": {"image": local("garbage.png")}, "annotations": ann},
        {"id": 4, "data": {"image": "/data/local-files/?d=../../etc/passwd"}, "annotations": ann},
        {"id": 5, "data": {"image": "http://169.254.169.254/latest/meta-data"}, "annotations": ann},
        {"id": 6, "data": {"image": "file:///etc/passwd"}, "annotations": ann},
        {"id": 7, "data": {}, "annotations": ann},
        {"id": 8, "data": {"image": local("a.png")}, "annotations": ann},
        "not a task",
    ]
    res = _predict(client, tasks)
    assert [len(r["result"]) for r in res] == [0, 0, 0, 0, 0, 0, 0, 1, 0]


def test_huge_image_refused(client, app, settings, doc_root):
    from dataclasses import replace

    backend = app.extensions["rwkvsam_backend"]
    backend.loader.settings = replace(settings, max_image_pixels=1000)
    (res,) = _predict(client, [{"id": 1, "data": {"image": local("a.png")}}], {"result": [keypoint(50, 50)]})
    assert res["result"] == []


def test_zoom_target_decodes_boxes_in_zoomed_windows(settings, doc_root):
    """ZOOM_TARGET: batch and interactive boxes give the masks of rwkvsam_core.zoom, clipped to the box."""
    from dataclasses import replace

    from labelstudio_backend.model import clip_to_boxes
    from labelstudio_backend.server import create_app
    from rwkvsam_core import Predictor
    from rwkvsam_core.zoom import predict_boxes_zoomed, zoom_window

    zs = replace(settings, zoom_target=200.0)
    app = create_app(zs)
    try:
        client = app.test_client()
        boxes = [rect(5, 5, 30, 40, "cat"), rect(50, 20, 40, 60, "dog")]
        task = {"id": 9, "data": {"image": local("a.png")}, "annotations": [{"id": 1, "result": boxes}]}
        (res,) = _predict(client, [task])
        image = manager_image(client, task)
        px = np.array([_box_px(b) for b in boxes])
        manager = get_manager(zs)
        model, _ = manager.get_model()
        assert all(zoom_window(b, (IMAGE_H, IMAGE_W), 200.0, model.image_size) is not None for b in px)
        expect, _ = predict_boxes_zoomed(Predictor(model), image, px, target=200.0)
        expect = clip_to_boxes(expect[:, None], px)[:, 0]
        got = [_mask(r) for r in res["result"]]
        assert [r["value"]["brushlabels"] for r in res["result"]] == [["cat"], ["dog"]]
        for g, e in zip(got, expect, strict=True):
            np.testing.assert_array_equal(g, e)
        (inter,) = _predict(client, [{"id": 10, "data": {"image": local("a.png")}}], {"result": [boxes[1]]})
        np.testing.assert_array_equal(_mask(inter["result"][0]), expect[1])
    finally:
        app.extensions["rwkvsam_backend"].webhooks.shutdown(wait=True)


def test_concurrent_requests_for_the_same_new_image(client, settings):
    manager = get_manager(settings)
    manager.get_model()
    task = {"id": 9, "data": {"image": local("b.png")}}
    out, errors = [], []

    def one(i):
        try:
            out.append(_predict(client, [task], {"result": [keypoint(10 + 10 * i, 40)]})[0])
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(out) == 4 and all(len(r["result"]) == 1 for r in out)
    assert manager.stats["encodes"] == 1  # one encoder pass, the other requests waited for it


def _wait(cond, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_webhook_stores_masks_only_for_set_up_projects(client, settings):
    from labelstudio_backend.convert import mask_to_rle

    m = np.zeros((IMAGE_H, IMAGE_W), bool)
    m[20:60, 30:90] = True
    brush = {
        "type": "brushlabels",
        "from_name": "tag",
        "to_name": "image",
        "original_width": IMAGE_W,
        "original_height": IMAGE_H,
        "value": {"format": "rle", "rle": mask_to_rle(m), "brushlabels": ["dog"]},
    }
    payload = {
        "action": "ANNOTATION_CREATED",
        "project": {"id": 5},
        "task": {"id": 11, "data": {"image": local("a.png")}},
        "annotation": {"id": 21, "result": [brush, rect(1, 1, 5, 5)]},
    }
    dataset = settings.model_dir / "dataset"
    r = client.post("/webhook", json=payload)
    assert r.status_code == 201
    time.sleep(0.5)
    assert not (dataset / "p5_t11_a21").exists()  # project 5 was never set up: ignored
    assert client.post("/setup", json={"project": "5.1", "schema": CONFIG}).status_code == 200
    assert client.post("/webhook", json=payload).status_code == 201
    assert _wait(lambda: (dataset / "p5_t11_a21" / "meta.json").exists())
    from rwkvsam_core.data import InstanceFolderDataset

    item = InstanceFolderDataset(dataset)[0]
    assert item["labels"] == ["dog"]
    np.testing.assert_array_equal(item["masks"][0], m)
    assert client.post("/webhook", json={**payload, "action": "ANNOTATION_DELETED"}).status_code == 201
    assert _wait(lambda: not (dataset / "p5_t11_a21").exists())
    assert client.post("/webhook", json={"action": "PROJECT_CREATED"}).status_code == 200


def test_failed_training_keeps_the_old_model(client, settings, app):
    from labelstudio_backend.convert import parse_label_config  # noqa: F401 - config registered below
    from rwkvsam_core.data import write_instance_sample

    assert client.post("/setup", json={"project": "6.1", "schema": CONFIG}).status_code == 200
    img = np.zeros((32, 32, 3), np.uint8)
    write_instance_sample(
        settings.model_dir / "dataset", "p6_t1_a1", img, np.ones((1, 32, 32), bool), ["cat"]
    )
    trainer = app.extensions["rwkvsam_backend"].trainer
    from dataclasses import replace

    trainer.settings = replace(settings, train_args="--no-such-flag")
    before = get_manager(settings).version
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 6}}).status_code == 201
    assert _wait(lambda: trainer.state().get("runs"), timeout=120)
    assert _wait(lambda: not trainer.running, timeout=120)
    run = trainer.state()["runs"][-1]
    assert run["rc"] != 0 and "no-such-flag" in run["error"]
    assert get_manager(settings).version == before
    (res,) = _predict(client, [{"id": 1, "data": {"image": local("a.png")}}], {"result": [keypoint(50, 50)]})
    assert res["model_version"] == before and len(res["result"]) == 1


def test_swapped_weights_bump_the_version_and_are_served(client, settings, app, tmp_path):
    from rwkvsam_core import save_checkpoint

    manager = get_manager(settings)
    model, v0 = manager.get_model()
    assert client.post("/setup", json={"project": "8.1", "schema": CONFIG}).get_json()["model_version"] == v0
    ckpt = tmp_path / "new.safetensors"
    import torch

    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)  # a different model
    save_checkpoint(model, ckpt)
    trainer = app.extensions["rwkvsam_backend"].trainer
    v1 = trainer.swap_in(ckpt, generation=1)
    assert v1 != v0 and v1.startswith("rwkvsam_t-ft1-")
    assert client.post("/setup", json={"project": "8.1", "schema": CONFIG}).get_json()["model_version"] == v1
    (res,) = _predict(client, [{"id": 1, "data": {"image": local("a.png")}}], {"result": [keypoint(50, 50)]})
    assert res["model_version"] == v1 and res["result"][0]["value"]["brushlabels"] == ["cat"]
    assert manager.stats["reloads"] == 1


class _DiskPredictor:
    """Stand-in predictor: the mask of a click alone is a disk around it (three equal candidates)."""

    def __init__(self, side=100, radius=15):
        import torch

        from rwkvsam_core import ResizeLongestSide

        self.original_size = (side, side)
        self.transform = ResizeLongestSide(side)
        self.device = torch.device("cpu")
        self.radius = radius
        self.calls = []
        outer = self

        class Model:
            image_size = side

            @staticmethod
            def decode(feats, point_coords, point_labels, multimask_output=True, **kw):
                assert point_coords.shape == (1, 1, 2) and multimask_output
                x, y = (float(v) for v in point_coords[0, 0])
                outer.calls.append((x, y))
                low = side // 4
                yy, xx = torch.meshgrid(torch.arange(low) * 4.0, torch.arange(low) * 4.0, indexing="ij")
                disk = outer.radius - torch.sqrt((xx - x) ** 2 + (yy - y) ** 2)
                return disk.expand(1, 3, low, low).clone(), torch.tensor([[0.2, 0.7, 0.5]])

        self.model = Model()

    def get_features(self):
        return type("F", (), {"tensors": {}})()


def _manager(settings):
    from labelstudio_backend.model import ModelManager

    return ModelManager(settings)


def test_object_clicks_two_objects_of_one_label(settings):
    from labelstudio_backend.convert import Click

    a, b, c = Click(10, 10, True, "x"), Click(80, 80, True, "x"), Click(85, 85, True, "x")
    pred, manager = _DiskPredictor(), _manager(settings)
    kept, single = manager.object_clicks(pred, [a, b], "img")
    assert kept == [b] and pred.calls == [(80, 80)]  # b's disk does not reach a: a new object
    low_res, score = single.low_res(), single.score  # the mask of b alone is the answer: not decoded again
    assert tuple(low_res.shape) == (1, 1, 25, 25) and score == pytest.approx(0.7)
    assert low_res[0, 0, 20, 20] > 0 and low_res[0, 0, 2, 2] < 0
    kept, single = manager.object_clicks(pred, [a, b, c], "img")
    assert kept == [b, c] and single is None  # c's disk holds b: the same object
    assert pred.calls == [(80, 80), (85, 85)]  # only the new click was decoded


def test_object_clicks_negative_click_corrects_the_current_object(settings):
    from labelstudio_backend.convert import Click

    a, b = Click(10, 10, True, "x"), Click(80, 80, True, "x")
    neg_a, neg_b = Click(20, 20, False, "x"), Click(90, 70, False, "x")
    pred, manager = _DiskPredictor(), _manager(settings)
    assert manager.object_clicks(pred, [a, neg_a], "img") == ([a, neg_a], None)
    assert pred.calls == []  # a negative click needs no test
    kept, _ = manager.object_clicks(pred, [a, neg_a, b, neg_b], "img")
    assert kept == [b, neg_b]  # neg_a corrected the first object and stays with it
    assert pred.calls == [(80, 80)]


def test_object_clicks_are_decided_once_per_image_and_cold_requests_agree(settings):
    from labelstudio_backend.convert import Click

    near = [Click(70 + 2 * i, 72 + i, True, "x") for i in range(4)]
    far = Click(10, 10, True, "x")
    clicks = [far, *near]
    warm_pred, warm = _DiskPredictor(), _manager(settings)
    for k in range(1, len(clicks) + 1):  # the requests as Label Studio sends them, one click more each
        warm_kept, _ = warm.object_clicks(warm_pred, clicks[:k], "img")
    assert len(warm_pred.calls) == len(clicks) - 1  # every click after the first decoded once
    cold_pred, cold = _DiskPredictor(), _manager(settings)
    cold_kept, _ = cold.object_clicks(cold_pred, clicks, "img")  # a worker that saw none of them
    assert cold_kept == warm_kept == near
    assert cold_pred.calls == warm_pred.calls
    before = len(warm_pred.calls)
    assert warm.object_clicks(warm_pred, clicks, "img")[0] == near  # a repeated request: no decode
    assert warm.object_clicks(warm_pred, clicks, "other image")[0] == near  # other image: decided anew
    assert len(warm_pred.calls) == before + len(clicks) - 1


def test_object_clicks_cold_work_is_bounded_by_the_window(settings):
    from labelstudio_backend.convert import Click

    clicks = [Click(20 + i, 20 + i, True, "x") for i in range(40)]  # one object, every disk holds the last
    pred, manager = _DiskPredictor(), _manager(settings)
    kept, _ = manager.object_clicks(pred, clicks, "img", window=8)
    assert kept == clicks[-8:] and len(pred.calls) == 7  # only the newest 8 clicks were decided
    kept, _ = manager.object_clicks(pred, [*clicks, Click(61, 61, True, "x")], "img", window=8)
    assert kept == clicks[-8:] + [Click(61, 61, True, "x")] and len(pred.calls) == 8  # then one a click


def test_interactive_click_paths_with_the_real_model(client, settings, monkeypatch):
    """Decoder passes per request and the answer of each path, with the grouping decision forced."""
    from labelstudio_backend.model import ModelManager

    task = {"id": 1, "data": {"image": local("b.png")}}
    manager = get_manager(settings)

    def masks_of(ctx):
        before = manager.stats["decodes"]
        (res,) = _predict(client, [task], {"result": ctx})
        return _mask(res["result"][0]), manager.stats["decodes"] - before

    first, d = masks_of([keypoint(30, 50)])
    assert d == 1
    alone, _ = masks_of([keypoint(70, 30)])  # the second click on its own
    monkeypatch.setattr(ModelManager, "click_joins", lambda *a: False)
    new_object, d = masks_of([keypoint(30, 50), keypoint(70, 30)])
    assert d == 1  # decoded alone once, and that mask is the answer
    np.testing.assert_array_equal(new_object, alone)
    monkeypatch.setattr(ModelManager, "click_joins", lambda *a: True)
    same, d = masks_of([keypoint(30, 50), keypoint(72, 32)])
    assert d == 2  # the new click alone, then the object's two clicks together
    predictor, _ = manager.predictor_for(manager_image(client, task))
    expect, _, _ = predictor.predict(
        point_coords=np.array([[0.30 * IMAGE_W, 0.50 * IMAGE_H], [0.72 * IMAGE_W, 0.32 * IMAGE_H]]),
        point_labels=np.array([1, 1]),
        multimask_output=False,
    )
    np.testing.assert_array_equal(same, expect[0])
    _, d = masks_of([keypoint(30, 50), keypoint(72, 32), keypoint(60, 60, positive=False)])
    assert d == 1  # a negative click: only the object's clicks are decoded


def manager_image(client, task):
    backend = client.application.extensions["rwkvsam_backend"]
    return backend.loader.load(task["data"]["image"])


def test_box_and_clicks_inside_it_are_decoded_together(client, settings, monkeypatch):
    manager = get_manager(settings)
    manager.get_model()
    calls = []
    real = manager._predictor_and_key

    def spy(image):
        predictor, version, key = real(image)
        orig = predictor.predict

        def predict(*a, **k):
            calls.append(k)
            return orig(*a, **k)

        predictor.predict = predict
        return predictor, version, key

    monkeypatch.setattr(manager, "_predictor_and_key", spy)
    task = {"id": 1, "data": {"image": local("a.png")}}
    ctx = {
        "result": [
            keypoint(90, 90),  # outside the box: another object's click, ignored
            rect(10, 10, 50, 50, "dog"),
            keypoint(20, 20),
            keypoint(30, 40, positive=False),
        ]
    }
    before = manager.stats["decodes"]
    (res,) = _predict(client, [task], ctx)
    assert manager.stats["decodes"] - before == 1 and len(calls) == 1
    (k,) = calls
    np.testing.assert_allclose(k["box"], [16, 12, 96, 72])
    np.testing.assert_allclose(k["point_coords"], [[32, 24], [48, 48]])
    np.testing.assert_array_equal(k["point_labels"], [1, 0])
    assert res["result"][0]["value"]["brushlabels"] == ["dog"]
    assert _outside_box(_mask(res["result"][0]), (16, 12, 96, 72)) == 0


def test_many_clicks_of_two_objects_with_the_real_model(client):
    task = {"id": 1, "data": {"image": local("a.png")}}
    ctx = {
        "result": [
            keypoint(20, 20),
            keypoint(25, 25),
            keypoint(80, 70),
            keypoint(82, 72, positive=False),
            keypoint(85, 75),
        ]
    }
    (res,) = _predict(client, [task], ctx)
    assert len(res["result"]) == 1 and res["result"][0]["type"] == "brushlabels"


def test_predict_refuses_a_config_without_brush_or_image(client):
    for config in (
        '<View><Image name="image" value="$image"/><Choices name="c" toName="image"/></View>',
        '<View><Text name="t" value="$t"/><BrushLabels name="b" toName="t"/></View>',
        "<View><not xml",
    ):
        r = client.post("/predict", json={"tasks": [{"id": 1, "data": {}}], "label_config": config})
        assert r.status_code == 400 and r.get_json()["status"] == "error", config


def test_bad_boxes_in_batch_are_skipped_and_the_good_ones_served(client):
    good = rect(10, 10, 50, 50, "dog")
    bad = [
        rect(10, 10, 0, 30),  # empty
        rect(150, 10, 20, 20),  # outside the image: clipped to nothing
        {**rect(5, 5, 10, 10), "value": {"x": "a", "y": 1, "width": 2, "height": 3}},
        {
            **rect(5, 5, 10, 10),
            "value": {"x": 5, "y": 5, "width": 10, "height": 10, "rotation": float("nan")},
        },
        {k: v for k, v in rect(5, 5, 10, 10).items() if k != "original_width"},
        "not a region",
    ]
    task = {"id": 1, "data": {"image": local("a.png")}, "annotations": [{"id": 1, "result": [*bad, good]}]}
    (res,) = _predict(client, [task])
    assert [r["value"]["brushlabels"] for r in res["result"]] == [["dog"]]


def test_bad_clicks_give_an_empty_result_not_an_error(client):
    task = {"id": 1, "data": {"image": local("a.png")}}
    nan = {**keypoint(10, 10), "value": {"x": float("nan"), "y": 5, "keypointlabels": ["cat"]}}
    for ctx in (
        {"result": [keypoint(20, 20), nan]},
        {"result": [keypoint(150, 20)]},  # outside the image
        {"result": "nope"},
        {"result": [{"type": "keypointlabels", "value": [1, 2]}]},
    ):
        (res,) = _predict(client, [task], ctx)
        assert res["result"] == [], ctx
    (res,) = _predict(client, [task], {"result": [keypoint(150, 20), keypoint(20, 20)]})
    assert len(res["result"]) == 1  # the click on the image is served


def test_malformed_webhooks_never_break_the_worker(client, app, settings):
    assert client.post("/setup", json={"project": "5.1", "schema": CONFIG}).status_code == 200
    trainer = app.extensions["rwkvsam_backend"].trainer
    bad = [
        {"action": "ANNOTATION_CREATED", "project": 5, "annotation": "x", "task": {"id": 1}},
        {
            "action": "ANNOTATION_CREATED",
            "project": 5,
            "annotation": {"id": 1, "result": "x"},
            "task": {"id": 1},
        },
        {
            "action": "ANNOTATION_CREATED",
            "project": 5,
            "annotation": {"id": "a", "result": []},
            "task": {"id": 1},
        },
        {
            "action": "ANNOTATION_UPDATED",
            "project": 5,
            "annotation": {"id": 2, "result": [1, None]},
            "task": [],
        },
        {"action": "ANNOTATIONS_DELETED", "project": 5, "annotations": "all"},
        {
            "action": "ANNOTATION_CREATED",
            "project": 5,
            "annotation": {"id": 3},
            "task": {"id": 4, "data": {}},
        },
        {"action": "START_TRAINING", "project": "nope"},
    ]
    for payload in bad:
        assert client.post("/webhook", json=payload).status_code == 201
        msg = trainer.handle_webhook(payload)  # what the background thread logs for it
        assert isinstance(msg, str) and msg, payload
    assert not trainer.dataset.exists() or trainer.num_samples() == 0
    (res,) = _predict(client, [{"id": 1, "data": {"image": local("a.png")}}], {"result": [keypoint(50, 50)]})
    assert len(res["result"]) == 1
