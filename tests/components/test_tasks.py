from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from components import tasks
from components.config import load_config
from components.errors import IngestError
from components.data.step import DatasetVersion
from components.tasks import is_transient, step_cache_key


def _key(task: str, version: str, *overrides: str) -> str:
    dataset = DatasetVersion(name="d", manifest=Path("m"), version=version, n_cases=1, n_patients=1)
    context = SimpleNamespace(task=SimpleNamespace(name=task))
    parameters = {"dataset": dataset, "validation_report": Path("r"), "run_id": "run1",
                  "config": load_config(overrides=list(overrides), environ={})}
    return step_cache_key(context, parameters)


def test_cache_keys_are_the_step_tables_keys_of_explicit_values(workspace):
    assert _key("train", "v1") == _key("train", "v1")
    assert _key("train", "v1") != _key("train", "v2")  # new data
    assert _key("train", "v1") != _key("train", "v1", "train.epochs=1")  # new config that training reads
    assert _key("train", "v1") == _key("train", "v1", "promotion.rules=[]", "evaluate.n_bootstrap=10")  # not read
    assert _key("train", "v1") != _key("evaluate", "v1")  # another step
    assert _key("train", "v1").startswith("train-s2-")
    assert "/" not in _key("train", "v1") and ":" not in _key("train", "v1")  # a file name, whatever the tracking URI


class _HttpError(Exception):
    """Stands for an exception of an HTTP client library."""


_HttpError.__module__ = "requests.exceptions"


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (TimeoutError("read timed out"), True),
        (OSError(errno.ECONNRESET, "reset"), True),
        (_HttpError("HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded"), True),
        (_HttpError("404 Client Error: Not Found"), False),
        (ValueError("shapes do not match"), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (IngestError("DVC could not version data/demo: push failed"), False),
    ],
)
def test_only_transient_io_failures_are_retried(exc, transient):
    assert is_transient(exc) is transient


def test_transient_causes_are_found_through_wrappers():
    try:
        try:
            raise ConnectionResetError(errno.ECONNRESET, "reset by peer")
        except ConnectionResetError as inner:
            raise IngestError("DVC could not version data/demo") from inner
    except IngestError as outer:
        assert is_transient(outer)


def test_io_steps_retry_with_backoff_and_computation_never():
    for name in ("version", "register"):
        io_task = tasks.TASKS[name]
        assert io_task.retries == tasks.RETRIES and io_task.retry_condition_fn is tasks.retry_transient
        assert io_task.retry_delay_seconds == [2, 4, 8]
    for name in ("ingest", "validate", "train", "evaluate", "promote"):
        assert not tasks.TASKS[name].retries


def test_the_retry_condition_reads_the_failed_states_own_exception():
    from prefect.states import Failed

    assert tasks.retry_transient(None, None, Failed(data=ConnectionRefusedError(111, "Connection refused")))
    assert not tasks.retry_transient(None, None, Failed(data=ValueError("a NaN in the manifest")))


def test_a_task_reads_a_dataloader_with_forked_workers(tmp_path):
    """Prefect leaves its services' at-exit drains in a forked child, where they failed an assertion: every
    DataLoader worker of a training inside a flow exited with code 1 (``medflow run --set train.num_workers=2``).
    In a process of its own: a flow run here would fix this process's Prefect home for the tests after it."""
    script = tmp_path / "reading.py"
    script.write_text(
        "import torch\n"
        "from prefect import flow, task\n"
        "import components.tasks  # its fork hook drops the drains\n\n"
        "@task\n"
        "def read() -> int:\n"
        "    loader = torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2)\n"
        "    return sum(int(batch.sum()) for batch in loader)\n\n"
        "@flow\n"
        "def reading() -> int:\n"
        "    return read()\n\n"
        "if __name__ == '__main__':\n"
        "    print('read', reading())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and "read 28" in done.stdout, done.stderr[-3000:]
