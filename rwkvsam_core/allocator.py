"""glibc allocator settings for fast CPU inference.

On Linux, glibc returns every freed block above its mmap threshold (128 KiB by default, adapted
upward only slowly) to the kernel, and the next allocation of that size page-faults fresh zeroed
memory in again. The encoder and decoder allocate and free tensors of megabytes per layer, so on
virtual machines, where page faults are expensive, most of the time goes to the kernel rather than
to arithmetic. Measured on a 2-core AMD EPYC VM (2026-11-27, rwkvsam_t at 1024): image embedding
8-12 s and one decode 1000 ms with the defaults, 1.3-1.6 s and 90 ms with the settings below.

``tune_allocator()`` raises the mmap threshold to 32 MiB and the trim threshold to 1 GiB, so freed
blocks are reused instead of being unmapped. The cost is resident memory: up to about 1 GiB of freed
memory stays with the process. ``build_model`` calls it once per process (never at import time);
set ``RWKVSAM_TUNE_ALLOCATOR=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_TOP_PAD = -2
THREAD_HEAP_PAD = 128 << 20
_done = False
_heaps_kept = False


def _mallopt():
    """glibc's ``mallopt`` as a ctypes function, or None off Linux/glibc or with
    ``RWKVSAM_TUNE_ALLOCATOR=0``."""
    if os.environ.get("RWKVSAM_TUNE_ALLOCATOR", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Apply the glibc settings once per process; returns True if they are in effect.

    Does nothing (returns False) off Linux/glibc or when ``RWKVSAM_TUNE_ALLOCATOR=0``.
    """
    global _done
    if _done:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    _done = ok
    logger.debug("glibc allocator tuned: %s", ok)
    return ok


def keep_thread_heaps(top_pad: int = THREAD_HEAP_PAD) -> bool:
    """Set glibc's ``M_TOP_PAD`` once per process so freed heaps of thread arenas stay mapped
    (see ``napari_plugin._engine.keep_thread_heaps`` for why a decode thread needs it).

    Returns True if the setting is in effect; off like :func:`tune_allocator`.
    """
    global _heaps_kept
    if _heaps_kept:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _heaps_kept = mallopt(_M_TOP_PAD, top_pad) == 1
    return _heaps_kept
