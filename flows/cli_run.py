"""``medflow run``: the retraining pipeline, or the completed run's summary when nothing changed (wiring
only; the work is :mod:`flows.pipeline`), and the summary it prints."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from components.config import load_config
from components.errors import PromotionRefused
from components.progress import make_console
from flows.prefect_server import (
    check_prefect_server, hide_user_tracebacks, starting_beside, stop_embedded_server, use_embedded_prefect,
    wait_embedded_server,
)

console = make_console()

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c",
                                                  help="Run config YAML (default: the packaged demo).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s",
                                                    help="Override a config key: --set train.epochs=2.")]
WaitOption = Annotated[float, typer.Option("--wait",
                                           help="Seconds to wait for another medflow command in this workspace.")]


def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option("--force",
                                        help="Retrain even when data, config and code are unchanged.")] = False,
    summary: Annotated[Path | None,
                       typer.Option(help="Write the run's summary (versions, metrics, gates) as JSON here.")] = None,
    wait: WaitOption = 0.0,
) -> None:
    """Run the whole retraining pipeline as a Prefect flow (exit 3 when the model is not promoted).

    With the same data, config and code as a completed run (and its model still
    registered), nothing needs doing: the run's summary is shown and no flow starts.
    """
    import json  # noqa: PLC0415

    from components.workspace import refuse_if_busy, undone_on_failure, workspace_lock  # noqa: PLC0415

    cfg = load_config(config, overrides=set_ or [])
    if cfg.placement and not os.environ.get("PREFECT_API_URL"):
        from components.errors import ConfigError  # noqa: PLC0415

        raise ConfigError(
            f"placement {dict(cfg.placement)} sends steps to work pools, which needs a Prefect server with workers: "
            "set PREFECT_API_URL (the embedded server has no deployments and no workers)"
        )
    with undone_on_failure(before_removal=stop_embedded_server):  # a first run that fails leaves no trace
        if not wait:  # a busy workspace is said at once, not after torch and MONAI have loaded for the preflight
            refuse_if_busy()
        with workspace_lock("run", wait_s=wait):
            result = _run_locked(cfg, force=force)
    print_summary(result)
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
    if not result.promoted:  # a scheduler or CI must tell a refusal from a promotion, as with `medflow promote`
        raise typer.Exit(code=PromotionRefused.exit_code)


def _run_locked(cfg, *, force: bool):
    """The pipeline, or the completed run's summary when nothing changed (the caller holds the workspace lock).

    The summary is looked for before the preflight, which imports torch and MONAI (most of a no-op's
    seconds): a config that a completed run used with the same code passed it then. A registered backbone's
    alias is the exception: the run's key names the version it points to now, which the preflight pins.
    Prefect's embedded server starts once the data is checked, while the model's checks import torch and MONAI.
    """
    from flows.summary import reusable_summary, save_summary  # noqa: PLC0415

    from components.tracking import check_tracking_access  # noqa: PLC0415

    check_tracking_access()
    reuse = not (force or cfg.placement)
    backbone = cfg.train.backbone
    before_preflight = reuse and not (backbone and backbone.registered)
    result = reusable_summary(cfg) if before_preflight else None
    if result is not None:
        return result
    from flows.preflight import check_data, check_model  # noqa: PLC0415

    check_data(cfg)
    check_prefect_server()
    use_embedded_prefect()
    with starting_beside():
        cfg = check_model(cfg)  # a registered backbone's alias pinned
        result = reusable_summary(cfg) if reuse and not before_preflight else None
    if result is not None:  # a registered backbone's run, answered once its alias is pinned
        stop_embedded_server()
        return result
    from flows.pipeline import retrain  # noqa: PLC0415 (Prefect reads its settings at import)

    hide_user_tracebacks()
    wait_embedded_server()
    result = retrain(cfg, force=force)
    save_summary(cfg, result)
    return result


def print_summary(summary) -> None:
    """The end-of-run summary: data version, MLflow run, key metrics, each gate, the champion."""
    console.print()
    console.print(f"[bold]Dataset[/]      {summary.dataset}: {summary.n_cases} images of {summary.n_patients} patients")
    unchanged = "; unchanged" if summary.data_unchanged else ""
    console.print(f"[bold]Data version[/] {summary.data_version} (DVC{unchanged})")
    console.print(f"[bold]MLflow run[/]   {summary.run_id}")
    console.print(f"[bold]Model[/]        {summary.model_name} version {summary.version} (alias challenger)")
    if summary.reused and summary.finished:
        console.print(f"[bold]Nothing changed[/] since the run that finished {summary.finished}: same data version, "
                      "config and code, so no flow was started and nothing was registered (--force retrains)")
    elif summary.cached_steps:
        console.print(f"[bold]Reused[/]       {', '.join(summary.cached_steps)} from the cache: what they read (data "
                      "version, config sections, upstream results, medflow's source) is unchanged (--force retrains)")
    metrics = "  ".join(f"{k} {v:.3f}" for k, v in summary.metrics.items() if v is not None)
    from flows.summary import study_line  # noqa: PLC0415

    line = study_line(Path(getattr(summary, "study", "") or ""))
    if line:
        console.print(f"[bold]Study[/]        {line}")
    console.print(f"[bold]Test metrics[/] {metrics}")
    console.print(gate_table(summary.gates))
    change = getattr(summary, "champion_change", "")
    if summary.promoted and change:  # a reprinted summary whose champion has moved since
        console.print(f"[bold green]Promoted[/] when it ran: version {summary.version} became "
                      f"{summary.model_name}@champion")
        console.print(f"[bold]Since then[/]: {change}; {summary.model_name}@champion is version {summary.champion}")
    elif summary.promoted:
        console.print(f"[bold green]Promoted[/]: {summary.model_name}@champion is version {summary.champion}")
    else:
        held = f"version {summary.champion}" if summary.champion else "no version"
        console.print(f"[bold red]Not promoted[/]: {summary.model_name}@champion stays at {held}")
        console.print(f"Reason: {summary.reason}", markup=False, soft_wrap=True)
        if change:
            console.print(f"[bold]Since then[/]: {change}")
    console.print("Dashboards: medflow ui (MLflow and Prefect, this workspace's runs)")


def gate_table(gates) -> Table:
    """Each promotion gate's rule, its value and the verdict (the reason too where the rule does not say it)."""
    table = Table(title="Promotion gates", title_justify="left")
    for column in ("rule", "value", "verdict"):
        table.add_column(column)
    for gate in gates:
        value = "null" if gate.value is None else f"{gate.value:.4f}"
        rule = f"{gate.metric} {gate.op} {gate.threshold:g}"
        # a plain failure's reason restates the rule and its value, which the row already shows
        said = not gate.reason or gate.reason.startswith(rule)
        verdict = "[green]pass[/]" if gate.passed else "[red]fail[/]" + ("" if said else f" ({gate.reason})")
        table.add_row(rule, value, verdict)
    return table
