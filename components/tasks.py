"""The pipeline steps as Prefect tasks. The only module of ``components`` that imports Prefect.

Each task passes small, hashable values (config, paths, versions, run ids).
Training, evaluation, registration and promotion are cached on explicit keys:
the data version, the config hash, the code version and the tracking store, so
a re-run with nothing changed reuses them and registers no new version.
Ingestion and validation always run: they are what tells whether the data
changed.

Retries: only the two steps that are I/O alone retry, with exponential backoff,
and only when the failure is transient (a connection refused or reset, a
timeout, a 5xx answer): versioning (DVC push to the remote) and registration
(the tracking server; idempotent per training run). Conversion, training and
evaluation never retry: running the same computation again gives the same error.
"""

from __future__ import annotations

import errno

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from components import lineage, paths, steps

RETRIES = 3
BACKOFF_SECONDS = 2
TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EPIPE}
TRANSIENT_TEXT = ("connection refused", "connection reset", "max retries exceeded", "timed out", "temporarily unavailable",
                  "502", "503", "504", "remote end closed connection")


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
    """``<step>-<data version>-<config hash>-<code version>-<tracking store>`` from the call's own values."""
    dataset: steps.DatasetVersion = parameters["dataset"]
    config = parameters["config"]
    name = context.task.name
    return "-".join([name, dataset.version, config.config_hash(), lineage.code_version(), paths.tracking_uri()])


def _cached(fn, name: str, **options):
    return task(fn, name=name, cache_key_fn=step_cache_key, persist_result=True, **options)


_io_retries = {
    "retries": RETRIES,
    "retry_delay_seconds": exponential_backoff(backoff_factor=BACKOFF_SECONDS),
    "retry_condition_fn": retry_transient,
}

prepare = task(steps.prepare_dataset, name="ingest", cache_policy=NO_CACHE)
version = task(steps.version_prepared, name="version", cache_policy=NO_CACHE, **_io_retries)
validate = task(steps.validate_dataset, name="validate", cache_policy=NO_CACHE)
train = _cached(steps.train_model, "train")
evaluate = _cached(steps.evaluate_model, "evaluate")
register = _cached(steps.register, "register", **_io_retries)
promote = _cached(steps.promote, "promote")


def ingest(config) -> steps.DatasetVersion:
    """Ingestion as two tasks: conversion (no retries), then DVC versioning (retried when transient)."""
    return version(prepare(config), config)
