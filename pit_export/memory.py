"""Give freed heap back to the OS between pipeline stages.

glibc serves the many mid-sized tensors of a stage (fold's float64 chunks, a toolchain's temporaries) from its heap
and keeps the pages after they are freed, so the next stage would start from the previous one's high-water mark.
malloc_trim(0) returns them; a no-op where glibc is not the allocator."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys


def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl has no malloc_trim
        return None


_TRIM = _malloc_trim()


def release_memory() -> None:
    gc.collect()
    if _TRIM is not None:
        _TRIM(0)
