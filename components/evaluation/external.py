"""External validation: the evaluation contract on the sites a model never trained or tuned on, and how far
it falls from the internal test set (``external`` and ``external_delta`` in report.json)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from components.evaluation.intervals import difference_intervals
from components.evaluation.declarations import MetricSettings
from components.evaluation.report import EvaluationReport, check_predictions, evaluate_predictions


def _patients(joined: pd.DataFrame) -> np.ndarray:
    return joined["patient_id"].astype(str).to_numpy() if "patient_id" in joined else joined["case_id"].to_numpy()


def external_evaluation(
    internal: EvaluationReport, internal_predictions: pd.DataFrame, external_predictions: pd.DataFrame,
    manifest: pd.DataFrame, *, attributes: Sequence[str], threshold: float, n_bootstrap: int, seed: int,
    min_group_size: int, settings: MetricSettings = MetricSettings(), site_column: str = "site",
) -> tuple[dict, dict]:
    """``(external, external_delta)``: the external cases' report (sites, n, overall, ci95, groups, fairness,
    warnings) and, per metric, external minus internal with its interval (``ci95``), from independent
    patient resamples of the two sets (they share no patient, so there is nothing to pair)."""
    report = evaluate_predictions(external_predictions, manifest, attributes=attributes, threshold=threshold,
                                  n_bootstrap=n_bootstrap, seed=seed, min_group_size=min_group_size,
                                  target_specificity=settings.specificity, ordinal=settings.ordinal,
                                  source="external predictions")
    joined = manifest.set_index("case_id").loc[external_predictions["case_id"]]
    external = {"sites": sorted(joined[site_column].astype(str).unique()) if site_column in joined else [],
                **{key: value for key, value in report.to_dict().items()
                   if key in ("n", "n_patients", "overall", "ci95", "groups", "fairness", "per_class", "warnings")}}
    delta = {name: (external["overall"][name] - internal.overall[name])
             for name in internal.overall if isinstance(internal.overall.get(name), float)
             and isinstance(external["overall"].get(name), float)}
    if n_bootstrap:
        sets = []
        for table in (internal_predictions, external_predictions):
            joined_set, y_true, prob = check_predictions(table, manifest)
            sets.append((y_true, prob, _patients(joined_set)))
        intervals = difference_intervals(sets[0], sets[1], threshold=threshold, settings=settings,
                                         n_resamples=n_bootstrap, seed=seed)
        delta["ci95"] = {name: intervals.get(name) for name in delta}
    return external, delta
