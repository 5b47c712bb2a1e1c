"""Benchmark: ``medflow predict`` throughput against the bare pyfunc, and the drift check's cost.

For two networks, the demo's small DenseNet on 64x64 images and MONAI's DenseNet121 on 224x224 images (a
chest-film classifier's size), a model is trained briefly and registered on one synthetic DICOM export, and a
second export (new studies from the same scanners) is predicted. In the same process, best of ``--repeat``
alternating runs:

- baseline: the registered pyfunc's ``predict`` on the images already in memory (batches of 32);
- medflow, tables only (``--no-dicom``): ``predict_source`` on the DICOM files: listing, reading with
  ingestion's readers (threads reading ahead while the network predicts), predicting, writing the tables,
  the drift tests (the embedding test on features taken from the predicting pass) and page, and the batch's
  MLflow run;
- medflow with DICOM results: the same, plus a TID 1500 structured report per input (highdicom);

and the drift tests alone on 1,000 cases (scalar facts; then the embedding test on 1,000 feature vectors).

    .venv/bin/python benchmarks/predict.py [--write] [--repeat 2] [--small 400] [--clinical 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Prediction: medflow predict vs the bare pyfunc"
NOTE = ("On the demo network (about a millisecond per 64x64 image) reading a DICOM file with pydicom costs more "
        "than predicting it, and each batch pays fixed costs that do not grow with it (the drift page's plots, the "
        "embedding test's permutations, the MLflow run), so that row measures reading and bookkeeping. At a "
        "clinical size the network dominates: reading happens in threads while torch computes. Each structured "
        "report costs highdicom some 30 ms of Python, written by a process per core after the predictions.")


@dataclass(frozen=True)
class Network:
    label: str
    overrides: tuple[str, ...]
    image_size: int


SMALL = Network("demo DenseNet, 64x64", ("train.model=densenet",), 64)
CLINICAL = Network("DenseNet121, 224x224", ("train.model=densenet121", "train.model_kwargs={}", "train.batch_size=8"),
                   224)


def measure(workspace: Path, network: Network, *, train_patients: int, predict_patients: int, repeat: int,
            name: str) -> dict:
    """Train and register ``network`` on one export, then time predicting another: the row's figures."""
    import mlflow  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from components.config import load_config  # noqa: PLC0415
    from components.data.ingest import IngestSettings, ingest_export  # noqa: PLC0415
    from components.data.sources import read_source  # noqa: PLC0415
    from components.data.synthetic import generate_export  # noqa: PLC0415
    from components.inference.evaluate import evaluate_run  # noqa: PLC0415
    from components.monitoring.predict import list_inputs, predict_source  # noqa: PLC0415
    from components.registry.register import register_model  # noqa: PLC0415
    from components.training.classification import train_classifier  # noqa: PLC0415

    export = generate_export(workspace / f"{name}-train", n_patients=train_patients, image_size=network.image_size, seed=1)
    report, _ = ingest_export(source=export.folder, labels_csv=export.labels_csv, dataset_dir=workspace / "data" / name,
                              settings=IngestSettings(), salt=b"bench-salt-0123456789abcdef0123")
    config = load_config(overrides=["train.epochs=1", "evaluate.n_bootstrap=20", f"registry.model_name={name}",
                                    f"data.name={name}", f"data.image_size={network.image_size}", *network.overrides],
                         environ={})
    trained = train_classifier(manifest_path=report.manifest, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=report.manifest, config=config,
                              out_dir=workspace / f"{name}-eval")
    register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                   report_path=evaluation.report, config=config)
    (workspace / "data" / f"{name}.dvc").write_text(f"outs:\n- md5: v1.dir\n  path: {name}\n")

    new = generate_export(workspace / f"{name}-new", n_patients=predict_patients, image_size=network.image_size, seed=2)
    files = list_inputs(new.folder, "dicom")
    few = workspace / f"{name}-few"  # a third of the same files: the fixed cost per batch drops out of the slope
    for path in files[:len(files) // 3]:
        (few / path.relative_to(new.folder)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, few / path.relative_to(new.folder))
    images = [read_source(p, fmt="dicom", rel_path=p.name).array.astype(np.float32) for p in files]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1")
    predict_source(f"{name}/1", few, "dicom", workspace / f"{name}-warm", dicom_results=False)  # feature cache
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    for i in range(repeat):
        for folder, n in ((few, len(files) // 3), (new.folder, len(files))):
            start = time.perf_counter()
            for b in range(0, n, 32):
                pyfunc.predict(np.stack(images[b:min(b + 32, n)]))
            times["bare", n].append(time.perf_counter() - start)
            start = time.perf_counter()
            predict_source(f"{name}/1", folder, "dicom", workspace / f"{name}-tables{i}-{n}", dicom_results=False)
            times["tables", n].append(time.perf_counter() - start)
            start = time.perf_counter()
            predict_source(f"{name}/1", folder, "dicom", workspace / f"{name}-out{i}-{n}")
            times["ours", n].append(time.perf_counter() - start)
    n1, n2 = len(files) // 3, len(files)
    best = {key: min(values) for key, values in times.items()}
    figures = {"n": n2, "n_few": n1, "pyfunc": pyfunc, "images": images, "manifest": report.manifest,
               "out": workspace / f"{name}-out0-{n2}"}
    for run in ("bare", "tables", "ours"):
        figures[run] = best[run, n2]
        slope = (best[run, n2] - best[run, n1]) / (n2 - n1)  # seconds per image, the batch's fixed cost apart
        figures[f"{run}_rate"] = 1 / slope
        figures[f"{run}_fixed"] = best[run, n2] - slope * n2
    return figures


def drift_cost(figures: dict, name: str) -> tuple[float, float]:
    """Seconds of the scalar drift tests and of the embedding test, each on 1,000 cases."""
    import numpy as np  # noqa: PLC0415
    import pandas as pd  # noqa: PLC0415

    from components.monitoring.drift import batch_drift, embedding_drift  # noqa: PLC0415
    from components.monitoring.predict import resolve_model  # noqa: PLC0415
    from components.training.backbones import captured_features  # noqa: PLC0415

    model = resolve_model(f"{name}/1")
    table = pd.read_parquet(figures["out"] / "predictions.parquet")
    facts = pd.read_parquet(figures["manifest"])[["mean", "std", "shape", "spacing", "modality"]]
    batch = pd.concat([table] * (-(-1000 // len(table)))).head(1000)
    batch_facts = pd.concat([facts] * (-(-1000 // len(facts)))).head(1000)
    start = time.perf_counter()
    batch_drift(model, facts=batch_facts, predictions=batch)
    drift_s = time.perf_counter() - start
    python_model = figures["pyfunc"].unwrap_python_model()
    with captured_features(python_model.model, 2) as captured:
        figures["pyfunc"].predict(np.stack(figures["images"][:64]))
    features = np.concatenate([t.numpy() for t in captured])
    features = np.concatenate([features] * (-(-1000 // len(features))))[:1000]
    start = time.perf_counter()
    embedding_drift(python_model, model, features, 2)
    return drift_s, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--small", type=int, default=400, help="patients of the demo network's new export")
    parser.add_argument("--clinical", type=int, default=200, help="patients of DenseNet121's new export")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    workspace = Path(tempfile.mkdtemp(prefix="medflow-bench-predict-"))
    os.chdir(workspace)
    runs = [(SMALL, measure(workspace, SMALL, train_patients=200, predict_patients=args.small, repeat=args.repeat,
                            name="small"))]
    drift_s, embedding_s = drift_cost(runs[0][1], "small")
    runs.append((CLINICAL, measure(workspace, CLINICAL, train_patients=30, predict_patients=args.clinical,
                                   repeat=args.repeat, name="clinical")))

    lines = ["| network | run | time for N inputs (s) | images/s, whole command | ratio | fixed cost per batch (s) "
             "| images/s, marginal | ratio |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    labels = {"bare": "bare pyfunc on arrays in memory", "tables": "medflow predict, tables only (`--no-dicom`)",
              "ours": "medflow predict with an SR per input"}
    for network, f in runs:
        for run, label in labels.items():
            lines.append(f"| {network.label}, N = {f['n']} | {label} | {f[run]:.2f} | {f['n'] / f[run]:.1f} "
                         f"| {f['bare'] / f[run]:.2f} | {f[run + '_fixed']:.2f} | {f[run + '_rate']:.1f} "
                         f"| {f[run + '_rate'] / f['bare_rate']:.2f} |")
    text = "\n".join(lines) + (f"\n\nDrift tests on 1,000 cases (the demo network): scalar facts (KS on 2 input facts "
                               f"and 2 prediction scores, 3 categorical facts; the model's test predictions read from "
                               f"MLflow) {drift_s:.2f} s; the embedding test (MMD of 1,000 feature vectors against the "
                               f"cached training features, 500 permutations) {embedding_s:.2f} s.")
    print(text)
    if args.write:
        clinical = runs[1][1]
        ratio = clinical["tables_rate"] / clinical["bare_rate"]
        met = "met" if ratio >= 0.95 else "not met"
        write_section(SECTION, (
            f"`make bench` (`benchmarks/predict.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}; each network trained one epoch on a synthetic export (64x64 or "
            f"224x224 CR images) and registered, then a second export predicted; best of {args.repeat} alternating "
            f"runs in one process, after one run that caches the training features. medflow's time is the whole "
            f"`predict_source` call: resolving and loading the version, listing and reading the DICOM files with "
            f"ingestion's readers, writing predictions.csv/.parquet, predict.json, drift.json and drift.html, and "
            f"the batch's MLflow run; the baseline predicts arrays already in memory. Each run is timed on N inputs "
            f"and on a third of them: the slope between the two is the marginal throughput (images/s once a batch "
            f"is under way), the intercept the fixed cost per batch.\n\n{text}\n\nTarget (medflow predict at least 0.95x the bare pyfunc's "
            f"throughput, reading DICOM included, at a clinical size; marginal, tables only): {met} ({ratio:.2f}). "
            f"{NOTE}\n"))
    shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
