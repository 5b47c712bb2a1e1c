"""The pipeline steps as Prefect tasks. The only module of ``components`` that imports Prefect.

Each task passes small, hashable values (config, paths, versions, run ids).
Training, evaluation, registration and promotion are cached on explicit keys:
the data version, the config hash, the code version and the tracking store, so
a re-run with nothing changed reuses them and registers no new version.
Ingestion and validation always run: they are what tells whether the data
changed. No task retries: none of them is a transient I/O call of its own.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from components import lineage, paths, steps


def step_cache_key(context, parameters: dict) -> str:
    """``<step>-<data version>-<config hash>-<code version>-<tracking store>`` from the call's own values."""
    dataset: steps.DatasetVersion = parameters["dataset"]
    config = parameters["config"]
    name = context.task.name
    return "-".join([name, dataset.version, config.config_hash(), lineage.code_version(), paths.tracking_uri()])


def _cached(fn, name: str):
    return task(fn, name=name, cache_key_fn=step_cache_key, persist_result=True)


ingest = task(steps.ingest_dataset, name="ingest", cache_policy=NO_CACHE)
validate = task(steps.validate_dataset, name="validate", cache_policy=NO_CACHE)
train = _cached(steps.train_model, "train")
evaluate = _cached(steps.evaluate_model, "evaluate")
register = _cached(steps.register, "register")
promote = _cached(steps.promote, "promote")
