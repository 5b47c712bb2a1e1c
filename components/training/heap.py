"""glibc's allocator settings, read through ctypes: torch and numpy allocate with malloc and offer no way to set
its thresholds or trim its heaps (jemalloc and tcmalloc are loaded with ``LD_PRELOAD``, before a process starts).
:mod:`components.training.forward` trims and keeps the heap; :mod:`components.training.datasets`' workers set
the trim threshold back."""

from __future__ import annotations

import ctypes
import ctypes.util


def libc_function(name: str):
    """The C library's function ``name``, or None where it has none (``malloc_trim``, ``mallopt``: macOS, musl;
    ``mallinfo2``: glibc before 2.33 too)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


MALLOPT = libc_function("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
# the thresholds glibc's own rule raises them to as large blocks are freed (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit,
# and twice that)
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD_MAX = 2 * MMAP_THRESHOLD_MAX


def trim_past_threshold() -> None:
    """Let glibc trim the heap's free top again past :data:`TRIM_THRESHOLD_MAX` (where it has ``mallopt``)."""
    if MALLOPT is not None:
        MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)
