"""Benchmark: each step of ``medflow run`` and the whole, as plain calls and as a Prefect flow.

The same config runs in fresh workspaces of one process: once as a warm-up
(imports, first-use initialisation; not reported), then the steps called as
plain functions, then the retraining flow on Prefect's ephemeral server. The table gives seconds per step and the flow/plain ratio (the cost of
orchestration); ``--write`` puts it into BENCHMARKS.md.

    .venv/bin/python benchmarks/pipeline.py [--set key=value ...] [--write]
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

STEPS = ("ingest", "validate", "train", "evaluate", "register", "promote")


def _fresh_workspace() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="medflow-bench-"))
    os.chdir(folder)
    return folder


def run_plain(config) -> dict[str, float]:
    """Seconds per step, calling the step functions directly."""
    from components import steps

    times: dict[str, float] = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        out = fn(*args)
        times[name] = time.perf_counter() - start
        return out

    dataset = timed("ingest", steps.ingest_dataset, config)
    report = timed("validate", steps.validate_dataset, dataset, config)
    trained = timed("train", steps.train_model, dataset, report, config)
    evaluation = timed("evaluate", steps.evaluate_model, trained.run_id, dataset, config)
    model = timed("register", steps.register, evaluation, dataset, config)
    timed("promote", steps.promote, model, evaluation, dataset, config)
    return times


def run_flow(config) -> tuple[dict[str, float], float]:
    """Seconds per task as Prefect recorded them, and the wall time of the whole flow call."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import retrain

    start = time.perf_counter()
    state = retrain(config, return_state=True)
    total = time.perf_counter() - start
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    times = {run.name.rsplit("-", 1)[0]: run.total_run_time.total_seconds() for run in runs}
    return times, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()

    from flows.cli import quiet_libraries, use_embedded_prefect

    quiet_libraries()
    from components.config import load_config

    config = load_config(overrides=args.overrides)
    _fresh_workspace()
    run_plain(config)  # warm-up: imports, first-use initialisation; not reported
    plain_ws = _fresh_workspace()
    start = time.perf_counter()
    plain = run_plain(config)
    plain_total = time.perf_counter() - start

    flow_ws = _fresh_workspace()
    use_embedded_prefect()
    flow, flow_total = run_flow(config)

    rows = [(s, plain[s], flow.get(s, float("nan"))) for s in STEPS]
    lines = [
        "| step | plain call (s) | Prefect task (s) | task / plain |",
        "|---|---:|---:|---:|",
        *[f"| {s} | {p:.2f} | {f:.2f} | {f / p:.2f} |" for s, p, f in rows],
        f"| **whole run** (flow call incl. ephemeral server start) | {plain_total:.2f} | {flow_total:.2f} | {flow_total / plain_total:.2f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = "make bench" if not args.overrides else "python benchmarks/pipeline.py " + " ".join(f"--set {o}" for o in args.overrides)
        section = (
            f"`{command}` on {date.today().isoformat()}, {os.cpu_count()} CPU cores, {platform.machine()}, "
            f"Python {platform.python_version()}, demo config (config hash {config.config_hash()}).\n\n"
            f"{table}\n\n"
            "Both runs happen in one process after a warm-up run, each in a fresh workspace (so each generates "
            "the synthetic export and creates its stores); the flow's whole-run figure includes starting "
            "Prefect's ephemeral server, which a real deployment pays once.\n"
        )
        write_section("Pipeline steps: plain calls vs Prefect flow", section)
    for folder in (plain_ws, flow_ws):
        print(f"workspace kept for inspection: {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
