"""End-to-end: a label-fraction study through ``medflow run``, its arms fanned out on Prefect's process pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
SMALL = ["data.n_patients=200", "data.image_size=32", "train.epochs=4", "evaluate.n_bootstrap=200",
         'promotion.rules=[{metric: overall.auc, op: ">=", value: 0.6}]', "study.label_fractions=[0.25, 1.0]",
         "study.parallel=2"]


def _env(workspace: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    return env | {"PREFECT_HOME": str(workspace / ".medflow" / "prefect")}


def _run(workspace: Path, *extra: str) -> subprocess.CompletedProcess:
    env = _env(workspace)
    settings = [arg for item in (*SMALL, *extra) for arg in ("--set", item)]
    return subprocess.run([MEDFLOW, "run", *settings, "--summary", "summary.json"], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def test_label_fractions_train_an_arm_each_report_the_curve_register_the_largest_and_resume(tmp_path):
    plain = subprocess.run([MEDFLOW, "run", *[arg for item in SMALL[:-2] for arg in ("--set", item)], "--summary",
                            "plain.json"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                           timeout=900, check=False)
    assert plain.returncode == 0, plain.stderr[-3000:]
    first = _run(tmp_path)  # as if a study had stopped after its 1.0 arm: that arm is the plain run, finished
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Study        label fractions: 0.25 (" in first.stdout and "1 (" in first.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    study = json.loads(Path(summary["study"]).read_text())
    assert Path(summary["study"]).with_name("study.html").is_file()
    quarter, full = study["arms"]
    assert (quarter["fraction"], full["fraction"]) == (0.25, 1.0)
    assert 0.2 < quarter["n_train_patients"] / full["n_train_patients"] < 0.35
    assert full["run_id"] == summary["run_id"] != quarter["run_id"]  # the whole training set's model is registered
    assert full["run_id"] == json.loads((tmp_path / "plain.json").read_text())["run_id"]  # reused, not retrained

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    (study_run,) = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                      "tags.`medflow.study` = 'label_fractions'")
    assert Path(summary["study"]).parent.name == study_run.info.run_id
    runs = {arm["run_id"]: client.get_run(arm["run_id"]) for arm in study["arms"]}
    for arm in study["arms"]:
        run = runs[arm["run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id  # nested under the study in the UI
        report = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=arm["run_id"],
                                                                     artifact_path="evaluation/report.json")).read_text())
        assert arm["metrics"]["auc"] == {"value": report["overall"]["auc"], "ci95": report["ci95"]["auc"]}
        assert study_run.data.metrics[f"auc.fraction_{arm['fraction']:g}"] == pytest.approx(report["overall"]["auc"])
    a, b = runs.values()
    assert study_run.info.experiment_id == a.info.experiment_id == b.info.experiment_id
    trainings = lambda: len(client.search_runs([a.info.experiment_id]))  # noqa: E731
    before = trainings()

    for record in (tmp_path / ".medflow" / "runs").glob("summary-*.json"):
        record.unlink()  # without the record the flow runs again: every arm's steps come from the cache
    # again, on a Dask cluster of its own (workers started elsewhere, entering the workspace): nothing retrains
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={k: v for k, v in _env(tmp_path).items() if k.startswith("PREFECT")}) as cluster:
        again = _run(tmp_path, f"study.dask_address={cluster.scheduler_address}")
        with Client(cluster) as dask_client:  # what this cluster's scheduler was given, by task name
            prefixes = dask_client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert again.returncode == 0, again.stderr[-3000:]
    assert prefixes == ["study_arm"]  # the arms ran on this cluster's workers
    rerun = json.loads(Path(json.loads((tmp_path / "summary.json").read_text())["study"]).read_text())
    assert [arm["run_id"] for arm in rerun["arms"]] == [arm["run_id"] for arm in study["arms"]]
    assert trainings() == before + 1  # the new study run only: no arm trained again


def test_leaving_one_site_out_judges_each_site_unseen_and_registers_the_run_on_every_site(tmp_path):
    done = subprocess.run([MEDFLOW, "run", *[arg for item in (*SMALL[:-2], "study.leave_one_site_out=true")
                                             for arg in ("--set", item)], "--summary", "summary.json"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Study        leave one site out: site-a held out auc" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    study = json.loads(Path(summary["study"]).read_text())
    assert [a["site"] for a in study["arms"]] == ["site-a", "site-b", "site-c"]
    assert study["all_sites"]["run_id"] == summary["run_id"]  # the run on every site is the one registered

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    (study_run,) = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                      "tags.`medflow.study` = 'leave_one_site_out'")
    for arm in study["arms"]:
        report = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=arm["run_id"],
                                                                     artifact_path="evaluation/report.json")).read_text())
        assert report["external"]["sites"] == [arm["site"]]  # held out: the arm never trained or tuned on it
        assert arm["external"]["auc"]["value"] == report["external"]["overall"]["auc"]
        assert study_run.data.metrics[f"auc.site_{arm['site']}"] == pytest.approx(report["external"]["overall"]["auc"])
        assert client.get_run(arm["run_id"]).data.tags["mlflow.parentRunId"] == study_run.info.run_id
    assert len({arm["run_id"] for arm in study["arms"]} | {summary["run_id"]}) == 4
    status = subprocess.run([MEDFLOW, "status"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300, check=False)
    assert f"study {study_run.info.run_id[:8]}  study: leave one site out (site-a, site-b, site-c)  4 arms' runs" in status.stdout
    held = [client.get_run(arm["run_id"]).info for arm in study["arms"]]
    assert any(a.start_time < b.end_time and b.start_time < a.end_time  # two arms trained at once
               for k, a in enumerate(held) for b in held[k + 1:])


def test_three_fold_cross_validation_validates_each_case_once_and_ensembles_the_folds_on_test(tmp_path):
    # one arm at a time: the arms run in this process, one after another, without a Dask cluster
    done = subprocess.run([MEDFLOW, "run", *[arg for item in (*SMALL[:-2], "study.folds=3", "study.parallel=1")
                                             for arg in ("--set", item)],
                           "--summary", "summary.json"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Study        3-fold cross-validation: auc per fold" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    study = json.loads(Path(summary["study"]).read_text())
    assert len(study["per_fold"]) == 3
    # the folds joined into one model are the registered run: its test probabilities are the folds' mean
    assert summary["run_id"] == study["ensemble"]["run_id"] == study["registered"]["run_id"] != study["all_data"]["run_id"]
    runs = tmp_path / ".medflow" / "runs"
    joined = pd.read_parquet(runs / summary["run_id"] / "predictions.parquet").set_index("case_id").sort_index()
    folds = [pd.read_parquet(runs / f["run_id"] / "predictions.parquet").set_index("case_id").sort_index()
             for f in study["per_fold"]]
    columns = [c for c in joined.columns if c.startswith("prob")]
    mean = sum(f[columns].to_numpy() for f in folds) / 3
    assert joined[columns].to_numpy() == pytest.approx(mean, abs=1e-5)

    manifest = pd.read_parquet(next((tmp_path / "data" / "demo").glob("manifest.parquet")))
    pool = manifest[manifest["split"].isin(("train", "val"))]
    oof = pd.concat([pd.read_parquet(tmp_path / ".medflow" / "runs" / f["run_id"] / "val_predictions.parquet")
                     for f in study["per_fold"]])
    assert sorted(oof["case_id"]) == sorted(pool["case_id"])  # every train and val case validated on exactly once
    assert study["out_of_fold"]["n"] == len(pool)
    assert study["out_of_fold"]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(oof["y_true"], oof["prob"]))
    assert study["ensemble"]["n_test"] == (manifest["split"] == "test").sum()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    (study_run,) = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                      "tags.`medflow.study` = 'cross_validation'")
    assert study_run.data.metrics["auc.cv_mean"] == pytest.approx(study["mean"]["auc"])
    assert study_run.data.params["n_arms"] == "4"  # three folds and the all-data run; the joined ensemble trains nothing
    arms = sorted((client.get_run(r).info for r in [study["all_data"]["run_id"], *(f["run_id"] for f in study["per_fold"])]),
                  key=lambda info: info.start_time)
    assert all(a.end_time <= b.start_time for a, b in zip(arms, arms[1:]))  # study.parallel=1: one after another
    assert "distributed" not in done.stderr  # and no Dask cluster was started for them
    # served: the registered version (one pyfunc, the folds inside) gives those probabilities from the images
    import nibabel as nib  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    version = client.get_model_version(summary["model_name"], summary["version"])
    assert version.run_id == summary["run_id"]
    test = manifest[manifest["split"] == "test"].head(8)
    images = np.stack([nib.load(tmp_path / "data" / "demo" / p).get_fdata(dtype=np.float32) for p in test["image"]])
    served = mlflow.pyfunc.load_model(f"models:/{summary['model_name']}/{summary['version']}").predict(images)
    assert served[:, 1] == pytest.approx(joined.loc[test["case_id"], "prob"].to_numpy(), abs=1e-5)
    # new studies through the ensemble: its embedding drift compares every fold's features, side by side
    import shutil  # noqa: PLC0415

    from components.training.pretrained import classification_head  # noqa: PLC0415

    new = tmp_path / "new"
    new.mkdir()
    for image in test["image"]:
        shutil.copy(tmp_path / "data" / "demo" / image, new / Path(image).name)
    predicted = subprocess.run([MEDFLOW, "predict", "--model", f"{summary['model_name']}/{summary['version']}",
                                "--source", str(new), "--format", "nifti", "--out", "predictions"], cwd=tmp_path,
                               env=_env(tmp_path), capture_output=True, text=True, timeout=600, check=False)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    drift = json.loads((tmp_path / "predictions" / "drift.json").read_text())
    assert next(t for t in drift["tests"] if t["fact"] == "embedding.features")["n_batch"] == len(test)
    (reference,) = (tmp_path / ".medflow" / "cache" / "drift").glob(f"{summary['run_id']}-*.npy")
    members = mlflow.pyfunc.load_model(f"models:/{summary['model_name']}/{summary['version']}").unwrap_python_model()
    widths = [classification_head(m, 2)[1].in_features for m in members.model.members]
    assert len(widths) == 3 and np.load(reference).shape[1] == sum(widths)


def test_nested_cross_validation_chooses_per_outer_fold_and_registers_the_best_candidates_folds(tmp_path):
    candidates = "study.candidates=[{train.lr: 0.003}, {train.lr: 0.000001}]"  # a useful rate, and one that barely moves
    done = subprocess.run([MEDFLOW, "run", *[arg for item in (*SMALL[:-2], "train.epochs=2", "study.folds=3", candidates,
                                                               "study.parallel=1") for arg in ("--set", item)],
                           "--summary", "summary.json"],
                          cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode in (0, 3), done.stderr[-3000:]  # promoted, or refused by a gate: the study completed
    assert "nested over 2 candidates by auc: chosen per outer fold" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    study = json.loads(Path(summary["study"]).read_text())
    nested = study["nested"]
    assert nested["candidates"] == [{"train.lr": 0.003}, {"train.lr": 0.000001}]
    for fold in nested["per_fold"]:  # each outer fold's choice is the better mean over its inner folds
        assert fold["chosen"] == int(np.argmax(fold["inner"]))
    assert nested["chosen"] == int(np.argmax(nested["cv_mean"]))
    manifest = pd.read_parquet(next((tmp_path / "data" / "demo").glob("manifest.parquet")))
    assert nested["estimate"]["n"] == manifest["split"].isin(("train", "val")).sum()  # every case once

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    (study_run,) = client.search_runs([r.experiment_id for r in client.search_experiments()],
                                      "tags.`medflow.study` = 'cross_validation'")
    assert study_run.data.params["chosen"] == str(nested["chosen"])
    # medflow status counts the trainings: the outer folds, the all-data run and the inner arms, not the ensemble
    assert study_run.data.params["n_arms"] == str(len(study["per_fold"]) + 1 + len(nested["runs"])) == "20"
    assert study_run.data.metrics["auc.nested"] == pytest.approx(nested["estimate"]["metrics"]["auc"]["value"])
    lr = nested["candidates"][nested["chosen"]]["train.lr"]
    # the registered ensemble joins the chosen candidate's folds, trained at its rate
    assert summary["run_id"] == study["ensemble"]["run_id"]
    assert [float(client.get_run(f["run_id"]).data.params["train.lr"]) for f in study["per_fold"]] == [lr] * 3
    children = client.search_runs([study_run.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{study_run.info.run_id}'")
    assert len(children) == 2 * (1 + 3 + 3 * 2) + 1  # every arm of both candidates, and the joined ensemble
