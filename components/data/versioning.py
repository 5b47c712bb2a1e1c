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
STATE_DIR = ".medflow/"


@dataclass(frozen=True)
class DataVersion:
    """A versioned dataset."""

    name: str
    version: str
    dvc_file: Path
    remote: str
    commit: str | None = None


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
        elif Path(top.stdout.strip()).resolve() != root.resolve():
            subdir = True
        # medflow's state (the pseudonym key, the MLflow store) must never be one `git add -A` from a push
        _ignore(root, STATE_DIR)
    with _quiet_dvc():
        repo = Repo.init(root_dir=str(root), no_scm=no_scm, subdir=subdir)
        with repo.config.edit("repo") as conf:
            conf["core"]["analytics"] = False
            conf["core"]["check_update"] = False
        repo.close()
    if not no_scm:  # the project set-up is committed (in the user's repository too): DVC reads it at every revision
        commit_paths(root, [".gitignore", ".dvcignore", ".dvc/config", ".dvc/.gitignore"], "medflow: initialise the DVC project")


def _ignore(root: Path, pattern: str) -> None:
    """Append ``pattern`` to ``root/.gitignore`` unless git ignores it already."""
    if _git(root, "check-ignore", "-q", f"{pattern.rstrip('/')}/state").returncode == 0:
        return
    ignore = root / ".gitignore"
    text = ignore.read_text() if ignore.exists() else ""
    ignore.write_text(text + ("" if not text or text.endswith("\n") else "\n") + f"{pattern}\n")


def check_workspace(root: Path, dataset: str) -> None:
    """Refuse, before any work, a folder where DVC could not record a data version: one inside a git
    repository (not ignoring the folder) that ignores ``data/<dataset>.dvc``, such as medflow's own checkout.

    Raises:
        IngestError: naming the ignore rule and what to do.
    """
    if shutil.which("git") is None or (root / ".dvc").is_dir():
        return
    inside = _git(root, "rev-parse", "--show-toplevel").returncode == 0
    if not inside or (not (root / ".git").exists() and _git(root, "check-ignore", "-q", ".").returncode == 0):
        return  # no repository, or one that ignores this folder: medflow makes the folder its own
    target = f"data/{dataset}.dvc"
    rule = _git(root, "check-ignore", "-v", target)
    if rule.returncode == 0:
        source = rule.stdout.split("\t")[0].strip()
        raise IngestError(f"{root / target} would be ignored by git ({source}), so DVC could not record the data "
                          f"version; run medflow in a folder of its own (mkdir demo && cd demo), or stop ignoring it")


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


def version_dataset(root: Path, dataset_dir: Path, *, remote: str, meta: dict | None = None) -> DataVersion:
    """``dvc add`` the dataset folder as one directory and commit its ``.dvc`` file (push: :func:`push_dataset`).

    Args:
        root: the DVC project (see :func:`ensure_repository`).
        dataset_dir: ``data/<name>`` inside ``root``.
        remote: DVC remote URL or local path; configured as remote ``medflow`` in
            the project's local config unless the project already has a default remote.
        meta: counts to keep in the ``.dvc`` file's ``meta`` (DVC ignores it when hashing).

    Returns:
        The data version: DVC's directory hash, and the git commit that records it
        (None without git). An unchanged dataset makes no new commit.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    ensure_repository(root)
    dvc_file = dataset_dir.with_name(dataset_dir.name + ".dvc")
    with _quiet_dvc(), Repo(str(root)) as repo:
        if remote and not repo.config["core"].get("remote"):
            with repo.config.edit("local") as conf:
                conf["remote"][REMOTE_NAME] = {"url": str(remote)}
                conf["core"]["remote"] = REMOTE_NAME
        try:
            repo.add([str(dataset_dir)])
            if meta is not None:
                _write_meta(dvc_file, meta)
        except DvcException as exc:
            raise IngestError(f"DVC could not version {dataset_dir}: {exc}") from exc
        remote_url = repo.config["remote"][repo.config["core"]["remote"]]["url"]
    version = read_version(dvc_file)
    commit = _commit(root, dvc_file, f"medflow: data {dataset_dir.name} version {version[:12]}")
    return DataVersion(name=dataset_dir.name, version=version, dvc_file=dvc_file, remote=remote_url, commit=commit)


def push_dataset(root: Path, dvc_file: Path) -> None:
    """``dvc push`` one dataset to the project's default remote.

    Raises:
        IngestError: the remote cannot be reached or written (the data stays in the local cache).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    with _quiet_dvc(), Repo(str(root)) as repo:
        logger = logging.getLogger("dvc")
        level = logger.level
        logger.setLevel(logging.CRITICAL)  # DVC logs each failed file; the IngestError below says it once
        try:
            repo.push(targets=[str(dvc_file)])
        except (DvcException, OSError) as exc:
            remote = repo.config["remote"].get(repo.config["core"].get("remote", ""), {}).get("url", "?")
            raise IngestError(f"DVC could not push {dvc_file.name} to {remote}: {exc}") from exc
        finally:
            logger.setLevel(level)


def _write_meta(dvc_file: Path, meta: dict) -> None:
    content = yaml.safe_load(dvc_file.read_text())
    content["meta"] = meta
    dvc_file.write_text(yaml.safe_dump(content, sort_keys=False))


def _commit(root: Path, dvc_file: Path, message: str) -> str | None:
    """Commit the ``.dvc`` file (and DVC's ``.gitignore`` beside it) alone; the commit's sha, or None without git."""
    if _git(root, "rev-parse", "--git-dir").returncode != 0:
        return None
    paths = [str(dvc_file.relative_to(root))]
    if (dvc_file.parent / ".gitignore").exists():
        paths.append(str((dvc_file.parent / ".gitignore").relative_to(root)))
    commit_paths(root, paths, message)
    last = _git(root, "log", "-n", "1", "--format=%H", "--", paths[0])
    return last.stdout.strip() or None


def commit_paths(root: Path, paths: list[str], message: str) -> None:
    """Commit these paths (relative to ``root``) only (the user's other staged changes stay staged); nothing when unchanged."""
    paths = [p for p in paths if (root / p).exists()]
    _git(root, "add", "--", *paths)
    if _git(root, "diff", "--cached", "--quiet", "--", *paths).returncode == 0:
        return
    identity = [] if _git(root, "config", "user.email").stdout.strip() else [
        "-c", "user.name=medflow", "-c", "user.email=medflow@localhost"
    ]
    done = subprocess.run(
        ["git", *identity, "commit", "-q", "-m", message, "--", *paths], cwd=root, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise IngestError(f"cannot commit {', '.join(paths)} in {root}: {done.stderr.strip() or done.stdout.strip()}")


@dataclass(frozen=True)
class VersionEntry:
    """One data version in git history."""

    version: str
    commit: str
    date: str
    meta: dict


def list_versions(root: Path, dvc_file: Path) -> list[VersionEntry]:
    """Every version of a dataset recorded in git, newest first (one entry per version change)."""
    rel = str(dvc_file.resolve().relative_to(root.resolve()))
    log = _git(root, "log", "--format=%H %cI", "--", rel)
    if log.returncode != 0:
        raise IngestError(f"cannot read the git history of {dvc_file}: {log.stderr.strip()}")
    entries, seen = [], set()
    for line in log.stdout.split("\n"):
        if not line.strip():
            continue
        commit, date = line.split(" ", 1)
        shown = _git(root, "show", f"{commit}:./{rel}")
        if shown.returncode != 0:
            continue
        content = yaml.safe_load(shown.stdout) or {}
        outs = content.get("outs") or [{}]
        version = str(outs[0].get("md5", "")).removesuffix(".dir")
        if version and version not in seen:
            seen.add(version)
            entries.append(VersionEntry(version=version, commit=commit, date=date, meta=content.get("meta") or {}))
    return entries


def checkout_version(root: Path, dvc_file: Path, rev: str) -> VersionEntry:
    """Restore the dataset to a version: ``rev`` is a git revision or a prefix of a data version.

    The ``.dvc`` file is taken from that commit and the folder checked out by DVC
    (pulled from the remote when the local cache lacks it).
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    versions = list_versions(root, dvc_file)
    resolved = _git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").stdout.strip()
    match = [v for v in versions if v.commit == resolved] or [v for v in versions if v.version.startswith(rev)]
    if not match:
        known = ", ".join(v.version[:12] for v in versions[:10]) or "none"
        raise IngestError(f"{dvc_file.name}: no data version {rev!r}; known versions: {known}")
    entry = match[0]
    rel = str(dvc_file.resolve().relative_to(root.resolve()))
    done = _git(root, "checkout", entry.commit, "--", rel)
    if done.returncode != 0:
        raise IngestError(f"cannot restore {dvc_file} from commit {entry.commit[:12]}: {done.stderr.strip()}")
    with _quiet_dvc(), Repo(str(root)) as repo:
        try:
            repo.pull(targets=[str(dvc_file)], force=True)
        except DvcException as exc:
            raise IngestError(f"DVC could not restore {dvc_file.name} at {entry.version[:12]}: {exc}") from exc
    return entry


def read_file_at(root: Path, dvc_file: Path, commit: str, relpath: str) -> bytes:
    """A file of the dataset as it was at ``commit`` (from the DVC cache, or the remote)."""
    import dvc.api
    from dvc.exceptions import DvcException

    target = f"{dvc_file.resolve().relative_to(root.resolve()).with_suffix('')}/{relpath}"
    try:
        with _quiet_dvc():
            return dvc.api.read(target, repo=str(root), rev=commit, mode="rb")
    except (DvcException, OSError) as exc:
        raise IngestError(f"cannot read {target} at commit {commit[:12]}: {exc}") from exc


def read_version(dvc_file: Path) -> str:
    """The directory hash recorded in a ``.dvc`` file (md5 without the ``.dir`` suffix)."""
    try:
        out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError) as exc:
        raise IngestError(f"{dvc_file} is not a DVC file of one output") from exc
    return str(out["md5"]).removesuffix(".dir")
