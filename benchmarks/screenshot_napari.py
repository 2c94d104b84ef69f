"""Screenshot of the whole napari window with the RWKV-SAM widget docked (writes docs/napari_screenshot.png).

The sample photograph is opened from the plugin's manifest, one object is committed as a label and a
second one is previewed (a box plus a positive point). Starts Xvfb when there is no DISPLAY. The model
is the default rwkvsam_t with its shipped starter weights (random, seeded, where none are installed).

Usage: python benchmarks/screenshot_napari.py [--size 1024] [--out docs/napari_screenshot.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_napari import ROOT, register_plugin, start_display, wait_for  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="model input side")
    parser.add_argument("--out", default=str(ROOT / "docs" / "napari_screenshot.png"))
    parser.add_argument("--seed", type=int, default=0, help="torch seed of the random-weight model")
    args = parser.parse_args()

    start_display()
    os.environ.setdefault("RWKVSAM_CACHE_DIR", tempfile.mkdtemp(prefix="rwkvsam-shot-cache-"))
    warnings.filterwarnings("ignore", message="RWKV-SAM: no weights")

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    torch.manual_seed(args.seed)  # only matters where no weights are installed

    register_plugin()
    viewer = napari.Viewer(show=True, title="RWKV-SAM in napari")
    viewer.window._qt_window.resize(1500, 950)
    app = QApplication.instance()
    _, widget = viewer.window.add_plugin_dock_widget("rwkvsam", "RWKV-SAM")
    widget.size_combo.setCurrentText(str(args.size))
    widget.device_combo.setCurrentText("cpu")
    viewer.open_sample("rwkvsam", "coffee")
    wait_for(app, lambda: widget.is_ready, 1800)

    # a committed object: the cup, boxed (the README's example box)
    updated = []
    widget.preview_updated.connect(lambda: updated.append(1))
    widget.boxes_layer.add_rectangles(np.array([[15.0, 170.0], [310.0, 410.0]]))
    wait_for(app, lambda: bool(updated), 60)
    widget.commit()
    # a previewed object: the spoon's bowl, a box plus a positive point
    updated.clear()
    widget.boxes_layer.add_rectangles(np.array([[225.0, 320.0], [330.0, 410.0]]))
    widget.points_layer.feature_defaults = {"label": 1}
    widget.points_layer.add([285.0, 365.0])
    widget.points_layer.selected_data = set()
    wait_for(app, lambda: bool(updated), 60)
    viewer.layers.selection.active = widget.points_layer
    viewer.reset_view()

    end = time.perf_counter() + 1.0  # let the docks and the canvas settle
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.02)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(path=str(out), canvas_only=False)
    print(f"wrote {out}")
    widget.shutdown()
    viewer.close()


if __name__ == "__main__":
    main()
