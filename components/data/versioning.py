"""Version a dataset folder with DVC: one directory, one hash, pushed to a remote.

The data version is the DVC directory hash (the md5 of the ``.dir`` manifest
DVC writes); it tags every MLflow run and model version.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml

from components.errors import IngestError

REMOTE_NAME = "medflow"


@dataclass(frozen=True)
class DataVersion:
    """A versioned dataset."""

    name: str
    version: str
    dvc_file: Path
    remote: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)


def ensure_repository(root: Path) -> None:
    """Make ``root`` a DVC project, initialising git first where it needs its own.

    ``root`` gets its own git repository when it lies in none, or when the one
    it lies in ignores it (DVC refuses git-ignored ``.dvc`` files). Inside a git
    repository that tracks it, DVC is initialised as a subdirectory project.
    """
    if (root / ".dvc").is_dir():
        return
    from dvc.repo import Repo

    no_scm = shutil.which("git") is None
    subdir = False
    if not no_scm:
        top = _git(root, "rev-parse", "--show-toplevel")
        own_repo = (root / ".git").exists()
        if top.returncode != 0 or (not own_repo and _git(root, "check-ignore", "-q", ".").returncode == 0):
            if _git(root, "init", "-q").returncode != 0:
                raise IngestError(f"cannot initialise a git repository in {root}")
            with (root / ".gitignore").open("a") as ignore:
                ignore.write(".medflow/\n")
        elif Path(top.stdout.strip()).resolve() != root.resolve():
            subdir = True
    with _quiet_dvc():
        repo = Repo.init(root_dir=str(root), no_scm=no_scm, subdir=subdir)
        with repo.config.edit("repo") as conf:
            conf["core"]["analytics"] = False
            conf["core"]["check_update"] = False
        repo.close()


@contextmanager
def _quiet_dvc():
    """DVC prints hints and telemetry notices; keep the run's output to medflow's own."""
    saved_env = os.environ.get("DVC_NO_ANALYTICS")
    logger = logging.getLogger("dvc")
    saved_level = logger.level
    os.environ["DVC_NO_ANALYTICS"] = "1"
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(saved_level)
        if saved_env is None:
            os.environ.pop("DVC_NO_ANALYTICS", None)


def version_dataset(root: Path, dataset_dir: Path, *, remote: str) -> DataVersion:
    """``dvc add`` the dataset folder as one directory and ``dvc push`` it.

    Args:
        root: the DVC project (see :func:`ensure_repository`).
        dataset_dir: ``data/<name>`` inside ``root``.
        remote: DVC remote URL or local path; configured as remote ``medflow`` in
            the project's local config unless the project already has a default remote.

    Returns:
        The data version: DVC's directory hash.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    ensure_repository(root)
    with _quiet_dvc(), Repo(str(root)) as repo:
        if remote and not repo.config["core"].get("remote"):
            with repo.config.edit("local") as conf:
                conf["remote"][REMOTE_NAME] = {"url": str(remote)}
                conf["core"]["remote"] = REMOTE_NAME
        try:
            repo.add([str(dataset_dir)])
            dvc_file = dataset_dir.with_name(dataset_dir.name + ".dvc")
            repo.push(targets=[str(dvc_file)])
        except DvcException as exc:
            raise IngestError(f"DVC could not version {dataset_dir}: {exc}") from exc
        remote_url = repo.config["remote"][repo.config["core"]["remote"]]["url"]
    return DataVersion(
        name=dataset_dir.name, version=read_version(dvc_file), dvc_file=dvc_file, remote=remote_url
    )


def read_version(dvc_file: Path) -> str:
    """The directory hash recorded in a ``.dvc`` file (md5 without the ``.dir`` suffix)."""
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise IngestError(f"{dvc_file} is not a DVC file of one output") from exc
    return str(out["md5"]).removesuffix(".dir")
