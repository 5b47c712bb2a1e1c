"""Benchmark: a k-fold study's arms one after another and two at a time, against the same trainings in a loop.

In one fresh workspace of one process, the demo data is ingested, versioned and validated once with the step
functions. Then the same arms (the plain run and one per fold of ``study.folds``) are trained and evaluated
three ways, each under its own MLflow experiment so that no step is reused from another's cache:

- a loop: each arm's train and evaluate step functions called one after another (no Prefect, no Dask);
- the study with ``study.parallel=1``: the subflow ``medflow-study`` on a one-worker local Dask cluster;
- the study with ``study.parallel=2``: the same on two workers (each with torch on its share of the cores).

A warm-up training (not reported) pays the first imports. The first ratio is the cost of the fan-out (Prefect
tasks, the Dask cluster, the study's report and MLflow run) against the loop; the second the speed-up of two
concurrent arms against one.

    .venv/bin/python benchmarks/study.py [--folds 5] [--set key=value ...] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Studies: arms fanned out on Dask against a loop"
NOTE = ("At the demo's size an arm trains and evaluates in about 5 s, so the study's fixed costs dominate the "
        "overhead. Measured apart: a one-worker local Dask cluster starts in 0.8 s and its worker then imports "
        "torch, MONAI, MLflow, Prefect and medflow's steps in 9.5 s before its first arm (once per worker); a "
        "no-op Dask task costs 15 ms. The rest, about 5 s an arm, is the Prefect task runs of each arm (the arm, "
        "its train and evaluate tasks, their persisted results through the parent's API) and, since the fold "
        "ensemble is registered, joining and judging the folds once; these do not grow with an arm's length.")
SMALL = ["data.n_patients=200", "data.image_size=32", "train.epochs=3", "evaluate.n_bootstrap=100"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
        os.environ.pop(name, None)
    workspace = Path(tempfile.mkdtemp(prefix="medflow-bench-study-"))
    os.chdir(workspace)
    os.environ["PREFECT_HOME"] = str(workspace / ".medflow" / "prefect")

    from prefect import flow  # noqa: PLC0415

    from components.config import load_config  # noqa: PLC0415
    from components.data.study import fold_arms  # noqa: PLC0415
    from components.steps import get_step  # noqa: PLC0415
    from flows.pipeline import run_study  # noqa: PLC0415

    def config(*extra: str):
        return load_config(overrides=[*SMALL, *args.overrides, f"study.folds={args.folds}", *extra], environ={})

    base = config()
    prepared = get_step("ingest").resolve()(base)
    dataset = get_step("version").resolve()(prepared, base)
    report = get_step("validate").resolve()(dataset, base)
    train, evaluate = get_step("train").resolve(), get_step("evaluate").resolve()
    warm = config("registry.experiment=bench-warm-up", "train.epochs=1")
    train(dataset, report, fold_arms(warm, dataset.manifest)[0][1])

    start = time.perf_counter()
    for _, arm in fold_arms(config("registry.experiment=bench-loop"), dataset.manifest):
        evaluate(train(dataset, report, arm).run_id, dataset, arm)
    loop = time.perf_counter() - start

    @flow(name="bench-study")
    def study(cfg):
        return run_study(cfg, dataset, report)

    timed = {}
    for workers in (1, 2):
        start = time.perf_counter()
        study(config(f"registry.experiment=bench-parallel-{workers}", f"study.parallel={workers}"))
        timed[workers] = time.perf_counter() - start

    arms = args.folds + 1
    lines = [
        "| run | arms | time (s) | ratio |",
        "|---|---:|---:|---:|",
        f"| loop: train and evaluate step functions, one arm after another | {arms} | {loop:.1f} | 1.00 |",
        f"| study, `study.parallel=1` (one Dask worker) | {arms} | {timed[1]:.1f} | {timed[1] / loop:.2f} |",
        f"| study, `study.parallel=2` (two Dask workers) | {arms} | {timed[2]:.1f} | {timed[2] / loop:.2f} |",
    ]
    overhead, speedup = timed[1] / loop - 1, timed[1] / timed[2]
    text = "\n".join(lines) + (f"\n\nFan-out overhead (parallel=1 against the loop): {overhead * 100:+.1f} %; "
                               f"speed-up of two concurrent arms against one: {speedup:.2f}x.")
    print(text)
    if args.write:
        met = lambda ok: "met" if ok else "not met"  # noqa: E731
        write_section(SECTION, (
            f"`make bench` (`benchmarks/study.py --folds {args.folds}`) on {date.today().isoformat()}, "
            f"{os.cpu_count()} CPU cores, Python {platform.python_version()}; the demo data at "
            f"{', '.join(SMALL)}; {args.folds}-fold cross-validation, so {arms} arms (the plain run and one per "
            f"fold), each a training and an evaluation; each way under its own MLflow experiment, so nothing is "
            f"reused from a cache. The study's time includes starting the local Dask cluster and its workers "
            f"(their imports, and their Prefect client on this process's API), the out-of-fold and "
            f"ensemble figures, study.json/study.html and the study's MLflow run.\n\n{text}\n\n"
            f"Targets: fan-out overhead at most 5 %: {met(overhead <= 0.05)}; at least 1.7x with two concurrent "
            f"arms on 2 cores: {met(speedup >= 1.7)}. {NOTE}\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
