"""The process's memory between Shapley cases: resident set, the C heap, and giving freed memory back.

A game call's KV cache and activations are bounded by the plan (`plan.MemoryModel`, `shapley.max_cache_bytes`);
what this module handles is what outlives a call. XLA's CPU buffers and compiled executables live on the C
heap (glibc malloc on Linux). When a case's buffers are freed, glibc keeps the freed chunks in its arenas
(one per thread that allocated, up to 8 per core) and returns little of it to the system, so the resident set
of a long run creeps up case after case although the live heap does not. `release()` drops the cached
executables when there are too many and trims the heap (`malloc_trim(0)`) so that freed memory leaves the
process. Where glibc is absent (macOS, musl) the trimming is skipped and only the executables are dropped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import pathlib
from collections.abc import Callable, Sequence


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


@functools.cache
def glibc():
    """glibc's handle with malloc_trim and mallinfo2 (glibc >= 2.33), or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> bool:
    """Returns the C heap's free memory to the system (`malloc_trim(0)`); False where there is no glibc."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


@dataclasses.dataclass(frozen=True)
class HeapStats:
    """The C heap in MB: `in_use` allocated (arenas + mmapped chunks), `free` held by the arenas but unused."""

    in_use: float
    free: float


def heap_stats() -> HeapStats | None:
    """glibc's `mallinfo2`, summed over its arenas; None where there is no glibc."""
    libc = glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return HeapStats(in_use=(info.uordblks + info.hblkhd) / 2**20, free=info.fordblks / 2**20)


def _status_mb(field: str) -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """The resident set now, in MB (Linux)."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The peak resident set since the process started or the last `reset_peak_rss`, in MB (Linux)."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Sets the peak resident set to the current one (Linux >= 4.0)."""
    pathlib.Path("/proc/self/clear_refs").write_text("5")


def release(compiled: Sequence[Callable], max_executables: int | None) -> bool:
    """Between cases: drops the executables of the jitted functions `compiled` when they hold more than
    `max_executables` (None: never), then trims the heap. Returns whether they were dropped.

    Measured with SmolLM2 on 2 CPU cores after 8 cases of n = 6-30 (80 executables): RSS 4,766 MB, of which
    glibc held 1,779 MB freed but kept; `malloc_trim` alone gave back 1,722 MB; the jitted functions'
    `clear_cache` freed 1,591 MB of executables (about 20 MB each) and a trim after it took RSS to 1,526 MB;
    `jax.clear_caches()` freed only 40 MB more, so only the game's own functions are cleared."""
    executables = sum(fn._cache_size() for fn in compiled)
    dropped = max_executables is not None and executables > max_executables
    if dropped:
        for fn in compiled:
            fn.clear_cache()
        gc.collect()
    trim_heap()
    return dropped
