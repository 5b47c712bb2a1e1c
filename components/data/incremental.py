"""The incremental state of an ingest: content hashes of its inputs (reused while a file's
size and mtime are unchanged, as DVC's state does), and the fingerprint of inputs and
settings that tells an unchanged export from a changed one.

The state is a JSON file outside the dataset (it names source paths).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

STATE_VERSION = 1


def _file_hash(path: Path, cache: dict, hashes: dict) -> str:
    """sha256 of a file, reused from ``cache`` when its size and mtime are unchanged (as DVC's state does)."""
    stat = path.stat()
    key = str(path)
    known = cache.get(key)
    if known and known[0] == stat.st_size and known[1] == stat.st_mtime_ns:
        digest = known[2]
    else:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    hashes[key] = [stat.st_size, stat.st_mtime_ns, digest]
    return digest


def content_hash(path: Path, cache: dict, hashes: dict) -> str:
    """Content hash of an input: a file's sha256, or a folder's over its files' names and hashes."""
    if path.is_dir():
        parts = [f"{p.relative_to(path)}:{_file_hash(p, cache, hashes)}" for p in sorted(path.rglob("*")) if p.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return _file_hash(path, cache, hashes)


def load_state(state_file: Path | None) -> dict:
    if state_file is None or not state_file.exists():
        return {}
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return {}
    return state if state.get("version") == STATE_VERSION else {}


def save_state(state_file: Path, state: dict, *, data_version: str) -> None:
    """Record a finished ingest (and the data version it became) for the next incremental run."""
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state | {"data_version": data_version}))
    tmp.replace(state_file)


def fingerprint(settings: Any, salt: bytes, labels_csv: Path, inputs: dict[str, str]) -> str:
    payload = json.dumps(
        [asdict(settings), hashlib.sha256(salt).hexdigest(), hashlib.sha256(labels_csv.read_bytes()).hexdigest(), sorted(inputs.items())]
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def matches_state(state: dict, fingerprint: str, manifest_path: Path) -> bool:
    return (state.get("fingerprint") == fingerprint and manifest_path.exists()
            and hashlib.sha256(manifest_path.read_bytes()).hexdigest() == state.get("manifest_sha256"))
