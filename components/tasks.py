"""The pipeline steps as Prefect tasks. The only module of ``components`` that imports Prefect.

Every task is made from the step table (:mod:`components.steps`) and passes
small, hashable values (config, paths, versions, run ids). Training,
evaluation, registration and promotion are cached on their step keys (the
config sections each reads, its inputs' identities, medflow's source hash and
the tracking store), so a re-run with nothing changed reuses them and registers
no new version, and a new promotion rule re-runs promotion alone. Ingestion and
validation always run: they are what tells whether the data changed.

Retries: only the two steps that are I/O alone retry, with exponential backoff,
and only when the failure is transient (a connection refused or reset, a
timeout, a 5xx answer): versioning (DVC push to the remote) and registration
(the tracking server; idempotent per training run). Conversion, training and
evaluation never retry: running the same computation again gives the same error.
"""

from __future__ import annotations

import errno
import functools
import inspect
import os
import threading

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components import lineage, steps

RETRIES = 3
BACKOFF_SECONDS = 2
TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}
TRANSIENT_TEXT = ("connection refused", "connection reset", "max retries exceeded", "timed out", "temporarily unavailable",
                  "502", "503", "504", "remote end closed connection")


def _forget_prefect_exit_drains() -> None:
    """In a forked child, drop the at-exit drains of Prefect's queue services.

    Prefect 3.8 resets its services in a forked child (their event loop is the
    parent's) but leaves each one's ``threading._register_atexit`` drain behind,
    and that drain fails an assertion when the child ends: every forked
    DataLoader worker of a training inside a flow (``train.num_workers`` > 0)
    exited with code 1, and the run failed. Neither Prefect nor the standard
    library can unregister a threading at-exit call, hence the private list. The
    drains are known by their owner's base class's module, not by importing Prefect's private
    service class, so a Prefect that moves the class breaks nothing here.
    """
    calls = getattr(threading, "_threading_atexits", None)
    if calls is not None:
        calls[:] = [c for c in calls if not _is_prefect_service_call(c)]


def _is_prefect_service_call(call) -> bool:
    """Whether ``call`` (a functools.partial of a bound method) belongs to one of Prefect's services."""
    owner = getattr(getattr(call, "func", call), "__self__", None)
    return owner is not None and any(c.__module__ == "prefect._internal.concurrency.services"
                                     for c in type(owner).__mro__)  # EventsWorker, APILogWorker, ...


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_prefect_exit_drains)


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a passing I/O failure worth retrying."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS:
            return True
        if type(exc).__module__.split(".")[0] in ("requests", "urllib3", "aiohttp", "mlflow", "dvc") and any(
            text in str(exc).lower() for text in TRANSIENT_TEXT
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task_, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient I/O failures."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 (the state's own exception, re-raised to inspect it)
        return is_transient(exc)
    return False


def step_cache_key(context, parameters: dict) -> str:
    """The task's key, from the step table: the config sections the step reads, its keyed inputs'
    identities, medflow's source hash and the tracking store (:func:`components.steps.step_key`)."""
    return steps.get_step(context.task.name).key(parameters["config"], parameters)


_IO_RETRIES = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    "retry_condition_fn": retry_transient,
}


def make_task(step: steps.Step) -> Task:
    """The Prefect task of one step: cached on its key (results persisted) or never cached; retried on
    transient I/O failures only when the table says so.

    Raises:
        TypeError: the step's function does not take the inputs the table names (and ``config``).
    """
    fn = step.resolve()
    taken = tuple(inspect.signature(fn).parameters)
    if taken != (*step.inputs, "config"):
        raise TypeError(f"step {step.name}: {step.function} takes {taken}, the table says {(*step.inputs, 'config')}")
    caching = {"cache_key_fn": step_cache_key, "persist_result": True} if step.cached else {"cache_policy": NO_CACHE}

    @functools.wraps(fn)
    def in_flow_run(*args, **kwargs):
        with lineage.orchestrated_by(flow_run_facts()):
            return fn(*args, **kwargs)

    return task(in_flow_run, name=step.name, **caching, **(_IO_RETRIES if step.retries else {}))


def flow_run_facts() -> dict[str, str]:
    """The Prefect flow run a task runs in, for the MLflow run's tags: its id, name and (on a server with a UI
    address, ``PREFECT_UI_URL``) its page."""
    from prefect.runtime import flow_run  # noqa: PLC0415

    return {"flow_run_id": flow_run.id or "", "flow_run_name": flow_run.name or "", "flow_run_url": flow_run.ui_url or ""}


TASKS: dict[str, Task] = {step.name: make_task(step) for step in steps.STEPS}
