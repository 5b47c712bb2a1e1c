"""glibc's allocator through ctypes: the heap kept for the training steps, and its free pages handed back by the
batch loops, in fresh processes where the figures are glibc's own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

from components.training import heap

REPO = Path(__file__).resolve().parents[3]


def test_a_trimmer_trims_once_the_loop_has_grown_the_process_past_its_limit_and_again_once_grown_by_it(
        monkeypatch):
    trims, mib = [], 2**20
    # what the process holds resident: as the loop begins, then after each batch (and straight after each trim)
    resident = iter([1000 * mib, 1100 * mib, 1300 * mib, 950 * mib, 980 * mib, 930 * mib, 1190 * mib, 900 * mib])
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(len(batches)))
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: 527 * mib)  # glibc's count: trimmed chunks count too
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(resident))
    trim, batches = heap.HeapTrimmer(256 * mib), []
    for batch in range(5):
        batches.append(batch)
        trim()
    # +100 MiB since the loop began is not past the limit, +300 is; then +30 is not; from the least since (930,
    # not 950) +260 is
    assert trims == [2, 5]
    assert next(resident, None) is None


def test_a_trimmer_leaves_the_free_pages_the_loop_began_with(monkeypatch):
    """A validation begins with the training steps' freed activations in the heap: the next epoch takes them
    again, and trimming them only made it fault them back in."""
    trims, mib = [], 2**20
    resident = iter([1500 * mib, 1500 * mib, 1510 * mib, 1600 * mib])
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: 640 * mib)
    monkeypatch.setattr(heap, "resident_bytes", lambda: next(resident))
    trim = heap.HeapTrimmer(256 * mib)
    for _ in range(3):
        trim()
    assert trims == []


def test_a_trimmer_under_its_limit_of_free_heap_never_trims(monkeypatch):
    trims = []
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: 10 * 2**20)
    trim = heap.HeapTrimmer(256 * 2**20)
    for _ in range(3):
        trim()
    assert trims == []


def test_where_glibc_cannot_say_what_is_free_a_limit_trims_every_time(monkeypatch):
    trims = []
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "MALLINFO2", None)  # glibc before 2.33
    assert heap.free_heap_bytes() is None
    heap.release_free_memory(above=heap.VALIDATION_FREE_HEAP)
    assert trims == [0]


def test_without_malloc_trim_in_the_c_library_release_does_nothing(monkeypatch):
    monkeypatch.setattr(heap.ctypes, "CDLL", lambda name: types.SimpleNamespace())  # macOS, musl: no malloc_trim
    assert heap.libc_function("malloc_trim") is None and heap._mallinfo2() is None
    assert heap.libc_function("mallopt") is None
    monkeypatch.setattr(heap, "MALLOC_TRIM", None)
    monkeypatch.setattr(heap, "MALLOPT", None)
    heap.release_free_memory()
    with heap.kept_heap():
        pass


@pytest.mark.parametrize("fails", [False, True])
def test_a_kept_heap_sets_glibcs_thresholds_and_sets_them_back_and_trims_as_it_closes(monkeypatch, fails):
    calls = []
    monkeypatch.setattr(heap, "MALLOPT", lambda option, value: calls.append((option, value)))
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: calls.append(("trim", pad)))
    with pytest.raises(RuntimeError) if fails else contextlib.nullcontext(), heap.kept_heap():
        assert calls == [(heap.M_MMAP_THRESHOLD, 32 * 2**20), (heap.M_TRIM_THRESHOLD, -1)]
        if fails:
            raise RuntimeError("a failed step")
    assert calls[2:] == [(heap.M_TRIM_THRESHOLD, 64 * 2**20), ("trim", 0)]


def test_kept_heaps_nest_and_only_the_outermost_sets_glibcs_thresholds_and_trims(monkeypatch):
    """A validation's predictions open a kept heap inside the epoch loop's: closing the inner one must not let
    glibc trim the outer one's pages by itself again."""
    calls = []
    monkeypatch.setattr(heap, "MALLOPT", lambda option, value: calls.append((option, value)))
    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: calls.append(("trim", pad)))
    with heap.kept_heap():
        with heap.kept_heap():
            pass
        assert calls == [(heap.M_MMAP_THRESHOLD, 32 * 2**20), (heap.M_TRIM_THRESHOLD, -1)]
    assert calls[2:] == [(heap.M_TRIM_THRESHOLD, 64 * 2**20), ("trim", 0)]
    with heap.kept_heap():  # and a later one sets them again
        assert len(calls) == 6


KEPT_HEAP = """
import contextlib
import resource
import sys
import numpy as np
from components.training.heap import kept_heap

def faults(rounds):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):  # a step's working set, allocated and freed
        blocks = [np.ones(2**20 // 8) for _ in range(128)]  # 128 MiB in blocks of 1 MiB
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with kept_heap() if sys.argv[1] == "kept" else contextlib.nullcontext():
    faults(1)  # the heap grows to hold them once
    print(faults(4))
"""


@pytest.mark.skipif(heap.MALLOPT is None, reason="the C library has no mallopt (not glibc)")
def test_a_kept_heap_keeps_the_pages_a_step_freed_for_the_next_step():
    """With glibc's defaults, freeing a step's 128 MiB trims the heap's top and the next step faults its 32,768
    pages in again (in a fresh process: no other test's settings or heap in the figures)."""
    faults = {how: int(subprocess.run([sys.executable, "-c", KEPT_HEAP, how], capture_output=True, text=True,
                                      check=True, cwd=REPO).stdout.split()[-1]) for how in ("default", "kept")}
    assert faults["default"] > 3 * 32_768, faults  # glibc's defaults: four steps fault their pages in again
    assert faults["kept"] < 1_000, faults


FRAGMENTED_HEAP = """
import ctypes
import sys
from components.training.heap import free_heap_bytes, release_free_memory

def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
blocks = [libc.malloc(64 * 1024) for _ in range(2000)]  # 125 MiB below the mmap threshold: on the heap
for block in blocks:
    ctypes.memset(block, 1, 64 * 1024)
pin = libc.malloc(96 * 1024)  # from the heap's top, above them: freeing them cannot shrink the heap from its top
for block in blocks:
    libc.free(block)
before, counted = resident(), free_heap_bytes()
release_free_memory(above=int(sys.argv[1]))
print(before - resident(), counted, free_heap_bytes())
"""


def _released(above: int) -> int:
    """Bytes :func:`release_free_memory` hands back after 125 MiB were freed below a pinned block, in a fresh
    process (no other test's heap in the figures)."""
    return _fragmented_heap(above)[0]


def _fragmented_heap(above: int) -> list[int | None]:
    """That run's bytes handed back, and glibc's count of free bytes before and after it (None without mallinfo2)."""
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP, str(above)], capture_output=True, text=True,
                         check=True, cwd=REPO)  # the repository on the path wherever pytest was started
    return [None if x == "None" else int(x) for x in out.stdout.split()[-3:]]


@pytest.mark.skipif(heap.MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_release_free_memory_hands_freed_heap_pages_back_to_the_system():
    released = _released(0)
    assert released > 100 * 2**20, f"only {released / 2**20:.0f} MiB of 125 MiB freed went back to the system"


@pytest.mark.skipif(heap.MALLINFO2 is None, reason="the C library has no mallinfo2 (not glibc 2.33+)")
def test_release_free_memory_past_a_limit_counts_what_glibc_holds_free():
    assert _released(200 * 2**20) < 20 * 2**20  # 125 MiB free is under a 200 MiB limit: kept
    assert _released(50 * 2**20) > 100 * 2**20  # and over a 50 MiB one: handed back


@pytest.mark.skipif(heap.MALLINFO2 is None, reason="the C library has no mallinfo2 (not glibc 2.33+)")
def test_glibc_counts_the_pages_a_trim_handed_back_as_free_still():
    """Why :class:`~components.training.heap.HeapTrimmer` asks the process's size too: after ``malloc_trim``
    the 125 MiB freed below a pinned block are counted free as before (their pages went back to the system)."""
    released, before, after = _fragmented_heap(0)
    assert released > 100 * 2**20 and before > 120 * 2**20 and after > 0.95 * before
