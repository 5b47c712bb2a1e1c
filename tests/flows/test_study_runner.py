"""Where a study's arms run: in this process one at a time, on a local Dask cluster, or on the named cluster."""

from __future__ import annotations

import pytest
from prefect_dask import DaskTaskRunner

from components.config import StudyConfig
from components.data.ingest import default_workers


@pytest.fixture
def runner(monkeypatch):
    import flows.pipeline as pipeline

    monkeypatch.setattr(pipeline, "_prefect_api", lambda: {"PREFECT_API_URL": "http://127.0.0.1:4200/api"})
    return pipeline.study_runner


@pytest.mark.parametrize(("parallel", "arms"), [(1, 6), (0, 1), (4, 1)])
def test_one_arm_at_a_time_runs_in_the_flows_own_thread_without_a_cluster(runner, parallel, arms):
    assert runner(StudyConfig(parallel=parallel), arms) == (None, 0)  # no runner: torch keeps this thread's threads


@pytest.mark.parametrize(("parallel", "arms", "workers"), [(2, 6, 2), (5, 3, 3)])
def test_concurrent_arms_get_a_local_cluster_of_that_many_processes_sharing_the_cores(runner, parallel, arms, workers):
    chosen, threads = runner(StudyConfig(parallel=parallel), arms)
    assert isinstance(chosen, DaskTaskRunner) and chosen.address is None
    kwargs = chosen.cluster_kwargs
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (workers, 1, True)
    assert kwargs["env"] == {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}  # the workers report to this API
    assert threads == max(1, default_workers() // workers)


def test_a_named_cluster_takes_every_study_even_of_one_arm(runner):
    chosen, threads = runner(StudyConfig(parallel=1, dask_address="tcp://scheduler:8786"), 1)
    assert isinstance(chosen, DaskTaskRunner) and chosen.address == "tcp://scheduler:8786"
    assert threads == 0  # its workers' cores are theirs to share


def test_the_study_runs_arms_param_stays_within_mlflows_limit_for_a_large_nested_study():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    from flows.pipeline import arms_param

    few = [f"{k:032x}" for k in range(11)]
    assert arms_param(few) == ", ".join(few)  # a plain study: the ids themselves
    many = [f"{k:032x}" for k in range(2 * (1 + 5 + 5 * 4) * 4)]  # 5 folds, 8 candidates: 208 arms
    assert len(", ".join(many)) > MAX_PARAM_VAL_LENGTH
    assert arms_param(many) == "208 runs (their ids are in study.json)"
