"""Process-level settings that make the per-step training loop fast on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(mmap_threshold: int = 64 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's malloc reuse freed blocks instead of returning them to the OS.

    A training step allocates and frees a few MB of tensors ([B, B+S] scores, gathered
    item rows); with glibc's defaults these are often fresh ``mmap`` pages, and the page
    faults of touching them cost ~25% of a CPU step. Blocks below ``mmap_threshold`` then
    come from the heap, which is trimmed only beyond ``trim_threshold`` of free memory.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    return mallopt(_M_TOP_PAD, 16 << 20) == 1 and ok
