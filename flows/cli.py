"""``medflow``: the command line. Each command only wires arguments to a library function.

Errors a user can cause (:class:`MedflowError`) print one readable line and exit
non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from typer.core import TyperGroup

from components import paths
from components.progress import make_console, metric_text
from components.config import load_config
from components.errors import Interrupted, MedflowError, PromotionRefused
from components.machine import arrow_on_c_heap
from flows.cli_data import data_app, ingest, init
from flows.cli_predict import export, predict
from flows.cli_pretrain import pretrain
from flows.cli_run import ConfigOption, SetOption, gate_table, run
from flows.cli_ui import ui

class _Stopped(Exception):
    """A command's KeyboardInterrupt (Ctrl-C, SIGTERM), carried past typer, which turns one into a silent
    exit 130 and drops it, to :func:`main`, which says what was interrupted."""


class _Commands(TyperGroup):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise _Stopped() from exc
        except BaseException as exc:  # SIGTERM inside a flow: Prefect's TerminationSignal (Prefect is loaded then)
            termination = getattr(sys.modules.get("prefect.exceptions"), "TerminationSignal", None)
            if termination is not None and isinstance(exc, termination):
                raise _Stopped() from exc
            raise


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="MLOps for medical imaging: ingest, validate, train, evaluate, register and promote.",
)
console = make_console()
err = make_console(stderr=True)
app.add_typer(data_app, name="data")
app.command()(ingest)
app.command()(init)
app.command()(ui)
app.command()(predict)
app.command()(export)
app.command()(pretrain)
app.command()(run)


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    """medflow command line."""
    os.environ["MEDFLOW_DEBUG"] = "1" if debug else os.environ.get("MEDFLOW_DEBUG", "0")
    quiet_libraries()
    arrow_on_c_heap()  # predict, compare and drift read tables outside the steps too


def quiet_libraries() -> None:
    """Keep the console to medflow's progress, Prefect's run log and real warnings."""
    import logging  # noqa: PLC0415
    import warnings  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    for name in ("monai.data.nvimgcodec_pydicom_plugin", "great_expectations", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.ERROR)
    medflow_logger = logging.getLogger("medflow")
    if not medflow_logger.handlers:  # medflow's own warnings (data drift) reach the console
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        handler.addFilter(_unless_prefect_prints)
        medflow_logger.addHandler(handler)
        medflow_logger.setLevel(logging.INFO)


def _unless_prefect_prints(record: object) -> bool:
    """Once a flow has set up Prefect's logging, its console handler on the root logger prints medflow's
    records (with the time and the logger's name): this handler then stays quiet, or each line came twice."""
    import logging  # noqa: PLC0415

    return not any(type(h).__name__ == "PrefectConsoleHandler" for h in logging.getLogger().handlers)


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Option(help="Predictions table (CSV or Parquet): case_id, y_true, prob or prob_0..")],
    manifest: Annotated[Path, typer.Option(help="Manifest (CSV or Parquet) with case_id and group columns.")],
    out: Annotated[Path, typer.Option(help="Where to write report.json.")],
    html: Annotated[Path | None, typer.Option(help="Also write the HTML report (plots inline) here.")] = None,
    attribute: Annotated[list[str] | None, typer.Option(help="Group column; repeat. Default: sex, age_group, race, site if present.")] = None,
    threshold: Annotated[float, typer.Option(help="Decision threshold (binary).")] = 0.5,
    n_bootstrap: Annotated[int, typer.Option(help="Patient-level bootstrap resamples; 0 skips the CIs.")] = 1000,
    min_group_size: Annotated[int, typer.Option(help="Smaller groups are warned about and left out of the gaps.")] = 10,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
    target_specificity: Annotated[float, typer.Option(help="Specificity at which sensitivity is read.")] = 0.9,
    ordinal: Annotated[bool, typer.Option("--ordinal", help="The classes are ordered grades: adds quadratic "
                                                            "weighted kappa.")] = False,
) -> None:
    """Evaluate any predictions table against a manifest and write report.json."""
    from components.evaluation.files import evaluate_files  # noqa: PLC0415

    report = evaluate_files(
        predictions, manifest, out=out, html=html, attributes=attribute or None, threshold=threshold,
        n_bootstrap=n_bootstrap, seed=seed, min_group_size=min_group_size, target_specificity=target_specificity,
        ordinal=ordinal,
    )
    o = report.overall
    if report.task == "segmentation":
        console.print(f"segmentation: n={report.n}  dice {metric_text(o['dice'])}  hd95 {metric_text(o['hd95'])} mm -> {out}")
    else:
        console.print(f"{report.task}: n={report.n}  auc {metric_text(o['auc'])}  ece {o['ece']:.3f}  brier {o['brier']:.3f} -> {out}")
    for warning in report.warnings:
        err.print(f"warning: {warning}")


@app.command()
def validate(
    manifest: Annotated[Path, typer.Option(help="Manifest (Parquet or CSV) to check.")],
    config: ConfigOption = None,
    set_: SetOption = None,
    previous: Annotated[Path | None, typer.Option(help="Manifest of the previous data version: drift is reported as warnings.")] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    data_docs: Annotated[Path | None, typer.Option(help="Write the great-expectations Data Docs site (HTML) into this folder.")] = None,
) -> None:
    """Run the config's dataset expectation suites on a manifest (exit 2 when any fails)."""
    from components.data.ingest import load_manifest  # noqa: PLC0415
    from components.errors import DataValidationError  # noqa: PLC0415
    from components.validation.step import describe_failures, run_validation  # noqa: PLC0415

    cfg = load_config(config, overrides=set_ or [])
    report = run_validation(
        load_manifest(manifest), cfg, previous=load_manifest(previous) if previous else None, docs_dir=data_docs,
    )
    if out:
        report.write_json(out)
    for warning in report.warnings:
        err.print(f"warning: drift: {warning.describe()}", markup=False, soft_wrap=True)
    if not report.success:
        raise DataValidationError(describe_failures(f"{manifest}: validation failed", report, out))
    docs = f"; Data Docs {report.data_docs}" if report.data_docs else ""
    console.print(f"{manifest}: {report.n_expectations} expectations passed on {report.n_rows} rows{docs}",
                  markup=False, soft_wrap=True)


ModelOption = Annotated[str, typer.Option("--model", "-m", help="Registered model name.")]


def _client():
    """MLflow client of the configured registry, failing fast when a server does not answer."""
    import mlflow  # noqa: PLC0415

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(paths.tracking_uri())
    return mlflow.tracking.MlflowClient()


@app.command()
def promote(
    model: ModelOption,
    version: Annotated[str, typer.Option("--version", "-v", help="The version to promote.")],
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Apply the config's promotion policy to a registered version (exit 3 when refused)."""
    from components.registry.step import promote_registered  # noqa: PLC0415

    cfg = load_config(config, overrides=set_ or [])
    _client()
    decision = promote_registered(model_name=model, version=version, config=cfg)
    console.print(gate_table(decision.gates))
    if not decision.promoted:
        raise PromotionRefused(f"version {version} of {model} was not promoted: {decision.reason}")
    console.print(f"[bold green]Promoted[/]: {model}@champion is version {version}"
                  + (f" (previous-champion: {decision.champion_before})" if decision.champion_before else ""))


@app.command()
def rollback(model: ModelOption) -> None:
    """Give ``champion`` back to ``previous-champion``; the rollback is recorded."""
    from components.registry.promote import rollback as roll_back  # noqa: PLC0415

    event = roll_back(_client(), model)
    console.print(f"Rolled back: {model}@champion is version {event.champion_after} (was {event.champion_before})")


@app.command()
def compare(
    model: ModelOption,
    a: Annotated[str, typer.Argument(help="The version whose test cases both models are judged on.")],
    b: Annotated[str | None, typer.Argument(help="The version to compare with (default: the champion).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the comparison as JSON here.")] = None,
    n_bootstrap: Annotated[int, typer.Option(help="Paired patient-level resamples.")] = 1000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
) -> None:
    """Two versions side by side on A's test cases: every metric, the paired difference A - B and its 95% CI."""
    from components.registry.compare import compare_versions  # noqa: PLC0415

    result = compare_versions(model_name=model, a=a, b=b, n_resamples=n_bootstrap, seed=seed)
    console.print(f"{model}: version {result.a} (A) and version {result.b} (B) on A's test set: {result.n} images of "
                  f"{result.n_patients} patients, data version {result.data_version[:12]}", markup=False,
                  soft_wrap=True)
    for title, rows in (("Metrics", result.metrics), ("Fairness", result.fairness)):
        table = Table(title=title, title_justify="left")
        for column in ("metric", "A", "B", "A - B", "95% CI (paired)", "better"):
            table.add_column(column)
        for row in rows:
            ci = "-" if row.ci95 is None else f"{row.ci95[0]:+.4f} .. {row.ci95[1]:+.4f}"
            better = {"a": "A", "b": "B"}.get(row.better, "neither")
            table.add_row(row.name, metric_text(row.a), metric_text(row.b), "-" if row.difference is None else f"{row.difference:+.4f}",
                          ci, better)
        console.print(table)
    if json_out:
        result.write_json(json_out)


@app.command()
def history(model: ModelOption) -> None:
    """Every promotion decision and rollback of a model, oldest first."""
    from components.registry.history import read_history  # noqa: PLC0415
    from components.registry.promote import check_model  # noqa: PLC0415

    client = _client()
    check_model(client, model)
    events = read_history(client, model)
    if not events:
        console.print(f"{model}: no decisions recorded")
    for e in events:
        console.print(f"{e.at[:19].replace('T', ' ')}  {e.kind:<9} version {e.version:<4} {e.verdict:<11} "
                      f"champion {e.champion_before or '-'} -> {e.champion_after or '-'}", markup=False, soft_wrap=True)
        for g in e.gates:
            value = "null" if g["value"] is None else format(g["value"], ".4f")
            console.print(f"    {'pass' if g['passed'] else 'FAIL'}  {g['metric']} {g['op']} {g['threshold']:g}  "
                          f"(value {value})", markup=False, soft_wrap=True)
        if e.reason and (e.kind != "promotion" or e.verdict == "refused" and all(g["passed"] for g in e.gates)):
            console.print(f"    {e.reason}", markup=False, soft_wrap=True)


@app.command()
def status(limit: Annotated[int, typer.Option(help="How many of the latest runs to list.")] = 10) -> None:
    """The latest runs with their data versions, the latest studies, and each model's champion."""
    from components.registry.status import latest_runs, latest_studies, registered_models  # noqa: PLC0415

    client = _client()
    console.print(f"Tracking store: {paths.tracking_uri()}", markup=False, soft_wrap=True)
    runs = latest_runs(client, limit=limit)
    if not runs:
        console.print("No runs yet: medflow run starts one.")
    for r in runs:
        console.print(f"{r.started}  run {r.run_id[:8]}  {r.status:<9} {r.experiment}  data {r.data_version[:8]}  "
                      + (f"test Dice {metric_text(r.test_dice)}" if r.test_dice is not None else f"test AUC {metric_text(r.test_auc)}"),
                      markup=False, soft_wrap=True)
    for study in latest_studies(client):
        console.print(f"{study.started}  study {study.run_id[:8]}  {study.name}  {study.arms} arms' runs "
                      f"(.medflow/studies/{study.run_id}/study.html)", markup=False, soft_wrap=True)
    for m in registered_models(client):
        console.print(f"{m.name}: latest version {m.latest_version or '-'}, champion {m.champion or '-'}, "
                      f"previous-champion {m.previous_champion or '-'}", markup=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medflow`` console script; returns the exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        with sigterm_interrupts():
            code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            return code
    except (_Stopped, KeyboardInterrupt) as exc:
        return _interrupted(exc.__cause__ if isinstance(exc, _Stopped) else exc, debug=debug)
    except typer.Abort:
        err.print("medflow: aborted")
        return Interrupted.exit_code
    except MedflowError as exc:
        if debug:
            raise
        print(f"medflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except OSError as exc:  # the file system's refusal (permission, no space, a file where a folder goes)
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"medflow: error: {where}{exc.strerror or exc} (--debug shows where)", file=sys.stderr)
        return 1
    except typer.TyperException as exc:  # usage errors: typer's click raises these
        exc.show()
        return getattr(exc, "exit_code", 2)
    except Exception as exc:  # a server that does not answer, or a registry refusal
        from mlflow.exceptions import MlflowException  # noqa: PLC0415

        if debug or not isinstance(exc, MlflowException):
            raise
        from components.tracking import describe_mlflow_error  # noqa: PLC0415

        print(f"medflow: error: {describe_mlflow_error(exc, paths.tracking_uri())}", file=sys.stderr)
        return 1
    return 0


def _interrupted(cause: BaseException | None, *, debug: bool) -> int:
    """Ctrl-C or SIGTERM: one line (what was interrupted and what the next run does), exit 130."""
    if debug and cause is not None:
        raise cause
    said, seen = "interrupted", set()
    while cause is not None and id(cause) not in seen:  # what training said, wherever Prefect chained it
        if isinstance(cause, Interrupted) or hasattr(cause, "medflow_interrupted"):
            said = getattr(cause, "medflow_interrupted", str(cause))
            break
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    print(f"medflow: {said}", file=sys.stderr)
    return Interrupted.exit_code


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a ``kill``, or Kubernetes before it evicts a pod) stops a command as Ctrl-C does: with
    Python's default it ended the process at once, the MLflow run left RUNNING. Inside a flow Prefect's
    own handler takes over (its TerminationSignal) and gives this one back after."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
