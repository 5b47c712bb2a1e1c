"""One writer per workspace: commands that change ``data/`` or ``.medflow/`` hold ``.medflow/workspace.lock``.

Two ``medflow run`` in one folder would otherwise race on the dataset folder, DVC's
index and the SQLite stores. The lock is an OS file lock (the ``filelock`` package),
released when the holder exits, however it exits; a sidecar file names the holder
so the refusal can say who has it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from components import paths
from components.errors import WorkspaceBusy


@contextmanager
def workspace_lock(command: str, *, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the workspace lock for ``command``; wait up to ``wait_s`` seconds for another holder.

    Raises:
        WorkspaceBusy: naming the holder, when the lock is still held after ``wait_s``.
    """
    home = paths.medflow_home()
    lock_path, holder = home / "workspace.lock", home / "workspace.lock.holder"
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=wait_s)
    except Timeout:
        raise _busy(holder) from None
    try:
        holder.write_text(json.dumps({"command": command, "pid": os.getpid(),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        yield lock_path
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _busy(holder: Path) -> WorkspaceBusy:
    try:
        who = json.loads(holder.read_text())
        by = f"`medflow {who['command']}` (pid {who['pid']}, since {who['since']})"
    except (OSError, ValueError, KeyError):
        by = "another medflow command"
    return WorkspaceBusy(f"{by} is writing to this workspace ({paths.workspace_root()}); wait for it to finish, "
                         f"or pass --wait SECONDS to wait for the lock")


def refuse_if_busy() -> None:
    """Say at once when another command holds the workspace lock, taking no lock and creating nothing (a
    command checks this before its slow preflight, then takes the lock with :func:`workspace_lock`).

    Raises:
        WorkspaceBusy: naming the holder.
    """
    home = paths.medflow_home_path()
    lock_path = home / "workspace.lock"
    if not lock_path.exists():
        return
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise _busy(home / "workspace.lock.holder") from None
    lock.release()


# What a first command makes in a folder before its first data version: medflow's state, the dataset folder, and
# the git and DVC project medflow initialises (``.git`` only when it made its own repository: a user's repository
# keeps what it committed there).
OWN_PROJECT = (".git", ".dvc", ".dvcignore", ".gitignore")


@contextmanager
def undone_on_failure(*, before_removal: Callable[[], None] | None = None) -> Iterator[None]:
    """A command that fails (or is interrupted) before the workspace's first data version leaves the folder as
    it found it: what it made there (the state folder with its pseudonym key, ``data/``, its own git and DVC
    project) is removed. Once a data version exists, nothing is: that is a workspace worth keeping.

    Args:
        before_removal: called first when something is removed (to stop a server that writes into the state
            folder, the embedded Prefect's).
    """
    root, home = paths.workspace_root(), paths.medflow_home_path()
    made = [p for p in (home, paths.data_root()) if not p.exists()]
    if not (root / ".git").exists():
        made += [root / name for name in OWN_PROJECT if not (root / name).exists()]
    try:
        yield
    except BaseException:
        made = [p for p in made if p.exists() or p.is_symlink()]
        if made and not any(paths.data_root().glob("*.dvc")):
            if before_removal is not None:
                before_removal()
            for path in made:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        raise
