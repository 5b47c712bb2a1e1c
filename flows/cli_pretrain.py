"""``medflow pretrain``: the pretraining flow on the configured dataset (wiring only; the work is
:mod:`components.pretraining`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from components.config import load_config
from components.progress import make_console, metric_text

console = make_console()


def pretrain(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML (default: the demo).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set pretrain.epochs=2.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Pretrain again even when data, config and code are unchanged.")] = False,
    summary: Annotated[Path | None, typer.Option(help="Write the run's summary as JSON here.")] = None,
) -> None:
    """Pretrain an encoder self-supervised on the dataset's images (labels unused) and register it as a new
    version of <name>-encoder; a classifier then starts from it with
    --set train.backbone.source=models:/<name>-encoder@latest."""
    from components.tracking import check_tracking_access  # noqa: PLC0415
    from components.workspace import undone_on_failure, workspace_lock  # noqa: PLC0415
    from flows.prefect_server import (  # noqa: PLC0415
        check_prefect_server, hide_user_tracebacks, starting_beside, stop_embedded_server, use_embedded_prefect,
        wait_embedded_server,
    )
    from flows.preflight import check_data, check_pretrain_model  # noqa: PLC0415

    cfg = load_config(config, overrides=set_ or [])
    with undone_on_failure(before_removal=stop_embedded_server):
        check_data(cfg)
        with workspace_lock("pretrain", wait_s=0):
            check_tracking_access()
            check_prefect_server()
            use_embedded_prefect()
            with starting_beside():  # as `medflow run` does
                cfg = check_pretrain_model(cfg)  # a registered starting encoder's alias pinned to its version
            hide_user_tracebacks()
            wait_embedded_server()
            from flows.pretrain import pretrain as pretrain_flow  # noqa: PLC0415 (Prefect reads its settings at import)

            result = pretrain_flow(cfg, force=force)
    console.print()
    console.print(f"[bold]Dataset[/]      {result.dataset}: {result.n_cases} images, data version {result.data_version}")
    console.print(f"[bold]MLflow run[/]   {result.run_id} ({result.method} on {result.network}, {result.epochs} epochs)")
    console.print(f"[bold]Checks[/]       val_loss {metric_text(result.val_loss)}  embedding_std {metric_text(result.embedding_std)} "
                  f"(about 1 when spread, 0 when collapsed)  knn_val_auc {metric_text(result.knn_auc)}")
    if result.cached_steps and "pretrain" in result.cached_steps:
        console.print("[bold]Reused[/]       the pretraining from the cache: data, config and code are unchanged "
                      "(--force pretrains again)")
    console.print(f"[bold]Encoder[/]      {result.model_name} version {result.version}: "
                  f"--set train.backbone.source=models:/{result.model_name}@latest")
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
