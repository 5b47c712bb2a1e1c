"""``medflow predict``: a registered version on a folder of new studies (wiring only; the work is
:mod:`components.monitoring.predict`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from components.progress import make_console

console = make_console()


def predict(
    model: Annotated[str, typer.Option("--model", "-m", help="A registered version: NAME@ALIAS or NAME/VERSION.")],
    source: Annotated[Path, typer.Option(help="Folder of new studies (DICOM files or series folders, NIfTI, PNG).")],
    format_: Annotated[str, typer.Option("--format", help="dicom, nifti or png.")],
    out: Annotated[Path, typer.Option(help="Output folder (written whole, or not at all).")] = Path("predictions"),
    strict: Annotated[bool, typer.Option("--strict", help="Refuse the batch when any input cannot be read.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another model's predictions in --out.")] = False,
    drift_alpha: Annotated[float, typer.Option(help="Significance of the drift tests (Bonferroni-corrected).")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    device: Annotated[str, typer.Option(help="Where the network runs: auto (a GPU when there is one), cpu or "
                                        "cuda.")] = "auto",
    dicom: Annotated[bool, typer.Option("--dicom/--no-dicom", help="For DICOM input, also write each result as "
                                        "DICOM (SEG or structured report) into dicom/.")] = True,
) -> None:
    """Predict a folder of new studies with a registered version: predictions.csv/.parquet, masks, predict.json
    (lineage and unreadable inputs) and drift.json (against the model's training data)."""
    from components.monitoring.predict import predict_source  # noqa: PLC0415

    result = predict_source(model, source, format_, out, strict=strict, overwrite=overwrite, batch_size=batch_size,
                            dicom_results=dicom, drift_alpha=drift_alpha, device=device)
    m = result.model
    console.print(f"Predicted    {result.n_predicted} of {result.n_inputs} inputs with {m.name} version {m.version} "
                  f"({m.task}, trained on {m.dataset}@{m.data_version[:12]}) on {result.device} -> {out}", markup=False,
                  soft_wrap=True)
    for item in result.skipped[:20]:
        console.print(f"  skipped {item['path']}: {item['reason']}", markup=False, soft_wrap=True)
    if len(result.skipped) > 20:
        console.print(f"  ... and {len(result.skipped) - 20} more (all in {out / 'predict.json'})", markup=False)
    if result.no_dicom:
        console.print(f"  {len(result.no_dicom)} predicted without a DICOM result (reasons in predict.json), e.g. "
                      f"{result.no_dicom[0]['path']}: {result.no_dicom[0]['reason']}", markup=False, soft_wrap=True)
    drift = result.drift or {}
    verdict = (f"DRIFT in {', '.join(drift['drifted'])}" if drift.get("detected")
               else "none detected" + (f" ({len(drift.get('tests', []))} tests)" if drift.get("tests") else ""))
    console.print(f"Drift        {verdict} (drift.json; plots in drift.html)", markup=False, soft_wrap=True)
    for note in drift.get("notes", []):
        console.print(f"  {note}", markup=False, soft_wrap=True)
    console.print(f"MLflow run   {result.run_id} (counts, model version and drift figures; no paths)", markup=False,
                  soft_wrap=True)
    if drift.get("detected") and os.environ.get("PREFECT_API_URL"):  # the on-drift deployment's trigger
        from flows.predict import DRIFT_EVENT, announce_drift  # noqa: PLC0415

        announce_drift(result)
        console.print(f"Announced {DRIFT_EVENT} to the Prefect server", markup=False)


def export(
    model: Annotated[str, typer.Option("--model", "-m", help="A registered version: NAME@ALIAS or NAME/VERSION.")],
    format_: Annotated[str, typer.Option("--format", help="onnx.")] = "onnx",
    out: Annotated[Path | None, typer.Option(help="The file to write (default NAME-vVERSION.onnx).")] = None,
    input_size: Annotated[tuple[int, int] | None, typer.Option(
        help="Height and width of the images the graph takes (default: the training size).")] = None,
) -> None:
    """Export a registered classifier with its preprocessing and temperature as ONNX, checked against its pyfunc
    with onnxruntime, and log it to the version."""
    from components.monitoring.export import export_model  # noqa: PLC0415
    from components.monitoring.predict import resolve_model  # noqa: PLC0415

    if out is None:
        ref = resolve_model(model)
        out = Path(f"{ref.name}-v{ref.version}.{format_}")
    result = export_model(model, out, fmt=format_, input_size=input_size)
    m = result.model
    console.print(f"Exported     {m.name} version {m.version} -> {result.path} (input images N x {result.input_size[0]} x "
                  f"{result.input_size[1]}, output calibrated probabilities)", markup=False, soft_wrap=True)
    console.print(f"Checked      max |onnxruntime - pyfunc| = {result.max_abs_diff:.2g} on {result.checked_on}",
                  markup=False, soft_wrap=True)
    console.print(f"Logged       {result.artifact_uri} (version tag medflow.onnx)", markup=False, soft_wrap=True)
