"""Benchmark: ``medflow predict`` throughput against the bare pyfunc, and the drift check's cost.

A tiny classifier is trained and registered on a synthetic DICOM export in a throwaway workspace. Then,
in the same process, best of ``--repeat`` alternating runs:

- baseline: the registered pyfunc's ``predict`` on the images already in memory (batches of 32);
- medflow, tables only (``--no-dicom``): ``predict_source`` on the DICOM files: listing, reading with
  ingestion's readers, predicting, writing the tables, the drift tests and page, and the batch's MLflow run;
- medflow with DICOM results: the same, plus a TID 1500 structured report per input (highdicom);

and the drift tests alone on 1,000 cases (scalar facts; then the embedding test, features included).

    .venv/bin/python benchmarks/predict.py [--write] [--patients 400] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Prediction: medflow predict vs the bare pyfunc"
NOTE = ("The demo network takes about a millisecond per 64x64 image, less than pydicom takes to read the file, "
        "and each batch pays fixed costs that do not grow with it (the embedding test, the drift page's plots, "
        "the MLflow run), so on this network the ratio measures reading and bookkeeping; a network at clinical "
        "sizes (tens of milliseconds per image on a CPU) narrows it. Each structured report costs highdicom "
        "some 30 ms of Python, written by a process per core.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.pop("MLFLOW_TRACKING_URI", None)

    import mlflow
    import numpy as np
    import pandas as pd

    from components.config import load_config
    from components.data.ingest import IngestSettings, ingest_export
    from components.data.sources import read_source
    from components.data.synthetic import generate_export
    from components.inference.evaluate import evaluate_run
    from components.monitoring.drift import batch_drift, embedding_drift
    from components.monitoring.predict import list_inputs, predict_source, resolve_model
    from components.registry.register import register_model
    from components.training.classification import train_classifier

    workspace = Path(tempfile.mkdtemp(prefix="medflow-bench-predict-"))
    os.chdir(workspace)
    export = generate_export(workspace / "export", n_patients=args.patients, image_size=64, seed=1)
    report, _ = ingest_export(source=export.folder, labels_csv=export.labels_csv, dataset_dir=workspace / "data" / "demo",
                              settings=IngestSettings(), salt=b"bench-salt-0123456789abcdef0123")
    config = load_config(overrides=["train.epochs=1", "evaluate.n_bootstrap=20", "registry.model_name=bench"], environ={})
    trained = train_classifier(manifest_path=report.manifest, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=report.manifest, config=config,
                              out_dir=workspace / "eval")
    register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                   report_path=evaluation.report, config=config)
    (workspace / "data" / "demo.dvc").write_text("outs:\n- md5: v1.dir\n  path: demo\n")

    files = list_inputs(export.folder, "dicom")
    images = [read_source(p, fmt="dicom", rel_path=p.name).array.astype(np.float32) for p in files]
    pyfunc = mlflow.pyfunc.load_model("models:/bench/1")
    bare, tables, ours = [], [], []
    for i in range(args.repeat):
        start = time.perf_counter()
        for b in range(0, len(images), 32):
            pyfunc.predict(np.stack(images[b:b + 32]))
        bare.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_source("bench/1", export.folder, "dicom", workspace / f"tables{i}", dicom_results=False)
        tables.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_source("bench/1", export.folder, "dicom", workspace / f"out{i}")
        ours.append(time.perf_counter() - start)
    n = len(files)
    model = resolve_model("bench/1")
    table = pd.read_parquet(workspace / "out0" / "predictions.parquet")
    facts = pd.read_parquet(report.manifest)[["mean", "std", "shape", "spacing", "modality"]]
    reps = -(-1000 // len(table))
    batch = pd.concat([table] * reps).head(1000)
    batch_facts = pd.concat([facts] * (-(-1000 // len(facts)))).head(1000)
    start = time.perf_counter()
    batch_drift(model, facts=batch_facts, predictions=batch)
    drift_s = time.perf_counter() - start
    arrays = (images * (-(-1000 // len(images))))[:1000]
    start = time.perf_counter()
    embedding_drift(pyfunc.unwrap_python_model(), model, arrays, 2)
    embedding_s = time.perf_counter() - start

    lines = [
        "| inputs | run | time (s) | images/s | ratio to the bare pyfunc |",
        "|---:|---|---:|---:|---:|",
        f"| {n} | bare pyfunc on arrays in memory | {min(bare):.2f} | {n / min(bare):.0f} | 1.00 |",
        f"| {n} | medflow predict from DICOM files, tables only (`--no-dicom`) | {min(tables):.2f} "
        f"| {n / min(tables):.0f} | {min(bare) / min(tables):.2f} |",
        f"| {n} | medflow predict from DICOM files, with an SR per input | {min(ours):.2f} | {n / min(ours):.0f} "
        f"| {min(bare) / min(ours):.2f} |",
    ]
    text = "\n".join(lines) + f"\n\nDrift tests on 1,000 cases: scalar facts (KS on 2 input facts and 2 prediction " \
                              f"scores, 3 categorical facts; the model's test predictions read from MLflow) " \
                              f"{drift_s:.2f} s; the embedding test (features of the 1,000 inputs and of up to 500 " \
                              f"training cases, MMD with 500 permutations) {embedding_s:.2f} s."
    print(text)
    if args.write:
        met = "met" if min(bare) / min(tables) >= 0.95 else "not met"
        write_section(SECTION, (
            f"`make bench` (`benchmarks/predict.py`) on {date.today().isoformat()}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}; a densenet trained one epoch on a synthetic export of "
            f"{args.patients} patients (64x64 CR images), registered; best of {args.repeat} alternating runs in one "
            f"process. medflow's time includes listing and reading the DICOM files with ingestion's readers, "
            f"writing predictions.csv/.parquet, predict.json, drift.json and drift.html, and the batch's MLflow "
            f"run; the baseline predicts arrays already in memory.\n\n{text}\n\nTarget (medflow predict at least "
            f"0.95x the bare pyfunc's throughput, reading included): {met}. {NOTE}\n"))
    shutil.rmtree(workspace, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
