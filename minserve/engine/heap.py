"""Hand freed heap memory back to the OS when the engine goes idle (glibc's malloc_trim).

Why: glibc keeps what a thread frees in that thread's arena, and gives back only the top of each
arena. A server's threads (HTTP workers, tokenizing threads, grammar compiles, the engine) each
take an arena; after a burst their freed pages stay resident, and RSS does not come back down.
malloc_trim(0) returns the free pages of every arena (madvise), without moving live data. Called
once per busy -> idle transition, it costs milliseconds when nothing waits. No-op off glibc.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = None
_loaded = False


def _load() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim      # glibc; musl has none
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Give free heap pages back to the OS; True when some were (False: nothing, or no glibc)."""
    global _malloc_trim, _loaded
    if not _loaded:
        _malloc_trim, _loaded = _load(), True
    return bool(_malloc_trim is not None and _malloc_trim(0))
