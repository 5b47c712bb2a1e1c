"""A study's report: its arms' evaluations side by side.

Label fractions (``study.label_fractions``): each arm is an ordinary training on a nested share of the
training patients, evaluated on the same test split; ``study.json`` lists, per fraction, the arm's run, its
training patients, and each summary metric of its report.json with the patient-level 95% interval, and
``study.html`` draws each metric against the fraction. Judging tables only, as the rest of this package.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from components.evaluation.declarations import metric, report_metrics  # noqa: E402
from components.evaluation.html_report import CSS, fmt_value, html_table, png_uri  # noqa: E402

LABEL_FRACTIONS = "label_fractions"


@dataclass(frozen=True)
class Arm:
    """One arm of a study: its fraction of the training patients, their number, its run and its report."""

    fraction: float
    n_train_patients: int
    run_id: str
    report: Mapping


def fraction_study(arms: Sequence[Arm]) -> dict:
    """``study.json`` of a label-fraction study: per arm (smallest fraction first) its run, training patients and
    each summary metric of its report with the 95% interval."""
    arms = sorted(arms, key=lambda a: a.fraction)
    names = [m.name for m in report_metrics(arms[-1].report) if m.summary]
    rows = []
    for arm in arms:
        overall, ci95 = arm.report.get("overall", {}), arm.report.get("ci95", {})
        rows.append({"fraction": arm.fraction, "n_train_patients": arm.n_train_patients, "run_id": arm.run_id,
                     "metrics": {n: {"value": overall.get(n), "ci95": ci95.get(n)} for n in names}})
    return {"design": LABEL_FRACTIONS, "n_test": arms[-1].report.get("n"), "metrics": names, "arms": rows}


def _figure(study: Mapping, name: str, title: str) -> str:
    arms = [a for a in study["arms"] if a["metrics"][name]["value"] is not None]
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    x = [a["fraction"] for a in arms]
    y = [a["metrics"][name]["value"] for a in arms]
    # a bootstrap interval need not contain its point (BCa can move it aside): an arm is drawn from its point
    low = [max(0.0, v - (a["metrics"][name]["ci95"] or [v, v])[0]) for a, v in zip(arms, y)]
    high = [max(0.0, (a["metrics"][name]["ci95"] or [v, v])[1] - v) for a, v in zip(arms, y)]
    ax.errorbar(x, y, yerr=[low, high], marker="o", capsize=4, color="#1d4ed8")
    for a, v in zip(arms, y):
        ax.annotate(f"{a['n_train_patients']} pts", (a["fraction"], v), textcoords="offset points", xytext=(4, 6),
                    fontsize=7, color="#555")
    if len(x) > 1 and max(x) / min(x) >= 10:
        ax.set_xscale("log")
    ax.set_xticks(x, [f"{f:g}" for f in x])
    ax.set_xlabel("fraction of the training patients with labels")
    ax.set_ylabel(title)
    ax.set_title(f"{title} on the test split (95% interval)", fontsize=10)
    return png_uri(fig)


def write_study_html(study: Mapping, out: Path) -> Path:
    """``study.html``: a figure per summary metric against the fraction, and the table behind it."""
    figures = "".join(f"<img alt='study figure' src='{_figure(study, n, metric(n).title)}'>" for n in study["metrics"])
    header = ["fraction", "training patients", *study["metrics"], "run"]
    rows = [[f"{a['fraction']:g}", str(a["n_train_patients"]),
             *(f"{fmt_value(a['metrics'][n]['value'])} [{', '.join(fmt_value(v) for v in a['metrics'][n]['ci95'] or [])}]"
               for n in study["metrics"]), html.escape(a["run_id"])] for a in study["arms"]]
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>medflow study</title><style>{CSS}</style>"
                   f"</head><body><h1>Label fractions</h1><p class='muted'>Each arm trained on a nested, "
                   f"label-stratified share of the training patients; every arm is evaluated on the same "
                   f"{study.get('n_test')} test cases, intervals from patient resamples.</p>"
                   f"<div class='figs'>{figures}</div>{html_table(header, rows)}</body></html>\n")
    return out
