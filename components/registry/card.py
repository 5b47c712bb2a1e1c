"""The model card of a registered version: Markdown, and the same as a static HTML page."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import markdown
import pandas as pd

from components.evaluation.declarations import CALIBRATION, report_metrics
from components.registry.promote import PromotionDecision

CSS = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:0.5rem 0 1rem}td,th{border:1px solid #bbb;padding:0.25rem 0.6rem;text-align:left}"
    "th{background:#f0f0f0}code{background:#f4f4f4;padding:0 0.2rem}"
)


INTENDED_USE = {
    "classification": "{task} image classification, trained by medflow for research and for retraining studies. "
    "Not a medical device: a clinician decides. The model takes raw single-channel images (N, H, W), resizes and "
    "normalises them as in training, and returns calibrated class probabilities.",
    "segmentation": "Image segmentation, trained by medflow for research and for retraining studies. Not a medical "
    "device: a clinician reviews every contour. The model takes raw single-channel images (N, *spatial) of any size, "
    "normalises them as in training, segments them by sliding window and returns calibrated probabilities per class "
    "and voxel (N, K, *spatial); the mask is their argmax.",
}


def _num(value: object) -> str:
    return "null" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_num(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def card_columns(attributes: Sequence[str]) -> list[str]:
    """The manifest columns the card's data section reads: a manifest read with only these leaves its image
    facts, paths and hashes unread (the promotion step's peak grew by about 1 KB a case reading them)."""
    return ["split", "patient_id", "label", "foreground", *attributes]


def _share(frame: pd.DataFrame, task: str) -> float | None:
    """Mean foreground fraction (segmentation), share of images with any label (multi-label) or with a class > 0."""
    if task == "segmentation":
        return float(frame["foreground"].mean()) if "foreground" in frame else None
    if task == "multilabel":
        return float((frame["label"].astype(str) != "").mean())
    return float((frame["label"] > 0).mean())


def _composition(manifest: pd.DataFrame, attributes: list[str], *, task: str) -> str:
    share = {"segmentation": "mean foreground share", "multilabel": "share with any label"}.get(task, "positive share")
    parts = [_table(["split", "images", "patients", share], [
        [split, len(g), g["patient_id"].nunique(), _share(g, task)] for split, g in manifest.groupby("split")
    ])]
    for attribute in attributes:
        if attribute in manifest.columns:
            counts = manifest.groupby([attribute, "split"]).size().unstack(fill_value=0)
            rows = [[str(g), *[int(counts.at[g, s]) if s in counts.columns else 0 for s in ("train", "val", "test")]]
                    for g in counts.index]
            parts.append(f"**{attribute}**\n\n" + _table([attribute, "train", "val", "test"], rows))
    return "\n\n".join(parts)


def model_card_markdown(
    *,
    model_name: str,
    version: str,
    lineage: Mapping[str, str],
    report: Mapping,
    calibration: Mapping | None,
    manifest: pd.DataFrame | None,
    attributes: list[str],
    decision: PromotionDecision,
) -> str:
    """The card as Markdown: intended use, data, metrics with CIs, calibration, fairness, decision."""
    overall, ci = report["overall"], report.get("ci95", {})
    segmentation = report["task"] == "segmentation"
    metric_rows = [[m.name, overall.get(m.name), *(ci.get(m.name) or [None, None])]
                   for m in report_metrics(report) if m.name in overall]
    calibration_metrics = report_metrics(report, kind=(CALIBRATION,))
    sections = [
        f"# Model card: {model_name} version {version}",
        "## Intended use",
        INTENDED_USE["segmentation" if segmentation else "classification"].format(task=report["task"].capitalize()),
        "## Lineage",
        _table(["fact", "value"], [[k, f"`{v}`"] for k, v in lineage.items()]),
        "## Data",
        _composition(manifest, attributes, task=report["task"]) if manifest is not None
        else "The manifest was not available when this card was written.",
        f"## Performance on the test split (n = {report['n']} images, {report['n_patients']} patients)",
        _table(["metric", "value", "95% CI low", "95% CI high"], metric_rows),
        "Intervals: patient-level bootstrap.",
        "## Calibration",
        (_table(["", *(m.name.replace("_", " ").upper() for m in calibration_metrics)], [
            ["before temperature scaling", *(calibration["before"].get(m.name) for m in calibration_metrics)],
            ["after (T = " + f"{calibration['temperature']:.3f})",
             *(calibration["after"].get(m.name) for m in calibration_metrics)],
        ]) if calibration else "No calibration record."),
        "## Fairness",
    ]
    for attribute, summary in report.get("fairness", {}).items():
        if segmentation:
            sections.append(f"**{attribute}**: Dice gap {_num(summary.get('dice_gap'))}, "
                            f"ES-Dice {_num(summary.get('es_dice'))}")
            sections.append(_table([attribute, "n", "Dice", "HD95 (mm)"],
                                   [[g, m["n"], m["dice"], m["hd95"]] for g, m in report["groups"][attribute].items()]))
            continue
        groups = report["groups"][attribute]
        sections.append(f"**{attribute}**: AUC gap {_num(summary.get('auc_gap'))}, ES-AUC {_num(summary.get('es_auc'))}, "
                        f"equalized-odds difference {_num(summary.get('equalized_odds_difference'))}, "
                        f"demographic-parity difference {_num(summary.get('demographic_parity_difference'))}")
        sections.append(_table([attribute, "n", "AUC", "sensitivity", "specificity", "ECE"],
                               [[g, m["n"], m["auc"], m["sensitivity"], m["specificity"], m["ece"]] for g, m in groups.items()]))
    if report.get("shortcuts"):
        sections.append("## Shortcuts")
        sections.append("A linear probe on the model's penultimate features predicts each attribute "
                        "(AUC 0.5: not encoded; near 1: a possible shortcut).")
        sections.append(_table(["attribute", "shortcut AUC", "95% CI low", "95% CI high", "note"],
                               [[a, s["auc"], *(s.get("ci95") or [None, None]), s.get("reason") or ""]
                                for a, s in report["shortcuts"].items()]))
    verdict = "promoted to champion" if decision.promoted else "refused"
    sections += [
        "## Promotion decision",
        f"Version {version} was **{verdict}** on {decision.decided_at}"
        + (f" ({decision.reason})." if decision.reason else "."),
        _table(["rule", "value", "passed", "reason"],
               [[f"{g.metric} {g.op} {g.threshold:g}", g.value, "yes" if g.passed else "no", g.reason] for g in decision.gates]),
    ]
    return "\n\n".join(sections) + "\n"


def write_model_card(markdown_text: str, folder: Path) -> tuple[Path, Path]:
    """Write ``model_card.md`` and a self-contained ``model_card.html`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    md_path, html_path = folder / "model_card.md", folder / "model_card.html"
    md_path.write_text(markdown_text)
    body = markdown.markdown(markdown_text, extensions=["tables"])
    title = markdown_text.splitlines()[0].lstrip("# ")
    html_path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
                         f"<style>{CSS}</style></head><body>{body}</body></html>\n")
    return md_path, html_path
