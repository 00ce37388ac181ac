"""Giving freed memory back to the system between components (low-memory mode).

ONNX Runtime with its CPU arena off allocates through the C library's malloc. glibc keeps what a session freed in
its heaps instead of returning it (large blocks come from the heap, not from fresh mappings, once blocks of that
size have been freed: its mmap threshold adapts upwards), so a released component's memory stays in the process's
resident set, and so do the temporaries of loading a session. `malloc_trim` returns it: on the int8 PixArt-Σ-XL
transformer at 1024², 0.36 GB after creating its session and 0.66 GB after releasing it (docs/memory.md).
"""

from __future__ import annotations

import ctypes
import sys


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc `malloc_trim(0)`); nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:  # the process's own symbols, libc's among them (no library search: this runs once per component)
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # a libc without malloc_trim (musl)
        return
    trim(0)
