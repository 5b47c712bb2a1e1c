"""End-to-end: ``medflow run`` as a user runs it, on Prefect's ephemeral server."""

from __future__ import annotations

import gzip
import json
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pydicom
import pytest
from mlflow.tracking import MlflowClient

from tests.flows.test_cli import TORCH_PROBE

pytestmark = pytest.mark.slow

MEDFLOW = str(Path(sys.executable).with_name("medflow"))
SMALL = [
    "data.n_patients=200", "data.image_size=32", "train.epochs=6", "evaluate.n_bootstrap=200",
    'promotion.rules=[{metric: overall.auc, op: ">=", value: 0.75}, {metric: fairness.sex.auc_gap, op: "<=", value: 0.15}]',
]


SET_RULES = [arg for item in SMALL if item.startswith("promotion") for arg in ("--set", item)]


def _cli(workspace: Path, *args: str, probe: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    env["PREFECT_HOME"] = str(workspace / ".medflow" / "prefect")
    command = [sys.executable, "-c", TORCH_PROBE, *args] if probe else [MEDFLOW, *args]
    return subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True, timeout=600, check=False)


def _run(workspace: Path, *overrides: str, probe: bool = False) -> subprocess.CompletedProcess:
    flags = [o for o in overrides if o.startswith("--")]
    settings = [o for o in (*SMALL, *overrides) if not o.startswith("--")]
    return _cli(workspace, "run", *flags, *[arg for item in settings for arg in ("--set", item)], probe=probe)


def test_fair_run_promotes_then_a_biased_run_is_refused_and_the_champion_stays(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Promoted: medflow-demo-classifier@champion is version 1" in first.stdout
    assert "Data version" in first.stdout and "MLflow run" in first.stdout
    assert (tmp_path / "data" / "demo.dvc").is_file() and (tmp_path / ".git").is_dir()

    again = _run(tmp_path, probe=True)  # nothing changed: the completed run's summary answers, no flow starts
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing changed since the run that finished" in again.stdout and "version 1 (alias challenger)" in again.stdout
    # answered before the preflight's imports (seconds), so before Prefect's server starts and before any flow
    # (Prefect's "Starting temporary server" line no longer tells: the server starts before Prefect's logging is set up)
    assert again.stdout.strip().endswith("torch not loaded")
    for record in (tmp_path / ".medflow" / "runs").glob("summary-*.json"):
        record.unlink()  # without the record the flow runs, and every cached step is reused
    cached = _run(tmp_path)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "Reused" in cached.stdout and "version 1 (alias challenger)" in cached.stdout

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    client = MlflowClient()
    (trained,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    with sqlite3.connect(tmp_path / ".medflow" / "prefect" / "prefect.db") as db:  # each side names the other
        flow_runs = dict(db.execute("select r.id, r.name from flow_run r join flow f on f.id = r.flow_id "
                                    "where f.name = 'medflow-retrain'"))
        links = [link for (link,) in db.execute("select data from artifact where key = 'mlflow-run'")]
    assert trained.data.tags["medflow.prefect.flow_run_id"] in flow_runs
    assert trained.data.tags["medflow.prefect.flow_run_name"] == flow_runs[trained.data.tags["medflow.prefect.flow_run_id"]]
    assert any(trained.info.run_id in link for link in links)
    v1_tags = client.get_model_version("medflow-demo-classifier", "1").tags
    assert v1_tags["medflow.prefect.flow_run_id"] in flow_runs
    strict = _run(tmp_path, 'promotion.rules=[{metric: overall.auc, op: ">=", value: 0.99}]')  # a new policy only
    assert strict.returncode == 3, strict.stderr[-3000:]  # refused: a scheduler can tell
    assert "Not promoted: medflow-demo-classifier@champion stays at version 1" in strict.stdout
    assert "overall.auc >= 0.99 fails" in strict.stdout
    assert len(mlflow.search_runs(search_all_experiments=True)) == 1  # no training, no evaluation run
    assert len(client.search_model_versions("name='medflow-demo-classifier'")) == 1
    decision = json.loads(client.get_model_version("medflow-demo-classifier", "1").tags["medflow.promotion"])
    assert [g["metric"] for g in decision["gates"] if not g["passed"]] == ["overall.auc"] and not decision["promoted"]
    assert str(client.get_model_version_by_alias("medflow-demo-classifier", "champion").version) == "1"

    champion = mlflow.pyfunc.load_model("models:/medflow-demo-classifier@champion")
    prob = champion.predict(np.random.default_rng(0).normal(size=(3, 48, 48)).astype(np.float32))
    assert prob.shape == (3, 2) and np.allclose(prob.sum(axis=1), 1, atol=1e-5)

    second = _run(tmp_path, "data.bias=1.0", "train.num_workers=2")  # forked DataLoader workers inside the flow
    assert second.returncode == 3, second.stderr[-3000:]
    assert "Not promoted: medflow-demo-classifier@champion stays at version 1" in second.stdout
    v2 = client.get_model_version("medflow-demo-classifier", "2")
    decision = json.loads(v2.tags["medflow.promotion"])
    failed = [g["metric"] for g in decision["gates"] if not g["passed"]]
    assert "fairness.sex.auc_gap" in failed, (decision, second.stdout)
    assert str(client.get_model_version_by_alias("medflow-demo-classifier", "champion").version) == "1"
    v1 = client.get_model_version("medflow-demo-classifier", "1")
    assert v1.tags["medflow.data_version"] != v2.tags["medflow.data_version"]

    history = _cli(tmp_path, "history", "--model", "medflow-demo-classifier")
    assert history.returncode == 0
    lines = [line for line in history.stdout.splitlines() if "version" in line]
    assert "version 1    promoted" in lines[0] and "version 1    refused" in lines[1]  # the stricter policy
    assert "version 2    refused" in lines[2]
    assert "FAIL  fairness.sex.auc_gap <= 0.15" in history.stdout

    refused = _cli(tmp_path, "promote", "--model", "medflow-demo-classifier", "--version", "2", *SET_RULES)
    assert refused.returncode == 3, refused.stderr
    assert refused.stderr.startswith("medflow: error: version 2 of medflow-demo-classifier was not promoted")
    forced = _cli(tmp_path, "promote", "--model", "medflow-demo-classifier", "--version", "2", "--set", "promotion.rules=[]",
                  "--set", "promotion.non_inferiority=[]")
    assert forced.returncode == 0, forced.stderr
    back = _cli(tmp_path, "rollback", "--model", "medflow-demo-classifier")
    assert back.returncode == 0 and "champion is version 1 (was 2)" in back.stdout
    assert str(client.get_model_version_by_alias("medflow-demo-classifier", "champion").version) == "1"
    kinds = _cli(tmp_path, "history", "--model", "medflow-demo-classifier").stdout
    assert kinds.count("rollback") == 1 and kinds.count("promoted") == 2

    forced = _run(tmp_path, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "Reused" not in forced.stdout and "version 3 (alias challenger)" in forced.stdout

    # version 3 retrained the champion's config on the same data: side by side, nothing tells them apart
    compared = _cli(tmp_path, "compare", "--model", "medflow-demo-classifier", "3", "1", "--json", "compare.json",
                    "--n-bootstrap", "200")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "version 3 (A) and version 1 (B) on A's test set" in " ".join(compared.stdout.split())
    table = json.loads((tmp_path / "compare.json").read_text())
    auc = next(r for r in table["metrics"] if r["name"] == "auc")
    assert auc["ci95"][0] <= auc["difference"] <= auc["ci95"][1] and auc["better"] != "b"
    assert {r["name"] for r in table["fairness"]} >= {"sex.auc_gap", "sex.es_auc"}
    unknown = _cli(tmp_path, "compare", "--model", "medflow-demo-classifier", "9")
    assert unknown.returncode == 1 and len(unknown.stderr.strip().splitlines()) == 1

    # the champion on the export as new studies: nothing identifying reaches what medflow versions or logs
    export = next((tmp_path / ".medflow" / "exports").iterdir())
    predicted = _cli(tmp_path, "predict", "--model", "medflow-demo-classifier@champion", "--source", str(export),
                     "--format", "dicom", "--out", "predictions")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert re.search(r"^Predicted .* on (cpu|cuda:0) -> predictions$", predicted.stdout, re.MULTILINE), predicted.stdout
    assert len(pd.read_csv(tmp_path / "predictions" / "predictions.csv")) == len(list(export.rglob("*.dcm")))
    outputs = [r.stdout + r.stderr for r in (first, again, cached, strict, second, history, refused, forced, back, forced,
                                             predicted)]
    reports = sorted((tmp_path / "predictions" / "dicom").glob("*_sr.dcm"))  # for the PACS: in the source's study
    assert len(reports) == len(list(export.rglob("*.dcm")))
    studies = {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in export.rglob("*.dcm")}
    assert str(pydicom.dcmread(reports[0]).StudyInstanceUID) in studies
    leaks = _identifiers_found(tmp_path, outputs)
    assert not leaks, f"patient identifiers written by medflow: {sorted(leaks)[:10]}"
    some = pydicom.dcmread(next((tmp_path / ".medflow" / "exports").rglob("*.dcm")), stop_before_pixels=True)
    planted = tmp_path / "data" / "planted.txt"  # the scan's positive control: one name, gzip-compressed
    planted.write_bytes(gzip.compress(f"note about {some.PatientName}".encode()))
    assert _identifiers_found(tmp_path, []) == {str(some.PatientName).encode()}
    planted.unlink()


IDENTIFIER_SHAPES = re.compile(
    rb"MRN\d{7}|ACC\d+|[A-Z][a-z]+\^[A-Z][a-z]+|General Hospital site-[a-z]|\d+(?:\.\d+){6,}|\b(?:19|20)\d{6}\b"
)


def _identifiers_found(workspace: Path, outputs: list[str]) -> set[bytes]:
    """Every PHI value of the export's DICOM headers that appears in anything medflow wrote or printed.

    Scanned: the workspace (dataset, DVC cache and remote, MLflow store and artifacts, Prefect's database and
    results, reports, model cards, ingest state), git history, and the console output. Not scanned: the
    hospital export itself, the pseudonym key, and ``predictions/``, the results that go back to the hospital
    (its DICOM results must name the source study). Tokens shaped like identifiers are compared with the values.
    """
    exports = workspace / ".medflow" / "exports"
    values: set[bytes] = set()
    for path in exports.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName",
                        "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            values.add(str(ds.get(keyword, "")).encode())
    values.discard(b"")
    found: set[bytes] = set()

    def scan(data: bytes) -> None:
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        found.update(values.intersection(IDENTIFIER_SHAPES.findall(data)))

    for path in workspace.rglob("*"):
        rel = path.relative_to(workspace).parts
        if (path.is_file() and rel[:2] not in ((".medflow", "exports"), (".medflow", "secrets"))
                and rel[0] not in (".git", "predictions")):
            scan(path.read_bytes())
    history = subprocess.run(["git", "log", "-p", "--all"], cwd=workspace, capture_output=True, check=True)
    scan(history.stdout)
    for text in outputs:
        scan(text.encode())
    assert len(values) > 1000  # the scan looked for every patient's identifiers
    return found


def test_failed_validation_stops_before_training_with_exit_2(tmp_path):
    result = _run(tmp_path, "validation.min_group_size=100000")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "medflow: error: data validation failed" in result.stderr
    assert "expect_column_values_to_be_between on groups.n" in result.stderr
    assert "Traceback" not in result.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    assert mlflow.search_runs(search_all_experiments=True).empty


def test_ctrl_c_during_training_exits_130_in_seconds_with_the_runs_recorded_as_stopped(tmp_path):
    """Ctrl-C reaches the whole foreground process group, Prefect's embedded server too: the run used to
    wait over a minute for that dead server, print tracebacks and leave its flow run "Running" for good."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDFLOW", "MLFLOW_TRACKING", "PREFECT_API_URL"))}
    env["PREFECT_HOME"] = str(tmp_path / ".medflow" / "prefect")
    settings = [*SMALL[:2], "train.epochs=500", "train.checkpoint_interval_s=0"]
    run = subprocess.Popen([MEDFLOW, "run", *[arg for item in settings for arg in ("--set", item)]], cwd=tmp_path,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = tmp_path / ".medflow" / "checkpoints"
    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline and not list(checkpoints.glob("*.pt")):
        time.sleep(0.2)
    assert run.poll() is None, run.communicate()[1][-3000:]
    os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    sent = time.monotonic()
    try:
        _, stderr = run.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail(f"medflow run still running 60 s after Ctrl-C: {run.communicate()[1][-3000:]}")
    assert run.returncode == 130, stderr[-3000:]
    assert time.monotonic() - sent < 30
    assert "Traceback" not in stderr
    said = [line for line in stderr.splitlines() if line.startswith("medflow:")]
    assert len(said) == 1 and re.fullmatch(
        r"medflow: interrupted after epoch \d+, which is checkpointed; `medflow run` resumes from there", said[0]
    ), stderr[-3000:]
    assert list(checkpoints.glob("*.pt"))
    # Prefect's embedded server is a child in the same process group, and may still be closing its database
    while time.monotonic() - sent < 60:
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with sqlite3.connect(tmp_path / ".medflow" / "prefect" / "prefect.db", timeout=30) as db:  # as Prefect keeps it
        states = dict(db.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id"))
    assert states == {"medflow-retrain": "CRASHED"}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / '.medflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["KILLED"]


def test_a_first_run_that_fails_in_ingest_leaves_the_folder_as_it_found_it(tmp_path):
    """The flow had started (Prefect's embedded server writes under .medflow/): its state, the pseudonym key
    and the MLflow store all went with the failure, since no data version was made."""
    source = tmp_path / "export"
    source.mkdir()
    (source / "labels.csv").write_text("path,label,patient_id\nmissing.dcm,1,p1\n")
    failed = _cli(tmp_path, "run", "--set", f"data.source={source}", "--set", "data.format=dicom")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "missing.dcm: file not found" in failed.stderr
    assert "Beginning flow run" in failed.stdout + failed.stderr  # it failed inside the flow, not in the preflight
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
