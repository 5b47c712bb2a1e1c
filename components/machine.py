"""What this machine lets medflow use, and work spread over it. Read when called, never at import."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS has one), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
