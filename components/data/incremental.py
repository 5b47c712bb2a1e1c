"""The incremental state of an ingest: content hashes of its inputs (reused while a file's
size and mtime are unchanged, as DVC's state does), each converted case's source path, ID and
input hashes, and the fingerprint of inputs and settings that tells an unchanged export from a
changed one.

The state is an SQLite file outside the dataset (it names source paths), read and written a
record at a time by path, so that no ingest holds every input's record in memory: the JSON file
it replaces (state version 1, still read once and carried over) held about 2 KB a case in
memory, 0.2 GB at 100,000 images.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import tempfile
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import Any

STATE_VERSION = 2
DRAFT_PREFIX, DRAFT_SUFFIX = ".ingest-", ".draft"  # a draft is <prefix><host>-<pid>-<random><suffix>
TAG_SEPARATOR = "|"  # between a case's removed tag names (DICOM keywords) in one column
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime INTEGER NOT NULL,
                                   digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cases (path TEXT PRIMARY KEY, case_id TEXT NOT NULL, removed_tags TEXT NOT NULL,
                                  input TEXT, mask_input TEXT);
"""


class IngestState:
    """One ingest's records, in an SQLite file: a saved state (:func:`load_state`), or a new one being written
    (:func:`new_state`, a temporary file removed when the object goes, kept by :func:`save_state`)."""

    def __init__(self, path: Path, *, temporary: bool) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False)  # its finalizer may run on any thread
        if temporary:  # a draft: durability comes from save_state's copy, not from every write
            self._db.execute("PRAGMA journal_mode = OFF")
            self._db.execute("PRAGMA synchronous = OFF")
            weakref.finalize(self, _remove, self._db, path)
        self._db.executescript(SCHEMA)

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, **values: str) -> None:
        self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", values.items())

    @property
    def data_version(self) -> str | None:
        return self._meta("data_version") or None

    @property
    def fingerprint(self) -> str | None:
        return self._meta("fingerprint")

    @property
    def manifest_sha256(self) -> str | None:
        return self._meta("manifest_sha256")

    def file_hash(self, key: str) -> tuple[int, int, str] | None:
        """The recorded size, mtime (ns) and sha256 of an input file."""
        return self._db.execute("SELECT size, mtime, digest FROM hashes WHERE path = ?", (key,)).fetchone()

    def record_hash(self, key: str, size: int, mtime: int, digest: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", (key, size, mtime, digest))

    def case(self, rel: str) -> dict | None:
        """The recorded case of a source path: ``case_id``, ``removed_tags``, ``input`` and ``mask_input``."""
        row = self._db.execute("SELECT case_id, removed_tags, input, mask_input FROM cases WHERE path = ?",
                               (rel,)).fetchone()
        if row is None:
            return None
        return {"case_id": row[0], "removed_tags": row[1].split(TAG_SEPARATOR) if row[1] else [],
                "input": row[2], "mask_input": row[3]}

    def record_cases(self, rows) -> None:
        """Record ``(path, case_id, removed tags joined by TAG_SEPARATOR, input, mask_input)`` rows."""
        self._db.executemany("INSERT OR REPLACE INTO cases VALUES (?, ?, ?, ?, ?)", rows)

    def save(self, target: Path) -> None:
        """Copy the records into ``target`` (replaced whole: a reader sees the old state or the new one)."""
        self._db.commit()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.unlink(missing_ok=True)
        copy = sqlite3.connect(tmp)
        try:
            self._db.backup(copy)
        finally:
            copy.close()
        tmp.replace(target)


def _remove(db: sqlite3.Connection, path: Path) -> None:
    db.close()
    path.unlink(missing_ok=True)


def new_state(folder: Path | None = None) -> IngestState:
    """An empty state in a temporary file (in ``folder``, beside the saved state, or the system's temp folder),
    named after this host and process; the drafts in ``folder`` of this host's processes that are gone (killed
    before their draft's object went) are removed first."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_drafts(folder)
    handle, name = tempfile.mkstemp(prefix=f"{DRAFT_PREFIX}{socket.gethostname()}-{os.getpid()}-",
                                    suffix=DRAFT_SUFFIX, dir=folder)
    os.close(handle)
    return IngestState(Path(name), temporary=True)


def remove_stale_drafts(folder: Path) -> None:
    """Remove the drafts in ``folder`` whose process, on this host, no longer runs. A draft of another host (a
    shared volume: another pod's ingest may still write it), of a process that runs, or without an owner in its
    name (made before drafts were named after theirs) is left alone."""
    host = socket.gethostname()
    for draft in folder.glob(f"{DRAFT_PREFIX}*{DRAFT_SUFFIX}"):
        owner = draft.name[len(DRAFT_PREFIX):-len(DRAFT_SUFFIX)].rsplit("-", 2)
        if len(owner) == 3 and owner[0] == host and owner[1].isdigit() and not _running(int(owner[1])):
            draft.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: is there such a process (no signal is sent)
    except ProcessLookupError:
        return False
    except PermissionError:  # there is, another user's
        pass
    return True


def _file_hash(path: Path, previous: IngestState, new: IngestState | None) -> str:
    """sha256 of a file, reused from ``previous`` when its size and mtime are unchanged (as DVC's state does)."""
    stat = path.stat()
    key = str(path)
    known = previous.file_hash(key)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        digest = known[2]
    else:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    if new is not None:
        new.record_hash(key, stat.st_size, stat.st_mtime_ns, digest)
    return digest


def content_hash(path: Path, previous: IngestState, new: IngestState | None) -> str:
    """Content hash of an input: a file's sha256, or a folder's over its files' names and hashes.

    Each file's hash is recorded in ``new`` (None: recorded nowhere).
    """
    if path.is_dir():
        files = (p for p in sorted(path.rglob("*")) if p.is_file())
        parts = [f"{p.relative_to(path)}:{_file_hash(p, previous, new)}" for p in files]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _file_hash(path, previous, new)


def load_state(state_file: Path | None) -> IngestState:
    """The state saved at ``state_file``; an empty one where there is none, or it is unreadable or of another
    version. A version 1 state (JSON, at the same path with ``.json``) is carried over."""
    if state_file is not None and state_file.exists():
        state = new_state(state_file.parent)
        try:
            saved = sqlite3.connect(f"file:{state_file}?mode=ro", uri=True)
            try:
                saved.backup(state._db)
            finally:
                saved.close()
            if state._meta("version") == str(STATE_VERSION):
                return state
        except sqlite3.DatabaseError:
            pass
        return new_state(state_file.parent)
    legacy = state_file.with_suffix(".json") if state_file is not None else None
    if legacy is not None and legacy.exists():
        return _carried_over(legacy)
    return new_state(state_file.parent if state_file is not None else None)


def _carried_over(legacy: Path) -> IngestState:
    """A version 1 (JSON) state's records in a new state; an empty one where it is unreadable."""
    state = new_state(legacy.parent)
    try:
        old = json.loads(legacy.read_text())
    except (OSError, ValueError):
        return state
    if old.get("version") != 1:
        return state
    for key, (size, mtime, digest) in old.get("hashes", {}).items():
        state.record_hash(key, size, mtime, digest)
    state.record_cases((rel, c["case_id"], TAG_SEPARATOR.join(c["removed_tags"]), c["input"], c["mask_input"])
                       for rel, c in old.get("cases", {}).items())
    state.set_meta(version=str(STATE_VERSION), data_version=old.get("data_version") or "")
    return state  # no fingerprint: the next ingest reuses its cases but builds the manifest again


def save_state(state_file: Path, state: IngestState, *, data_version: str) -> None:
    """Record a finished ingest (and the data version it became) for the next incremental run."""
    state.set_meta(version=str(STATE_VERSION), data_version=data_version)
    state.save(state_file)
    legacy = state_file.with_suffix(".json")
    if legacy != state_file:
        legacy.unlink(missing_ok=True)  # a version 1 state, carried over into this one


def fingerprint(settings: Any, salt: bytes, labels_csv: Path, inputs: dict[str, str]) -> str:
    """sha256 over the settings, the key, the labels file and every input's content hash (streamed)."""
    h = hashlib.sha256(json.dumps([asdict(settings), hashlib.sha256(salt).hexdigest(),
                                   hashlib.sha256(labels_csv.read_bytes()).hexdigest()]).encode())
    for rel, digest in sorted(inputs.items()):
        h.update(f"\n{rel}\0{digest}".encode())
    return h.hexdigest()


def matches_state(state: IngestState, fingerprint: str, manifest_path: Path) -> bool:
    return (state.fingerprint == fingerprint and manifest_path.exists()
            and hashlib.sha256(manifest_path.read_bytes()).hexdigest() == state.manifest_sha256)
