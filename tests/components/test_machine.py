"""What the machine lends: usable cores, an ordered map over threads, and the heap Arrow allocates on."""

from __future__ import annotations

import threading
import time

import pandas as pd
import pyarrow as pa
import pytest

from components.machine import ARROW_POOL_ENV, ordered_map, usable_cores
from components.steps import Step


@pytest.fixture
def arrow_pool():
    """Arrow's default pool set back to mimalloc (pyarrow's own default on Linux) for the test, restored after."""
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    yield
    pa.set_memory_pool(before)


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


def test_a_resolved_step_puts_arrows_buffers_on_the_c_heap(monkeypatch, arrow_pool, tmp_path):
    monkeypatch.delenv(ARROW_POOL_ENV, raising=False)
    Step("light", "os.path:join", inputs=(), reads=()).resolve()
    assert pa.default_memory_pool().backend_name == "system"
    before = pa.system_memory_pool().bytes_allocated()
    frame = pd.DataFrame({"case_id": [f"case-{i}" for i in range(1000)]})
    frame.to_parquet(tmp_path / "m.parquet")
    strings = pd.read_parquet(tmp_path / "m.parquet")["case_id"]
    assert pa.system_memory_pool().bytes_allocated() > before  # pandas' strings now live in the C heap's pool
    assert strings.iloc[-1] == "case-999"


def test_arrow_pool_named_in_the_environment_is_left_alone(monkeypatch, arrow_pool):
    monkeypatch.setenv(ARROW_POOL_ENV, "mimalloc")
    Step("light", "os.path:join", inputs=(), reads=()).resolve()
    assert pa.default_memory_pool().backend_name == "mimalloc"
