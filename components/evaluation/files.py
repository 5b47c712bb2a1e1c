"""``medflow evaluate`` as a library call: tables on disk in, report.json (and report.html) out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from components.evaluation.html_report import render_segmentation_html, write_html_report
from components.evaluation.report import EvaluationReport, evaluate_predictions, read_table
from components.evaluation.segmentation import evaluate_segmentation


def evaluate_files(
    predictions: Path,
    manifest: Path,
    *,
    out: Path,
    html: Path | None = None,
    attributes: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 10,
    target_specificity: float = 0.9,
    ordinal: bool = False,
) -> EvaluationReport:
    """Evaluate a predictions table (CSV or Parquet) against a manifest and write the report.

    A table with a ``mask`` column holds predicted masks (segmentation, paths relative to
    the table; true masks in the manifest's ``label``, relative to the manifest); any other
    is a classification table of the evaluation contract.
    """
    predictions_table, manifest_table = read_table(predictions), read_table(manifest)
    title = f"Evaluation of {predictions.name}"
    if "mask" in predictions_table.columns:
        report = evaluate_segmentation(
            predictions_table, manifest_table, predictions_root=predictions.parent, manifest_root=manifest.parent,
            attributes=attributes, n_bootstrap=n_bootstrap, seed=seed, min_group_size=min_group_size,
            source=str(predictions),
        )
        report.write_json(out)
        if html:
            html.parent.mkdir(parents=True, exist_ok=True)
            html.write_text(render_segmentation_html(report.to_dict(), title=title))
        return report
    report = evaluate_predictions(
        predictions_table, manifest_table, attributes=attributes, threshold=threshold,
        n_bootstrap=n_bootstrap, seed=seed, min_group_size=min_group_size, source=str(predictions),
        target_specificity=target_specificity, ordinal=ordinal,
    )
    report.write_json(out)
    if html:
        write_html_report(report.to_dict(), predictions_table, manifest_table, html, title=title)
    return report
