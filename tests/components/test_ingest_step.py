"""The ingest step against a DVC remote that cannot be reached: the version stays local and the next run pushes it."""

from __future__ import annotations

import json

from components import paths
from components.config import load_config
from components.data.step import ingest_dataset


def test_an_unreachable_remote_leaves_the_version_local_and_the_next_run_pushes_it(workspace, caplog):
    blocker = workspace / "mount"
    blocker.write_text("the remote's mount point is a file: nothing can be written below it")
    remote = blocker / "dvc-remote"
    config = load_config(overrides=["data.n_patients=20", "data.image_size=16", f"data.remote={remote}"], environ={})

    first = ingest_dataset(config)
    assert first.push_pending and (workspace / "data" / "demo" / "manifest.parquet").exists()
    marker = paths.medflow_home() / "ingest" / "demo.push-pending"
    assert marker.read_text().strip() == first.version
    assert "push is pending: the next run pushes it" in caplog.text

    blocker.unlink()  # the remote is back
    again = ingest_dataset(config)
    assert again.unchanged and again.version == first.version and not again.push_pending
    assert not marker.exists()
    listing = remote / "files" / "md5" / first.version[:2] / f"{first.version[2:]}.dir"
    assert {e["relpath"] for e in json.loads(listing.read_text())} >= {"manifest.parquet", "deid_audit.json"}
