"""Benchmark on a GPU: medflow's training step against a bare MONAI loop, DenseNet121 at 224x224, with AMP.

Run it where there is a CUDA device (it refuses otherwise). A synthetic export of
``--patients`` patients at ``--size`` pixels is ingested, then each row trains
``--epochs`` epochs, one after the other in this process:

- the bare MONAI loop (``benchmarks/training.py``'s, on the GPU: pinned memory,
  non-blocking copies, autocast and a GradScaler) with no DataLoader workers and
  with ``--workers``;
- medflow's ``train_classifier`` with the same settings (MLflow logging, the
  resumable checkpoint every epoch);
- medflow with ``--workers`` and ``train.amp=false``, and with ``train.memory_format=contiguous`` (every other
  row trains in the layout ``auto`` picks: channels_last for a DenseNet, the bare loop too);
- then, for each further ``--batch-sizes``, the bare loop and medflow with ``--workers``;
- then the evaluation step (``evaluate_run``: val, test and the shortcut audit's train features, the
  bootstrap, the reports) of the first medflow run with workers, with ``train.device=cpu`` and no workers
  against the GPU with ``--workers``;
- then that run's network as the registered pyfunc serves it (``MedflowModel``, which ``medflow predict`` and
  ``mlflow models serve`` load) predicting the test split's images as raw arrays, with its ``model_config``
  ``device`` set to ``cpu`` against the GPU.

Every row caches the preprocessed samples in memory (MONAI's CacheDataset). Two
figures per row: the whole call (set-up, the cache's fill, every epoch), and the
steady state, from the end of the first epoch to the end of the last (medflow's
epoch ends are the timestamps of its per-epoch MLflow metrics). The GPU's
utilisation (NVML, through ``torch.cuda.utilization``) is sampled every 0.1 s and
averaged over the steady state. Target: at least 85 % with workers.

    python benchmarks/gpu.py [--patients 2000] [--size 224] [--epochs 6] [--workers 8] [--batch-sizes 32 256]
                             [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

from report import write_section
from training import bare_monai_loop

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Training on a GPU: medflow vs a bare MONAI loop"


class Utilisation:
    """Samples the GPU's utilisation (per cent of time a kernel ran, from NVML) on a thread."""

    def __init__(self, every: float = 0.1) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        if not torch.cuda.is_available():  # a trial of the script on the CPU: nothing to sample
            return
        while not self._stop.wait(self.every):
            self.samples.append((time.time(), torch.cuda.utilization()))

    def __enter__(self) -> "Utilisation":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float:
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) if inside else float("nan")


def medflow_epoch_ends(run_id: str) -> list[float]:
    """Wall-clock ends of a medflow training run's epochs: its per-epoch ``train_loss`` timestamps."""
    from mlflow import MlflowClient

    history = MlflowClient().get_metric_history(run_id, "train_loss")
    return [m.timestamp / 1000 for m in sorted(history, key=lambda m: m.step)]


def served_model(run_id: str, manifest_path: Path, folder: Path, device: str, *, limit: int = 2048) -> list[tuple]:
    """(device, images, seconds) of the registered pyfunc's ``predict`` on up to ``limit`` test images read as
    raw arrays (N, H, W), in batches of 64 as ``medflow predict`` hands them, on the CPU and on ``device``; each
    after a warm-up batch."""
    from types import SimpleNamespace

    import nibabel as nib
    import numpy as np
    import pandas as pd

    from components.inference.model import download_checkpoint
    from components.registry.model import MedflowModel

    checkpoint = download_checkpoint(run_id, dst=folder / "pyfunc")
    manifest = pd.read_parquet(manifest_path)
    paths = manifest.loc[manifest["split"] == "test", "image"].head(limit)
    images = np.stack([nib.load(manifest_path.parent / p).get_fdata(dtype=np.float32) for p in paths])
    rows = []
    for choice in ("cpu", device):
        model = MedflowModel()
        model.load_context(SimpleNamespace(artifacts={"checkpoint": str(checkpoint)}, model_config={"device": choice}))
        model.predict(None, images[:64])
        began = time.perf_counter()
        for start in range(0, len(images), 64):
            model.predict(None, images[start:start + 64])
        rows.append((str(model.device), len(images), time.perf_counter() - began))
        print(rows[-1], flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 256],
                        help="the first for every row, each further one for a bare and a medflow row")
    parser.add_argument("--model", default="densenet121")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script on a small run)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the steady state runs from the end of the first epoch")

    import torch

    from components.config import load_config
    from components.data.ingest import IngestSettings, ingest_export
    from components.data.synthetic import generate_export
    from components.inference.evaluate import evaluate_run
    from components.training.classification import train_classifier

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs a GPU", file=sys.stderr)
        return 1
    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-gpu-"))
    os.chdir(folder)
    start = time.perf_counter()
    export = generate_export(folder / "export", n_patients=args.patients, image_size=args.size, seed=7)
    report, _ = ingest_export(source=export.folder, labels_csv=export.labels_csv, dataset_dir=folder / "data" / "d",
                              settings=IngestSettings(), salt=b"g" * 32)
    print(f"export and ingest: {time.perf_counter() - start:.1f} s", flush=True)

    def config(workers: int, amp: bool = True, batch: int = args.batch_sizes[0], epochs: int = args.epochs,
               layout: str = "auto", device: str = args.device):
        return load_config(overrides=[
            f"train.epochs={epochs}", f"train.batch_size={batch}", f"data.image_size={args.size}", f"train.model={args.model}",
            f"train.device={device}", f"train.num_workers={workers}", "train.cache=memory",
            f"train.amp={str(amp).lower()}", f"train.memory_format={layout}", "registry.experiment=bench-gpu"],
            environ={})

    def bare(workers: int, amp: bool, batch: int, layout: str):
        ends: list[float] = []
        samples = bare_monai_loop(report.manifest, config(workers, amp, batch, layout=layout), num_workers=workers,
                                  device=args.device, epoch_ends=ends)
        return samples, ends

    trained: list[str] = []

    def medflow(workers: int, amp: bool, batch: int, layout: str):
        result = train_classifier(manifest_path=report.manifest,
                                  data_version=f"bench-{workers}-{amp}-{batch}-{layout}",
                                  config=config(workers, amp, batch, layout=layout))
        if workers == args.workers:  # the evaluation and pyfunc rows take the first run with --workers
            trained.append(result.run_id)
        return None, medflow_epoch_ends(result.run_id)

    # warm-up, one epoch: imports, cuDNN's first use, the fork of workers
    bare_monai_loop(report.manifest, config(args.workers, epochs=1), num_workers=args.workers, device=args.device)
    first, workers = args.batch_sizes[0], args.workers
    runs = [("bare MONAI loop", bare, 0, True, first, "auto"), ("medflow", medflow, 0, True, first, "auto"),
            ("bare MONAI loop", bare, workers, True, first, "auto"), ("medflow", medflow, workers, True, first, "auto"),
            ("medflow", medflow, workers, False, first, "auto"),
            ("medflow", medflow, workers, True, first, "contiguous"),
            *[(name, train, workers, True, batch, "auto") for batch in args.batch_sizes[1:]
              for name, train in (("bare MONAI loop", bare), ("medflow", medflow))]]
    rows, samples = [], 0
    for name, train, workers, amp, batch, layout in runs:
        with Utilisation() as gpu:
            began = time.time()
            seen, ends = train(workers, amp, batch, layout)
            finished = time.time()
        samples = seen or samples
        per_epoch = samples // args.epochs
        steady = (len(ends) - 1) * per_epoch / (ends[-1] - ends[0])
        rows.append((name, workers, amp, layout, batch, finished - began, samples / (finished - began), steady,
                     gpu.mean(ends[0], ends[-1]), gpu.mean(began, finished)))
        print(rows[-1], flush=True)
    evaluations = []
    for device, workers in (("cpu", 0), (args.device, args.workers)):
        began = time.perf_counter()
        evaluate_run(run_id=trained[0], manifest_path=report.manifest, config=config(workers, device=device),
                     out_dir=folder / f"eval-{device}-{workers}")
        evaluations.append((device, workers, time.perf_counter() - began))
        print(evaluations[-1], flush=True)
    served = served_model(trained[0], report.manifest, folder, args.device)
    table = "\n".join([
        "| training | workers | AMP | layout | batch | whole call (s) | samples/s | steady samples/s | "
        "GPU busy, steady | GPU busy, whole call |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {w} | {'yes' if a else 'no'} | {ly} | {b} | {t:.1f} | {s:.0f} | {st:.0f} | {u:.0f} % | "
          f"{uw:.0f} % |" for n, w, a, ly, b, t, s, st, u, uw in rows],
        "",
        "| evaluation step (`evaluate_run`) | workers | whole call (s) | / the CPU's |",
        "|---|---:|---:|---:|",
        *[f"| train.device={d} | {w} | {t:.1f} | {evaluations[0][2] / t:.2f}x |" for d, w, t in evaluations],
        "",
        "| registered model (pyfunc) | images | predict (s) | images/s | / the CPU's |",
        "|---|---:|---:|---:|---:|",
        *[f"| device={d} | {n} | {t:.2f} | {n / t:.0f} | {served[0][2] / t:.2f}x |" for d, n, t in served],
    ])
    print(table)
    if args.write:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        n_train = samples // args.epochs
        section = (
            f"`python benchmarks/gpu.py --write --patients {args.patients} --size {args.size} --epochs {args.epochs} "
            f"--workers {args.workers} --batch-sizes {' '.join(map(str, args.batch_sizes))}` on "
            f"{date.today().isoformat()}, one {name}, {os.cpu_count()} CPU cores, "
            f"Python {platform.python_version()}, torch {torch.__version__}; {args.model} at {args.size}x{args.size}, "
            f"{n_train} training images, {args.epochs} epochs, every row with MONAI's CacheDataset; one run per "
            f"row after a warm-up epoch. Steady: from the end of the first epoch to the end of the last (the "
            f"cache's fill and the first epoch left out). GPU busy: NVML's utilisation sampled every 0.1 s.\n\n"
            f"{table}\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
