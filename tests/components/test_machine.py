"""What the machine lends: usable cores, and an ordered map over threads."""

from __future__ import annotations

import threading
import time

import pytest

from components.machine import ordered_map, usable_cores


def test_usable_cores_follows_the_affinity(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    assert usable_cores() == 3


def test_ordered_map_keeps_the_order_and_draws_items_only_as_it_needs_them():
    drawn = []

    def items():
        for i in range(12):
            drawn.append(i)
            yield i

    def slow_square(i):
        time.sleep(0.01 * (i % 3))  # later items may finish first
        return i * i, threading.current_thread().name

    results = ordered_map(slow_square, items(), workers=2)
    assert next(results)[0] == 0 and len(drawn) <= 3  # at most workers + 1 items ahead
    rest = list(results)
    assert [r for r, _ in rest] == [i * i for i in range(1, 12)]
    assert len({name for _, name in rest}) == 2

    def fails(i):
        raise ValueError(f"case {i}")

    with pytest.raises(ValueError, match="case 0"):
        list(ordered_map(fails, range(5), workers=2))
