"""``medflow init`` + a plain ``dvc repro``: the stages in dvc.yaml reproduce a run through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

SMALL = [
    "data.n_patients=60", "data.image_size=32", "train.epochs=1", "evaluate.n_bootstrap=50",
    "validation.min_group_size=1", "promotion.rules=[]", "promotion.non_inferiority=[]",
]


def _dvc(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_dvc_repro_runs_the_pipeline_and_then_has_nothing_to_do(workspace):
    assert main(["init", *[a for s in SMALL for a in ("--set", s)]]) == 0
    assert (workspace / "dvc.yaml").read_text() == (Path(__file__).parents[2] / "dvc.yaml").read_text()
    first = _dvc(workspace, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    summary = json.loads((workspace / "reports" / "summary.json").read_text())
    ingest = json.loads((workspace / "reports" / "ingest.json").read_text())
    assert summary["data_version"] == ingest["data_version"] and summary["version"] == "1"
    again = _dvc(workspace, "repro")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Stage 'retrain' didn't change, skipping" in again.stdout
    metrics = _dvc(workspace, "metrics", "show", "--json")
    assert metrics.returncode == 0 and "reports/summary.json" in metrics.stdout


def test_init_refuses_to_overwrite(workspace, capsys):
    assert main(["init"]) == 0
    assert main(["init"]) == 1
    assert "medflow.yaml, dvc.yaml already in" in capsys.readouterr().err
    assert main(["init", "--force"]) == 0
