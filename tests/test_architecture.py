"""The layers of shared/DESIGN.md hold: import-linter's contracts in pyproject.toml (layers, no Prefect in
a stage, evaluation judging tables only, the config and step table importing no stage, no cycles)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache"], cwd=cwd,
                          capture_output=True, text=True, check=False, env=env)


def test_every_import_contract_is_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    """The contracts can fail: a copy of the packages where evaluation imports inference is refused."""
    import shutil

    for package in ("components", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    report = tmp_path / "components" / "evaluation" / "report.py"
    report.write_text(report.read_text() + "\nfrom components.inference import predict  # an upward import\n")
    result = _lint(tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Evaluation judges prediction tables" in result.stdout and "BROKEN" in result.stdout
