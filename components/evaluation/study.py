"""A study's report: its arms' evaluations side by side.

Label fractions (``study.label_fractions``): each arm is an ordinary training on a nested share of the
training patients, evaluated on the same test split; ``study.json`` lists, per fraction, the arm's run, its
training patients, and each summary metric of its report.json with the patient-level 95% interval, and
``study.html`` draws each metric against the fraction.

Leave one site out (``study.leave_one_site_out``): each arm trains on every site but one and is judged on that
site as an external site; ``study.json`` lists, per site, the external figures, the internal ones (the other
sites' test split) and their difference, each with its interval, beside the plain run on every site; the
page draws each metric per site.

Cross-validation (``study.folds``): each fold's arm validates on its fold; ``study.json`` holds each summary metric
per fold (on its val cases), their mean and sd, the same on the pooled out-of-fold predictions with a patient
bootstrap interval (probabilities before temperature scaling: each fold's temperature is fitted on those very
cases), the fold ensemble's (mean of the folds' calibrated probabilities) on the test split, and the plain run's
on the test split (the model registered). Judging tables only, as the rest of this package.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from components.errors import EvaluationError  # noqa: E402
from components.evaluation.declarations import metric, report_metrics  # noqa: E402
from components.evaluation.report import evaluate_predictions  # noqa: E402
from components.evaluation.html_report import CSS, fmt_value, html_table, png_uri  # noqa: E402

LABEL_FRACTIONS = "label_fractions"
LEAVE_ONE_SITE_OUT = "leave_one_site_out"
CROSS_VALIDATION = "cross_validation"


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


def _figures(report: Mapping, names: Sequence[str], section: str | None = None) -> dict:
    """Each metric's ``{value, ci95}`` from report.json (or its ``section``, e.g. ``external``)."""
    source = report.get(section) or {} if section else report
    overall, ci95 = source.get("overall", {}), source.get("ci95", {})
    return {n: {"value": overall.get(n), "ci95": ci95.get(n)} for n in names}


def site_study(all_sites: Arm, arms: Sequence[Arm], sites: Sequence[str]) -> dict:
    """``study.json`` of leave-one-site-out: the plain run on every site, then per held-out site (``sites``, in
    the arms' order) its run, training patients, held-out cases, and each summary metric external (on the
    site), internal (the other sites' test split) and their difference (external minus internal), each with
    its 95% interval."""
    names = [m.name for m in report_metrics(all_sites.report) if m.summary]
    rows = []
    for site, arm in zip(sites, arms):
        external, delta = arm.report.get("external") or {}, arm.report.get("external_delta") or {}
        rows.append({"site": site, "run_id": arm.run_id, "n_train_patients": arm.n_train_patients,
                     "n_external": external.get("n"), "n_external_patients": external.get("n_patients"),
                     "external": _figures(arm.report, names, "external"), "internal": _figures(arm.report, names),
                     "delta": {n: {"value": delta.get(n), "ci95": (delta.get("ci95") or {}).get(n)} for n in names}})
    return {"design": LEAVE_ONE_SITE_OUT, "metrics": names,
            "all_sites": {"run_id": all_sites.run_id, "n_train_patients": all_sites.n_train_patients,
                          "n_test": all_sites.report.get("n"), "metrics": _figures(all_sites.report, names)},
            "arms": rows}


def cv_study(plain: Arm, folds: Sequence[Arm], val_tables: Sequence[pd.DataFrame], test_tables: Sequence[pd.DataFrame],
             manifest: pd.DataFrame, *, threshold: float, n_bootstrap: int, seed: int, min_group_size: int,
             attributes: Sequence[str] = (), target_specificity: float = 0.9, ordinal: bool = False) -> dict:
    """``study.json`` of k-fold cross-validation from the folds' val predictions (each train or val case exactly
    once) and test predictions, and the plain run's report (see the module docstring).

    Raises:
        EvaluationError: the folds' val cases overlap (a case predicted by two folds).
    """
    names = [m.name for m in report_metrics(plain.report) if m.summary]
    judge = dict(threshold=threshold, seed=seed, min_group_size=min_group_size, target_specificity=target_specificity,
                 ordinal=ordinal)
    per_fold = []
    for k, (arm, table) in enumerate(zip(folds, val_tables)):
        overall = evaluate_predictions(table, manifest, attributes=[], n_bootstrap=0, source=f"fold {k} val",
                                       **judge).overall
        per_fold.append({"fold": k, "run_id": arm.run_id, "n_train_patients": arm.n_train_patients, "n_val": len(table),
                         "metrics": {n: overall.get(n) for n in names}})
    pooled = pd.concat(val_tables, ignore_index=True)
    twice = pooled["case_id"][pooled["case_id"].duplicated()]
    if len(twice):
        raise EvaluationError(f"case {twice.iloc[0]} is in the val split of two folds: the folds must not overlap")
    oof = evaluate_predictions(pooled, manifest, attributes=[], n_bootstrap=n_bootstrap, source="out-of-fold", **judge)
    ensemble = _mean_probabilities(test_tables)
    tested = evaluate_predictions(ensemble, manifest, attributes=attributes, n_bootstrap=n_bootstrap,
                                  source="fold ensemble", **judge)
    values = {n: [f["metrics"][n] for f in per_fold if f["metrics"][n] is not None] for n in names}
    return {
        "design": CROSS_VALIDATION, "folds": len(folds), "metrics": names, "per_fold": per_fold,
        "mean": {n: float(np.mean(v)) if v else None for n, v in values.items()},
        "sd": {n: float(np.std(v, ddof=1)) if len(v) > 1 else None for n, v in values.items()},
        "out_of_fold": {"n": len(pooled), "calibrated": False,
                        "metrics": _figures({"overall": oof.overall, "ci95": oof.ci95}, names)},
        "ensemble": {"n_test": len(ensemble), "metrics": _figures({"overall": tested.overall, "ci95": tested.ci95}, names)},
        "all_data": {"run_id": plain.run_id, "n_train_patients": plain.n_train_patients, "n_test": plain.report.get("n"),
                     "metrics": _figures(plain.report, names)},
    }


def check_select_by(name: str, summary: Sequence[str]) -> None:
    """Refuse a ``study.select_by`` that is not one of the run's summary metrics, naming the closest.

    Raises:
        ConfigError: naming the metrics it may be.
    """
    import difflib  # noqa: PLC0415

    from components.errors import ConfigError  # noqa: PLC0415

    if name not in summary:
        close = difflib.get_close_matches(name, summary, n=1)
        raise ConfigError(f"study.select_by {name!r} is not a summary metric of this run; it may be "
                          f"{', '.join(summary)}" + (f"; did you mean {close[0]!r}?" if close else ""))


def nested_cv(candidates: Sequence[Mapping], fold_tables: Sequence[Sequence[pd.DataFrame]],
              inner_tables: Mapping[tuple[int, int, int], pd.DataFrame], manifest: pd.DataFrame, *, select_by: str,
              names: Sequence[str], threshold: float, n_bootstrap: int, seed: int, min_group_size: int,
              target_specificity: float = 0.9, ordinal: bool = False) -> dict:
    """Nested cross-validation's figures (``study.json``'s ``nested``) from each candidate's fold val predictions
    (``fold_tables[c][f]``) and inner val predictions (``inner_tables[c, f, j]``: fold ``f`` unused, validated
    on fold ``j``).

    For each outer fold the candidate with the best mean inner ``select_by`` is chosen (the first listed on a
    tie, or where every value is undefined) and judged by its arm validating on that fold; pooling those outer
    val predictions gives the nested estimate, the figure of the whole procedure (choosing included) on cases no
    choice saw. ``chosen`` is the candidate best over the outer folds themselves: the one whose folds are joined
    and registered.
    """
    judge = dict(threshold=threshold, seed=seed, min_group_size=min_group_size, target_specificity=target_specificity,
                 ordinal=ordinal)
    higher = metric(select_by).higher_is_better

    def value(table: pd.DataFrame, source: str) -> float | None:
        return evaluate_predictions(table, manifest, attributes=[], n_bootstrap=0, source=source,
                                    **judge).overall.get(select_by)

    def mean(values: Sequence[float | None]) -> float | None:
        defined = [v for v in values if v is not None]
        return float(np.mean(defined)) if defined else None

    def best(scores: Sequence[float | None]) -> int:
        ranked = [(-(v if higher else -v), c) for c, v in enumerate(scores) if v is not None]
        return min(ranked)[1] if ranked else 0

    k = len(fold_tables[0])
    outer = [[value(fold_tables[c][f], f"candidate {c}, fold {f} val") for f in range(k)]
             for c in range(len(candidates))]
    per_fold, chosen_tables = [], []
    for f in range(k):
        inner = [mean([value(inner_tables[c, f, j], f"candidate {c}, fold {f} unused, fold {j} val")
                       for j in range(k) if j != f]) for c in range(len(candidates))]
        choice = best(inner)
        per_fold.append({"fold": f, "inner": inner, "chosen": choice, "value": outer[choice][f]})
        chosen_tables.append(fold_tables[choice][f])
    pooled = pd.concat(chosen_tables, ignore_index=True)
    estimate = evaluate_predictions(pooled, manifest, attributes=[], n_bootstrap=n_bootstrap,
                                    source="nested out-of-fold", **judge)
    cv_mean = [mean(values) for values in outer]
    return {"candidates": [dict(c) for c in candidates], "select_by": select_by, "per_fold": per_fold,
            "cv_mean": cv_mean, "chosen": best(cv_mean),
            "estimate": {"n": len(pooled), "metrics": _figures({"overall": estimate.overall, "ci95": estimate.ci95},
                                                                names)}}


def _mean_probabilities(tables: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The fold ensemble's predictions: each ``prob*`` column averaged over the folds' tables (same cases)."""
    first = tables[0].set_index("case_id")
    columns = [c for c in first.columns if str(c).startswith("prob")]
    stacked = np.stack([t.set_index("case_id").loc[first.index, columns].to_numpy(float) for t in tables])
    out = first.copy()
    out[columns] = stacked.mean(axis=0)
    return out.reset_index()


def _errors(points: Sequence[Mapping]) -> list[list[float]]:
    """matplotlib's yerr for ``{value, ci95}`` points; a bootstrap interval need not contain its point (BCa can
    move it aside), so each bar is drawn from the point."""
    return [[max(0.0, p["value"] - (p["ci95"] or [p["value"]] * 2)[0]) for p in points],
            [max(0.0, (p["ci95"] or [p["value"]] * 2)[1] - p["value"]) for p in points]]


def _site_figure(study: Mapping, name: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for offset, key, label, style in ((-0.1, "external", "held-out site (external)", dict(color="#c2410c", marker="o")),
                                      (0.1, "internal", "other sites' test split", dict(color="#1d4ed8", marker="s",
                                                                                        mfc="white"))):
        points = [(k, a[key][name]) for k, a in enumerate(study["arms"]) if a[key][name]["value"] is not None]
        if points:
            ax.errorbar([k + offset for k, _ in points], [p["value"] for _, p in points],
                        yerr=_errors([p for _, p in points]), linestyle="none", capsize=4, label=label, **style)
    everywhere = study["all_sites"]["metrics"][name]["value"]
    if everywhere is not None:
        ax.axhline(everywhere, color="#555", linestyle="--", linewidth=1, label="trained on every site")
    ax.set_xticks(range(len(study["arms"])), [a["site"] for a in study["arms"]])
    ax.set_xlabel("site held out")
    ax.set_ylabel(title)
    ax.set_title(f"{title} per held-out site (95% interval)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return png_uri(fig)


def _cv_figure(study: Mapping, name: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(5.2, 3.2))
    folds = [(f["fold"], f["metrics"][name]) for f in study["per_fold"] if f["metrics"][name] is not None]
    ax.plot([k for k, _ in folds], [v for _, v in folds], "o", color="#888", label="each fold, its val cases")
    at = len(study["per_fold"])
    mean, sd = study["mean"][name], study["sd"][name]
    if mean is not None:
        ax.errorbar([at], [mean], yerr=[[sd or 0.0], [sd or 0.0]], fmt="D", color="#555", capsize=4, label="mean ± sd")
    for offset, key, label, color in ((1, "out_of_fold", "out-of-fold, pooled", "#1d4ed8"),
                                      (2, "ensemble", "fold ensemble, test", "#c2410c"),
                                      (3, "all_data", "trained on all, test", "#15803d")):
        point = study[key]["metrics"][name]
        if point["value"] is not None:
            ax.errorbar([at + offset], [point["value"]], yerr=_errors([point]), fmt="o", capsize=4, color=color,
                        label=label)
    ax.set_xticks([*range(at), at, at + 1, at + 2, at + 3],
                  [*(str(k) for k in range(at)), "mean", "OOF", "ens.", "all"], fontsize=8)
    ax.set_xlabel("fold")
    ax.set_ylabel(title)
    ax.set_title(f"{title}: {at}-fold cross-validation (95% intervals)", fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return png_uri(fig)


def _figure(study: Mapping, name: str, title: str) -> str:
    arms = [a for a in study["arms"] if a["metrics"][name]["value"] is not None]
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    x = [a["fraction"] for a in arms]
    y = [a["metrics"][name]["value"] for a in arms]
    ax.errorbar(x, y, yerr=_errors([a["metrics"][name] for a in arms]), marker="o", capsize=4, color="#1d4ed8")
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


def _cell(point: Mapping) -> str:
    interval = ", ".join(fmt_value(v) for v in point["ci95"] or [])
    return f"{fmt_value(point['value'])} [{interval}]"


def write_study_html(study: Mapping, out: Path) -> Path:
    """``study.html``: a figure per summary metric (against the fraction, or per held-out site) and the table
    behind it."""
    names = study["metrics"]
    if study["design"] == LEAVE_ONE_SITE_OUT:
        title = "Leave one site out"
        figures = "".join(f"<img alt='study figure' src='{_site_figure(study, n, metric(n).title)}'>" for n in names)
        header = ["site held out", "training patients", "held-out cases", *(f"{n}: external, internal, difference"
                                                                              for n in names), "run"]
        rows = [[html.escape(a["site"]), str(a["n_train_patients"]), str(a["n_external"]),
                 *(f"{_cell(a['external'][n])}; {_cell(a['internal'][n])}; {_cell(a['delta'][n])}" for n in names),
                 html.escape(a["run_id"])] for a in study["arms"]]
        every = study["all_sites"]
        rows.append(["every site (registered)", str(every["n_train_patients"]), "–",
                     *(_cell(every["metrics"][n]) for n in names), html.escape(every["run_id"])])
        intro = ("Each arm trained on every site but one and was judged on that site as an external site, "
                 "never trained or tuned on; internal is the other sites' test split. The last row is the plain "
                 "run on every site, the model registered.")
    elif study["design"] == CROSS_VALIDATION:
        title = f"{study['folds']}-fold cross-validation"
        figures = "".join(f"<img alt='study figure' src='{_cv_figure(study, n, metric(n).title)}'>" for n in names)
        header = ["", "cases", *names, "run"]
        rows = [[f"fold {f['fold']} (val)", str(f["n_val"]), *(fmt_value(f["metrics"][n]) for n in names),
                 html.escape(f["run_id"])] for f in study["per_fold"]]
        rows.append(["mean ± sd", "", *(f"{fmt_value(study['mean'][n])} ± {fmt_value(study['sd'][n])}" for n in names),
                     ""])
        for key, label, n in (("out_of_fold", "out-of-fold, pooled (before temperature scaling)",
                               study["out_of_fold"]["n"]),
                              ("ensemble", "fold ensemble on the test split", study["ensemble"]["n_test"]),
                              ("all_data", "trained on every fold, test split (registered)", study["all_data"]["n_test"])):
            rows.append([label, str(n), *(_cell(study[key]["metrics"][m]) for m in names),
                         html.escape(study["all_data"]["run_id"]) if key == "all_data" else ""])
        intro = ("The train and val patients are dealt into folds per label; each fold's model trained on the others "
                 "and validated on it. Out-of-fold figures pool every fold's val cases (each once); the fold "
                 "ensemble averages the folds' calibrated probabilities on the untouched test split.")
        nested = study.get("nested")
        if nested:
            by = nested["select_by"]
            label = lambda c: html.escape(", ".join(f"{k}={v}" for k, v in nested["candidates"][c].items()))  # noqa: E731
            rows.append([f"nested estimate (choosing by {by} included)", str(nested["estimate"]["n"]),
                         *(_cell(nested["estimate"]["metrics"][m]) for m in names), ""])
            chosen = html_table(["outer fold", *(f"candidate {c}: {label(c)}, inner mean {by}"
                                                 for c in range(len(nested["candidates"]))), "chosen", f"{by} on the fold"],
                                [[str(f["fold"]), *(fmt_value(v) for v in f["inner"]), str(f["chosen"]),
                                  fmt_value(f["value"])] for f in nested["per_fold"]]
                                + [["mean over the outer folds", *(fmt_value(v) for v in nested["cv_mean"]),
                                    str(nested["chosen"]), ""]])
            intro += (f" Nested: each outer fold's candidate was chosen by cross-validating every candidate on the "
                      f"other folds, that fold unused; the figures are of candidate {nested['chosen']} "
                      f"({label(nested['chosen'])}), best over the outer folds, whose folds are joined and registered."
                      f"</p>{chosen}<p class='muted'>")
    else:
        title = "Label fractions"
        figures = "".join(f"<img alt='study figure' src='{_figure(study, n, metric(n).title)}'>" for n in names)
        header = ["fraction", "training patients", *names, "run"]
        rows = [[f"{a['fraction']:g}", str(a["n_train_patients"]), *(_cell(a["metrics"][n]) for n in names),
                 html.escape(a["run_id"])] for a in study["arms"]]
        intro = (f"Each arm trained on a nested, label-stratified share of the training patients; every arm is "
                 f"evaluated on the same {study.get('n_test')} test cases, intervals from patient resamples.")
    out.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>medflow study</title><style>{CSS}</style>"
                   f"</head><body><h1>{title}</h1><p class='muted'>{intro}</p>"
                   f"<div class='figs'>{figures}</div>{html_table(header, rows)}</body></html>\n")
    return out
