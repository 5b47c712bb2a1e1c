"""The CLI's contract: readable one-line errors, exit codes, ``medflow evaluate`` and ``validate``."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flows.cli import main

# medflow's entry point with the arguments that follow, saying at its end whether the command imported torch
TORCH_PROBE = ("import sys; from flows.cli import main; code = main(sys.argv[1:]); "
               "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)")

from tests.components.evaluation.references import synthetic_predictions


def test_unknown_override_is_one_line_and_exit_1(workspace, capsys):
    assert main(["run", "--set", "train.epoch=2"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "medflow: error: unknown config key 'train.epoch'; did you mean 'train.epochs'?"
    assert not (workspace / "data").exists()


def test_medflows_log_lines_print_once_where_prefects_console_handler_prints_them_too():
    """A flow's console showed "INFO cache: ..." twice: medflow's handler, and Prefect's on the root logger."""
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import quiet_libraries

    medflow = logging.getLogger("medflow")
    earlier = list(medflow.handlers)  # an in-process command's, on the stream pytest captured then (closed since)
    for handler in earlier:
        medflow.removeHandler(handler)
    quiet_libraries()
    (ours,) = medflow.handlers
    our_lines, prefects_lines = io.StringIO(), io.StringIO()
    ours.setStream(our_lines)
    prefects = PrefectConsoleHandler(stream=prefects_lines)
    root = logging.getLogger()
    set_up = [h for h in root.handlers if isinstance(h, PrefectConsoleHandler)]  # importing prefect adds one
    for handler in set_up:
        root.removeHandler(handler)
    try:
        logging.getLogger("medflow.training").info("cache: memory")  # a command outside a flow
        assert our_lines.getvalue() == "INFO cache: memory\n" and prefects_lines.getvalue() == ""
        root.addHandler(prefects)  # as Prefect's logging set-up does
        logging.getLogger("medflow.training").warning("cache: disk")
        assert "cache: disk" not in our_lines.getvalue() and prefects_lines.getvalue().count("cache: disk") == 1
    finally:
        root.removeHandler(prefects)
        for handler in set_up:
            root.addHandler(handler)
        medflow.removeHandler(ours)
        for handler in earlier:
            medflow.addHandler(handler)


def test_every_command_puts_arrows_buffers_on_the_c_heap(workspace, monkeypatch):
    """As resolving a step does (tests/components/test_machine.py): predict, compare and drift read tables too."""
    import pyarrow as pa

    from components.machine import ARROW_POOL_ENV

    monkeypatch.delenv(ARROW_POOL_ENV, raising=False)
    before = pa.default_memory_pool()
    pa.set_memory_pool(pa.mimalloc_memory_pool())
    try:
        assert main(["run", "--set", "train.epoch=2"]) == 1
        assert pa.default_memory_pool().backend_name == "system"
    finally:
        pa.set_memory_pool(before)


def test_debug_shows_the_traceback(workspace):
    from components.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "run", "--set", "train.epoch=2"])


def test_a_file_system_refusal_is_one_line_naming_the_path(workspace, capsys):
    """Permission denied, no space left, or (here, as root may write anywhere) a file where .medflow/ goes."""
    (workspace / ".medflow").write_text("not a folder")
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"medflow: error: {workspace / '.medflow'}: File exists (--debug shows where)"
    with pytest.raises(FileExistsError):
        main(["--debug", "run"])


def test_missing_config_file(workspace, capsys):
    assert main(["run", "--config", "nope.yaml"]) == 1
    assert capsys.readouterr().err.startswith("medflow: error: cannot read config nope.yaml")


def test_usage_errors_exit_2(capsys):
    assert main(["run", "--bogus"]) == 2
    assert "No such option: --bogus" in capsys.readouterr().err


def _write_tables(folder: Path, fmt: str) -> tuple[Path, Path]:
    y, prob, groups = synthetic_predictions(300)
    ids = [f"C{i}" for i in range(300)]
    predictions = pd.DataFrame({"case_id": ids, "y_true": y, "prob": prob})
    manifest = pd.DataFrame({"case_id": ids, "patient_id": [f"P{i // 3}" for i in range(300)], **groups})
    paths = folder / f"predictions.{fmt}", folder / f"manifest.{fmt}"
    for table, path in zip((predictions, manifest), paths):
        table.to_csv(path, index=False) if fmt == "csv" else table.to_parquet(path)
    return paths


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_evaluate_writes_the_report(tmp_path, capsys, fmt):
    predictions, manifest = _write_tables(tmp_path, fmt)
    out = tmp_path / "out" / "report.json"
    code = main(["evaluate", "--predictions", str(predictions), "--manifest", str(manifest), "--out", str(out), "--n-bootstrap", "100"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["n"] == 300 and report["n_patients"] == 100 and set(report["fairness"]) == {"sex", "site", "race"}
    assert "binary: n=300" in capsys.readouterr().out


def test_evaluate_bad_input_is_one_line_and_no_report(tmp_path, capsys):
    predictions, manifest = _write_tables(tmp_path, "csv")
    table = pd.read_csv(predictions)
    table.loc[7, "prob"] = -0.5
    table.to_csv(predictions, index=False)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--predictions", str(predictions), "--manifest", str(manifest), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == f"medflow: error: {predictions}: probabilities outside [0, 1] for case_id(s): C7"
    assert not out.exists()


def test_evaluate_refuses_text_labels_in_one_line(tmp_path, capsys):
    predictions, manifest = _write_tables(tmp_path, "csv")
    table = pd.read_csv(predictions)
    table["y_true"] = table["y_true"].map({0: "benign", 1: "malignant"})
    table.to_csv(predictions, index=False)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--predictions", str(predictions), "--manifest", str(manifest), "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"medflow: error: {predictions}: y_true holds text ('benign', 'malignant'); give class numbers 0..1 in the "
        "order of the probability columns (e.g. map benign=0, malignant=1)")
    assert not out.exists()


def test_evaluate_refuses_labels_that_contradict_the_manifest(tmp_path, capsys):
    predictions, manifest = _write_tables(tmp_path, "csv")
    table, cases = pd.read_csv(predictions), pd.read_csv(manifest)
    cases["label"] = table["y_true"]  # the manifest knows the truth
    cases.to_csv(manifest, index=False)
    table["y_true"] = 1 - table["y_true"]  # a flipped export: AUC near 0 without a word, before
    table.to_csv(predictions, index=False)
    out = tmp_path / "report.json"
    assert main(["evaluate", "--predictions", str(predictions), "--manifest", str(manifest), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow: error: {predictions}: y_true differs from the manifest's label for 300 of 300 "
                          "cases (C0, C1, C2, C3, C4")
    assert len(err.splitlines()) == 1 and not out.exists()
    table["y_true"] = 1 - table["y_true"]  # agreeing labels are evaluated as before
    table.to_csv(predictions, index=False)
    assert main(["evaluate", "--predictions", str(predictions), "--manifest", str(manifest), "--out", str(out),
                 "--n-bootstrap", "0"]) == 0


def test_validate_exits_2_and_names_the_failures(small_dataset, tmp_path, capsys):
    manifest = pd.read_parquet(small_dataset)
    manifest.loc[0, "label"] = 9
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path)
    assert main(["validate", "--manifest", str(small_dataset), "--set", "validation.min_group_size=1"]) == 0
    assert main(["validate", "--manifest", str(path), "--set", "validation.min_group_size=1"]) == 2
    err = capsys.readouterr().err
    assert "validation failed (1 expectation(s)" in err and "expect_column_values_to_be_in_set on manifest.label" in err


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("medflow")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "evaluate" in result.stdout and "run" in result.stdout


def test_a_tracking_server_that_does_not_answer_is_one_line(workspace, monkeypatch, capsys):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert main(["history", "--model", "m"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow: error: MLflow at http://127.0.0.1:{port} does not answer (connection refused") and "\n" not in err


def test_registry_commands_on_an_unknown_model(workspace, capsys):
    assert main(["history", "--model", "nope"]) == 1
    assert main(["rollback", "--model", "nope"]) == 1
    assert main(["promote", "--model", "nope", "--version", "1"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("medflow: error: no registered model 'nope'") for line in lines)


def test_evaluate_segmentation_tables_from_the_command_line(tmp_path, capsys):
    from tests.components.evaluation.test_segmentation import _dataset

    predictions, manifest = _dataset(tmp_path, n=12)
    predictions.to_csv(tmp_path / "pred" / "predictions.csv", index=False)
    manifest.to_parquet(tmp_path / "data" / "manifest.parquet")
    out, page = tmp_path / "report.json", tmp_path / "report.html"
    code = main(["evaluate", "--predictions", str(tmp_path / "pred" / "predictions.csv"),
                 "--manifest", str(tmp_path / "data" / "manifest.parquet"), "--out", str(out), "--html", str(page),
                 "--min-group-size", "3", "--n-bootstrap", "100"])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["task"] == "segmentation" and report["fairness"]["sex"]["dice_gap"] > 0
    assert "alt='subgroup Dice chart'" in page.read_text() and "segmentation: n=12" in capsys.readouterr().out


def test_status_lists_runs_data_versions_and_champions(workspace, capsys):
    import mlflow
    from mlflow.tracking import MlflowClient

    from components import paths

    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    assert main(["status"]) == 0
    assert "No runs yet" in capsys.readouterr().out
    experiment = client.create_experiment("e")
    run = client.create_run(experiment, tags={"medflow.data_version": "abcdef0123456789"})
    client.log_metric(run.info.run_id, "test_auc", 0.91)
    client.create_registered_model("m")
    client.create_model_version("m", source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("m", "champion", "1")
    client.create_registered_model("m.medflow-lock")
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert run.info.run_id[:8] in out and "abcdef01" in out and "0.910" in out
    assert "m: latest version 1, champion 1, previous-champion -" in out and "medflow-lock" not in out


def test_a_classification_config_turned_to_segmentation_is_refused_before_any_work(workspace, capsys):
    assert main(["run", "--set", "data.task=segmentation", "--set", "promotion.non_inferiority=[]"]) == 1
    assert "network 'densenet' is not a segmentation network; choices: unet," in capsys.readouterr().err
    assert main(["run", "--set", "data.task=segmentation"]) == 1
    assert "remove promotion.non_inferiority" in capsys.readouterr().err
    assert not (workspace / "data").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.model_kwargs={foo: 1}"],
         "network 'densenet' refused train.model_kwargs {'foo': 1}: DenseNet.__init__() got an unexpected keyword "
         "argument 'foo'"),
        (["data.task=segmentation", "train.model=unet", "promotion.non_inferiority=[]",
          "train.model_kwargs={chanels: [8, 16]}"],
         "network 'unet' has no argument 'chanels' (train.model_kwargs); did you mean 'channels'?"),
        (["study.folds=3", "study.candidates=[{train.lr: 0.01}, {train.model_kwargs: {foo: 1}}]"],
         "study.candidates[1]: network 'densenet' refused train.model_kwargs {'foo': 1}: DenseNet.__init__() got an unexpected keyword "
         "argument 'foo'"),
        (["study.folds=3", "study.candidates=[{train.lr: 0.01}, {train.lr: 0.001}]", "study.select_by=acu"],
         "study.select_by 'acu' is not a summary metric of this run; it may be auc, accuracy, qwk, ece, brier, dice, "
         "hd95, voxel_ece; did you mean 'auc'?"),
    ],
)
def test_network_arguments_are_refused_once_before_any_work(workspace, capsys, overrides, message):
    from tests.flows.test_prefect_server import embedded_servers

    assert main(["run", *[a for o in overrides for a in ("--set", o)]]) == 1
    assert capsys.readouterr().err == f"medflow: error: {message}\n"  # one line, printed once
    assert not (workspace / "data").exists() and not (workspace / ".medflow").exists()
    assert not embedded_servers()  # the one started beside the preflight is stopped


def test_a_prefect_server_that_does_not_answer_is_one_line(workspace, monkeypatch, capsys):
    from tests.integration.conftest import free_port

    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    assert main(["run", "--set", "data.n_patients=20"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow: error: the Prefect server at {url} does not answer (")
    assert len(err.splitlines()) == 1 and not (workspace / "data").exists()


@contextlib.contextmanager
def held_lock():
    """Another process holding the workspace lock (as a running `medflow run` does); yields that process."""
    import multiprocessing

    from components.workspace import workspace_lock

    ready, release = multiprocessing.Event(), multiprocessing.Event()

    def hold():
        with workspace_lock("run"):
            ready.set()
            release.wait(60)

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    try:
        assert ready.wait(30)
        yield holder
    finally:
        release.set()
        holder.join(30)


def test_a_second_command_in_a_busy_workspace_is_refused_naming_the_first(workspace, capsys):
    from components.workspace import workspace_lock

    with held_lock() as holder:
        assert main(["run", "--set", "data.n_patients=20"]) == 4
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"medflow: error: `medflow run` (pid {holder.pid}, since ")
        assert err.endswith("wait for it to finish, or pass --wait SECONDS to wait for the lock")
        assert main(["ingest", "--set", "data.n_patients=20"]) == 4
        assert not (workspace / "data").exists()
    with workspace_lock("ingest", wait_s=5):  # released when its holder ends
        pass


def test_a_busy_workspace_is_said_before_the_preflight_loads_torch(workspace):
    """The refusal comes at once: before the network checks import torch and MONAI (seconds)."""
    import subprocess
    import sys

    with held_lock():
        done = subprocess.run([sys.executable, "-c", TORCH_PROBE, "run"], cwd=workspace, capture_output=True,
                              text=True, timeout=120, check=False)
        assert done.returncode == 4, done.stderr[-2000:]
        assert done.stdout.strip() == "torch not loaded"
        assert "is writing to this workspace" in done.stderr


def test_a_run_in_a_checkout_that_ignores_data_stops_before_touching_it(workspace, capsys):
    """medflow's own clone ignores data/: the run used to convert the export, then fail on data/demo.dvc."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    (workspace / ".gitignore").write_text("data/\n")
    assert main(["run", "--set", "data.n_patients=20"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow: error: {workspace / 'data' / 'demo.dvc'} would be ignored by git (.gitignore:1:data/)")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in workspace.iterdir()) == [".git", ".gitignore"]  # the folder as it was


def test_a_pretraining_in_a_checkout_that_ignores_data_stops_before_touching_it(workspace, capsys):
    """As a run does: `medflow pretrain` used to convert the export, then fail on data/demo.dvc."""
    import subprocess

    subprocess.run(["git", "init", "-q"], cwd=workspace, check=True)
    (workspace / ".gitignore").write_text("data/\n")
    assert main(["pretrain", "-s", "data.n_patients=20", "-s", "pretrain.epochs=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medflow: error: {workspace / 'data' / 'demo.dvc'} would be ignored by git (.gitignore:1:data/)")
    assert len(err.splitlines()) == 1
    assert sorted(p.name for p in workspace.iterdir()) == [".git", ".gitignore"]  # the folder as it was


def test_a_refused_pretraining_stops_the_server_started_beside_its_checks(workspace, capsys, monkeypatch):
    """The server starts while the model's checks import torch: a refusal there stops it, also in a workspace that
    has a data version (which the failed command leaves, and with it nobody else stops the server)."""
    from flows import prefect_server
    from tests.flows.test_prefect_server import embedded_servers

    started = []
    start = prefect_server.start_embedded_server
    monkeypatch.setattr(prefect_server, "start_embedded_server", lambda: started.append(start()))
    (workspace / "data").mkdir()
    (workspace / "data" / "older.dvc").write_text("outs:\n- path: older\n")
    try:
        assert main(["pretrain", "--set", "pretrain.model=densenett"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("medflow: error: ") and "did you mean 'densenet'" in err and len(err.splitlines()) == 1
        # started beside the checks, and stopped: with torch already imported the refusal comes before the server's
        # process exists, so only the start's thread, which the stop ends and clears, tells a stop from none
        assert started and not prefect_server._starting and not embedded_servers()
    finally:
        prefect_server.stop_embedded_server()


def test_a_killed_holder_leaves_no_stale_lock(workspace):
    import multiprocessing
    import os
    import signal

    from components.workspace import workspace_lock

    ready = multiprocessing.Event()

    def hold():
        with workspace_lock("run"):
            ready.set()
            signal.pause()

    holder = multiprocessing.get_context("fork").Process(target=hold)
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    with workspace_lock("run", wait_s=5):  # the OS released the dead holder's lock
        pass


def test_placement_without_a_prefect_server_is_refused_before_any_work(workspace, monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main(["run", "--set", "placement.train=medflow-k8s"]) == 1
    err = capsys.readouterr().err
    assert "placement {'train': 'medflow-k8s'} sends steps to work pools" in err and "set PREFECT_API_URL" in err
    assert not (workspace / "data").exists()


def test_the_deployments_entry_point_refuses_a_run_before_any_work(workspace):
    """``retrain_workspace`` (what a deployment runs) passes the same preflight as ``medflow run``."""
    import shutil

    from components.config import default_config_path
    from components.errors import ConfigError
    from flows.pipeline import retrain_workspace

    shutil.copy(default_config_path(), workspace / "medflow.yaml")
    with pytest.raises(ConfigError, match="unknown network 'no-such-net'"):
        retrain_workspace.fn(workspace=str(workspace), overrides=["train.model=no-such-net"])
    assert not (workspace / "data").exists() and not (workspace / ".medflow").exists()
