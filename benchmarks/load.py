"""Benchmark: 20 concurrent promotions and 20 concurrent evaluations against one MLflow server.

Starts ``mlflow server`` on 127.0.0.1 (SQLite, and PostgreSQL when Debian's
``postgresql`` is installed), trains one tiny model, then for each backend:

- promotions: 20 versions of one model, each promoted by its own thread at the
  same moment, all compared with the same (absent) champion; baseline: 20
  versions of another model promoted one after another in the same process;
- evaluations: 20 runs holding the same checkpoint, each evaluated (predict the
  val and test splits, fit the temperature, bootstrap, log report and metrics)
  by its own thread at once; baseline: the same 20 evaluations one after another.

After each concurrent wave it checks what must hold: exactly one promotion won,
``champion`` names it, every call's decision is on its version and in the
model's history (20 events), no lock is left behind; every evaluated run holds
the same report. Any violation fails the benchmark. Latencies are per call;
throughput is calls per second of wall time.

    .venv/bin/python benchmarks/load.py [--n 20] [--write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

from fixtures import mlflow_server, small_dataset
from report import write_section

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SECTION = "Load: concurrent promotions and evaluations (one MLflow server)"


def _percentiles(latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731 (nearest rank)
    return statistics.median(ordered), pick(0.90), pick(0.99)


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def _wave(fn, items: list, *, concurrent: bool) -> tuple[list, list[float], float]:
    """Results, per-call latencies (s) and wall time (s) of ``fn`` over ``items``."""
    start = time.perf_counter()
    if concurrent:
        with ThreadPoolExecutor(max_workers=len(items)) as pool:
            done = list(pool.map(lambda item: _timed(fn, item), items))
    else:
        done = [_timed(fn, item) for item in items]
    return [d[0] for d in done], [d[1] for d in done], time.perf_counter() - start


def _scenario(backend: str, url: str, folder: Path, n: int, trained, manifest: Path, config) -> list[tuple]:
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.config import GateRule, Operator
    from components.inference.evaluate import evaluate_run
    from components.registry.history import read_history
    from components.registry.lock import lock_name
    from components.registry.promote import TAG_DECISION, current_champion, decide_promotion
    from components.training.loop import CHECKPOINT_DIR
    from components.tracking import use_experiment

    os.environ["MLFLOW_TRACKING_URI"] = url
    mlflow.set_tracking_uri(url)
    client = MlflowClient(url)
    experiment = use_experiment("load")
    checkpoint = Path(mlflow.artifacts.download_artifacts(run_id=trained["run_id"], artifact_path=CHECKPOINT_DIR,
                                                          tracking_uri=trained["uri"], dst_path=str(folder / f"ck-{backend}")))
    runs = []
    for _ in range(2 * n):  # n runs for the serial baseline, n for the concurrent wave
        run = client.create_run(experiment)
        client.log_artifacts(run.info.run_id, str(checkpoint), CHECKPOINT_DIR)
        client.set_terminated(run.info.run_id)
        runs.append(run.info.run_id)
    logged = mlflow.pyfunc.log_model(name="model", python_model=str(REPO / "components" / "registry" / "pyfunc_code.py"),
                                     artifacts={"checkpoint": str(checkpoint)},
                                     code_paths=[str(REPO / "components")], pip_requirements=[])
    models = {}
    for mode in ("serial", "concurrent"):
        name = f"load-{backend}-{mode}"
        client.create_registered_model(name)
        models[mode] = (name, [client.create_model_version(name, logged.model_uri, model_id=logged.model_id).version
                               for _ in range(n)])
    rules = [GateRule(metric="overall.auc", op=Operator.GE, value=0.5)]
    report = {"overall": {"auc": 0.9}}

    def promote_serially(version: str):
        name = models["serial"][0]
        return decide_promotion(client=client, model_name=name, version=version, report=report, rules=rules,
                                compared_with=current_champion(client, name))

    def promote_racing(version: str):
        return decide_promotion(client=MlflowClient(url), model_name=models["concurrent"][0], version=version,
                                report=report, rules=rules, compared_with=None)

    rows = []
    _, serial_lat, serial_wall = _wave(promote_serially, models["serial"][1], concurrent=False)
    decisions, lat, wall = _wave(promote_racing, models["concurrent"][1], concurrent=True)
    name = models["concurrent"][0]
    winners = [d.version for d in decisions if d.promoted]
    problems = []
    if len(winners) != 1 or current_champion(client, name) != winners[0]:
        problems.append(f"winners {winners}, champion {current_champion(client, name)}")
    recorded = [v for v in models["concurrent"][1] if TAG_DECISION in client.get_model_version(name, v).tags]
    if len(recorded) != n or len(read_history(client, name)) != n:
        problems.append(f"{len(recorded)} decisions on versions, {len(read_history(client, name))} history events")
    if client.search_registered_models(f"name='{lock_name(name)}'"):
        problems.append("a lock was left behind")
    held = sum("is in progress" in d.reason for d in decisions if not d.promoted)
    changed = sum("the champion changed" in d.reason for d in decisions if not d.promoted)
    if held + changed != n - 1:
        problems.append(f"{n - 1 - held - changed} refusals for another reason")
    rows.append((backend, "promotion", n, serial_lat, serial_wall, lat, wall, problems,
                 f"1 promoted, {held} refused by the lock, {changed} because the champion changed; {n} decisions "
                 "recorded; no lock left"))

    def evaluate(run_id: str):
        out = folder / f"eval-{backend}-{run_id}"
        result = evaluate_run(run_id=run_id, manifest_path=manifest, config=config, out_dir=out)
        return json.loads(result.report.read_text())["overall"]

    serial_reports, serial_lat, serial_wall = _wave(evaluate, runs[:n], concurrent=False)
    reports, lat, wall = _wave(evaluate, runs[n:], concurrent=True)
    problems = []
    if any(r != serial_reports[0] for r in reports + serial_reports):
        problems.append("the evaluations of one model disagree")
    missing = [r for r in runs[n:] if "test_auc" not in client.get_run(r).data.metrics]
    if missing:
        problems.append(f"{len(missing)} runs without their metrics")
    rows.append((backend, "evaluation", n, serial_lat, serial_wall, lat, wall, problems, "every run holds the same report"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from flows.cli import quiet_libraries

    quiet_libraries()
    import mlflow

    from components.config import load_config
    from components.training.classification import train_classifier
    from tests.integration.conftest import postgres_cluster  # the tests' throwaway PostgreSQL

    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-load-"))
    os.chdir(folder)
    manifest = small_dataset(folder)
    config = load_config(overrides=["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=200",
                                    "registry.experiment=load"], environ={})
    local = f"sqlite:///{folder / 'train.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = local
    trained = {"run_id": train_classifier(manifest_path=manifest, data_version="v", config=config).run_id,
               "uri": local}
    rows = []
    with contextlib.ExitStack() as stack:
        backends = [("SQLite", None)]
        try:
            backends.append(("PostgreSQL", stack.enter_context(postgres_cluster())))
        except RuntimeError as exc:
            print(f"PostgreSQL left out: {exc}")
        for backend, store in backends:
            server, url = mlflow_server(folder / backend, backend_uri=store)
            try:
                rows += _scenario(backend, url, folder, args.n, trained, manifest, config)
            finally:
                server.terminate()
                server.wait(timeout=30)
    lines = [
        "| backend | operation | calls | one after another: p50 / p90 / p99 (ms) | calls/s | all at once: p50 / p90 / p99 (ms) | calls/s | throughput ratio | checks |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    failed = []
    for backend, op, n, s_lat, s_wall, lat, wall, problems, note in rows:
        sp, cp = _percentiles(s_lat), _percentiles(lat)
        lines.append(f"| {backend} | {op} | {n} | {' / '.join(f'{v * 1000:.0f}' for v in sp)} | {n / s_wall:.1f} | "
                     f"{' / '.join(f'{v * 1000:.0f}' for v in cp)} | {n / wall:.1f} | {s_wall / wall:.2f} | "
                     f"{'FAILED: ' + '; '.join(problems) if problems else 'passed: ' + note} |")
        failed += problems
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section(SECTION, (
            f"`make bench` (`benchmarks/load.py --n {args.n}`) on {date.today().isoformat()}, {os.cpu_count()} CPU "
            f"cores, Python {platform.python_version()}, mlflow {mlflow.__version__}; `mlflow server` (2 workers) on "
            "127.0.0.1 with each backend store, started by the script. Promotions are lock + gates + alias moves + "
            "the decision tag and history event; the racing wave compares every version with the same champion, so "
            "one wins and the others are refused (by the lock, or because the champion changed). Evaluations predict "
            "the val and test splits of a small dataset, fit the temperature, bootstrap 200 times and log the report; "
            "they are CPU-bound, so on 2 cores running 20 at once mostly shares the cores.\n\n"
            f"{table}\n"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
