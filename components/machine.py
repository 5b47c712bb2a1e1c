"""What this machine lets medflow use, and work spread over it. Read when called, never at import."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"  # Arrow's own setting; where it is set, medflow leaves the choice alone


def arrow_on_c_heap() -> None:
    """Arrow's buffers (pandas' string columns, Parquet reads and writes) in the C library's heap, beside
    numpy's and Python's, instead of pyarrow's default mimalloc pool, unless ``ARROW_DEFAULT_MEMORY_POOL`` says
    otherwise. mimalloc kept the pages of the buffers Arrow had freed for Arrow alone: reading a manifest of
    15,824 rows left 20 MiB more resident than one of 989 with 5 MiB of it in use, and an evaluation of those
    rows peaked 126-128 MiB above its start against 93 on the C heap (74-84 for 989 rows, the same time), where
    numpy and pandas reuse the pages Arrow frees. Called as a step is resolved
    (:meth:`components.steps.Step.resolve`) and as the command line starts a command."""
    if ARROW_POOL_ENV in os.environ:
        return
    import pyarrow  # noqa: PLC0415 (pandas' string columns import it anyway; this module stays light)

    pyarrow.set_memory_pool(pyarrow.system_memory_pool())


def ordered_map(function: Callable, items: Iterable, *, workers: int) -> Iterator:
    """``function`` of each of ``items`` in order, computed on ``workers`` threads, taking the next item only
    as a result is handed on (at most ``workers`` + 1 items at once: a generator's chunks are drawn while
    the threads work, not all up front). (``Executor.map`` submits every item at once; Python 3.14's
    ``buffersize`` bounds it, 3.11 has none.)"""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
