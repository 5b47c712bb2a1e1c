"""report.html: the evaluation for people. One static file with its images inline:
the overall table with CIs, a table per attribute, ROC curves and reliability
diagrams per group (with their bin counts), and a chart of the subgroup gaps; for
segmentation, group Dice with CIs and a few test cases overlaid.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from components.evaluation.declarations import CALIBRATION, ECE_BINS, report_metrics  # noqa: E402
from components.evaluation.report import check_predictions  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;color:#1d1d1f}
h1{font-size:1.6rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0 1rem;font-size:.92rem}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
.warn{color:#9a5b00}.figs{display:flex;flex-wrap:wrap;gap:1rem}.figs img{max-width:34rem;width:100%;border:1px solid #eee}
.muted{color:#666;font-size:.9rem}
"""


def png_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fmt_value(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _ci(interval: object) -> str:
    return f"{interval[0]:.3f} – {interval[1]:.3f}" if isinstance(interval, list) else "–"


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def roc_figure(y_true: np.ndarray, prob: np.ndarray, labels: np.ndarray, attribute: str) -> str:
    """ROC curves, overall and per group (binary: the positive class)."""
    fig, ax = plt.subplots(figsize=(5, 4.4))
    curves = [("overall", np.ones(len(y_true), dtype=bool))] + [(g, labels == g) for g in sorted(set(labels))]
    for name, mask in curves:
        if len(np.unique(y_true[mask])) < 2:
            continue
        fpr, tpr, _ = roc_curve(y_true[mask], prob[mask])
        ax.plot(fpr, tpr, lw=2.2 if name == "overall" else 1.4, color="black" if name == "overall" else None,
                label=f"{name} (n={int(mask.sum())})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC by {attribute}")
    ax.legend(fontsize=8, loc="lower right")
    return png_uri(fig)


MIN_PER_BIN = 10  # a group too small for ECE_BINS bins of this many cases gets fewer, of equal counts


def reliability_bins(n: int) -> tuple[int, str]:
    """Bins of a reliability curve for ``n`` cases: ECE's equal-width bins when each could hold
    MIN_PER_BIN cases, else fewer bins of equal counts (quantiles), at least two."""
    if n >= ECE_BINS * MIN_PER_BIN:
        return ECE_BINS, "uniform"
    return max(2, n // MIN_PER_BIN), "quantile"


def reliability_points(hit: np.ndarray, confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """scikit-learn's calibration curve (mean confidence, observed frequency per non-empty bin) with the
    number of cases behind each point, which ``calibration_curve`` does not return: they are counted with
    its own bin edges and assignment. Also the binning used (:func:`reliability_bins`)."""
    n_bins, strategy = reliability_bins(len(hit))
    observed, predicted = calibration_curve(hit, confidence, n_bins=n_bins, strategy=strategy)
    edges = (np.linspace(0, 1, n_bins + 1) if strategy == "uniform"
             else np.percentile(confidence, np.linspace(0, 100, n_bins + 1)))
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    return predicted, observed, counts[counts > 0], strategy


def reliability_figure(y_true: np.ndarray, prob: np.ndarray, labels: np.ndarray, attribute: str) -> str:
    """Reliability diagram per group: observed frequency against predicted probability, each point sized by
    its bin's count (a small group gets fewer, equal-count bins), and below it how many cases fall where."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    if prob.ndim == 2:  # multiclass: top-label confidence against accuracy
        confidence, hit = prob.max(axis=1), (prob.argmax(axis=1) == y_true).astype(int)
        xlabel, ylabel = "top-label confidence", "accuracy"
    else:
        confidence, hit = prob, y_true
        xlabel, ylabel = "predicted probability", "observed frequency"
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for i, name in enumerate(["overall", *sorted(set(labels))]):
        mask = np.ones(len(y_true), dtype=bool) if name == "overall" else labels == name
        if mask.sum() < 2:
            continue
        predicted, observed, per_bin, strategy = reliability_points(hit[mask], confidence[mask])
        color = "black" if name == "overall" else f"C{i - 1}"
        ax.plot(predicted, observed, lw=2.2 if name == "overall" else 1.2, color=color,
                label=f"{name} (n={int(mask.sum())}" + (f", {len(per_bin)} equal-count bins)" if strategy == "quantile"
                                                        else ")"))
        ax.scatter(predicted, observed, s=12 + 60 * per_bin / per_bin.max(), color=color, zorder=3)
        counts.hist(confidence[mask], bins=edges, histtype="step", color=color, lw=1.6 if name == "overall" else 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey")
    ax.set(ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"Reliability by {attribute} (point size: cases in the bin)")
    ax.legend(fontsize=7, loc="upper left")
    counts.set(xlabel=xlabel, ylabel="cases")
    return png_uri(fig)


def gap_figure(report: Mapping) -> str:
    """Group AUCs with 95% CIs per attribute, against the overall AUC."""
    rows = [(a, g, m["auc"], (m.get("ci95") or {}).get("auc"))
            for a, groups in report["groups"].items() for g, m in groups.items() if m["auc"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.32 * max(len(rows), 4) + 1))
    for i, (a, _, auc, ci) in enumerate(rows):
        err = [[auc - ci[0]], [ci[1] - auc]] if ci else None
        ax.errorbar(auc, i, xerr=err, fmt="o", color=f"C{list(report['groups']).index(a)}", capsize=3)
    ax.set_yticks(range(len(rows)), [f"{a} = {g}" for a, g, _, _ in rows])
    if report["overall"]["auc"] is not None:
        ax.axvline(report["overall"]["auc"], color="black", ls="--", lw=1, label="overall AUC")
        _legend_below(ax)
    ax.invert_yaxis()
    ax.set(xlabel="AUC (95% CI, patient-level bootstrap)", title="Subgroup AUC")
    return png_uri(fig)


def _legend_below(ax) -> None:
    """The legend under the axes, where it hides no interval."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.25 / ax.figure.get_figheight()),
              frameon=False)


def shortcut_figure(shortcuts: Mapping) -> str:
    """Each attribute's shortcut AUC with its 95% CI, against chance (0.5)."""
    rows = [(a, s["auc"], s.get("ci95")) for a, s in shortcuts.items() if s["auc"] is not None]
    fig, ax = plt.subplots(figsize=(7, 0.4 * max(len(rows), 3) + 1))
    for i, (_, auc, ci) in enumerate(rows):
        err = [[auc - ci[0]], [ci[1] - auc]] if ci else None
        ax.errorbar(auc, i, xerr=err, fmt="o", color=f"C{i}", capsize=3)
    ax.set_yticks(range(len(rows)), [a for a, _, _ in rows])
    ax.axvline(0.5, color="black", ls="--", lw=1, label="chance: the features do not tell the groups apart")
    _legend_below(ax)
    ax.invert_yaxis()
    ax.set(xlabel="AUC of a linear probe on the model's features (95% CI)", xlim=(0.3, 1.0),
           title="Shortcuts: attributes predicted from the penultimate features")
    return png_uri(fig)


def shortcuts_section(shortcuts: Mapping) -> list[str]:
    """The report's shortcut audit: a table and, when any AUC is defined, its figure."""
    parts = ["<h2>Shortcuts</h2>",
             "<p class='muted'>A logistic-regression probe on the model's penultimate features, fitted on the "
             "training split, predicts each attribute on the test split. 0.5: the features do not encode it; "
             "near 1: the model could use the attribute as a shortcut.</p>",
             html_table(["attribute", "shortcut AUC", "95% CI", "train / test cases", "groups", "note"],
                    [[html.escape(a), fmt_value(s["auc"]), _ci(s.get("ci95")), f"{s['n_train']} / {s['n_test']}",
                      html.escape(", ".join(s["groups"])), html.escape(s.get("reason") or "")]
                     for a, s in shortcuts.items()])]
    if any(s["auc"] is not None for s in shortcuts.values()):
        parts.append(f"<div class='figs'><img alt='shortcut AUC chart' src='{shortcut_figure(shortcuts)}'></div>")
    return parts


def render_html(report: Mapping, predictions: pd.DataFrame, manifest: pd.DataFrame, *, title: str = "Evaluation report") -> str:
    """The whole page as a string."""
    joined, y_true, prob = check_predictions(predictions, manifest)
    n_labels = y_true.shape[1] if y_true.ndim == 2 else 1
    if n_labels > 1 or y_true.ndim == 2:  # multi-label: the figures pool every (case, label) pair
        y_true, prob = y_true.ravel(), prob.ravel()
    overall, ci = report["overall"], report.get("ci95", {})
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>{report['task']} task, {report['n']} cases of {report['n_patients']} patients, "
        f"decision threshold {report['threshold']:g}. Intervals: 95%, patient-level bootstrap.</p>",
        "<h2>Overall</h2>",
        html_table(["metric", "value", "95% CI"],
               [[m.name, fmt_value(overall.get(m.name)), _ci(ci.get(m.name))] for m in report_metrics(report)]),
    ]
    parts.append(f"<p class='muted'>sensitivity_at_specificity: the highest sensitivity at a specificity of at "
                 f"least {report.get('target_specificity', 0.9):g}"
                 + ("; qwk: quadratic weighted Cohen's kappa of the ordered grades" if report.get("ordinal") else "")
                 + ".</p>")
    if report.get("external"):
        external, delta = report["external"], report.get("external_delta") or {}
        parts.append("<h2>External sites</h2>")
        parts.append(f"<p class='muted'>{external['n']} cases of {external['n_patients']} patients from "
                     f"{html.escape(', '.join(external['sites']))}, never trained or tuned on "
                     "(study.external_sites). The difference's interval comes from independent patient "
                     "resamples of the two test sets.</p>")
        parts.append(html_table(["metric", "internal test", "external", "external - internal", "95% CI"], [
            [m.name, fmt_value(overall.get(m.name)), fmt_value(external["overall"].get(m.name)),
             fmt_value(delta.get(m.name)), _ci((delta.get("ci95") or {}).get(m.name))]
            for m in report_metrics(report)]))
    if report.get("per_class"):
        parts.append("<h2>Per class</h2>")
        parts.append(html_table(["class", "positive cases", "AUC (one-vs-rest)", "95% CI"], [
            [html.escape(k), str(c["n_positive"]), fmt_value(c["auc"]) + (
                f" <span class='muted'>({html.escape(c['note'])})</span>" if c.get("note") else ""),
             _ci((c.get("ci95") or {}).get("auc"))] for k, c in report["per_class"].items()]))
    if report.get("warnings"):
        parts.append("<ul class='warn'>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    if report.get("calibration"):
        cal = report["calibration"]
        parts.append("<h2>Calibration</h2>")
        parts.append(f"<p class='muted'>Temperature scaling fitted on the {html.escape(str(cal.get('fitted_on', 'validation')))} "
                     f"split: T = {cal['temperature']:.3f}.</p>")
        calibration = report_metrics(report, kind=(CALIBRATION,))
        parts.append(html_table(["", *(m.title for m in calibration)], [
            [label, *(fmt_value(cal[key][m.name]) for m in calibration)]
            for label, key in (("before scaling", "before"), ("after scaling", "after"))
        ]))
    parts.append("<h2>Subgroup gaps</h2>")
    parts.append(html_table(
        ["attribute", "AUC gap", "95% CI", "ES-AUC", "95% CI", "equalized odds diff.", "demographic parity diff."],
        [[a, fmt_value(f["auc_gap"]), _ci((f.get("ci95") or {}).get("auc_gap")), fmt_value(f["es_auc"]),
          _ci((f.get("ci95") or {}).get("es_auc")), fmt_value(f["equalized_odds_difference"]),
          fmt_value(f["demographic_parity_difference"])] for a, f in report["fairness"].items()],
    ))
    if report["groups"]:
        parts.append(f"<div class='figs'><img alt='subgroup AUC chart' src='{gap_figure(report)}'></div>")
    if report.get("shortcuts"):
        parts += shortcuts_section(report["shortcuts"])
    for attribute, groups in report["groups"].items():
        labels = np.repeat(joined[attribute].fillna("unknown").astype(str).to_numpy(), n_labels)
        parts.append(f"<h2>By {html.escape(attribute)}</h2>")
        if n_labels > 1:
            parts.append(f"<p class='muted'>Figures pool the {n_labels} labels of every case (micro average).</p>")
        parts.append(html_table(
            [attribute, "n", "AUC", "95% CI", "sensitivity", "specificity", "ECE", "Brier"],
            [[html.escape(g), str(m["n"]), fmt_value(m["auc"]) + (f" <span class='muted'>({html.escape(m['notes']['auc'])})</span>"
              if m.get("notes", {}).get("auc") else ""), _ci((m.get("ci95") or {}).get("auc")), fmt_value(m["sensitivity"]),
              fmt_value(m["specificity"]), fmt_value(m["ece"]), fmt_value(m["brier"])] for g, m in groups.items()],
        ))
        figures = [reliability_figure(y_true, prob, labels, attribute)]
        if prob.ndim == 1:
            figures.insert(0, roc_figure(y_true, prob, labels, attribute))
        parts.append("<div class='figs'>" + "".join(f"<img alt='{attribute} figure' src='{f}'>" for f in figures) + "</div>")
    body = "\n".join(parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def write_html_report(report: Mapping, predictions: pd.DataFrame, manifest: pd.DataFrame, path: Path, *,
                      title: str = "Evaluation report") -> Path:
    """Write the page to ``path`` (through a temporary file, so no half-written page remains)."""
    page = render_html(report, predictions, manifest, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


@dataclass(frozen=True)
class Overlay:
    """One test case for the page: its image, true and predicted masks (2D or 3D, same shape) and its Dice."""

    case_id: str
    image: np.ndarray
    truth: np.ndarray
    prediction: np.ndarray
    dice: float | None

    @classmethod
    def shown(cls, case_id: str, image: np.ndarray, truth: np.ndarray, prediction: np.ndarray,
              dice: float | None) -> Overlay:
        """The case as the page draws it, copied out of its arrays: an image's first channel, a volume's axial
        slice with the most true foreground (three full-size CT cases held whole were 1.4 GB)."""
        if image.ndim == truth.ndim + 1:  # channels last: the first
            image = image[..., 0]
        if image.ndim == 3:
            z = int(np.argmax((truth > 0).sum(axis=(0, 1)))) if (truth > 0).any() else image.shape[2] // 2
            image, truth, prediction = image[..., z], truth[..., z], prediction[..., z]
        return cls(case_id, np.array(image), np.array(truth), np.array(prediction), dice)


def overlay_figure(overlays: Sequence[Overlay]) -> str:
    """Each case's image beside the same image with the true (green) and predicted (red) outlines; for a
    volume, the axial slice with the most true foreground."""
    fig, axes = plt.subplots(len(overlays), 2, figsize=(6, 3 * len(overlays)), squeeze=False)
    for (plain, outlined), case in zip(axes, overlays):
        shown = Overlay.shown(case.case_id, case.image, case.truth, case.prediction, case.dice)
        image, truth, prediction = shown.image, shown.truth, shown.prediction
        for ax in (plain, outlined):
            ax.imshow(image.T, cmap="gray", origin="lower")
            ax.axis("off")
        for mask, color in ((truth, "lime"), (prediction, "red")):
            if (mask > 0).any() and not (mask > 0).all():
                outlined.contour((mask > 0).T.astype(float), levels=[0.5], colors=color, linewidths=1.2)
        plain.set_title(case.case_id, fontsize=8)
        outlined.set_title("truth (green), prediction (red)" + (f": Dice {case.dice:.3f}" if case.dice is not None
                                                                  else ""), fontsize=8)
    return png_uri(fig)


def render_segmentation_html(report: Mapping, *, title: str = "Segmentation evaluation",
                             overlays: Sequence[Overlay] = ()) -> str:
    """The page of a segmentation report: overall Dice/HD95 with CIs, gaps, groups with their Dice CIs in a
    chart, and (``overlays``) a few test cases with their true and predicted outlines."""
    overall, ci = report["overall"], report.get("ci95", {})
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='muted'>{report['n']} cases of {report['n_patients']} patients. Dice: mean over foreground "
        "classes per case; HD95 in mm. Intervals: 95%, patient-level bootstrap.</p>",
        "<h2>Overall</h2>",
        html_table(["metric", "value", "95% CI"], [[m, fmt_value(v), _ci(ci.get(m))] for m, v in overall.items()]),
        "<h2>Subgroup gaps</h2>",
        html_table(["attribute", "Dice gap", "ES-Dice"],
               [[a, fmt_value(f["dice_gap"]), fmt_value(f["es_dice"])] for a, f in report["fairness"].items()]),
    ]
    if report.get("warnings"):
        parts.append("<ul class='warn'>" + "".join(f"<li>{html.escape(w)}</li>" for w in report["warnings"]) + "</ul>")
    rows = [(a, g, m["dice"], (m.get("ci95") or {}).get("dice"))
            for a, groups in report["groups"].items() for g, m in groups.items() if m["dice"] is not None]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.32 * max(len(rows), 4) + 1))
        for i, (a, _, dice, interval) in enumerate(rows):
            err = [[dice - interval[0]], [interval[1] - dice]] if interval else None
            ax.errorbar(dice, i, xerr=err, fmt="o", color=f"C{list(report['groups']).index(a)}", capsize=3)
        ax.set_yticks(range(len(rows)), [f"{a} = {g}" for a, g, _, _ in rows])
        if overall.get("dice") is not None:
            ax.axvline(overall["dice"], color="black", ls="--", lw=1, label="overall Dice")
            _legend_below(ax)
        ax.invert_yaxis()
        ax.set(xlabel="mean Dice (95% CI, patient-level bootstrap)", xlim=(0, 1), title="Subgroup Dice")
        parts.append(f"<div class='figs'><img alt='subgroup Dice chart' src='{png_uri(fig)}'></div>")
    if overlays:
        parts.append("<h2>Test cases</h2><p class='muted'>The slice with the most true foreground of the test cases "
                     "with the lowest, median and highest Dice: the true mask's outline in green, the prediction's "
                     "in red.</p>")
        parts.append(f"<div class='figs'><img alt='test cases overlaid' src='{overlay_figure(overlays)}'></div>")
    for attribute, groups in report["groups"].items():
        parts.append(f"<h2>By {html.escape(attribute)}</h2>")
        parts.append(html_table([attribute, "n", "Dice", "95% CI", "HD95 (mm)"],
                            [[html.escape(g), str(m["n"]), fmt_value(m["dice"]), _ci((m.get("ci95") or {}).get("dice")),
                              fmt_value(m["hd95"])] for g, m in groups.items()]))
    body = "\n".join(parts)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")
