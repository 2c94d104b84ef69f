"""The "RWKV-SAM" dock widget.

The widget is thin: prompts are read from napari's own Points / Shapes layers and turned into SAM
prompts by the pure functions of :mod:`napari_plugin._conversion`; embeddings are computed by a
worker thread (:mod:`napari_plugin._engine`, imported lazily so torch is not imported with this
module), started after napari has painted a newly shown image (so the two do not compete on a small
CPU), again automatically when the image's contrast limits settle on new values; the live preview
is decoded in one persistent decode thread (only the latest prompts are decoded) and drawn on the GUI
thread.

Layers it manages (created on demand, shaped like the image's spatial axes, same scale/translate):

* ``RWKV-SAM points``: click = positive point (green), Shift-click or "next point negative" = negative
  (red);
* ``RWKV-SAM boxes``: rectangles, one object per rectangle;
* ``RWKV-SAM preview``: the current prediction;
* ``committed``: committed objects, one new label id each.

Keys (on the viewer): Shift-S embed, Shift-C commit, Shift-X clear, Shift-U undo (the label goes, the
prompts and the preview that made it come back), Shift-M next mask, Shift-N toggle negative points,
Shift-B segment all boxes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels, Points, Shapes
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QEvent, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ._conversion import (
    CommitRecord,
    PromptBatch,
    PromptError,
    Prompts,
    SliceIndex,
    choose_candidates,
    commit_masks,
    current_slice,
    extract_slice,
    group_prompts,
    masks_to_label_image,
    points_to_prompts,
    shapes_to_boxes,
    spatial_shape,
    undo_commit,
    write_changed_region,
)

if TYPE_CHECKING:
    import napari

logger = logging.getLogger(__name__)

POINTS_NAME = "RWKV-SAM points"
BOXES_NAME = "RWKV-SAM boxes"
PREVIEW_NAME = "RWKV-SAM preview"
COMMITTED_NAME = "committed"
POSITIVE_COLOR = "lime"
PREVIEW_COLOR = "cyan"
NEGATIVE_COLOR = "red"
MODEL_NAMES_FALLBACK = ("rwkvsam_t", "rwkvsam_s", "rwkvsam_b", "sam_vit_b", "sam_vit_l", "sam_vit_h")
INPUT_SIZES = ("model default", "1024", "512", "256")
KEYS = {
    "embed": "Shift-S",
    "commit": "Shift-C",
    "clear": "Shift-X",
    "undo": "Shift-U",
    "next_mask": "Shift-M",
    "toggle_negative": "Shift-N",
    "segment_all_boxes": "Shift-B",
}
CONTRAST_DEBOUNCE_MS = 400  # contrast limits must rest this long before the image is embedded again
# How long a prompt change may hold the GUI thread waiting for its decode. On a small CPU the decode
# and napari's redraw of the canvas slow each other down when they overlap; waiting (the decode runs
# in the decode thread meanwhile) lets the decode finish first and draws the prompt and its preview in
# one redraw. A longer decode (many boxes, a slow machine) is not waited for: it arrives later.
PREVIEW_WAIT_MS = 250
THUMBNAIL_DELAY_MS = 300
PROGRESS_STEPS = 100
# An embedding asked for by a change of what the canvas shows (an image opened or chosen, a slice, new
# data) starts once napari has painted the canvas after that change: on 2 cores with software OpenGL
# the first paint of a new image (~100 ms of GL setup and texture upload on the GUI thread) and the
# embedding slowed each other down. When no paint starts within this long after the GUI thread is
# free again (nothing to redraw), the embedding starts anyway.
FIRST_PAINT_TIMEOUT_MS = 150


def _guarded(func):
    """Turn exceptions of a user action into a napari notification (never a traceback dialog)."""

    @functools.wraps(func)
    def wrapper(self: RWKVSAMWidget, *args: Any, **kwargs: Any):
        try:
            return func(self, *args, **kwargs)
        except PromptError as err:
            self._warn(str(err))
        except Exception as err:  # a GUI action must never crash the viewer
            logger.exception("RWKV-SAM: %s failed", func.__name__)
            self._set_status(f"error: {err}")
            show_error(f"RWKV-SAM: {func.__name__.strip('_')} failed: {type(err).__name__}: {err}")
        return None

    return wrapper


@dataclass
class _Prediction:
    """The last decoder output for the current slice."""

    slice_index: SliceIndex
    batch: PromptBatch
    masks: Any  # _engine.MaskCandidates: (N, K, H, W) candidates, upsampled when shown
    scores: np.ndarray  # (N, K)
    signature: tuple = ()


@dataclass
class _SegmentAllRequest:
    """A "segment all boxes" run: what it decodes, to check on its return that it still applies."""

    seq: int
    key: Any  # _EmbedKey of the features it decodes with
    image_id: int
    shapes: list  # (index, shape type, vertices) of the slice's shapes when it started
    num_boxes: int


@dataclass(frozen=True)
class _EmbedKey:
    spec: Any  # _engine.ModelSpec
    layer_id: int
    slice_index: SliceIndex
    data_version: int
    contrast_version: int  # bumped by the Embed action (forces a new embedding)
    contrast: tuple[float, float] | None  # limits the plane is normalised with (None: uint8 RGB as is)


@dataclass
class _UndoEntry:
    """One commit: what it changed in the labels and the prompts and preview that produced it."""

    layer: Labels
    record: CommitRecord
    image_id: int
    points: np.ndarray  # (M, D) the slice's points, in layer order
    point_labels: np.ndarray  # (M,)
    boxes: list[np.ndarray]  # vertices of the slice's shapes
    box_types: list[str]
    key: _EmbedKey | None  # the embedding the prediction was decoded from
    prediction: _Prediction | None  # None: decode again after the undo
    choice: int | None


class RWKVSAMWidget(QWidget):
    """Dock widget: click or box an object, preview its mask live, commit it as a label.

    Args:
        napari_viewer: the viewer to dock into (injected by napari).
    """

    preview_updated = Signal()
    embedding_started = Signal()  # the embedding thread of a new embedding was started
    embedding_ready = Signal()
    committed = Signal(list)
    undone = Signal(list)
    _decoded = Signal(object)  # emitted by the decode thread, delivered on the GUI thread
    _segmented = Signal(object)  # "segment all boxes" done (decode thread -> GUI thread)

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._image_layer: Image | None = None
        self._points: Points | None = None
        self._boxes: Shapes | None = None
        self._preview: Labels | None = None
        self._committed: Labels | None = None
        self._data_versions: dict[int, int] = {}
        self._contrast_version = 0
        self._settled_contrast: dict[int, tuple[float, float] | None] = {}
        self._features: OrderedDict[_EmbedKey, Any] = OrderedDict()
        self._active_key: _EmbedKey | None = None
        self._segmenter = None
        self._active_features = None
        self._decode_thread = None  # _engine.LatestJobThread, started with the first decode
        self._decode_seq = 0
        self._decode_pending: int | None = None  # id of the latest decode request not answered yet
        self._segment_all: _SegmentAllRequest | None = None  # "segment all boxes" in the decode thread
        self._worker = None
        self._worker_cancel: threading.Event | None = None
        self._worker_progress = None  # _engine.EncoderProgress of the running embedding
        self._worker_key: _EmbedKey | None = None
        self._pending_key: _EmbedKey | None = None
        self._failed_key: _EmbedKey | None = None
        self._deferred_key: _EmbedKey | None = None  # embedding waiting for the canvas to be painted
        self._paint_watched: list[QWidget] = []  # canvases whose next paint starts it
        self._worker_started = 0.0
        self._prediction: _Prediction | None = None
        self._choice: int | None = None
        self._preview_slice: SliceIndex | None = None
        self._undo: list[_UndoEntry] = []
        self._editing_prompts = 0
        self.preview_wait_ms = PREVIEW_WAIT_MS
        self._last_note = ""
        self._closed = False

        self._build_ui()
        self._preview_timer = QTimer(self)
        self._preview_timer.setSingleShot(True)
        self._preview_timer.setInterval(0)  # next event-loop turn: a burst of layer events decodes once
        self._preview_timer.timeout.connect(self._update_preview)
        self._contrast_timer = QTimer(self)
        self._contrast_timer.setSingleShot(True)
        self._contrast_timer.setInterval(CONTRAST_DEBOUNCE_MS)
        self._contrast_timer.timeout.connect(self._on_contrast_settled)
        self._decoded.connect(self._on_decoded)
        self._segmented.connect(self._on_segmented)
        self._elapsed_timer = QTimer(self)
        self._elapsed_timer.setInterval(200)
        self._elapsed_timer.timeout.connect(self._show_elapsed)
        # the layer-list thumbnail of the preview is brought up to date once the preview has rested
        # (1-2 ms that a prompt -> preview update need not wait for)
        self._thumbnail_timer = QTimer(self)
        self._thumbnail_timer.setSingleShot(True)
        self._thumbnail_timer.setInterval(THUMBNAIL_DELAY_MS)
        self._thumbnail_timer.timeout.connect(self._update_preview_thumbnail)
        # a deferred embedding: the safety timeout is armed on the next event-loop turn (the GUI thread
        # may be busy adding layers until then), and a paint starts it on the turn after the paint
        self._paint_timeout = QTimer(self)
        self._paint_timeout.setSingleShot(True)
        self._paint_timeout.setInterval(FIRST_PAINT_TIMEOUT_MS)
        self._paint_timeout.timeout.connect(self._start_deferred)
        self._paint_timeout_arm = QTimer(self)
        self._paint_timeout_arm.setSingleShot(True)
        self._paint_timeout_arm.setInterval(0)
        self._paint_timeout_arm.timeout.connect(self._paint_timeout.start)
        self._after_paint = QTimer(self)
        self._after_paint.setSingleShot(True)
        self._after_paint.setInterval(0)
        self._after_paint.timeout.connect(self._start_deferred)

        self.viewer.layers.events.inserted.connect(self._on_layers_changed)
        self.viewer.layers.events.removed.connect(self._on_layers_changed)
        self.viewer.dims.events.current_step.connect(self._on_dims_changed)
        self._bind_keys()
        self._refresh_image_choices()

    # ------------------------------------------------------------------------------------------ UI
    def _build_ui(self) -> None:
        try:
            from rwkvsam_core import DEFAULT_MODEL, MODEL_NAMES
        except Exception as err:  # the widget still opens and says why it cannot segment
            logger.warning("rwkvsam_core unavailable: %s", err)
            DEFAULT_MODEL, MODEL_NAMES = MODEL_NAMES_FALLBACK[0], MODEL_NAMES_FALLBACK

        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)
        form.addRow("image", self.image_combo)
        self.model_combo = QComboBox()
        self.model_combo.addItems(list(MODEL_NAMES))
        self.model_combo.setCurrentText(DEFAULT_MODEL)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("model", self.model_combo)
        ckpt_row = QHBoxLayout()
        self.checkpoint_edit = QLineEdit()
        self.checkpoint_edit.setPlaceholderText("shipped weights (or a checkpoint file)")
        self.checkpoint_edit.editingFinished.connect(self._on_model_changed)
        browse = QPushButton("…")
        browse.setMaximumWidth(30)
        browse.setToolTip("choose a checkpoint: ours (.safetensors), official SAM (.pth) or the authors'")
        browse.clicked.connect(self._browse_checkpoint)
        ckpt_row.addWidget(self.checkpoint_edit)
        ckpt_row.addWidget(browse)
        form.addRow("checkpoint", ckpt_row)
        self.size_combo = QComboBox()
        self.size_combo.addItems(list(INPUT_SIZES))
        self.size_combo.setToolTip("model input side; smaller is faster and coarser")
        self.size_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("input size", self.size_combo)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda"])
        self.device_combo.currentIndexChanged.connect(self._on_model_changed)
        form.addRow("device", self.device_combo)
        layout.addLayout(form)

        self.auto_embed_check = QCheckBox("embed automatically")
        self.auto_embed_check.setChecked(True)
        self.auto_embed_check.setToolTip("compute the embedding as soon as an image or slice is shown")
        self.clip_check = QCheckBox("clip mask to box")
        self.clip_check.setChecked(True)
        self.clip_check.setToolTip(
            "an object prompted by a box lies inside its box: drop mask pixels outside it"
        )
        self.clip_check.toggled.connect(self._render_prediction)
        self.multimask_check = QCheckBox("candidates for a single click")
        self.multimask_check.setChecked(True)
        self.multimask_check.setToolTip(
            "one click is ambiguous (a part, the object, a group): decode three candidate masks "
            f"({KEYS['next_mask']} cycles them). A box or several clicks decode the single mask "
            "(SAM's rule; it scores higher on held-out boxes)"
        )
        self.multimask_check.toggled.connect(self._schedule_preview)
        self.zoom_check = QCheckBox("zoom on small boxes")
        self.zoom_check.setChecked(False)
        self.zoom_check.setToolTip(
            "boxes alone (no clicks): decode each small box in a window around it, zoomed so the box "
            "spans about 3/8 of the model's input. Sharper masks of nuclei-sized objects, less "
            "leaking into touching neighbours; worse on tiny specks. One more encoder pass per box "
            "(seconds each on a CPU)"
        )
        self.zoom_check.toggled.connect(self._schedule_preview)
        self.overwrite_check = QCheckBox("overwrite existing labels")
        self.overwrite_check.setToolTip("when off, a commit only fills unlabelled pixels")
        self.negative_check = QCheckBox(f"next point negative ({KEYS['toggle_negative']}; or Shift-click)")
        for box in (
            self.auto_embed_check,
            self.clip_check,
            self.multimask_check,
            self.zoom_check,
            self.overwrite_check,
            self.negative_check,
        ):
            layout.addWidget(box)

        grid = QGridLayout()
        self.buttons: dict[str, QPushButton] = {}
        entries = [
            ("embed", "Embed", self.embed),
            ("next_mask", "Next mask", self.next_mask),
            ("commit", "Commit", self.commit),
            ("clear", "Clear", self.clear),
            ("undo", "Undo", self.undo),
            ("segment_all_boxes", "Segment all boxes", self.segment_all_boxes),
        ]
        for i, (key, text, slot) in enumerate(entries):
            button = QPushButton(f"{text} ({KEYS[key]})")
            button.clicked.connect(lambda _checked=False, s=slot: s())
            grid.addWidget(button, i // 2, i % 2)
            self.buttons[key] = button
        layout.addLayout(grid)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(8)
        layout.addWidget(self.progress)
        self.status_label = QLabel("choose an image layer")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        self.scores_label = QLabel("")
        self.scores_label.setWordWrap(True)
        layout.addWidget(self.scores_label)
        layout.addStretch(1)

    def _browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "RWKV-SAM checkpoint", "", "Checkpoints (*.safetensors *.pth *.pt *.bin);;All files (*)"
        )
        if path:
            self.checkpoint_edit.setText(path)
            self._on_model_changed()

    def _bind_keys(self) -> None:
        actions = {
            "embed": self.embed,
            "commit": self.commit,
            "clear": self.clear,
            "undo": self.undo,
            "next_mask": self.next_mask,
            "toggle_negative": self.toggle_negative,
            "segment_all_boxes": self.segment_all_boxes,
        }
        for name, action in actions.items():
            self.viewer.bind_key(KEYS[name], lambda _viewer, a=action: a(), overwrite=True)

    def _unbind_keys(self) -> None:
        for key in KEYS.values():
            self.viewer.bind_key(key, None)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Disconnect from the viewer and stop background work (called when the widget closes)."""
        if self._closed:
            return
        self._closed = True
        self._preview_timer.stop()
        self._contrast_timer.stop()
        self._elapsed_timer.stop()
        self._thumbnail_timer.stop()
        self._pending_key = None
        self._drop_deferred()
        self._decode_pending = None
        self._segment_all = None
        if self._decode_thread is not None:
            self._decode_thread.close(timeout=0)  # a running decode ends on its own; its result is dropped
        self._cancel_worker()
        if self._image_layer is not None:
            self._disconnect_image(self._image_layer)
        for emitter, slot in (
            (self.viewer.layers.events.inserted, self._on_layers_changed),
            (self.viewer.layers.events.removed, self._on_layers_changed),
            (self.viewer.dims.events.current_step, self._on_dims_changed),
        ):
            emitter.disconnect(slot)
        self._unbind_keys()

    # ------------------------------------------------------------------------------ notifications
    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _warn(self, text: str) -> None:
        self._set_status(text)
        show_warning(f"RWKV-SAM: {text}")

    def _note(self, notes: list[str]) -> None:
        """Show prompt notes in the status line; notify once per new note."""
        text = "; ".join(notes)
        if text and text != self._last_note:
            show_info(f"RWKV-SAM: {text}")
        self._last_note = text

    # ------------------------------------------------------------------------------------- layers
    @property
    def image_layer(self) -> Image | None:
        return self._image_layer

    @property
    def points_layer(self) -> Points | None:
        return self._points

    @property
    def boxes_layer(self) -> Shapes | None:
        return self._boxes

    @property
    def preview_layer(self) -> Labels | None:
        return self._preview

    @property
    def committed_layer(self) -> Labels | None:
        return self._committed

    def _managed(self) -> tuple:
        return (self._points, self._boxes, self._preview, self._committed)

    def _refresh_image_choices(self) -> None:
        images = [layer for layer in self.viewer.layers if isinstance(layer, Image)]
        current = self._image_layer if self._image_layer in images else None
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for layer in images:
            self.image_combo.addItem(layer.name, id(layer))
            layer.events.name.connect(self._on_layer_renamed)  # connecting twice is a no-op
        self._image_choices = images
        if current is None and images:
            current = images[0]
        if current is not None:
            self.image_combo.setCurrentIndex(images.index(current))
        self.image_combo.blockSignals(False)
        if current is not self._image_layer:
            self._set_image_layer(current)

    def _on_layers_changed(self, event=None) -> None:
        for attr in ("_points", "_boxes", "_preview", "_committed"):
            layer = getattr(self, attr)
            if layer is not None and layer not in self.viewer.layers:
                setattr(self, attr, None)
                if attr == "_preview":
                    self._preview_slice = None
        self._refresh_image_choices()

    def _on_layer_renamed(self, event=None) -> None:
        for i, layer in enumerate(self._image_choices):
            if i < self.image_combo.count():
                self.image_combo.setItemText(i, layer.name)

    @_guarded
    def _on_image_changed(self, index: int) -> None:
        layer = self._image_choices[index] if 0 <= index < len(self._image_choices) else None
        self._set_image_layer(layer)

    def _set_image_layer(self, layer: Image | None) -> None:
        old = self._image_layer
        if old is layer:
            return
        if old is not None:
            self._disconnect_image(old)
        self._contrast_timer.stop()
        self._image_layer = layer
        self._prediction = None
        if layer is None:
            self._set_status("no image layer: open or add an image")
            self._request_embedding()
            return
        layer.events.data.connect(self._on_image_data)
        layer.events.contrast_limits.connect(self._on_contrast_changed)
        self._settled_contrast[id(layer)] = self._layer_contrast(layer)
        self._ensure_prompt_layers()
        self._set_status(f"image: {layer.name}")
        if self.auto_embed_check.isChecked():
            self._request_embedding(after_paint=True)
        self._schedule_preview()

    def _disconnect_image(self, layer: Image) -> None:
        layer.events.data.disconnect(self._on_image_data)
        layer.events.contrast_limits.disconnect(self._on_contrast_changed)

    def _spatial(self, layer: Image) -> tuple[int, ...]:
        data = layer.data[0] if layer.multiscale else layer.data
        return spatial_shape(data.shape, layer.rgb)

    def _ensure_prompt_layers(self) -> None:
        """Create (or re-create, when the image's dimensionality changed) the prompt and preview layers."""
        layer = self._image_layer
        if layer is None:
            return
        shape = self._spatial(layer)
        ndim = len(shape)
        geom = {"scale": layer.scale[-ndim:], "translate": layer.translate[-ndim:]}
        active = self.viewer.layers.selection.active
        if self._preview is not None and self._preview.data.shape != shape:
            self.viewer.layers.remove(self._preview)
            self._preview = None
        for attr in ("_points", "_boxes"):
            existing = getattr(self, attr)
            if existing is not None and existing.ndim != ndim:
                self.viewer.layers.remove(existing)
                setattr(self, attr, None)
        if self._preview is None:
            from napari.utils.colormaps import DirectLabelColormap

            self._preview = self.viewer.add_labels(
                np.zeros(shape, dtype=np.uint8), name=PREVIEW_NAME, opacity=0.6, **geom
            )
            # one bright colour for every previewed object: never confused with committed labels
            self._preview.colormap = DirectLabelColormap(color_dict={None: PREVIEW_COLOR, 0: "transparent"})
            self._preview_slice = None
        if self._boxes is None:
            self._boxes = self.viewer.add_shapes(
                ndim=ndim,
                name=BOXES_NAME,
                edge_color="yellow",
                face_color="transparent",
                edge_width=2,
                **geom,
            )
            self._boxes.events.data.connect(self._on_prompts_changed)
        if self._points is None:
            with warnings.catch_warnings():  # the 0/1 'label' feature is categorical on purpose
                warnings.filterwarnings("ignore", message="Feature 'label' looks like categorical")
                self._points = self.viewer.add_points(
                    np.zeros((0, ndim)),
                    ndim=ndim,
                    name=POINTS_NAME,
                    features={"label": np.zeros(0, dtype=np.int64)},
                    feature_defaults={"label": 1},
                    face_color="label",
                    face_color_cycle={1: POSITIVE_COLOR, 0: NEGATIVE_COLOR},
                    border_color="white",
                    size=max(3.0, 0.012 * max(shape[-2:])),
                    **geom,
                )
            self._points.events.data.connect(self._on_prompts_changed)
            self._points.mouse_drag_callbacks.insert(0, self._on_points_press)
            self._points.mode = "add"
        if active is not None and active in self.viewer.layers and active not in self._managed():
            self.viewer.layers.selection.active = self._points

    def _ensure_committed(self, shape: tuple[int, ...]) -> Labels:
        layer = self._committed
        if layer is not None and layer in self.viewer.layers and layer.data.shape == shape:
            return layer
        for candidate in self.viewer.layers:
            if (
                isinstance(candidate, Labels)
                and candidate.name == COMMITTED_NAME
                and candidate.data.shape == shape
            ):
                self._committed = candidate
                return candidate
        image = self._image_layer
        ndim = len(shape)
        self._committed = self.viewer.add_labels(
            np.zeros(shape, dtype=np.int32),
            name=COMMITTED_NAME,
            opacity=0.6,
            scale=image.scale[-ndim:],
            translate=image.translate[-ndim:],
        )
        # keep the prompt layers on top so clicks keep landing on them
        for layer in (self._preview, self._boxes, self._points):
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.move(self.viewer.layers.index(layer), len(self.viewer.layers))
        return self._committed

    def _on_points_press(self, layer: Points, event) -> None:
        """Before napari adds a point: choose its label from Shift / the negative toggle."""
        if layer.mode != "add":
            return
        negative = self.negative_check.isChecked() != ("Shift" in event.modifiers)
        layer.selected_data = set()
        layer.feature_defaults = {"label": 0 if negative else 1}

    # ----------------------------------------------------------------------------------- embedding
    def _model_spec(self):
        from ._engine import ModelSpec

        size_text = self.size_combo.currentText()
        return ModelSpec(
            name=self.model_combo.currentText(),
            checkpoint=self.checkpoint_edit.text().strip(),
            device=self.device_combo.currentText(),
            image_size=None if size_text == INPUT_SIZES[0] else int(size_text),
        )

    def _current_slice(self) -> SliceIndex:
        layer = self._image_layer
        shape = self._spatial(layer)
        if len(shape) == 2:
            return ()
        if self.viewer.dims.ndisplay != 2:
            raise PromptError("switch the viewer to 2-D display to segment a slice")
        order = tuple(self.viewer.dims.order)
        if tuple(sorted(order[-2:])) != tuple(sorted(range(len(order))[-2:])):
            raise PromptError("RWKV-SAM segments the last two axes: reset transposed/rolled dims first")
        point = layer.world_to_data(self.viewer.dims.point)
        return current_slice(point, shape)

    def _desired_key(self) -> _EmbedKey | None:
        layer = self._image_layer
        if layer is None or layer not in self.viewer.layers:
            return None
        if id(layer) not in self._settled_contrast:
            self._settled_contrast[id(layer)] = self._layer_contrast(layer)
        return _EmbedKey(
            self._model_spec(),
            id(layer),
            self._current_slice(),
            self._data_versions.get(id(layer), 0),
            self._contrast_version,
            self._settled_contrast[id(layer)],
        )

    @staticmethod
    def _layer_contrast(layer: Image) -> tuple[float, float] | None:
        """The limits the embedding normalises the plane with; None for uint8 RGB (used as is)."""
        data = layer.data[0] if layer.multiscale else layer.data
        if layer.rgb and data.dtype == np.uint8:
            return None  # napari shows uint8 RGB as is
        return tuple(float(v) for v in layer.contrast_limits)

    def _on_contrast_changed(self, event=None) -> None:
        """Contrast limits moved: embed again once they have rested (a dragged slider embeds once)."""
        if self._closed or self._image_layer is None:
            return
        self._contrast_timer.start()  # restarts the debounce

    @_guarded
    def _on_contrast_settled(self) -> None:
        layer = self._image_layer
        if self._closed or layer is None:
            return
        contrast = self._layer_contrast(layer)
        if contrast == self._settled_contrast.get(id(layer)):
            return
        self._settled_contrast[id(layer)] = contrast
        if self.auto_embed_check.isChecked() or self._has_prompts():
            self._request_embedding()  # cancels an embedding for older limits
        else:
            self._active_key = None
        self._schedule_preview()

    @_guarded
    def embed(self) -> None:
        """Compute (again) the embedding of the current slice with the layer's current contrast limits."""
        layer = self._image_layer
        if layer is None:
            raise PromptError("no image layer: open or add an image first")
        self._contrast_timer.stop()
        self._settled_contrast[id(layer)] = self._layer_contrast(layer)
        self._contrast_version += 1
        self._request_embedding(force=True)

    @_guarded
    def _request_embedding(self, force: bool = False, after_paint: bool = False) -> None:
        """Make sure the features of the current slice are (being) computed; cancel stale work.

        ``after_paint``: the request follows a change of what the canvas shows; a new embedding then
        starts after napari's next paint of the canvas (see ``FIRST_PAINT_TIMEOUT_MS``).
        """
        key = self._desired_key()
        if key is None:  # no image any more: its embedding is stale
            self._drop_deferred()
            self._pending_key = None
            self._cancel_worker()
            self._activate(None)
            return
        if key in self._features:
            self._drop_deferred()
            self._features.move_to_end(key)
            self._activate(key)
            return
        self._activate(None)
        if key == self._failed_key and not force:
            self._drop_deferred()
            return  # it failed already: retried only by the Embed action or a change of settings
        if self._worker is not None:
            self._drop_deferred()
            if self._worker_key == key:
                return
            self._pending_key = key
            self._cancel_worker()  # a stale job: it stops at its next encoder block, its result is ignored
            return
        if self._deferred_key == key:
            return  # already waiting for the paint
        if after_paint or self._deferred_key is not None:
            self._defer_until_painted(key)
            return
        self._start_worker(key)

    def _painted_canvases(self) -> list[QWidget]:
        """The visible OpenGL canvases of the window this widget is docked in (napari's canvas).

        Found through Qt (the main window above the dock, also when the dock floats, and its
        QOpenGLWidget children), not through napari's private attributes. Empty when the widget is
        not docked or the viewer is not shown: then no paint will come.
        """
        try:
            from qtpy.QtOpenGLWidgets import QOpenGLWidget
        except ImportError:  # qtpy without that module name
            from qtpy.QtWidgets import QOpenGLWidget

        window = self
        while window.parentWidget() is not None:
            window = window.parentWidget()
        if window is self or not window.isVisible():
            return []
        return [canvas for canvas in window.findChildren(QOpenGLWidget) if canvas.isVisible()]

    def _defer_until_painted(self, key: _EmbedKey) -> None:
        """Start the embedding of ``key`` on the event-loop turn after the canvas's next paint."""
        self._deferred_key = key
        if self._paint_watched or self._paint_timeout.isActive() or self._paint_timeout_arm.isActive():
            return  # already waiting for a paint: the latest key starts then
        canvases = self._painted_canvases()
        if not canvases:  # nothing will be painted: start now
            self._deferred_key = None
            self._start_worker(key)
            return
        for canvas in canvases:
            canvas.installEventFilter(self)
        self._paint_watched = canvases
        self._paint_timeout_arm.start()

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 (Qt name)
        if self._paint_watched and event.type() == QEvent.Type.Paint and obj in self._paint_watched:
            # the paint runs now, in this event; the embedding starts on the next event-loop turn
            self._stop_watching_paints()
            self._paint_timeout_arm.stop()
            self._paint_timeout.stop()
            self._after_paint.start()
        return super().eventFilter(obj, event)

    def _stop_watching_paints(self) -> None:
        for canvas in self._paint_watched:
            with contextlib.suppress(RuntimeError):  # the canvas was deleted meanwhile
                canvas.removeEventFilter(self)
        self._paint_watched = []

    def _drop_deferred(self) -> None:
        """Forget an embedding waiting for a paint (its image, slice or settings changed)."""
        self._deferred_key = None
        self._stop_watching_paints()
        self._paint_timeout_arm.stop()
        self._paint_timeout.stop()
        self._after_paint.stop()

    @_guarded
    def _start_deferred(self) -> None:
        key = self._deferred_key
        self._drop_deferred()
        if self._closed or key is None or self._worker is not None:
            return
        if key == self._safe_desired_key() and key not in self._features:
            self._start_worker(key)

    def _cancel_worker(self) -> None:
        if self._worker is not None:
            self._worker.quit()
        if self._worker_cancel is not None:
            self._worker_cancel.set()

    def _start_worker(self, key: _EmbedKey) -> None:
        from superqt.utils import create_worker  # napari's own wrapper adds a traceback notification

        from ._engine import EncoderProgress

        cancel = threading.Event()
        progress = EncoderProgress()
        worker = create_worker(
            _embedding_job,
            key,
            self._image_layer.data,
            cancel,
            progress,
            _start_thread=False,
            _connect={
                "returned": self._on_worker_returned,
                "errored": self._on_worker_errored,
                "warned": self._on_worker_warned,
                "finished": self._on_worker_finished,
            },
        )
        self._worker, self._worker_key, self._pending_key = worker, key, None
        self._worker_cancel = cancel
        self._worker_progress = progress
        self._worker_started = time.perf_counter()
        # a determinate bar: Qt's busy indicator (range 0..0) animates continuously, and on a small
        # machine with software OpenGL those repaints of the whole window took half the CPU the
        # embedding needed (rwkvsam_t at 1024: 4-6.5 s instead of 2 s)
        self.progress.setRange(0, PROGRESS_STEPS)
        self.progress.setValue(0)
        self._elapsed_timer.start()
        self._show_elapsed()
        worker.start()
        self.embedding_started.emit()

    def _show_elapsed(self) -> None:
        if self._worker_key is None:
            return
        where = f" slice {self._worker_key.slice_index}" if self._worker_key.slice_index else ""
        self.progress.setValue(int(PROGRESS_STEPS * self._worker_progress.fraction))
        elapsed = time.perf_counter() - self._worker_started
        self._set_status(
            f"computing embedding{where} with {self._worker_key.spec.label()}… {elapsed:.1f} s "
            "(prompts placed now are kept)"
        )

    def _on_worker_returned(self, result) -> None:
        if result is None:  # cancelled: a newer request replaced it
            return
        key, features = result
        self._failed_key = None
        self._features[key] = features
        while len(self._features) > 4:
            self._features.popitem(last=False)
        if self._closed:
            return
        if key == self._safe_desired_key():
            self._activate(key)

    def _on_worker_errored(self, err: Exception) -> None:
        key = self._worker_key
        self._failed_key = key
        logger.error("RWKV-SAM embedding failed: %s", err)
        what = str(err) if isinstance(err, EmbeddingError) else f"{type(err).__name__}: {err}"
        self._set_status(f"embedding failed: {what}")
        if key is not None and self._pending_key is None:
            show_error(f"RWKV-SAM: could not compute the embedding with {key.spec.label()}: {what}")

    def _on_worker_warned(self, args: tuple) -> None:
        """The core's warnings (e.g. 'RANDOM weights') raised in the worker become notifications."""
        message = str(args[0])
        if message.startswith("RWKV-SAM"):
            show_warning(message)
        else:
            logger.warning("during the embedding: %s", message)

    def _on_worker_finished(self) -> None:
        self._worker, self._worker_key, self._worker_cancel = None, None, None
        self._elapsed_timer.stop()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        if self._closed:
            return
        pending, self._pending_key = self._pending_key, None
        if pending is not None and pending == self._safe_desired_key() and pending not in self._features:
            self._start_worker(pending)
        elif self._active_key is not None:
            self._set_status(self._ready_text())

    def _safe_desired_key(self) -> _EmbedKey | None:
        try:
            return self._desired_key()
        except PromptError:
            return None

    def _activate(self, key: _EmbedKey | None) -> None:
        """Make the features of ``key`` the ones prompts are decoded with; refresh the preview."""
        if key == self._active_key:
            return
        self._active_key = key
        if key is None:
            return
        from ._engine import Segmenter

        if self._segmenter is None or self._segmenter.spec != key.spec:
            self._segmenter = Segmenter(key.spec)
        self._active_features = self._features[key]
        self._set_status(self._ready_text())
        self.embedding_ready.emit()
        self._update_preview()

    def _ready_text(self) -> str:
        key = self._active_key
        where = f" slice {key.slice_index}" if key and key.slice_index else ""
        return f"ready{where}: click points (Shift-click negative) or draw rectangles"

    @property
    def is_ready(self) -> bool:
        """True when the features of the current slice are loaded in the decoder."""
        return self._active_key is not None and self._active_key == self._safe_desired_key()

    @property
    def is_embedding(self) -> bool:
        """True while an embedding runs, or waits to start until the canvas has been painted."""
        return self._worker is not None or self._deferred_key is not None

    @property
    def is_embedding_started(self) -> bool:
        """True while an embedding runs in its thread (not while it waits for the canvas's paint)."""
        return self._worker is not None

    def _on_image_data(self, event=None) -> None:
        layer = self._image_layer
        if layer is None:
            return
        self._data_versions[id(layer)] = self._data_versions.get(id(layer), 0) + 1
        self._contrast_timer.stop()  # new data: embed it with the limits it has now
        self._settled_contrast[id(layer)] = self._layer_contrast(layer)
        if self.auto_embed_check.isChecked():
            self._request_embedding(after_paint=True)

    def _on_model_changed(self, *args) -> None:
        self._segmenter = None
        self._active_features = None
        self._active_key = None
        self._prediction = None
        if self.auto_embed_check.isChecked() and self._image_layer is not None:
            self._request_embedding()

    def _on_dims_changed(self, event=None) -> None:
        if self._image_layer is None:
            return
        key = self._safe_desired_key()
        if key == self._active_key:
            return
        self._active_key = None
        if self.auto_embed_check.isChecked() or self._has_prompts():
            self._request_embedding(after_paint=True)
        self._schedule_preview()

    # ------------------------------------------------------------------------------------- prompts
    def _has_prompts(self) -> bool:
        return bool(
            (self._points is not None and len(self._points.data))
            or (self._boxes is not None and len(self._boxes.data))
        )

    def _on_prompts_changed(self, event=None) -> None:
        """A prompt was added, moved or removed: decode at once.

        The decode is submitted from inside the layer's event, before napari redraws the canvas, so
        the decoder does not wait for that redraw. Edits made by the widget itself (clear, undo) are
        decoded once, after the last of them.
        """
        action = getattr(event, "action", None)
        if action is not None and str(action).endswith("ing"):  # adding/removing/changing: not yet done
            return
        self._choice = None
        if self._editing_prompts:
            self._schedule_preview()
        else:
            self._preview_timer.stop()
            self._update_preview()

    @contextlib.contextmanager
    def _widget_edits(self):
        """Prompt edits made by the widget: one preview update afterwards instead of one per edit."""
        self._editing_prompts += 1
        try:
            yield
        finally:
            self._editing_prompts -= 1

    def _schedule_preview(self, *args) -> None:
        if not self._closed:
            self._preview_timer.start()

    def toggle_negative(self) -> None:
        """Toggle whether the next clicked point is negative."""
        self.negative_check.setChecked(not self.negative_check.isChecked())

    def _gather(self, slice_index: SliceIndex, hw: tuple[int, int], boxes_only: bool = False) -> Prompts:
        prompts = Prompts()
        if self._points is not None and not boxes_only and len(self._points.data):
            labels = (
                self._points.features["label"].to_numpy()
                if "label" in self._points.features
                else np.ones(len(self._points.data), dtype=np.int64)
            )
            coords, labels, notes = points_to_prompts(self._points.data, labels, slice_index, hw)
            prompts.point_coords, prompts.point_labels = coords, labels
            prompts.messages += notes
        if self._boxes is not None and len(self._boxes.data):
            boxes, notes = shapes_to_boxes(self._boxes.data, self._boxes.shape_type, slice_index, hw)
            prompts.boxes = boxes
            prompts.messages += notes
        return prompts

    def _multimask_for(self, batch: PromptBatch) -> bool:
        """Whether ``batch`` decodes three candidates: one object given by one click, option on."""
        from rwkvsam_core.predictor import wants_candidates

        labels = batch.point_labels
        return (
            self.multimask_check.isChecked()
            and labels is not None
            and len(labels) == 1
            and wants_candidates(labels[0], batch.boxes is not None)
        )

    def _zoom_for(self, batch: PromptBatch) -> bool:
        """Whether ``batch`` is decoded in zoomed windows: boxes alone, option on."""
        from ._engine import zoomable

        return self.zoom_check.isChecked() and zoomable(batch)

    def _decode_fn(self, key: _EmbedKey, batch: PromptBatch, multimask: bool):
        """The decode for ``batch`` as a function of no arguments, to run in the decode thread: one
        decoder pass on the active features, or, with zoom, one encoder pass per small box on the
        key's plane (read here, on the GUI thread)."""
        segmenter, features = self._segmenter, self._active_features
        if not self._zoom_for(batch):
            return lambda: segmenter.predict(features, batch, multimask=multimask)
        plane = np.array(extract_slice(self._image_layer.data, key.slice_index), copy=True)
        return lambda: segmenter.predict_zoomed(features, plane, key.contrast, batch)

    def _current_batch(self, boxes_only: bool = False) -> tuple[_EmbedKey, PromptBatch, tuple]:
        """The active key, the prompts of the current slice grouped into objects, and their signature."""
        key = self._active_key
        hw = self._spatial(self._image_layer)[-2:]
        prompts = self._gather(key.slice_index, hw, boxes_only=boxes_only)
        batch = PromptBatch(None, None, prompts.boxes) if boxes_only else group_prompts(prompts)
        self._note(prompts.messages + batch.messages)
        multimask = self._multimask_for(batch)
        signature = (key, multimask, self._zoom_for(batch)) + tuple(
            None if a is None else (a.shape, a.tobytes())
            for a in (batch.point_coords, batch.point_labels, batch.boxes)
        )
        return key, batch, signature

    @_guarded
    def _update_preview(self) -> None:
        """Decode the prompts of the current slice in the decode thread; draw the preview when it returns.

        Only the latest prompts count: a request still waiting when newer prompts arrive is dropped,
        and an answer to an older request is not drawn.
        """
        if self._image_layer is None or self._closed:
            return
        key = self._desired_key()
        if key != self._active_key or self._segmenter is None:
            if self._has_prompts() and not self.is_embedding and key is not None:
                self._request_embedding()
            return
        key, batch, signature = self._current_batch()
        if batch.num_objects == 0:
            self._decode_pending = None
            self._prediction = None
            self._render_prediction()
            return
        if self._prediction is not None and self._prediction.signature == signature:
            self._decode_pending = None
            self._render_prediction()
            return
        self._submit_decode(key, batch, signature)

    def _decoder(self):
        """The decode thread (``_engine.LatestJobThread``), started on first use."""
        if self._decode_thread is None:
            from ._engine import LatestJobThread

            self._decode_thread = LatestJobThread()
        return self._decode_thread

    def _run_in_decoder(self, fn):
        """Run ``fn`` in the decode thread and wait for its result (its exception is raised here).

        For torch work an action needs at once (a commit whose preview lags behind, another candidate
        mask): done on the GUI thread, it would give that thread an OpenMP team of its own, and every
        team beyond the first slows every later decode (see ``_engine``).
        """
        done = threading.Event()
        outcome: list = []

        def job() -> None:
            try:
                outcome.append((True, fn()))
            except Exception as err:  # raised again on the GUI thread
                outcome.append((False, err))
            finally:
                done.set()

        self._decoder().submit(job, replaceable=False)
        done.wait()
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    def _submit_decode(self, key: _EmbedKey, batch: PromptBatch, signature: tuple) -> None:
        self._decode_seq += 1
        request = self._decode_seq
        self._decode_pending = request
        decode = self._decode_fn(key, batch, self._multimask_for(batch))
        deliver = self._decoded.emit
        done = threading.Event()
        answer: list[tuple] = []

        def job() -> None:  # runs in the decode thread
            try:
                out = decode()
            except Exception as err:  # handed to the GUI thread, shown there
                out = err
            answer.append((request, key, batch, signature, out))
            done.set()
            with contextlib.suppress(RuntimeError):  # the widget was deleted meanwhile
                deliver(answer[0])

        self._decoder().submit(job)
        # a decode queued behind "segment all boxes" would only hold the GUI: no wait then
        wait = self.preview_wait_ms > 0 and self._segment_all is None
        if wait and done.wait(self.preview_wait_ms / 1000):
            self._on_decoded(answer[0])  # the queued copy of this answer is then ignored

    def _on_decoded(self, answer: tuple) -> None:
        request, key, batch, signature, out = answer
        if self._closed or request != self._decode_pending:
            return  # an answer to prompts that changed since: a newer request is on its way
        self._decode_pending = None
        if key != self._active_key:
            return
        if isinstance(out, Exception):
            logger.error("RWKV-SAM decoding failed: %s", out)
            self._set_status(f"prediction failed: {type(out).__name__}: {out}")
            show_error(f"RWKV-SAM: prediction failed: {type(out).__name__}: {out}")
            return
        masks, scores = out
        self._prediction = _Prediction(key.slice_index, batch, masks, scores, signature)
        self._render_prediction()

    @property
    def is_decoding(self) -> bool:
        """True while the preview waits for a decode of the current prompts."""
        return self._decode_pending is not None

    def _chosen_masks(self) -> np.ndarray | None:
        """``(N, H, W)`` masks of the current prediction after the candidate choice and box clipping."""
        pred = self._prediction
        if pred is None:
            return None
        return self._final_masks(
            pred.masks, pred.scores, pred.batch.boxes, self._choice, self.clip_check.isChecked()
        )

    def _final_masks(
        self, candidates, scores: np.ndarray, boxes: np.ndarray | None, choice: int | None, clip: bool
    ):
        """The chosen candidates of ``candidates``, clipped to ``boxes`` if ``clip``: ``(N, H, W)``.

        Candidates not upsampled yet (another one than the best) are upsampled in the decode thread.
        """
        from ._engine import clip_masks_to_boxes

        chosen = choose_candidates(scores, choice)
        if candidates.missing(chosen) and not self._decoder().in_thread():
            self._run_in_decoder(lambda: candidates.get(chosen))
        masks = candidates.get(chosen)
        return clip_masks_to_boxes(masks, boxes) if clip else masks

    @_guarded
    def _render_prediction(self, *args) -> None:
        """Draw the current prediction into the preview layer.

        Only the rectangle of pixels that changed is written, and napari redraws the layer only when
        a plane on screen changed (a stack's other slices are sliced again when shown); the layer-list
        thumbnail follows once the preview has rested.
        """
        preview = self._preview
        if preview is None or preview not in self.viewer.layers:
            self._ensure_prompt_layers()
            preview = self._preview
            if preview is None:
                return
        pred = self._prediction
        changed: list[SliceIndex] = []
        if self._preview_slice is not None and (pred is None or self._preview_slice != pred.slice_index):
            if write_changed_region(preview.data[self._preview_slice], None) is not None:
                changed.append(self._preview_slice)
            self._preview_slice = None
        if pred is not None:
            labels = masks_to_label_image(self._chosen_masks(), preview.data.dtype)
            if write_changed_region(preview.data[pred.slice_index], labels) is not None:
                changed.append(pred.slice_index)
            self._preview_slice = pred.slice_index
            self._show_scores()
        else:
            self.scores_label.setText("")
        if changed:
            try:
                shown = self._current_slice()
            except PromptError:  # e.g. a 3-D view: whatever is shown, redraw it
                shown = None
            if shown is None or shown in changed:
                # same shape: no extent or dims update; the thumbnail waits (_thumbnail_timer)
                preview.refresh(extent=False, highlight=False, thumbnail=False)
            self._thumbnail_timer.start()
        self.preview_updated.emit()

    def _update_preview_thumbnail(self) -> None:
        preview = self._preview
        if preview is not None and preview in self.viewer.layers:
            preview.refresh(data_displayed=False, extent=False, highlight=False)

    def _show_scores(self) -> None:
        pred = self._prediction
        chosen = choose_candidates(pred.scores, self._choice)
        n, k = pred.scores.shape
        if n == 1:
            parts = [f"[{s:.2f}]" if j == chosen[0] else f"{s:.2f}" for j, s in enumerate(pred.scores[0])]
            text = "mask scores: " + "  ".join(parts)
        else:
            best = ", ".join(f"{pred.scores[i, chosen[i]]:.2f}" for i in range(n))
            text = f"{n} objects, candidate {int(chosen[0]) + 1}/{k}: {best}"
        if k > 1:
            text += f"  ({KEYS['next_mask']}: next mask)"
        self.scores_label.setText(text)

    # ------------------------------------------------------------------------------------- actions
    @_guarded
    def next_mask(self) -> None:
        """Show the next candidate mask (multimask output)."""
        pred = self._prediction
        if pred is None:
            raise PromptError("no preview yet: click a point or draw a box first")
        k = pred.scores.shape[1]
        if k < 2:
            raise PromptError(
                "one mask only: candidates come for a single click without a box "
                f"(and with '{self.multimask_check.text()}' on, on a model that has them)"
            )
        if self._choice is None:
            self._choice = int(np.argmax(pred.scores[0]))
        self._choice = (self._choice + 1) % k
        self._render_prediction()

    def _require_current_prediction(self) -> _Prediction:
        """The prediction for the prompts as they are now (decoded here if the preview lags behind)."""
        self._preview_timer.stop()
        if self._image_layer is None:
            raise PromptError("no image layer: open or add an image first")
        key = self._safe_desired_key()
        if key is None or key != self._active_key or self._segmenter is None:
            raise PromptError("the embedding is still being computed: commit again when it is ready")
        key, batch, signature = self._current_batch()
        if batch.num_objects == 0:
            raise PromptError("nothing to commit: click points or draw a box on this slice first")
        pred = self._prediction
        if pred is None or pred.signature != signature:
            segmenter, features = self._segmenter, self._active_features
            multimask = self._multimask_for(batch)
            masks, scores = self._run_in_decoder(
                lambda: segmenter.predict(features, batch, multimask=multimask)
            )
            self._prediction = pred = _Prediction(key.slice_index, batch, masks, scores, signature)
            self._decode_pending = None  # this answer is newer than any decode still in flight
            self._render_prediction()
        return pred

    @_guarded
    def commit(self) -> list[int]:
        """Write the preview into the committed Labels layer (one new id per object), clear the prompts.

        Undo brings the prompts and this preview back.

        Returns:
            The label ids given to the committed objects.
        """
        pred = self._require_current_prediction()
        return self._commit_masks(pred.slice_index, self._chosen_masks(), clear_points=True, prediction=pred)

    def _commit_masks(
        self,
        slice_index: SliceIndex,
        masks: np.ndarray,
        clear_points: bool,
        prediction: _Prediction | None = None,
        shape_indices: list[int] | None = None,
    ) -> list[int]:
        """Commit ``masks`` on ``slice_index``; then remove the slice's points (``clear_points``) and its
        shapes, or only the shapes ``shape_indices`` of the boxes layer when given."""
        shape = self._spatial(self._image_layer)
        layer = self._ensure_committed(shape)
        record = commit_masks(layer.data, slice_index, masks, overwrite=self.overwrite_check.isChecked())
        if not record.label_ids:
            raise PromptError("the mask is empty or covers only existing labels: nothing committed")
        layer.refresh()
        points, labels, boxes, box_types = self._slice_prompts(slice_index, points=clear_points)
        if shape_indices is not None:
            boxes = [np.array(self._boxes.data[i], copy=True) for i in shape_indices]
            box_types = [self._boxes.shape_type[i] for i in shape_indices]
        self._undo.append(
            _UndoEntry(
                layer,
                record,
                id(self._image_layer),
                points,
                labels,
                boxes,
                box_types,
                self._active_key if prediction is not None else None,
                prediction,
                self._choice if prediction is not None else None,
            )
        )
        if shape_indices is None:
            self._clear_slice(slice_index, points=clear_points, boxes=True)
        else:
            with self._widget_edits():
                self._boxes.selected_data = set(shape_indices)
                self._boxes.remove_selected()
            self._prediction = None
            self._choice = None
            self._decode_pending = None
            self._render_prediction()
            self._schedule_preview()  # the shapes left (drawn meanwhile) are previewed again
        ids = ", ".join(str(i) for i in record.label_ids)
        self._set_status(f"committed label {ids} ({KEYS['undo']} undoes)")
        self.committed.emit(list(record.label_ids))
        return list(record.label_ids)

    @_guarded
    def segment_all_boxes(self) -> None:
        """Every rectangle of the current slice becomes a committed label.

        All boxes are decoded in one batched pass in the decode thread; the viewer stays usable
        meanwhile and the labels are committed when it is done (signal ``committed``). The boxes that
        were segmented are then removed; if one of them was moved or removed meanwhile, or the image,
        slice or embedding changed, nothing is committed.
        """
        key = self._safe_desired_key()
        if self._image_layer is None:
            raise PromptError("no image layer: open or add an image first")
        if key is None or key != self._active_key or self._segmenter is None:
            raise PromptError("the embedding is still being computed: try again when it is ready")
        if self._segment_all is not None:
            raise PromptError("already segmenting all boxes: wait until it is done")
        key, batch, _ = self._current_batch(boxes_only=True)
        if batch.num_objects == 0:
            raise PromptError("no rectangles on this slice: draw boxes in the 'RWKV-SAM boxes' layer")
        _, on_boxes = self._on_slice_masks(key.slice_index)
        shapes = [
            (i, self._boxes.shape_type[i], np.array(self._boxes.data[i], copy=True))
            for i, on in enumerate(on_boxes)
            if on
        ]
        self._decode_seq += 1
        request = _SegmentAllRequest(self._decode_seq, key, id(self._image_layer), shapes, len(batch.boxes))
        decode = self._decode_fn(key, batch, self._multimask_for(batch))
        clip = self.clip_check.isChecked()
        final_masks = self._final_masks
        deliver = self._segmented.emit

        def job() -> None:  # runs in the decode thread
            try:
                masks, scores = decode()
                out = final_masks(masks, scores, batch.boxes, None, clip)
            except Exception as err:  # handed to the GUI thread, shown there
                out = err
            with contextlib.suppress(RuntimeError):  # the widget was deleted meanwhile
                deliver((request, out))

        self._segment_all = request
        self.buttons["segment_all_boxes"].setEnabled(False)
        # the status line says it; the busy progress bar is not used here: its animation repaints the
        # window continuously, which in software OpenGL took a third of the CPU the decode needed
        self._set_status(f"segmenting {request.num_boxes} box(es)…")
        self._decoder().submit(job, replaceable=False)

    @property
    def is_segmenting(self) -> bool:
        """True while "segment all boxes" runs (its labels are not committed yet)."""
        return self._segment_all is not None

    @_guarded
    def _on_segmented(self, answer: tuple) -> None:
        request, out = answer
        if self._closed or self._segment_all is None or request.seq != self._segment_all.seq:
            return
        self._segment_all = None
        self.buttons["segment_all_boxes"].setEnabled(True)
        if isinstance(out, Exception):
            logger.error("RWKV-SAM: segmenting all boxes failed: %s", out)
            self._set_status(f"segment all boxes failed: {type(out).__name__}: {out}")
            show_error(f"RWKV-SAM: segment all boxes failed: {type(out).__name__}: {out}")
            return
        layer = self._image_layer
        if layer is None or id(layer) != request.image_id or self._safe_desired_key() != request.key:
            raise PromptError(
                "the image, slice or model changed while the boxes were segmented: nothing committed"
            )
        indices = self._find_shapes(request.shapes)
        if indices is None:
            raise PromptError(
                f"boxes were moved or removed while they were segmented: nothing committed "
                f"({KEYS['segment_all_boxes']} segments them again)"
            )
        self._commit_masks(request.key.slice_index, out, clear_points=False, shape_indices=indices)

    def _find_shapes(self, shapes: list[tuple[int, str, np.ndarray]]) -> list[int] | None:
        """Current indices of ``shapes`` ((index, type, vertices) when recorded) in the boxes layer,
        or None if one of them is gone or changed."""
        layer = self._boxes
        if layer is None or layer not in self.viewer.layers:
            return None
        data, types = layer.data, layer.shape_type
        found: list[int] = []
        for old_index, kind, verts in shapes:
            order = [old_index, *range(len(data))]  # where it was first: shapes are rarely reordered
            match = next(
                (
                    i
                    for i in order
                    if i < len(data)
                    and i not in found
                    and types[i] == kind
                    and np.array_equal(data[i], verts)
                ),
                None,
            )
            if match is None:
                return None
            found.append(match)
        return found

    def _on_slice_masks(self, slice_index: SliceIndex) -> tuple[np.ndarray, list[bool]]:
        """Which points (bool array) and which shapes (list) lie on ``slice_index``."""
        lead = len(slice_index)
        on_points = np.zeros(0, dtype=bool)
        if self._points is not None:
            data = self._points.data
            on_points = (
                np.all(np.rint(data[:, :lead]) == np.asarray(slice_index), axis=1)
                if lead
                else np.ones(len(data), bool)
            )
        on_boxes = []
        if self._boxes is not None:
            on_boxes = [
                (not lead) or bool(np.all(np.rint(v[0, :lead]) == np.asarray(slice_index)))
                for v in self._boxes.data
            ]
        return on_points, on_boxes

    def _slice_prompts(
        self, slice_index: SliceIndex, points: bool = True
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[str]]:
        """Copies of the prompts on ``slice_index``: points, their labels, shape vertices, shape types."""
        on_points, on_boxes = self._on_slice_masks(slice_index)
        ndim = len(self._spatial(self._image_layer))
        coords, labels = np.zeros((0, ndim)), np.zeros(0, dtype=np.int64)
        if points and on_points.any():
            coords = np.array(self._points.data[on_points], copy=True)
            if "label" in self._points.features:
                labels = self._points.features["label"].to_numpy()[on_points].astype(np.int64)
            else:
                labels = np.ones(len(coords), dtype=np.int64)
        boxes: list[np.ndarray] = []
        types: list[str] = []
        if self._boxes is not None:
            for verts, kind, on in zip(self._boxes.data, self._boxes.shape_type, on_boxes, strict=True):
                if on:
                    boxes.append(np.array(verts, copy=True))
                    types.append(kind)
        return coords, labels, boxes, types

    def _remove_slice_prompts(self, slice_index: SliceIndex, points: bool = True, boxes: bool = True) -> None:
        on_points, on_boxes = self._on_slice_masks(slice_index)
        with self._widget_edits():
            if points and on_points.any():
                self._points.selected_data = set(np.flatnonzero(on_points).tolist())
                self._points.remove_selected()
            if boxes and any(on_boxes):
                self._boxes.selected_data = {i for i, flag in enumerate(on_boxes) if flag}
                self._boxes.remove_selected()

    def _clear_slice(self, slice_index: SliceIndex, points: bool = True, boxes: bool = True) -> None:
        """Remove the prompts lying on ``slice_index`` (all of them for a 2-D image) and the preview."""
        self._remove_slice_prompts(slice_index, points=points, boxes=boxes)
        self._prediction = None
        self._choice = None
        self._decode_pending = None  # a decode still in flight is for the prompts just removed
        self._render_prediction()

    @_guarded
    def clear(self) -> None:
        """Remove the prompts and the preview of the current slice."""
        if self._image_layer is None:
            raise PromptError("no image layer: open or add an image first")
        self._ensure_prompt_layers()  # brings back prompt layers the user deleted
        self._clear_slice(self._current_slice())
        self._set_status("prompts cleared")

    @_guarded
    def undo(self) -> None:
        """Revert the last commit and bring back the prompts (and the preview) that produced it.

        The prompts of that slice placed since the commit are replaced by the restored ones, so the
        object can be corrected and committed again.
        """
        while self._undo:
            entry = self._undo.pop()
            if entry.layer not in self.viewer.layers:
                continue
            undo_commit(entry.layer.data, entry.record)
            entry.layer.refresh()
            ids = ", ".join(str(i) for i in entry.record.label_ids)
            if self._restore_prompts(entry):
                self._set_status(f"undid label {ids}: its prompts are back, correct them and commit again")
            else:
                self._set_status(f"undid label {ids} (its prompts belong to another image: not restored)")
            self.undone.emit(list(entry.record.label_ids))
            return
        raise PromptError("nothing to undo")

    def _restore_prompts(self, entry: _UndoEntry) -> bool:
        """Put the prompts of ``entry`` back on their slice, and its preview if still valid."""
        layer = self._image_layer
        if layer is None or id(layer) != entry.image_id:
            return False
        self._ensure_prompt_layers()  # re-creates prompt layers the user deleted
        ndim = len(self._spatial(layer))
        slice_index = entry.record.slice_index
        self._remove_slice_prompts(slice_index, points=len(entry.points) > 0, boxes=True)
        with self._widget_edits():
            if entry.boxes:
                self._boxes.selected_data = set()
                self._boxes.add(entry.boxes, shape_type=entry.box_types)
                self._boxes.selected_data = set()
            if len(entry.points) and entry.points.shape[1] == ndim:
                points = self._points
                defaults = points.feature_defaults.iloc[0].to_dict() if len(points.feature_defaults) else None
                for coords, label in zip(entry.points, entry.point_labels, strict=True):
                    points.selected_data = set()  # feature_defaults would relabel selected points
                    points.feature_defaults = {"label": int(label)}
                    points.add(coords)
                points.selected_data = set()
                if defaults is not None:
                    points.feature_defaults = defaults
        # the restored prompts give the same signature: the preview comes back without a decode
        if entry.prediction is not None and entry.key == self._active_key:
            self._prediction = entry.prediction
            self._choice = entry.choice
            self._decode_pending = None
            self._render_prediction()
        self._schedule_preview()
        return True


BACKGROUND_NICE = 5


class EmbeddingError(Exception):
    """An embedding failed with a RuntimeError (superqt would take one for a deleted worker)."""


def _embedding_job(key: _EmbedKey, data, cancel: threading.Event, progress=None):
    """Worker-thread job (generator: each ``yield`` is a point where a stale job can be cancelled;
    ``cancel`` also stops the encoder itself between blocks; the encoder reports to ``progress``, an
    ``_engine.EncoderProgress``). Returns ``(key, features)``, or None when cancelled.

    The model is loaded and the image encoded in a thread started for this embedding, which ends with
    it: torch's OpenMP runtime keeps a team of worker threads for every thread that ran a parallel op,
    and when it manages more threads than there are CPUs it stops spin-waiting between ops, which
    made every later preview decode a third slower on a 2-core machine (see ``_engine``). The pool
    thread running this generator only waits for it.

    On Linux that thread runs at a lower CPU priority (nice +5) so the GUI thread and the decode thread
    win the CPU whenever they have work; its OpenMP threads inherit it, and they all end with it. Only
    the embedding is niced: the preview decodes run in their own thread at normal priority.
    """
    from ._engine import EmbeddingCancelled, compute_features, load_model, tracking_progress

    outcome: list = []

    def embed() -> None:
        restore = _lower_thread_priority()
        try:
            if cancel.is_set():  # stale before it started: not even the model is loaded
                raise EmbeddingCancelled("stale embedding stopped")
            load_model(key.spec)
            plane = extract_slice(data, key.slice_index)
            with tracking_progress(progress):
                outcome.append(compute_features(key.spec, plane, key.contrast, cancelled=cancel.is_set))
        except BaseException as err:  # handed to the worker below
            outcome.append(err)
        finally:
            restore()

    thread = threading.Thread(target=embed, name="rwkvsam-embed", daemon=True)
    thread.start()
    while thread.is_alive():
        yield  # superqt's quit() stops here; ``cancel`` stops the encoder
        thread.join(0.05)
    result = outcome[0]
    if isinstance(result, EmbeddingCancelled):
        return None
    if isinstance(result, RuntimeError):
        # superqt reports a RuntimeError as "worker deleted" and stays silent
        raise EmbeddingError(f"{type(result).__name__}: {result}") from result
    if isinstance(result, BaseException):
        raise result
    return key, result


def _lower_thread_priority():
    """Renice the calling thread; returns a function that tries to restore the old priority."""
    if not sys.platform.startswith("linux"):
        return lambda: None
    tid = threading.get_native_id()
    try:
        old = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(old, BACKGROUND_NICE))
    except OSError:
        return lambda: None

    def restore() -> None:
        with contextlib.suppress(OSError):  # raising priority again needs privileges
            os.setpriority(os.PRIO_PROCESS, tid, old)

    return restore
