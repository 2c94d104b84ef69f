"""The RWKV-SAM dock widget in a real napari viewer (Xvfb + pytest-qt).

Models have random weights (no trained weights exist yet), so these tests check the GUI logic and the
geometry of the masks (inside the box, on the right slice, at full resolution), not their quality.
Input size 256 keeps the embeddings short on a 2-core CPU.
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
        qtbot.waitUntil(lambda w=widget: not (w.is_embedding or w.is_decoding), timeout=EMBED_TIMEOUT_MS)
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


def test_segment_all_boxes_is_one_batched_call(dock, qtbot, monkeypatch):
    viewer, widget = dock()
    viewer.add_image(coffee(), name="coffee", rgb=True)
    wait_ready(qtbot, widget)
    from rwkvsam_core import Predictor

    calls = []
    original = Predictor.predict_torch

    def spy(self, *args, **kwargs):
        calls.append(None if args[2] is None else tuple(args[2].shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_torch", spy)
    boxes = [((20, 120), (30, 200)), ((200, 380), (300, 560)), ((150, 250), (250, 330))]
    with qtbot.waitSignal(widget.preview_updated, timeout=10_000):
        widget.boxes_layer.add_rectangles(
            np.array([[[r[0], c[0]], [r[1], c[1]]] for r, c in boxes], dtype=float)
        )
    assert calls == [(3, 4)]  # the live preview: one decoder pass for the three boxes
    assert widget.scores_label.text().startswith("3 objects")
    calls.clear()
    ids = widget.segment_all_boxes()
    assert calls == [(3, 4)]  # one decoder pass for the three boxes
    committed = widget.committed_layer.data
    assert ids and len(ids) <= 3
    for label_id in ids:
        ys, xs = np.nonzero(committed == label_id)
        # every label lies in one of the boxes
        assert any(
            ys.min() >= r[0] and ys.max() <= r[1] and xs.min() >= c[0] and xs.max() <= c[1] for r, c in boxes
        )
    assert len(widget.boxes_layer.data) == 0


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
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(widget.is_embedding))
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
