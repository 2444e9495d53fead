"""Hand freed heap memory back to the OS when the engine goes idle (glibc's malloc_trim).

Why: glibc keeps what a thread frees in that thread's arena, and gives back only the top of each
arena. A server's threads (HTTP workers, tokenizing threads, grammar compiles, the engine) each
take an arena; after a burst their freed pages stay resident, and RSS does not come back down.
malloc_trim(0) returns the free pages of every arena (madvise), without moving live data. It
costs milliseconds when nothing waits. No-op off glibc.

When: the engine thread, idle, looks every HEAP_TRIM_IDLE_S whether work was done since the last
trim (note_work()), and trims once if so. Work is the engine's steps and every HTTP request the
server answered: most of what a flood of bad requests allocates (bodies, parsed JSON, decoded
images, grammars) is freed on the HTTP side and never reaches the engine, and when only engine
steps counted, such a flood left RSS 1.2 GB up for good (issue 36, finding 8).
"""
from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

_malloc_trim: Callable[[int], int] | None = None
_loaded = False
_work = threading.Event()    # set: work was done since the last trim (any thread)


def _load() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim      # glibc; musl has none
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def note_work() -> None:
    """Work was done that may have left freed heap behind (a step, an HTTP request)."""
    _work.set()


def trim_after_work() -> bool:
    """trim() if work was noted since the last trim; True when pages went back."""
    if not _work.is_set():
        return False
    _work.clear()
    return trim()


def trim() -> bool:
    """Give free heap pages back to the OS; True when some were (False: nothing, or no glibc)."""
    global _malloc_trim, _loaded
    if not _loaded:
        _malloc_trim, _loaded = _load(), True
    return bool(_malloc_trim is not None and _malloc_trim(0))
