"""``drift.html``: a batch's drift report as a page a person reads, with a picture per test.

Each numeric fact is drawn as the batch's histogram over the reference's (the training split, or the model's
test predictions), titled with its Kolmogorov-Smirnov p-value; the embedding test as the batch's and the
training cases' penultimate features on their first two principal components (scikit-learn's PCA, fitted on
both), titled with its MMD and permutation p-value. The page is self-contained (figures inline), so it can be
mailed or attached to a ticket.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402

from components.evaluation.html_report import CSS, fmt_value, html_table, png_uri  # noqa: E402

BATCH, REFERENCE = "#c2410c", "#1d4ed8"


def _histogram(name: str, test: Mapping, batch: np.ndarray, reference: np.ndarray) -> str:
    fig, ax = plt.subplots(figsize=(4.6, 3.0))
    edges = np.histogram_bin_edges(np.concatenate([batch, reference]), bins=30)
    ax.hist(reference, bins=edges, density=True, alpha=0.45, color=REFERENCE, label=f"reference (n={len(reference)})")
    ax.hist(batch, bins=edges, density=True, alpha=0.55, color=BATCH, label=f"this batch (n={len(batch)})")
    ax.set_title(f"{name}: KS p = {test['p_value']:.2g}" + (" (drift)" if test["drifted"] else ""), fontsize=10)
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    return png_uri(fig)


def _embedding(test: Mapping, batch: np.ndarray, reference: np.ndarray) -> str:
    pooled = np.vstack([batch, reference])
    points = PCA(n_components=2, random_state=0).fit_transform(pooled) if pooled.shape[1] >= 2 else \
        np.column_stack([pooled[:, 0], np.zeros(len(pooled))])
    fig, ax = plt.subplots(figsize=(4.6, 3.6))
    ax.scatter(*points[len(batch):].T, s=10, alpha=0.5, color=REFERENCE, label=f"training cases (n={len(reference)})")
    ax.scatter(*points[:len(batch)].T, s=14, alpha=0.8, color=BATCH, marker="^", label=f"this batch (n={len(batch)})")
    ax.set_title(f"penultimate features, 2 principal components\nMMD\u00b2 = {test['statistic']:.3g}, "
                 f"permutation p = {test['p_value']:.2g}" + (" (drift)" if test["drifted"] else ""), fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, frameon=False)
    return png_uri(fig)


def render_drift_html(drift: Mapping, samples: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """The page for ``drift`` (:func:`components.monitoring.drift.batch_drift`'s report) and the values behind it."""
    verdict = (f"<p class='warn'><b>Drift detected</b> in {html.escape(', '.join(drift['drifted']))}.</p>"
               if drift["detected"] else "<p><b>No drift detected.</b></p>")
    rows = []
    for t in drift["tests"]:
        figure = t.get("p_value", t.get("unseen_share"))
        rows.append([html.escape(t["fact"]), html.escape(t["test"]), fmt_value(t.get("statistic")),
                     fmt_value(figure) if "p_value" in t else f"{t['unseen_share']:.1%} unseen "
                     + html.escape(", ".join(map(str, t.get("unseen", [])))),
                     "<b class='warn'>yes</b>" if t["drifted"] else "no"])
    figures = []
    for t in drift["tests"]:
        if t["fact"] in samples and "p_value" in t:
            batch, reference = samples[t["fact"]]
            figures.append(_embedding(t, batch, reference) if t["test"] == "mmd_permutation"
                           else _histogram(t["fact"], t, batch, reference))
    parts = [
        f"<h1>Drift: {html.escape(drift['model'])} version {html.escape(str(drift['version']))}</h1>",
        f"<p class='muted'>{drift['n_batch']} predicted inputs against the model's training data version "
        f"{html.escape(str(drift['data_version'])[:12])}. A numeric test drifts when its p-value is under "
        f"{drift['alpha']:g} / {sum('p_value' in t for t in drift['tests'])} tests = {drift['alpha_per_test']:.2g} "
        "(Bonferroni); a categorical fact when the batch holds values training never had.</p>",
        verdict,
        html_table(["fact", "test", "statistic", "p-value", "drift"], rows),
    ]
    if drift.get("notes"):
        parts.append("<ul class='muted'>" + "".join(f"<li>{html.escape(n)}</li>" for n in drift["notes"]) + "</ul>")
    if figures:
        parts.append("<div class='figs'>" + "".join(f"<img alt='drift figure' src='{f}'>" for f in figures) + "</div>")
    title = f"Drift of {drift['model']} v{drift['version']}"
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def write_drift_html(drift: Mapping, samples: Mapping, path: Path) -> Path:
    path.write_text(render_drift_html(drift, samples))
    return path
