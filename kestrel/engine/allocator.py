"""Keep freed memory in the process heap instead of returning it to the OS.

Each step allocates multi-MB temporaries (gathered K/V, activations). glibc serves blocks over its
mmap threshold with fresh mappings, so every step pays page faults to zero them again; on CPU that
more than doubled decode attention time. Raising the thresholds (what tcmalloc/jemalloc give for free)
makes those blocks reusable.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_done = False


def tune_allocator() -> bool:
    """Best effort, once per process; returns whether glibc accepted the settings."""
    global _done
    if _done or not sys.platform.startswith("linux") or os.environ.get("KESTREL_DEFAULT_MALLOC"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        ok = False
    _done = True
    return ok
