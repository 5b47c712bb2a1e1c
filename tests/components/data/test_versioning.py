from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from components.data.versioning import ensure_repository, push_dataset, read_version, version_dataset
from components.errors import IngestError


def _dataset(root: Path, files: dict[str, bytes]) -> Path:
    folder = root / "data" / "toy"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def test_version_is_the_dvc_directory_hash_and_the_remote_holds_every_file(tmp_path):
    files = {"images/a.nii": b"first image", "images/b.nii": b"second image", "manifest.parquet": b"table"}
    folder = _dataset(tmp_path, files)
    remote = tmp_path / "remote"
    version = version_dataset(tmp_path, folder, remote=str(remote))
    push_dataset(tmp_path, version.dvc_file)
    assert version.dvc_file == folder.with_name("toy.dvc")
    assert read_version(version.dvc_file) == version.version
    # independent check: the .dir object in the remote hashes to the version and lists each file's md5
    listing = remote / "files" / "md5" / version.version[:2] / f"{version.version[2:]}.dir"
    assert hashlib.md5(listing.read_bytes()).hexdigest() == version.version
    entries = {e["relpath"]: e["md5"] for e in json.loads(listing.read_text())}
    assert entries == {rel: hashlib.md5(data).hexdigest() for rel, data in files.items()}
    for md5 in entries.values():
        assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def test_unchanged_data_keeps_its_version_and_a_change_makes_a_new_one(tmp_path):
    folder = _dataset(tmp_path, {"images/a.nii": b"one"})
    first = version_dataset(tmp_path, folder, remote=str(tmp_path / "remote"))
    again = version_dataset(tmp_path, folder, remote=str(tmp_path / "remote"))
    (folder / "images" / "a.nii").write_bytes(b"two")
    changed = version_dataset(tmp_path, folder, remote=str(tmp_path / "remote"))
    assert first.version == again.version != changed.version


def test_a_plain_folder_gets_git_then_dvc(tmp_path):
    ensure_repository(tmp_path)
    assert (tmp_path / ".git").is_dir() and (tmp_path / ".dvc").is_dir()
    assert ".medflow/" in (tmp_path / ".gitignore").read_text()
    config = (tmp_path / ".dvc" / "config").read_text()
    assert "analytics = False" in config


def test_a_tracked_subfolder_of_a_git_repository_becomes_a_dvc_subdir_project(tmp_path):
    _git(tmp_path, "init", "-q")
    sub = tmp_path / "project"
    sub.mkdir()
    ensure_repository(sub)
    assert (sub / ".dvc").is_dir() and not (sub / ".git").exists()


def test_an_ignored_subfolder_gets_its_own_git_repository(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("/demo/\n")
    sub = tmp_path / "demo"
    sub.mkdir()
    folder = _dataset(sub, {"x.nii": b"x"})
    version = version_dataset(sub, folder, remote=str(tmp_path / "remote"))
    assert (sub / ".git").is_dir()
    assert _git(sub, "rev-parse", "--show-toplevel") == str(sub.resolve())
    assert version.version


def test_configured_default_remote_of_the_project_is_kept(tmp_path):
    ensure_repository(tmp_path)
    subprocess.run(["dvc", "remote", "add", "-d", "team", str(tmp_path / "team-remote")], cwd=tmp_path, check=True,
                   capture_output=True, env={"PATH": str(Path(__import__("sys").executable).parent) + ":/usr/bin:/bin"})
    folder = _dataset(tmp_path, {"x.nii": b"x"})
    version = version_dataset(tmp_path, folder, remote=str(tmp_path / "ignored"))
    assert version.remote == str(tmp_path / "team-remote")
    assert not (tmp_path / "ignored").exists()


@pytest.mark.parametrize("content", ["not: [valid", "outs: []\n", "md5: 1\n"])
def test_read_version_refuses_other_files(tmp_path, content):
    path = tmp_path / "x.dvc"
    path.write_text(content)
    with pytest.raises(IngestError, match=r"x.dvc is not a DVC file of one output"):
        read_version(path)


def test_a_users_own_repository_reads_its_first_version_after_a_second_and_keeps_state_out(tmp_path):
    """A folder the user made a git repository: the DVC set-up is committed with the first version, so
    the earlier version stays readable (the drift check reads it), and .medflow/ is ignored."""
    from components.data.versioning import read_file_at

    _git(tmp_path, "init", "-q")
    (tmp_path / "README.md").write_text("my study\n")
    _git(tmp_path, "add", "README.md")
    _git(tmp_path, "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q", "-m", "start")
    folder = _dataset(tmp_path, {"manifest.parquet": b"first"})
    first = version_dataset(tmp_path, folder, remote=str(tmp_path / "remote"))
    (folder / "manifest.parquet").write_bytes(b"second")
    second = version_dataset(tmp_path, folder, remote=str(tmp_path / "remote"))
    assert first.version != second.version and first.commit != second.commit
    assert read_file_at(tmp_path, first.dvc_file, first.commit, "manifest.parquet") == b"first"
    tracked = _git(tmp_path, "ls-files").split("\n")
    assert {".dvc/config", ".dvcignore", ".gitignore", "data/toy.dvc"} <= set(tracked)
    assert subprocess.run(["git", "check-ignore", "-q", ".medflow/pseudonym.key"], cwd=tmp_path).returncode == 0
    assert _git(tmp_path, "status", "--porcelain", "--", ".dvc", ".dvcignore", ".gitignore") == ""


def test_a_checkout_that_ignores_data_is_refused_before_any_work(tmp_path):
    """medflow's own clone ignores data/: DVC could not commit data/demo.dvc there, so say it first."""
    from components.data.versioning import check_workspace

    _git(tmp_path, "init", "-q")
    (tmp_path / ".gitignore").write_text("*.pyc\ndata/\n")
    with pytest.raises(IngestError, match=r"data/demo.dvc would be ignored by git \(.gitignore:2:data/\), so DVC "
                                          r"could not record the data version; run medflow in a folder of its own"):
        check_workspace(tmp_path, "demo")
    assert not (tmp_path / ".dvc").exists() and not (tmp_path / "data").exists()
    (tmp_path / ".gitignore").write_text("*.pyc\ndata/\n/demo/\n")
    (tmp_path / "demo").mkdir()
    check_workspace(tmp_path / "demo", "demo")  # a folder the checkout ignores becomes a repository of its own
