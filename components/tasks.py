"""The pipeline steps as Prefect tasks. The only module of ``components`` that imports Prefect.

Each task passes small, hashable values (config, paths, versions, run ids).
Caching is off until keys are explicit (data version, config hash, code
version); retries belong only on transient I/O.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from components import steps

ingest = task(steps.ingest_dataset, name="ingest", cache_policy=NO_CACHE)
validate = task(steps.validate_dataset, name="validate", cache_policy=NO_CACHE)
train = task(steps.train_model, name="train", cache_policy=NO_CACHE)
evaluate = task(steps.evaluate_model, name="evaluate", cache_policy=NO_CACHE)
register = task(steps.register, name="register", cache_policy=NO_CACHE)
promote = task(steps.promote, name="promote", cache_policy=NO_CACHE)
