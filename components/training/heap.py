"""glibc's allocator, read and set through ctypes: torch and numpy allocate with malloc and offer no way to set its
thresholds or trim its heaps (jemalloc and tcmalloc are loaded with ``LD_PRELOAD``, before a process starts).

The epoch loop keeps the heap while it trains, and the prediction loop while it predicts (:func:`kept_heap`);
the batch loops hand its free pages back (:func:`release_free_memory`, :class:`HeapTrimmer`); the DataLoader
workers let glibc trim their own heaps again (:func:`trim_past_threshold`). Every function does nothing where the C
library lacks the call (macOS, musl).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading

import psutil


def libc_function(name: str):
    """The C library's function ``name``, or None where it has none (``malloc_trim``, ``mallopt``: macOS, musl;
    ``mallinfo2``: glibc before 2.33 too)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (glibc 2.33 and later), every field in bytes or chunks."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    """glibc's ``mallinfo2`` returning its struct, or None where the C library has none."""
    function = libc_function("mallinfo2")
    if function is not None:
        function.restype = _MallInfo2
    return function


MALLOC_TRIM = libc_function("malloc_trim")
MALLINFO2 = _mallinfo2()
MALLOPT = libc_function("mallopt")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
# the thresholds glibc's own rule raises them to as large blocks are freed (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit,
# and twice that)
MMAP_THRESHOLD_MAX = 32 * 2**20
TRIM_THRESHOLD_MAX = 2 * MMAP_THRESHOLD_MAX
# training's validation hands the heap back once it has grown the process by this much (HeapTrimmer): 20,369
# validation images of 256x256 read after an epoch of 55,000 left 4.5 GB free in the heap (the step's peak 5.9 GB
# against 1.6 trimmed)
VALIDATION_FREE_HEAP = 256 * 2**20


def trim_past_threshold() -> None:
    """Let glibc trim the heap's free top again past :data:`TRIM_THRESHOLD_MAX` (where it has ``mallopt``)."""
    if MALLOPT is not None:
        MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_MAX)


def free_heap_bytes() -> int | None:
    """Bytes glibc's heaps hold free (``mallinfo2``'s ``fordblks``, every arena), None where it cannot say."""
    return MALLINFO2().fordblks if MALLINFO2 is not None else None


def resident_bytes() -> int:
    """This process's resident memory in bytes."""
    return psutil.Process().memory_info().rss


def release_free_memory(*, above: int = 0) -> None:
    """Hand the C heap's free pages back to the system; with ``above``, only once the heaps hold more than that
    many bytes free (every time where glibc cannot say how much). A batch's activations are freed into glibc's
    heaps (below its mmap threshold, which rises to 32 MB as large blocks are freed), and the next batches' blocks
    land among them: without this an evaluation of 4,024 images of 256x256 peaked 120 MiB above one of 1,006
    (medians of 3 runs, each varying by 100 MiB or more); trimmed, they peak at 338 and 352 MiB, for 5 % more
    time (``benchmarks/evaluation_memory.py``, 2026-12-05). A loop that trims past a limit uses
    :class:`HeapTrimmer`."""
    if MALLOC_TRIM is None:
        return
    free = free_heap_bytes() if above else None
    if free is None or free > above:
        MALLOC_TRIM(0)


# how many kept_heap blocks are open in this process (the settings are the process's): only the outermost sets
# glibc's thresholds and, as it closes, sets them back and trims
_KEPT = threading.Lock()
_kept_open = 0


@contextlib.contextmanager
def kept_heap():
    """While it is open, glibc keeps the pages a training step frees for the next step: blocks up to 32 MiB come
    from its heaps, and it hands none of the heaps' free pages back by itself. When it closes, the heap goes back
    to the system (``malloc_trim``) and glibc trims past 64 MiB free again (:func:`trim_past_threshold`). Blocks
    nest (a validation's predictions inside the epoch loop): only the outermost one changes the settings.

    With glibc's defaults each step's activations and gradients land partly in blocks mapped and unmapped for
    them and partly at the top of a heap that glibc trims as they are freed, so every step faults its working
    set in again: 10 epochs of the demo's network on 200-odd images of 128x128, each in a fresh process, took
    0.85-1.07 million minor faults and 9.7-9.8 s, kept 80-84 thousand and 8.2-9.4 s (BENCHMARKS.md, "Training
    step").
    Validation's :class:`HeapTrimmer` and evaluation's trims call ``malloc_trim`` themselves, which these settings
    do not change. glibc has no way back to its thresholds' rule once they are set; the values it closes with are
    the ones that rule rises to. Torch offers no CPU allocator of its own to tune.
    """
    global _kept_open
    if MALLOPT is None or MALLOC_TRIM is None:
        yield
        return
    with _KEPT:
        _kept_open += 1
        if _kept_open == 1:
            MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
            MALLOPT(M_TRIM_THRESHOLD, -1)  # -1: never trim by itself (mallopt(3))
    try:
        yield
    finally:
        with _KEPT:
            _kept_open -= 1
            if _kept_open == 0:
                trim_past_threshold()
                MALLOC_TRIM(0)


class HeapTrimmer:
    """:func:`release_free_memory` past ``above`` for one loop of batches, called after each: it trims once the
    process has grown by more than ``above`` since the loop began (and glibc's heaps hold more than ``above``
    free), and again only once it has grown by as much since the last trim.

    The free pages a validation starts with are the training steps' working set (their activations and
    gradients), which the next epoch takes again: trimming them at the first batch, as a limit on the free count
    alone did, handed back 640-730 MiB after each epoch of SimCLR pretraining at 64x64 (80-110 ms a trim), and
    the next epoch faulted them back in (4 epochs: 32.6 and 31.1 s untrimmed against 35.0 and 35.6, 0.3 against
    0.9-1.2 million minor faults). What a validation must not do is grow the process: 20,369 validation images of
    256x256 after an epoch of 55,000 left 4.5 GB free in the heap (:data:`VALIDATION_FREE_HEAP`).

    glibc counts a trimmed chunk as free still (``mallinfo2``'s ``fordblks`` is the same before and after
    ``malloc_trim``), so the free count alone would trim every batch once past the limit (17-41 ms a batch after an
    epoch of 1,118 images of 256x256, 527 MiB counted free) and fault the pages back in as the next batch ran. The
    process's resident size (psutil) says whether the loop has grown.
    """

    def __init__(self, above: int) -> None:
        self.above = above
        # the process's resident bytes when the loop began or after the last trim (or since, the least)
        self.resident = resident_bytes()

    def __call__(self) -> None:
        if MALLOC_TRIM is None:
            return
        free = free_heap_bytes()
        if free is not None and free <= self.above:
            return
        resident = resident_bytes()
        if resident - self.resident <= self.above:
            self.resident = min(self.resident, resident)
            return
        MALLOC_TRIM(0)
        self.resident = resident_bytes()
