"""``medflow ingest`` and ``medflow data versions|checkout``: the data commands of the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from components import paths
from components.progress import make_console
from components.config import load_config

console = make_console()
data_app = typer.Typer(no_args_is_help=True, help="Data versions: list them, restore one.")

ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="Run config YAML (default: the packaged demo).")]
SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="Override a config key: --set data.workers=2.")]
WaitOption = Annotated[float, typer.Option("--wait", help="Seconds to wait for another medflow command in this workspace.")]
DatasetOption = Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name (default: the config's data.name).")]


def ingest(
    source: Annotated[Path | None, typer.Option(help="Export folder (default: the config's data.source or the demo generator).")] = None,
    format_: Annotated[str | None, typer.Option("--format", help="dicom, nifti or png.")] = None,
    labels: Annotated[Path | None, typer.Option(help="Labels CSV: path,label[,patient_id,sex,age,race,site] (default SOURCE/labels.csv).")] = None,
    dataset: DatasetOption = None,
    task: Annotated[str | None, typer.Option(help="classification (labels are classes), multilabel (labels are sets of classes, 0|2) segmentation (labels are mask paths) or unlabelled (images for medflow pretrain; no label column).")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Ingest the good cases; record the bad ones in the ingest report.")] = False,
    config: ConfigOption = None,
    set_: SetOption = None,
    summary: Annotated[Path | None, typer.Option(help="Write the data version and counts as JSON here (a DVC stage output).")] = None,
    wait: WaitOption = 0.0,
) -> None:
    """Ingest an export into data/NAME, version it with DVC (one directory), push and commit it."""
    from components.data.step import check_source, ingest_dataset  # noqa: PLC0415
    from components.workspace import undone_on_failure, workspace_lock  # noqa: PLC0415

    flags = {"data.source": source, "data.format": format_, "data.labels": labels, "data.name": dataset,
             "data.task": task, "data.skip_bad": True if skip_bad else None}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(config, overrides=[*overrides, *(set_ or [])])
    check_source(cfg)
    with undone_on_failure(), workspace_lock("ingest", wait_s=wait):  # a first ingest that fails leaves no trace
        result = ingest_dataset(cfg)
    report_path = paths.medflow_home() / "ingest" / f"{cfg.data.name}-report.json"
    report = json.loads(report_path.read_text())
    state = "unchanged, no new version" if result.unchanged else (
        f"new version (previous {result.previous_version[:12]})" if result.previous_version else "first version")
    console.print(f"[bold]Dataset[/]      {cfg.data.name}: {result.n_cases} cases of {result.n_patients} patients -> {result.manifest}",
                  soft_wrap=True)
    console.print(f"[bold]Data version[/] {result.version} ({state})", soft_wrap=True)
    if result.push_pending:
        console.print("[bold]Push pending[/] the DVC remote could not be reached; the version is committed locally "
                      "and the next ingest or run pushes it", soft_wrap=True)
    console.print(f"[bold]Work[/]         converted {report['converted']}, reused {report['reused']}, "
                  f"skipped {len(report['skipped'])} (report {report_path})", soft_wrap=True)
    for item in report["skipped"][:20]:
        console.print(f"  skipped {item['path']}: {item['reason']}", markup=False, soft_wrap=True)
    if not result.unchanged and os.environ.get("PREFECT_API_URL"):
        announce_data_version(result)
    if summary:
        summary.parent.mkdir(parents=True, exist_ok=True)
        summary.write_text(json.dumps({"dataset": result.name, "data_version": result.version, "cases": result.n_cases,
                                       "patients": result.n_patients}, indent=2) + "\n")


TEMPLATE = "dvc.yaml"
WORKSPACE_CONFIG = "medflow.yaml"


def init(config: ConfigOption = None, set_: SetOption = None,
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing medflow.yaml and dvc.yaml.")] = False) -> None:
    """Make this folder a medflow workspace: git + DVC, medflow.yaml (the run config) and dvc.yaml (the stages)."""
    from importlib import resources  # noqa: PLC0415

    import yaml  # noqa: PLC0415

    from components.data.versioning import commit_paths, ensure_repository  # noqa: PLC0415
    from components.errors import ConfigError  # noqa: PLC0415

    root = paths.workspace_root()
    cfg = load_config(config, overrides=set_ or [])
    targets = [root / WORKSPACE_CONFIG, root / TEMPLATE]
    existing = [t.name for t in targets if t.exists()]
    if existing and not force:
        raise ConfigError(f"{', '.join(existing)} already in {root}; --force overwrites")
    ensure_repository(root)
    targets[0].write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    targets[1].write_text((resources.files("components") / "templates" / TEMPLATE).read_text())
    if (root / ".git").exists():
        commit_paths(root, [WORKSPACE_CONFIG, TEMPLATE], "medflow: workspace config and DVC stages")
    console.print(f"Workspace ready in {root}: edit {WORKSPACE_CONFIG}, then `dvc repro` (or `medflow run --config {WORKSPACE_CONFIG}`)",
                  markup=False, soft_wrap=True)


DATA_VERSION_EVENT = "medflow.data.version.created"


def announce_data_version(dataset) -> None:
    """Emit the Prefect event ``medflow.data.version.created`` for a new data version.

    The ``on-new-data`` deployment of ``infra/prefect.yaml`` has a trigger on it, so a
    Prefect automation starts a retraining run in this workspace. Only ``medflow
    ingest`` announces: a pipeline run trains on the version it ingested anyway.
    """
    from prefect.events import emit_event  # noqa: PLC0415

    emit_event(
        event=DATA_VERSION_EVENT,
        resource={
            "prefect.resource.id": f"medflow.dataset.{dataset.name}",
            "medflow.workspace": str(paths.workspace_root()),
            "medflow.data_version": dataset.version,
        },
        payload={"cases": dataset.n_cases, "patients": dataset.n_patients},
    )
    console.print(f"Announced {DATA_VERSION_EVENT} to the Prefect server", markup=False)


def _dvc_file(config: Path | None, dataset: str | None) -> Path:
    name = dataset or load_config(config).data.name
    return paths.data_root() / f"{name}.dvc"


@data_app.command("versions")
def versions(dataset: DatasetOption = None, config: ConfigOption = None) -> None:
    """List a dataset's versions, newest first: DVC hash, git commit, date and counts."""
    from components.data.versioning import list_versions, read_version  # noqa: PLC0415
    from components.errors import IngestError  # noqa: PLC0415

    dvc_file = _dvc_file(config, dataset)
    if not dvc_file.exists():
        raise IngestError(f"{dvc_file} does not exist: ingest the dataset first (medflow ingest)")
    current = read_version(dvc_file)
    console.print(f"Versions of {dvc_file.stem}, newest first (* = checked out):", markup=False)
    for v in list_versions(paths.workspace_root(), dvc_file):
        m = v.meta
        splits = "/".join(str(m.get(f"{s}_cases", "-")) for s in ("train", "val", "test"))
        console.print(
            f"{'*' if v.version == current else ' '} {v.version}  commit {v.commit[:12]}  {v.date[:19].replace('T', ' ')}  "
            f"cases {m.get('cases', '-')}  patients {m.get('patients', '-')}  train/val/test {splits}",
            markup=False, soft_wrap=True,
        )


@data_app.command("checkout")
def checkout(
    rev: Annotated[str, typer.Argument(help="A git revision, or the start of a data version.")],
    dataset: DatasetOption = None,
    config: ConfigOption = None,
    wait: WaitOption = 0.0,
) -> None:
    """Restore data/NAME to a version (its .dvc file from git, its files from the DVC cache or remote)."""
    from components.data.versioning import checkout_version  # noqa: PLC0415
    from components.workspace import workspace_lock  # noqa: PLC0415

    dvc_file = _dvc_file(config, dataset)
    with workspace_lock("data checkout", wait_s=wait):
        entry = checkout_version(paths.workspace_root(), dvc_file, rev)
    console.print(f"{dvc_file.stem} is at data version {entry.version} (commit {entry.commit[:12]})")
