"""Run the fine-tuning module as a child that ends when the worker that started it dies.

    python -m labelstudio_backend.train_child PARENT_PID MODULE [ARGS...]

runs ``python -m MODULE ARGS...`` in this process (``runpy``, same exit status). A gunicorn worker
that is killed while it trains must not leave its training child running: the next worker would
start another run next to it, and nobody would swap in the orphan's result. So the child asks the
kernel for SIGTERM when its parent dies (Linux ``PR_SET_PDEATHSIG``) and, everywhere, a watchdog
thread checks once a second that its parent is still ``PARENT_PID``. SIGTERM ends the engine between
two writes of its state; the engine writes checkpoints atomically, so nothing half-written is left.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def _watch_parent(parent: int, interval: float = 1.0) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            print(f"train_child: parent {parent} is gone: stopping", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
            os._exit(128 + signal.SIGTERM)


def die_with_parent(parent: int) -> None:
    """Arrange for this process to end when ``parent`` (the worker that started it) dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):  # best effort: the watchdog below covers every platform
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:  # died before the request above took effect
        print(f"train_child: parent {parent} is gone before the start", file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog", daemon=True).start()


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: python -m labelstudio_backend.train_child PARENT_PID MODULE [ARGS...]")
    die_with_parent(int(argv[0]))
    sys.argv = [argv[1], *argv[2:]]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
