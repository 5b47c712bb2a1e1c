"""Benchmark: registration and promotion latency against a local tracking server, and
the cost of MLflow logging per training epoch (batched, per metric, asynchronous).

Starts ``mlflow server`` (SQLite) on 127.0.0.1, trains one tiny model, then times
each operation N times in this process next to its bare-MLflow baseline.

    .venv/bin/python benchmarks/registry.py [--repeat N] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from fixtures import mlflow_server, small_dataset
from report import write_section

SECTION = "Registry and logging latency (local tracking server)"


def _times(fn, repeat: int) -> list[float]:
    out = []
    for i in range(repeat):
        start = time.perf_counter()
        fn(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def _row(name: str, baseline_name: str, ours: list[float], base: list[float]) -> str:
    med, p90 = statistics.median(ours), sorted(ours)[int(0.9 * (len(ours) - 1))]
    bmed = statistics.median(base)
    return f"| {name} | {med:.1f} | {p90:.1f} | {baseline_name} | {bmed:.1f} | {med / bmed:.2f} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    from flows.cli import quiet_libraries

    quiet_libraries()
    import mlflow
    from mlflow.tracking import MlflowClient

    from components.config import GateRule, Operator, load_config
    from components.inference.evaluate import evaluate_run
    from components.registry.promote import decide_promotion
    from components.registry.register import register_model
    from components.training.classification import train_classifier

    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-registry-"))
    os.chdir(folder)
    server, url = mlflow_server(folder)
    try:
        os.environ["MLFLOW_TRACKING_URI"] = url
        mlflow.set_tracking_uri(url)
        manifest = small_dataset(folder)
        config = load_config(overrides=["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=100",
                                        "registry.experiment=bench", "registry.model_name=bench"], environ={})
        trained = train_classifier(manifest_path=manifest, data_version="v", config=config)
        evaluation = evaluate_run(run_id=trained.run_id, manifest_path=manifest, config=config, out_dir=folder / "eval")
        client = MlflowClient(url)
        n = max(3, args.repeat // 4)
        versions = []
        register = _times(lambda i: versions.append(register_model(
            run_id=trained.run_id, data_version="v", temperature=evaluation.temperature,
            report_path=evaluation.report, config=config, reuse_existing=False).version), n)
        model_uri = f"runs:/{trained.run_id}/model"
        bare_register = _times(lambda i: mlflow.register_model(model_uri, "bench-bare"), n)

        rules = [GateRule(metric="overall.auc", op=Operator.GE, value=0.0)]
        report_json = {"overall": {"auc": 0.9}}
        state = {"champion": None}

        def promote(i: int) -> None:
            version = versions[i % len(versions)]
            decision = decide_promotion(client=client, model_name="bench", version=version, report=report_json,
                                        rules=rules, compared_with=state["champion"])
            state["champion"] = decision.champion_after

        promote_ms = _times(promote, args.repeat)
        bare_alias = _times(lambda i: client.set_registered_model_alias("bench", "champion", versions[i % len(versions)]), args.repeat)

        run = client.create_run(client.get_experiment_by_name("bench").experiment_id)
        metrics = {"train_loss": 0.5, "val_loss": 0.4, "val_auc": 0.9, "lr": 1e-3}
        with mlflow.start_run(run_id=run.info.run_id):
            batched = _times(lambda i: mlflow.log_metrics(metrics, step=i), args.repeat)
            single = _times(lambda i: [mlflow.log_metric(k, v, step=i) for k, v in metrics.items()], args.repeat)
            asynchronous = _times(lambda i: mlflow.log_metrics(metrics, step=1000 + i, synchronous=False), args.repeat)
            mlflow.flush_async_logging()
        epoch_s = (client.get_run(trained.run_id).info.end_time - client.get_run(trained.run_id).info.start_time) / 1000
    finally:
        server.terminate()
        server.wait(timeout=30)

    lines = [
        "| operation | medflow median (ms) | p90 (ms) | baseline | baseline median (ms) | ratio |",
        "|---|---:|---:|---|---:|---:|",
        _row("register (log pyfunc + register + tags + alias)", "mlflow.register_model of a logged model", register, bare_register),
        _row("promote (lock, gates, aliases, decision + history tags)", "set_registered_model_alias", promote_ms, bare_alias),
        _row("log one epoch's 4 metrics, batched", "4 x log_metric", batched, single),
        _row("log one epoch's 4 metrics, synchronous=False", "batched, synchronous", asynchronous, batched),
    ]
    table = "\n".join(lines)
    share = statistics.median(batched) / 1000 / epoch_s * 100
    note = (f"The training loop logs one batched call per epoch: {statistics.median(batched):.1f} ms, "
            f"{share:.1f}% of the tiny benchmark run's {epoch_s:.1f} s (one epoch plus set-up).")
    print(table)
    print(note)
    if args.write:
        section = (
            f"`make bench` (`benchmarks/registry.py --repeat {args.repeat}`) on {date.today().isoformat()}, "
            f"{os.cpu_count()} CPU cores, Python {platform.python_version()}, mlflow {mlflow.__version__}, "
            f"`mlflow server` with SQLite on 127.0.0.1 started by the script.\n\n{table}\n\n{note}\n"
        )
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
