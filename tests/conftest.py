"""Shared fixtures: an isolated workspace and a small ingested dataset."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

from components.machine import usable_cores

# MONAI warns at import about a GPU decoder medflow does not use
warnings.filterwarnings("ignore", message=".*NvImgCodec.*")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `make test`: workers share the cores
    # each worker's torch, OpenMP and BLAS (and the processes it starts) take its share, set before torch is
    # imported: two workers of two threads each on two cores ran some trainings ten times slower
    _share = str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _share)

from components.data.ingest import IngestSettings, ingest_export  # noqa: E402
from components.data.synthetic import generate_export  # noqa: E402

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# the `mlflow server`s the tests start: MLflow 3's job runner (four huey consumer processes a server, for its
# GenAI jobs) is nothing medflow uses, and its start costs CPU the tests share
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

SALT = b"test-salt-0123456789abcdef012345"


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Prefect's console handlers print warnings only from here on: at exit Prefect stops the temporary server
    that flows run in-process started and logs "Stopping temporary server" (info) into the stream pytest has
    closed by then, which printed a "--- Logging error ---" traceback at the end of `make test`. (Stopping the
    server here instead leaves Prefect's event client, which flushes at exit too, without its server.)"""
    prefect_handlers = sys.modules.get("prefect.logging.handlers")  # none to quiet if no test imported Prefect
    if prefect_handlers is None:
        return
    loggers = [logging.root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in [h for logger in loggers for h in logger.handlers]:
        if isinstance(handler, prefect_handlers.PrefectConsoleHandler):
            handler.setLevel(max(handler.level, logging.WARNING))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The end-to-end runs first, so that parallel workers (`make test`: whole files each) do not end on
    them one after another."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pydicom_export(folder: Path, names: list[str], labels: str) -> tuple[Path, Path]:
    """An export folder holding copies of pydicom's own test files and a labels CSV with ``labels``."""
    import shutil

    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    for name in names:
        shutil.copy(get_testdata_file(name), folder / name)
    (folder / "labels.csv").write_text(labels)
    return folder, folder / "labels.csv"


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder: state in ./.medflow, MLflow on SQLite inside it."""
    monkeypatch.chdir(tmp_path)
    # PREFECT_HOME too: an in-process `medflow run` sets it to its workspace's, which the next test's server would use
    for name in ("MEDFLOW_HOME", "MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name in list(os.environ):
        if name.startswith("MEDFLOW__"):
            monkeypatch.delenv(name)
    return tmp_path


@pytest.fixture
def recorded_trims(monkeypatch: pytest.MonkeyPatch):
    """``record(module)``: the module's validation loops get heap trimmers that record (which trimmer, its limit) at
    each call instead of trimming, the trimmers numbered as made; it returns the list they append to."""
    trims: list[tuple[int, int]] = []
    made = []

    class Recording:
        def __init__(self, above: int) -> None:
            self.above, self.number = above, len(made)
            made.append(self)

        def __call__(self) -> None:
            trims.append((self.number, self.above))

    def record(module) -> list[tuple[int, int]]:
        monkeypatch.setattr(module, "HeapTrimmer", Recording)
        return trims

    return record


@pytest.fixture(scope="session")
def small_export(tmp_path_factory: pytest.TempPathFactory):
    """A synthetic DICOM export of 60 patients, 32x32 pixels."""
    return generate_export(tmp_path_factory.mktemp("export"), n_patients=60, image_size=32, seed=3)


@pytest.fixture(scope="session")
def small_dataset(small_export, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small export ingested; returns the manifest path."""
    dataset_dir = tmp_path_factory.mktemp("data") / "small"
    report, _ = ingest_export(
        source=small_export.folder,
        labels_csv=small_export.labels_csv,
        dataset_dir=dataset_dir,
        settings=IngestSettings(val=0.2, test=0.25),
        salt=SALT,
    )
    return report.manifest


def _segmentation_dataset(tmp_path_factory, name: str, *, n_patients: int, image_size: int, depth: int, seed: int,
                          val: float) -> Path:
    from components.data.synthetic_segmentation import generate_segmentation_export  # noqa: PLC0415

    export = generate_segmentation_export(tmp_path_factory.mktemp(f"{name}-export"), n_patients=n_patients,
                                          image_size=image_size, depth=depth, seed=seed)
    report, _ = ingest_export(
        source=export.folder, labels_csv=export.labels_csv, dataset_dir=tmp_path_factory.mktemp("data") / name,
        settings=IngestSettings(fmt="nifti", task="segmentation", val=val, test=0.25), salt=SALT,
    )
    return report.manifest


@pytest.fixture(scope="session")
def seg_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic NIfTI segmentation export of 20 volumes (24x24x8 voxels) ingested; the manifest path."""
    return _segmentation_dataset(tmp_path_factory, "seg", n_patients=20, image_size=24, depth=8, seed=5, val=0.2)


@pytest.fixture(scope="session")
def seg2d_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 2D segmentation dataset: 16 images of 32x32 pixels with masks; the manifest path."""
    return _segmentation_dataset(tmp_path_factory, "seg2d", n_patients=16, image_size=32, depth=0, seed=6, val=0.25)
