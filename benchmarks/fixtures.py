"""What several benchmarks start from: an ``mlflow server`` on 127.0.0.1 and a small ingested dataset."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow_server(folder: Path, backend_uri: str | None = None) -> tuple[subprocess.Popen, str]:
    """``mlflow server`` on a free port of 127.0.0.1 (SQLite in ``folder`` unless ``backend_uri``); process and URL."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server",
         "--backend-store-uri", backend_uri or f"sqlite:///{folder / 'db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return process, url
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("mlflow server did not start")


def small_dataset(folder: Path) -> Path:
    """60 synthetic patients of 32x32 images, ingested under ``folder``; the manifest path."""
    from components.data.ingest import IngestSettings, ingest_export
    from components.data.synthetic import generate_export

    export = generate_export(folder / "export", n_patients=60, image_size=32, seed=3)
    report, _ = ingest_export(source=export.folder, labels_csv=export.labels_csv, dataset_dir=folder / "data" / "small",
                              settings=IngestSettings(val=0.2, test=0.25), salt=b"s" * 32)
    return report.manifest
