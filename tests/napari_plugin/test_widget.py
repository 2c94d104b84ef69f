"""The RWKV-SAM dock widget in a real napari viewer (Xvfb + pytest-qt).

The widget runs the shipped rwkvsam_t weights at input size 256 (short embeddings on a 2-core CPU,
far from the size they were trained at), so these tests check the GUI logic and the geometry of the
masks (inside the box, on the right slice, at full resolution), not their quality.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui

EMBED_TIMEOUT_MS = 120_000


@pytest.fixture
def dock(gui, plugin_manifest, make_napari_viewer, qtbot):
    """Factory: a viewer with the widget docked from the manifest, 256-px input on the CPU."""
    made = []

    def factory(show: bool = False):
        from napari_plugin._widget import RWKVSAMWidget

        viewer = make_napari_viewer(show=show)
        _, widget = viewer.window.add_plugin_dock_widget("rwkvsam", "RWKV-SAM")
        assert isinstance(widget, RWKVSAMWidget)
        widget.size_combo.setCurrentText("256")
        widget.device_combo.setCurrentText("cpu")
        made.append(widget)
        return viewer, widget

    yield factory
    for widget in made:  # never leave a worker thread running into the next test
        qtbot.waitUntil(
            lambda w=widget: not (w.is_embedding or w.is_decoding or w.is_segmenting),
            timeout=EMBED_TIMEOUT_MS,
        )
        widget.shutdown()


def coffee():
    from skimage import data

    return data.coffee()


def wait_ready(qtbot, widget):
    qtbot.waitUntil(lambda: widget.is_ready, timeout=EMBED_TIMEOUT_MS)


def add_box(qtbot, widget, rows, cols, z=None):
    """Draw one rectangle (rows=(r0, r1), cols=(c0, c1)) and wait for the preview."""
    corners = [[rows[0], cols[0]], [rows[0], cols[1]], [rows[1], cols[1]], [rows[1], cols[0]]]
    if z is not None:
        corners = [[z, *c] for c in corners]
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.boxes_layer.add_rectangles(np.array(corners, dtype=float))


def box_region(shape, rows, cols):
    region = np.zeros(shape, dtype=bool)
    region[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return region


def click(viewer, layer, yx, shift=False):
    """A left click on the canvas at data position ``yx``, through napari's own mouse dispatch."""
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    class Event:
        def __init__(self, kind):
            self.type = kind
            self.position = tuple(layer.data_to_world(yx))
            self.pos = np.array([0.0, 0.0])
            self.modifiers = ("Shift",) if shift else ()
            self.button = 1
            self.is_dragging = False
            self.handled = False
            self.dims_displayed = list(viewer.dims.displayed)
            self.view_direction = None
            self.dims_point = list(viewer.dims.point)

    mouse_press_callbacks(layer, Event("mouse_press"))
    mouse_release_callbacks(layer, Event("mouse_release"))


def test_manifest_validates_and_widget_module_is_light(gui):
    out = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari_plugin/napari.yaml", "--imports"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "valid" in out.stdout
    code = "import sys, napari_plugin._widget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_sample_data_from_manifest(dock):
    viewer, widget = dock()
    widget.auto_embed_check.setChecked(False)  # only the layer logic here: no embedding needed
    viewer.open_sample("rwkvsam", "coffee")
    layer = viewer.layers["coffee"]
    assert layer.data.shape == (400, 600, 3) and layer.data.dtype == np.uint8 and layer.rgb
    assert "CC0" in layer.metadata["source"]
    assert widget.image_layer is layer  # the widget picks up the new image


def test_box_and_points_preview_inside_box_commit_undo_clear(dock, qtbot, tmp_path):
    viewer, widget = dock()
    img = coffee()
    viewer.add_image(img, name="coffee", rgb=True)
    assert widget.points_layer is not None and widget.boxes_layer is not None
    wait_ready(qtbot, widget)

    # a box -> a preview inside the box, at the image's full resolution
    rows, cols = (60, 260), (150, 420)
    add_box(qtbot, widget, rows, cols)
    preview = widget.preview_layer.data
    assert preview.shape == img.shape[:2]
    inside = box_region(preview.shape, rows, cols)
    assert (preview > 0).any(), "empty preview"
    assert not (preview[~inside] > 0).any(), "preview leaks outside the box"
    assert "mask scores" in widget.scores_label.text()

    # the clip option is real: without it the raw decoder mask is shown, clipped it equals raw & box
    widget.clip_check.setChecked(False)
    raw = widget.preview_layer.data > 0
    widget.clip_check.setChecked(True)
    np.testing.assert_array_equal(widget.preview_layer.data > 0, raw & inside)

    # points (one positive click, one Shift-click negative) refine the same object
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (150, 280))
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (100, 200), shift=True)
    assert widget.points_layer.features["label"].tolist() == [1, 0]
    colors = widget.points_layer.face_color
    assert colors[0][1] > 0.9 and colors[0][0] < 0.1  # green
    assert colors[1][0] > 0.9 and colors[1][1] < 0.1  # red
    assert widget._prediction.batch.point_coords.shape == (1, 2, 2)
    preview = widget.preview_layer.data.copy()
    assert not (preview[~inside] > 0).any()

    # next mask cycles the candidates; commit writes the shown mask under a new id
    if widget._prediction.scores.shape[1] > 1:
        widget.next_mask()
        assert widget._choice is not None
        preview = widget.preview_layer.data.copy()
    ids = widget.commit()
    assert ids == [1]
    committed = widget.committed_layer
    np.testing.assert_array_equal(committed.data == 1, preview > 0)
    assert len(widget.points_layer.data) == 0 and len(widget.boxes_layer.data) == 0
    assert not widget.preview_layer.data.any()

    # a second, overlapping object gets id 2 and never overwrites label 1
    first = committed.data == 1
    rows2, cols2 = (40, 300), (100, 380)
    add_box(qtbot, widget, rows2, cols2)
    second_preview = widget.preview_layer.data > 0
    assert widget.commit() == [2]
    np.testing.assert_array_equal(committed.data == 1, first)
    np.testing.assert_array_equal(committed.data == 2, second_preview & ~first)

    # the committed layer is saved by napari's own writer
    out = tmp_path / "committed.tif"
    written = committed.save(str(out))
    assert written and out.exists()

    # undo reverts the last commit, then the first
    widget.undo()
    np.testing.assert_array_equal(committed.data == 1, first)
    assert not (committed.data == 2).any()
    widget.undo()
    assert not committed.data.any()
    widget.undo()  # nothing left: a notification, no exception
    assert "nothing to undo" in widget.status_label.text()

    # clear removes the prompts and the preview
    add_box(qtbot, widget, rows, cols)
    assert widget.preview_layer.data.any()
    widget.clear()
    assert len(widget.boxes_layer.data) == 0 and not widget.preview_layer.data.any()


def spy_decoder(monkeypatch, widget):
    """Record the boxes shape and the thread of every decoder pass of the widget's model."""
    import threading

    calls = []
    cls = type(widget._segmenter.model)
    original = cls.decode

    def spy(self, *args, **kwargs):
        boxes = kwargs.get("boxes")
        calls.append((None if boxes is None else tuple(boxes.shape), threading.current_thread()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "decode", spy)
    return calls


def test_segment_all_boxes_is_one_batched_call(dock, qtbot, monkeypatch):
    import threading

    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    calls = spy_decoder(monkeypatch, widget)
    boxes = [((20, 120), (30, 200)), ((200, 380), (300, 560)), ((150, 250), (250, 330))]
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.boxes_layer.add_rectangles(
            np.array([[[r[0], c[0]], [r[1], c[1]]] for r, c in boxes], dtype=float)
        )
    assert [c[0] for c in calls] == [(3, 4)]  # the live preview: one decoder pass for the three boxes
    assert widget.scores_label.text().startswith("3 objects")
    calls.clear()
    with qtbot.waitSignal(widget.committed, timeout=60_000) as blocker:
        assert widget.segment_all_boxes() is None  # returns at once: the decode runs in the background
    assert [c[0] for c in calls] == [(3, 4)]  # one decoder pass for the three boxes
    assert calls[0][1] is not threading.main_thread()  # not on the GUI thread
    ids = blocker.args[0]
    committed = widget.committed_layer.data
    assert ids and len(ids) <= 3
    for label_id in ids:
        ys, xs = np.nonzero(committed == label_id)
        # every label lies in one of the boxes
        assert any(
            ys.min() >= r[0] and ys.max() <= r[1] and xs.min() >= c[0] and xs.max() <= c[1] for r, c in boxes
        )
    assert len(widget.boxes_layer.data) == 0
    assert not widget.is_segmenting and widget.buttons["segment_all_boxes"].isEnabled()


def test_zoom_on_small_boxes_decodes_each_box_in_its_window(dock, qtbot, monkeypatch):
    """The option: preview and "segment all boxes" give rwkvsam_core.zoom's masks, off the GUI thread;
    with clicks in the box the usual single decoder pass runs."""
    import threading

    from napari_plugin._engine import clip_masks_to_boxes

    viewer, widget = dock()
    img = coffee()
    viewer.add_image(img, name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    threads = []
    original = type(widget._segmenter).predict_zoomed

    def spy(self, *args, **kwargs):
        threads.append(threading.current_thread())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(widget._segmenter), "predict_zoomed", spy)
    rows, cols = (
        (20, 120),
        (30, 200),
    )  # at input 256 the zoomed window is 113 px (the box spans 72 px unzoomed)
    add_box(qtbot, widget, rows, cols)
    unzoomed = widget.preview_layer.data > 0
    assert threads == []  # off by default
    with qtbot.waitSignal(widget.preview_updated, timeout=60_000):
        widget.zoom_check.setChecked(True)
    assert len(threads) == 1 and threads[0] is not threading.main_thread()
    _, batch, _ = widget._current_batch()
    masks, scores = original(widget._segmenter, widget._active_features, img, None, batch)
    expect = clip_masks_to_boxes(masks.get([0]), batch.boxes)[0]
    np.testing.assert_array_equal(widget.preview_layer.data > 0, expect)
    assert expect.any() and not np.array_equal(expect, unzoomed)  # a different decoding, not the same masks
    assert not (expect & ~box_region(expect.shape, rows, cols)).any()
    # a click inside the box: box + click in one ordinary decoder pass, no zoom
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (60, 125))
    assert len(threads) == 1
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.points_layer.data = np.zeros((0, 2))
    # segment all boxes: the zoomed masks are what is committed
    with qtbot.waitSignal(widget.committed, timeout=60_000) as blocker:
        widget.segment_all_boxes()
    (label_id,) = blocker.args[0]
    np.testing.assert_array_equal(widget.committed_layer.data == label_id, expect)


def test_segment_all_boxes_keeps_the_viewer_responsive(dock, qtbot, monkeypatch):
    import threading

    from qtpy.QtCore import QTimer

    from napari_plugin._engine import Segmenter

    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    rects = np.array([[[20.0, 30.0], [120.0, 200.0]], [[200.0, 300.0], [380.0, 560.0]]])
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.boxes_layer.add_rectangles(rects)
    qtbot.waitUntil(lambda: not widget.is_decoding, timeout=10_000)

    gate = threading.Event()
    held = threading.Event()
    original = Segmenter.predict

    def slow_predict(self, features, batch, multimask=True):
        if threading.current_thread() is not threading.main_thread() and batch.point_coords is None:
            held.set()
            gate.wait(60)  # a long decode: the GUI must not wait for it
        return original(self, features, batch, multimask=multimask)

    monkeypatch.setattr(Segmenter, "predict", slow_predict)
    ticks = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start()
    committed = []
    widget.committed.connect(committed.append)
    widget.segment_all_boxes()
    assert widget.is_segmenting and not widget.buttons["segment_all_boxes"].isEnabled()
    assert held.wait(10)
    qtbot.wait(300)  # the event loop runs while the boxes are decoded
    assert len(ticks) >= 10, f"only {len(ticks)} timer ticks while segmenting"
    assert committed == []
    widget.segment_all_boxes()  # a second request meanwhile: a message, not a second run
    assert "already segmenting" in widget.status_label.text()
    # a box drawn meanwhile is not part of this run and stays
    widget.boxes_layer.add_rectangles(np.array([[300.0, 20.0], [380.0, 120.0]]))
    gate.set()
    qtbot.waitUntil(lambda: bool(committed), timeout=60_000)
    timer.stop()
    assert 1 <= len(committed[0]) <= 2
    assert len(widget.boxes_layer.data) == 1
    np.testing.assert_array_equal(widget.boxes_layer.data[0][[0, 2]], [[300.0, 20.0], [380.0, 120.0]])
    assert widget.committed_layer.data[300:381, 20:121].max() == 0

    # a box moved while the run was going: nothing is committed, a message says why
    gate.clear()
    held.clear()
    before = widget.committed_layer.data.copy()
    widget.segment_all_boxes()
    assert held.wait(10)
    widget.boxes_layer.data = [widget.boxes_layer.data[0] + 5.0]
    gate.set()
    qtbot.waitUntil(lambda: not widget.is_segmenting, timeout=60_000)
    assert "nothing committed" in widget.status_label.text()
    np.testing.assert_array_equal(widget.committed_layer.data, before)
    assert len(widget.boxes_layer.data) == 1


def test_stack_segments_the_current_slice(dock, qtbot):
    viewer, widget = dock()
    rng = np.random.default_rng(0)
    stack = (rng.random((3, 120, 160)) * 4000).astype(np.uint16)  # uint16 grayscale stack
    stack[:, 40:80, 50:110] += 20000
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 2)
    wait_ready(qtbot, widget)
    assert widget._active_key.slice_index == (2,)
    rows, cols = (30, 90), (40, 120)
    add_box(qtbot, widget, rows, cols, z=2)
    preview = widget.preview_layer.data
    assert preview.shape == stack.shape
    assert preview[2].any() and not preview[[0, 1]].any()
    # commit with the keyboard shortcut, as a key press on the canvas
    from qtpy.QtCore import Qt

    with qtbot.waitSignal(widget.committed, timeout=10_000) as blocker:
        qtbot.keyClick(
            viewer.window._qt_viewer.canvas.native, Qt.Key.Key_C, Qt.KeyboardModifier.ShiftModifier
        )
    assert blocker.args == [[1]]
    committed = widget.committed_layer.data
    assert committed.shape == stack.shape
    assert not committed[[0, 1]].any()
    inside = box_region(committed.shape[1:], rows, cols)
    assert committed[2].any() and not committed[2][~inside].any()
    # another slice: a new embedding, prompts there land there
    viewer.dims.set_current_step(0, 0)
    wait_ready(qtbot, widget)
    assert widget._active_key.slice_index == (0,)
    add_box(qtbot, widget, rows, cols, z=0)
    assert widget.preview_layer.data[0].any() and not widget.preview_layer.data[1:].any()


def test_event_loop_runs_during_embedding_and_prompts_meanwhile_are_honoured(dock, qtbot):
    from qtpy.QtCore import QTimer

    viewer, widget = dock()
    rng = np.random.default_rng(1)
    img = (rng.random((300, 400)) * 1000).astype(np.float32)  # a new image: not in any cache
    ticks = []
    bar_ranges = set()
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(widget.is_embedding))
    timer.timeout.connect(lambda: widget.is_embedding and bar_ranges.add(widget.progress.maximum()))
    timer.start()
    viewer.add_image(img, name="float image")
    assert widget.is_embedding
    # a prompt placed while the embedding runs
    widget.boxes_layer.add_rectangles(np.array([[50.0, 60.0], [200.0, 300.0]]))
    qtbot.waitUntil(lambda: not widget.is_embedding, timeout=EMBED_TIMEOUT_MS)
    timer.stop()
    during = sum(ticks)
    # a GUI thread blocked for the whole embedding would deliver at most one (coalesced) tick
    assert during >= 5, f"only {during} timer ticks while the embedding ran"
    # a determinate bar, never Qt's busy animation (range 0..0: it repaints the window all the time)
    assert bar_ranges == {100}
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=10_000)
    assert not widget.preview_layer.data[~box_region(img.shape, (50, 200), (60, 300))].any()


def test_switching_image_cancels_stale_work_and_cache_makes_return_instant(dock, qtbot):
    from napari_plugin import _engine

    viewer, widget = dock()
    rng = np.random.default_rng(2)
    a = viewer.add_image((rng.random((200, 240)) * 255).astype(np.uint8), name="a")
    assert widget.is_embedding
    b = viewer.add_image(coffee(), name="b", rgb=True)
    widget.image_combo.setCurrentIndex(1)  # switch while a's embedding runs
    assert widget.image_layer is b
    wait_ready(qtbot, widget)
    assert widget._active_key.layer_id == id(b)
    assert widget.preview_layer.data.shape == (400, 600)
    # back to a and again to b: b comes from the embedding cache (no encoder run)
    cache = _engine.embedding_cache()
    widget.image_combo.setCurrentIndex(0)
    wait_ready(qtbot, widget)
    assert widget.image_layer is a
    hits = cache.hits + cache.disk_hits
    viewer.layers.remove(b)
    widget._features.clear()  # forget the widget's own copies: only the core's cache can answer
    viewer.add_image(coffee(), name="b again", rgb=True)
    widget.image_combo.setCurrentIndex(1)
    wait_ready(qtbot, widget)
    assert cache.hits + cache.disk_hits == hits + 1


def test_bad_input_gives_messages_not_tracebacks(dock, qtbot, tmp_path):
    viewer, widget = dock()
    # no image layer at all
    assert widget.commit() is None
    assert "no image layer" in widget.status_label.text()
    widget.undo()
    assert "nothing to undo" in widget.status_label.text()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    # nothing to commit yet
    assert widget.commit() is None
    assert "nothing to commit" in widget.status_label.text()
    # a box entirely outside the image
    widget.boxes_layer.add_rectangles(np.array([[1000.0, 1000.0], [1100.0, 1200.0]]))
    qtbot.waitUntil(lambda: "outside the image" in widget._last_note, timeout=10_000)
    assert not widget.preview_layer.data.any()
    widget.clear()
    # a checkpoint that does not load: a message, the prompts and layers are kept
    bogus = tmp_path / "broken.safetensors"
    bogus.write_bytes(b"not a checkpoint")
    widget.boxes_layer.add_rectangles(np.array([[10.0, 10.0], [100.0, 100.0]]))
    widget.checkpoint_edit.setText(str(bogus))
    widget._on_model_changed()
    qtbot.waitUntil(lambda: "embedding failed" in widget.status_label.text(), timeout=EMBED_TIMEOUT_MS)
    assert len(widget.boxes_layer.data) == 1 and "coffee" in viewer.layers
    # back to the default weights: segmentation works again
    widget.checkpoint_edit.setText("")
    widget._on_model_changed()
    wait_ready(qtbot, widget)
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=10_000)


def _layer_prompts(widget):
    return (
        widget.points_layer.data.copy(),
        widget.points_layer.features["label"].to_numpy().copy(),
        [v.copy() for v in widget.boxes_layer.data],
    )


def test_candidates_only_for_a_single_click(dock, qtbot):
    """SAM's rule: one click decodes three candidates; a box or several clicks decode the single mask."""
    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (150, 280))
    assert widget._prediction.scores.shape == (1, 3)
    widget.next_mask()
    assert widget._choice is not None
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (100, 200), shift=True)
    assert widget._prediction.scores.shape == (1, 1)  # two clicks
    assert "mask scores" in widget.scores_label.text() and "next mask" not in widget.scores_label.text()
    widget.next_mask()  # guarded: a notice, no change
    assert widget._prediction.scores.shape == (1, 1)
    widget.clear()
    add_box(qtbot, widget, (60, 260), (150, 420))
    assert widget._prediction.scores.shape == (1, 1)  # a box
    widget.clear()
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.multimask_check.setChecked(False)
        click(viewer, widget.points_layer, (150, 280))
    assert widget._prediction.scores.shape == (1, 1)  # candidates switched off


def test_undo_brings_back_the_prompts_and_the_preview(dock, qtbot, monkeypatch):
    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    rows, cols = (60, 260), (150, 420)
    add_box(qtbot, widget, rows, cols)
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (150, 280))
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (100, 200), shift=True)
    if widget._prediction.scores.shape[1] > 1:
        widget.next_mask()  # a candidate other than the default: undo must bring this one back
    points, labels, boxes = _layer_prompts(widget)
    assert labels.tolist() == [1, 0] and len(boxes) == 1
    preview = widget.preview_layer.data.copy()
    scores_text = widget.scores_label.text()
    choice = widget._choice
    assert preview.any()

    assert widget.commit() == [1]
    committed = widget.committed_layer.data
    first = committed == 1
    np.testing.assert_array_equal(first, preview > 0)
    assert len(widget.points_layer.data) == 0 and len(widget.boxes_layer.data) == 0
    assert not widget.preview_layer.data.any()

    # undo: the label goes, the prompts and the preview that produced it come back, with no decode
    from napari_plugin._engine import Segmenter

    decodes = []
    original = Segmenter.predict
    monkeypatch.setattr(Segmenter, "predict", lambda *a, **k: decodes.append(1) or original(*a, **k))
    with qtbot.waitSignal(widget.undone, timeout=10_000) as blocker:
        widget.undo()
    assert blocker.args == [[1]]
    assert not committed.any()
    new_points, new_labels, new_boxes = _layer_prompts(widget)
    np.testing.assert_array_equal(new_points, points)
    assert new_labels.tolist() == [1, 0]
    assert len(new_boxes) == 1
    np.testing.assert_array_equal(new_boxes[0], boxes[0])
    np.testing.assert_array_equal(widget.preview_layer.data, preview)
    assert widget._choice == choice and widget.scores_label.text() == scores_text
    assert "prompts are back" in widget.status_label.text()
    colors = widget.points_layer.face_color
    assert colors[0][1] > 0.9 and colors[1][0] > 0.9  # green positive, red negative again
    # the scheduled preview update finds the restored prediction current: still no decode
    qtbot.waitUntil(lambda: not widget._preview_timer.isActive() and not widget.is_decoding, timeout=10_000)
    assert decodes == []
    np.testing.assert_array_equal(widget.preview_layer.data, preview)

    # correct the object (one more negative point) and commit again: the same id, the new mask
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (230, 400), shift=True)
    assert decodes, "a changed prompt must be decoded"
    corrected = widget.preview_layer.data > 0
    assert widget.commit() == [1]
    np.testing.assert_array_equal(committed == 1, corrected)

    # prompts placed after a commit are replaced by the restored ones on undo
    widget.undo()
    widget.clear()
    assert widget.commit() is None  # nothing to commit
    add_box(qtbot, widget, rows, cols)
    assert widget.commit() == [1]
    add_box(qtbot, widget, (300, 380), (20, 120))  # the next object, started
    widget.undo()
    assert not committed.any()
    assert len(widget.boxes_layer.data) == 1
    np.testing.assert_array_equal(widget.boxes_layer.data[0], boxes[0])
    assert len(widget.points_layer.data) == 0


def test_undo_of_segment_all_boxes_restores_the_boxes(dock, qtbot):
    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    rects = np.array([[[20.0, 30.0], [120.0, 200.0]], [[200.0, 300.0], [380.0, 560.0]]])
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.boxes_layer.add_rectangles(rects)
    before = [v.copy() for v in widget.boxes_layer.data]
    with qtbot.waitSignal(widget.committed, timeout=60_000) as blocker:
        widget.segment_all_boxes()
    assert blocker.args[0] and len(widget.boxes_layer.data) == 0
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):  # decoded again from the boxes
        widget.undo()
    assert not widget.committed_layer.data.any()
    assert len(widget.boxes_layer.data) == 2
    for restored, original in zip(widget.boxes_layer.data, before, strict=True):
        np.testing.assert_array_equal(restored, original)
    assert widget._prediction is not None and widget._prediction.masks.shape[0] == 2


def test_undo_on_a_stack_slice(dock, qtbot):
    from qtpy.QtCore import Qt

    viewer, widget = dock()
    rng = np.random.default_rng(3)
    stack = (rng.random((2, 100, 140)) * 255).astype(np.uint8)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    wait_ready(qtbot, widget)
    add_box(qtbot, widget, (20, 80), (30, 120), z=1)
    box = widget.boxes_layer.data[0].copy()
    assert widget.commit() == [1]
    assert widget.committed_layer.data[1].any()
    with qtbot.waitSignal(widget.undone, timeout=10_000):  # Shift-U on the canvas
        qtbot.keyClick(
            viewer.window._qt_viewer.canvas.native, Qt.Key.Key_U, Qt.KeyboardModifier.ShiftModifier
        )
    assert not widget.committed_layer.data.any()
    assert len(widget.boxes_layer.data) == 1
    np.testing.assert_array_equal(widget.boxes_layer.data[0], box)  # back on slice 1
    assert widget.preview_layer.data[1].any() and not widget.preview_layer.data[0].any()


def test_a_prompt_change_is_decoded_at_once_and_bursts_decode_only_the_latest(dock, qtbot, monkeypatch):
    import threading

    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    from napari_plugin._engine import Segmenter

    decoded = []
    gate = threading.Event()
    gate.set()
    original = Segmenter.predict

    def spy(self, features, batch, multimask=True):
        decoded.append(batch.point_coords.shape[1])
        gate.wait(60)  # holds a decode while the test piles up prompt changes
        return original(self, features, batch, multimask=multimask)

    monkeypatch.setattr(Segmenter, "predict", spy)
    # the decode starts inside the layer's event: when add() returns, the preview is already drawn
    # (the GUI waits up to preview_wait_ms for it) without any turn of the event loop
    widget.points_layer.add([150.0, 280.0])
    assert decoded == [1]
    assert widget._prediction is not None and widget._prediction.batch.point_coords.shape[1] == 1
    assert widget.preview_layer.data.any()

    # changes that come while a decode runs are not queued up: only the newest prompts are decoded
    widget.preview_wait_ms = 0
    decoded.clear()
    gate.clear()
    widget.points_layer.add([100.0, 200.0])
    qtbot.waitUntil(lambda: decoded == [2], timeout=10_000)  # this change is being decoded (held)
    for i in range(1, 5):
        widget.points_layer.add([100.0 + 10 * i, 200.0 + 20 * i])
        assert widget.is_decoding
    gate.set()
    qtbot.waitUntil(lambda: not widget.is_decoding, timeout=10_000)
    assert decoded == [2, 6]
    assert widget._prediction.batch.point_coords.shape[1] == 6


def test_contrast_change_re_embeds_once_after_the_slider_rests(dock, qtbot, monkeypatch):
    from napari_plugin import _engine

    calls = []
    original = _engine.compute_features

    def spy(spec, plane, contrast, cancelled=None):
        calls.append(contrast)
        return original(spec, plane, contrast, cancelled=cancelled)

    monkeypatch.setattr(_engine, "compute_features", spy)
    viewer, widget = dock()
    rng = np.random.default_rng(4)
    img = (rng.random((160, 200)) * 1000).astype(np.float32)
    img[40:120, 50:150] += 3000
    layer = viewer.add_image(img, name="float", contrast_limits=(0, 4000))
    wait_ready(qtbot, widget)
    add_box(qtbot, widget, (30, 130), (40, 160))
    # opening the image embeds it once; nothing else runs or waits when the slider starts to move
    # (one CI run found an embedding running here: these lines say what it was if it comes back)
    qtbot.waitUntil(lambda: not widget.is_embedding, timeout=EMBED_TIMEOUT_MS)
    assert calls == [(0.0, 4000.0)], f"embeddings on opening the image: {calls}"
    old_key, old_preview = widget._active_key, widget.preview_layer.data.copy()
    assert old_key.contrast == (0.0, 4000.0)
    calls.clear()

    # a dragged slider: many values in a row; nothing is embedded while it moves
    for hi in range(3900, 2900, -100):
        layer.contrast_limits = (0, hi)
        assert not widget.is_embedding
    assert widget.is_ready and widget._active_key == old_key  # the old embedding serves meanwhile
    with qtbot.waitSignals([widget.embedding_ready, widget.preview_updated], order="strict", timeout=60_000):
        pass
    assert calls == [(0.0, 3000.0)]  # one embedding, with the final limits
    assert widget._active_key.contrast == (0.0, 3000.0)
    assert widget._prediction.signature[0] == widget._active_key  # preview decoded from the new one
    assert widget.preview_layer.data.shape == old_preview.shape

    # back to the first limits: that embedding is still held, nothing is computed
    layer.contrast_limits = (0, 4000)
    qtbot.waitUntil(lambda: widget._active_key == old_key, timeout=10_000)
    assert calls == [(0.0, 3000.0)]

    # uint8 RGB is used as is: its contrast limits never trigger an embedding
    rgb = viewer.add_image(coffee(), name="coffee", rgb=True)
    widget.image_combo.setCurrentIndex(1)
    wait_ready(qtbot, widget)
    calls.clear()
    rgb.contrast_limits = (20, 200)
    assert widget._contrast_timer.isActive()
    qtbot.waitUntil(lambda: not widget._contrast_timer.isActive(), timeout=10_000)
    assert widget.is_ready and not widget.is_embedding and calls == []


def test_a_stale_embedding_is_cancelled(dock, qtbot, monkeypatch):
    import threading

    from napari_plugin import _engine

    viewer, widget = dock()
    rng = np.random.default_rng(5)
    layer = viewer.add_image(
        (rng.random((120, 150)) * 100).astype(np.float32), name="f", contrast_limits=(0, 100)
    )
    wait_ready(qtbot, widget)
    outcomes = []
    original = _engine.compute_features
    first_running = threading.Event()

    def spy(spec, plane, contrast, cancelled=None):
        if contrast == (0.0, 50.0):  # the stale one: runs until it is told to stop (at most 60 s)
            first_running.set()
            for _ in range(6000):
                if cancelled():
                    break
                threading.Event().wait(0.01)
        try:
            out = original(spec, plane, contrast, cancelled=cancelled)
        except _engine.EmbeddingCancelled:
            outcomes.append((contrast, "cancelled"))
            raise
        outcomes.append((contrast, "done"))
        return out

    monkeypatch.setattr(_engine, "compute_features", spy)
    layer.contrast_limits = (0, 50)
    qtbot.waitUntil(first_running.is_set, timeout=10_000)
    layer.contrast_limits = (0, 70)  # the limits move again while that embedding runs
    qtbot.waitUntil(lambda: widget.is_ready and widget._active_key.contrast == (0.0, 70.0), timeout=60_000)
    assert outcomes == [((0.0, 50.0), "cancelled"), ((0.0, 70.0), "done")]
    assert all(key.contrast != (0.0, 50.0) for key in widget._features)


def test_cuda_without_a_gpu_is_a_message_not_a_stuck_widget(dock, qtbot):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible")
    viewer, widget = dock()
    widget.device_combo.setCurrentText("cuda")
    viewer.add_image(coffee(), name="coffee", rgb=True)
    qtbot.waitUntil(lambda: "embedding failed" in widget.status_label.text(), timeout=EMBED_TIMEOUT_MS)
    assert "CUDA" in widget.status_label.text()
    qtbot.waitUntil(lambda: not widget.is_embedding, timeout=10_000)
    widget.device_combo.setCurrentText("cpu")
    wait_ready(qtbot, widget)


def test_preview_redraws_only_what_changed_and_shows_what_a_full_refresh_shows(dock, qtbot, monkeypatch):
    viewer, widget = dock()
    rng = np.random.default_rng(6)
    stack = (rng.random((3, 120, 160)) * 255).astype(np.uint8)
    viewer.add_image(stack, name="stack")
    viewer.dims.set_current_step(0, 1)
    wait_ready(qtbot, widget)
    from napari_plugin._widget import PREVIEW_NAME

    preview = viewer.layers[PREVIEW_NAME]  # the layer itself (the widget holds napari's plugin proxy)
    full_refresh = type(preview).refresh
    refreshes = []

    def counting_refresh(*args, **kwargs):
        refreshes.append(kwargs.get("data_displayed", True))
        return full_refresh(preview, *args, **kwargs)

    monkeypatch.setattr(preview, "refresh", counting_refresh)

    def shown_equals_full_refresh():
        qtbot.wait(50)
        shot = viewer.screenshot(canvas_only=True, flash=False)
        full_refresh(preview)
        qtbot.wait(50)
        np.testing.assert_array_equal(shot, viewer.screenshot(canvas_only=True, flash=False))

    add_box(qtbot, widget, (20, 90), (30, 130), z=1)
    assert widget.preview_layer.data[1].any()
    assert refreshes == [True]  # one redraw of the layer
    shown_equals_full_refresh()
    qtbot.waitUntil(lambda: refreshes == [True, False], timeout=5_000)  # then the thumbnail

    # the same prediction drawn again (e.g. the clip option toggled twice): nothing to redraw
    refreshes.clear()
    widget._render_prediction()
    assert refreshes == []

    # another slice: the preview of slice 1 is cleared off screen, without a redraw
    viewer.dims.set_current_step(0, 2)
    qtbot.waitUntil(lambda: not widget.preview_layer.data[1].any(), timeout=10_000)
    assert True not in refreshes
    viewer.dims.set_current_step(0, 1)
    shown_equals_full_refresh()

    # the clear action redraws once
    wait_ready(qtbot, widget)
    add_box(qtbot, widget, (20, 90), (30, 130), z=1)
    refreshes.clear()
    widget.clear()
    assert not preview.data.any() and refreshes == [True]
    shown_equals_full_refresh()


def test_torch_work_stays_off_the_gui_thread_and_the_embedding_thread_ends(dock, qtbot, monkeypatch):
    import threading

    import rwkvsam_core
    from napari_plugin import _engine

    viewer, widget = dock()
    embed_threads = []
    original_compute = _engine.compute_features

    def spy_compute(spec, plane, contrast, cancelled=None):
        embed_threads.append(threading.current_thread())
        return original_compute(spec, plane, contrast, cancelled=cancelled)

    monkeypatch.setattr(_engine, "compute_features", spy_compute)
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    # the embedding ran in a thread of its own, which has ended (and its OpenMP team with it)
    assert embed_threads and embed_threads[0] is not threading.main_thread()
    qtbot.waitUntil(lambda: not embed_threads[0].is_alive(), timeout=10_000)

    decodes = spy_decoder(monkeypatch, widget)
    upsampled = []
    original_upsample = rwkvsam_core.postprocess_masks

    def spy_upsample(*args, **kwargs):
        upsampled.append(threading.current_thread())
        return original_upsample(*args, **kwargs)

    monkeypatch.setattr(rwkvsam_core, "postprocess_masks", spy_upsample)
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        click(viewer, widget.points_layer, (150, 280))  # one click: three candidates, the best shown
    assert widget._prediction.scores.shape[1] == 3 and len(upsampled) == 1
    widget.next_mask()  # another candidate: upsampled now
    assert len(upsampled) == 2
    widget.preview_wait_ms = 0
    corners = [[60, 150], [60, 420], [260, 420], [260, 150]]
    widget.boxes_layer.add_rectangles(np.array(corners, dtype=float))  # box + click: a single mask
    assert widget.commit() == [1]  # decoded for the commit if the preview still lags behind
    assert len(decodes) >= 2 and upsampled
    gui = threading.main_thread()
    assert all(thread is not gui for _, thread in decodes)
    assert all(thread is not gui for thread in upsampled)


def test_embedding_of_a_new_image_starts_after_the_canvas_is_painted(dock, qtbot):
    """The embedding thread does not compete with napari's first paint of a new image (2 cores)."""
    import time

    from qtpy.QtCore import QEvent, QObject

    viewer, widget = dock(show=True)
    viewer.window._qt_window.resize(900, 700)
    canvas = viewer.window._qt_viewer.canvas.native  # the test may look inside napari; the widget does not
    qtbot.waitUntil(canvas.isVisible, timeout=10_000)

    class PaintSpy(QObject):
        def __init__(self):
            super().__init__()
            self.painted: list[float] = []

        def eventFilter(self, obj, event):  # noqa: N802 (Qt name)
            if event.type() == QEvent.Type.Paint:
                self.painted.append(time.perf_counter())
            return False

    spy = PaintSpy()
    canvas.installEventFilter(spy)
    started: list[float] = []
    widget.embedding_started.connect(lambda: started.append(time.perf_counter()))
    rng = np.random.default_rng(11)
    img = (rng.random((200, 260)) * 1000).astype(np.float32)  # not in any cache
    spy.painted.clear()
    viewer.add_image(img, name="new image")
    # requested, but waiting for the paint: nothing started inside the layer event
    assert widget.is_embedding and not widget.is_embedding_started and started == []
    # a prompt placed before the embedding starts is honoured when it is ready
    widget.boxes_layer.add_rectangles(np.array([[40.0, 50.0], [150.0, 200.0]]))
    qtbot.waitUntil(lambda: bool(started), timeout=10_000)
    canvas.removeEventFilter(spy)
    assert spy.painted and spy.painted[0] < started[0], "the embedding started before the canvas was painted"
    assert len(started) == 1
    wait_ready(qtbot, widget)
    qtbot.waitUntil(lambda: widget.preview_layer.data.any(), timeout=10_000)
    assert not widget.preview_layer.data[~box_region(img.shape, (40, 150), (50, 200))].any()


def test_a_deferred_embedding_starts_without_a_paint_and_follows_the_latest_image(dock, qtbot, monkeypatch):
    import time

    from qtpy.QtWidgets import QWidget

    from napari_plugin import _widget

    viewer, widget = dock(show=True)
    qtbot.waitUntil(viewer.window._qt_viewer.canvas.native.isVisible, timeout=10_000)
    never_painted = QWidget()  # stands for a canvas that gets no paint event (nothing to redraw)
    monkeypatch.setattr(widget, "_painted_canvases", lambda: [never_painted])
    starts: list[tuple[float, int]] = []
    widget.embedding_started.connect(
        lambda: starts.append((time.perf_counter(), widget._worker_key.layer_id))
    )
    rng = np.random.default_rng(12)
    t0 = time.perf_counter()
    a = viewer.add_image((rng.random((120, 150)) * 255).astype(np.uint8), name="a")
    assert widget.is_embedding and not widget.is_embedding_started
    # another image chosen before it started: only that one is embedded (the stale request is dropped)
    b = viewer.add_image((rng.random((130, 160)) * 255).astype(np.uint8), name="b")
    widget.image_combo.setCurrentIndex(1)
    assert widget.image_layer is b and widget.is_embedding and not widget.is_embedding_started
    qtbot.waitUntil(lambda: bool(starts), timeout=10_000)
    assert (starts[0][0] - t0) * 1000 >= _widget.FIRST_PAINT_TIMEOUT_MS  # the safety timeout started it
    wait_ready(qtbot, widget)
    assert [layer_id for _, layer_id in starts] == [id(b)]
    assert widget._active_key.layer_id == id(b) and id(a) not in {key.layer_id for key in widget._features}
    # an image removed while its embedding waits: not embedded (the widget moves on to the first image)
    starts.clear()
    c = viewer.add_image((rng.random((100, 110)) * 255).astype(np.uint8), name="c")
    widget.image_combo.setCurrentIndex(2)
    assert widget.image_layer is c and widget.is_embedding and not widget.is_embedding_started
    viewer.layers.remove(c)
    assert widget.image_layer is a
    wait_ready(qtbot, widget)
    assert [layer_id for _, layer_id in starts] == [id(a)]


def test_a_hidden_viewer_starts_the_embedding_at_once(dock, qtbot):
    viewer, widget = dock()  # not shown: no paint will come
    viewer.add_image((np.random.default_rng(13).random((90, 120)) * 255).astype(np.uint8), name="hidden")
    assert widget.is_embedding_started
    wait_ready(qtbot, widget)
