"""Fixtures of the napari plugin tests: a virtual X display, the plugin manifest, a fast model.

napari needs OpenGL, so ``QT_QPA_PLATFORM=offscreen`` does not work: without a DISPLAY these tests
start Xvfb themselves (installed by ``scripts/ci_deps_napari.sh``) and use Qt's normal xcb platform.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

MANIFEST = Path(__file__).resolve().parents[2] / "napari_plugin" / "napari.yaml"


def _missing_gui_dependency(reason: str):
    # In CI a missing dependency is a failure (the deps script should have installed it), not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (scripts/ci_deps_napari.sh installs it)")
    pytest.skip(reason)


def _die_with_parent() -> None:
    """In the Xvfb child: ask Linux to send SIGTERM when the test process exits (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


@pytest.fixture(scope="session")
def _display():
    """Start Xvfb when there is no display; yields the DISPLAY value."""
    if os.environ.get("QT_QPA_PLATFORM") == "offscreen":
        os.environ.pop("QT_QPA_PLATFORM")  # napari's OpenGL canvas does not run offscreen
    if os.environ.get("DISPLAY"):
        yield os.environ["DISPLAY"]
        return
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        _missing_gui_dependency("Xvfb is not installed and no DISPLAY is set")
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [xvfb, "-displayfd", str(write_fd), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        proc.kill()
        pytest.fail("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    # The QApplication outlives the session fixtures and Qt exits the process when its X server
    # disappears, so Xvfb is not stopped here: it gets SIGTERM when this process has exited.
    yield os.environ["DISPLAY"]
    if not sys.platform.startswith("linux"):
        import atexit

        atexit.register(proc.terminate)


@pytest.fixture
def gui(_display, tmp_path_factory, monkeypatch):
    """Everything a GUI test needs: a display, napari + pytest-qt importable, a private embedding cache."""
    for module in ("napari", "pytestqt", "qtpy"):
        try:
            __import__(module)
        except ImportError:
            _missing_gui_dependency(f"{module} is not installed")
    monkeypatch.setenv("RWKVSAM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rwkvsam-embeddings"))
    from napari_plugin import _engine

    monkeypatch.setattr(_engine, "_CACHE", None)  # a fresh cache object bound to the directory above
    return _display


@pytest.fixture
def plugin_manifest(gui):
    """Register the plugin's manifest with npe2 (as the installed entry point would)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    manifest = PluginManifest.from_file(MANIFEST)
    if manifest.name not in pm:
        pm.register(manifest)
    return manifest
