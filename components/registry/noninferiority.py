"""Non-inferiority of a challenger against the champion on the same test set.

Both models' predictions on the same cases are resampled together (the same
patients in every resample: a paired, patient-level bootstrap). The challenger
is non-inferior on a metric when the lower bound of the one-sided ``level``
interval of its improvement over the champion is above ``-margin``.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from components.config import NonInferiorityRule
from components.errors import ConfigError
from components.evaluation.bootstrap import WeightedMetrics, resample_patients
from components.evaluation.declarations import metric as declared, weighted_metrics_names
from components.registry.gates import GateResult

# the manifest columns the champion's comparison reads: the cases' ids, patients, images and labels (the
# image facts, paths and hashes are left unread)
COMPARED_COLUMNS = ("case_id", "patient_id", "image", "label")


@dataclass(frozen=True)
class NonInferiority:
    """Outcome of one non-inferiority comparison (improvement > 0: the challenger is better)."""

    metric: str
    margin: float
    level: float
    challenger: float
    champion: float
    improvement: float
    lower_bound: float
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def paired_noninferiority(
    y_true: np.ndarray,
    prob_challenger: np.ndarray,
    prob_champion: np.ndarray,
    patient_ids: np.ndarray,
    *,
    metric: str,
    margin: float,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
    threshold: float = 0.5,
) -> NonInferiority:
    """Paired patient-level bootstrap of the challenger's improvement on ``metric``.

    Args:
        y_true: (N,) classes of the shared test cases.
        prob_challenger: (N,) or (N, K) challenger probabilities.
        prob_champion: the champion's, same layout and case order.
        patient_ids: (N,) patient of each case.
        metric: a declared metric with a weighted form (``auc``, ``ece``, ...); where lower is better
            (``ece``, ``brier``, ...) the improvement is champion - challenger.
        margin: largest tolerated loss, in the metric's units.
        level: one-sided confidence level of the lower bound.
    """
    sign = 1.0 if declared(metric).higher_is_better else -1.0
    codes = np.unique(np.asarray(patient_ids), return_inverse=True)[1]
    evaluate_challenger = WeightedMetrics(y_true, prob_challenger, threshold=threshold, units=codes)
    evaluate_champion = WeightedMetrics(y_true, prob_champion, threshold=threshold, units=codes)
    ones = np.ones((1, int(codes.max()) + 1))
    challenger = evaluate_challenger(ones)[metric][0]
    champion = evaluate_champion(ones)[metric][0]
    diffs = []
    for counts in resample_patients(int(codes.max()) + 1, n_resamples=n_resamples, rng=np.random.default_rng(seed)):
        diffs.append(sign * (evaluate_challenger(counts)[metric] - evaluate_champion(counts)[metric]))
    diffs = np.concatenate(diffs)
    diffs = diffs[~np.isnan(diffs)]
    lower = float(np.percentile(diffs, (1 - level) * 100)) if len(diffs) else float("nan")
    return NonInferiority(
        metric=metric,
        margin=margin,
        level=level,
        challenger=float(challenger),
        champion=float(champion),
        improvement=float(sign * (challenger - champion)),
        lower_bound=lower,
        passed=bool(lower >= -margin),
    )


UNKNOWN_METRIC = ("promotion.non_inferiority: {metric!r} is not a metric the paired bootstrap computes; "
                  "metrics are {known}{hint}")


def check_noninferiority(rules: Sequence[NonInferiorityRule]) -> None:
    """Refuse a non-inferiority rule over a metric that has no weighted form (the paired bootstrap needs one).

    Raises:
        ConfigError: naming the metric, the ones there are, and the closest.
    """
    known = weighted_metrics_names()
    for rule in rules:
        if rule.metric not in known:
            hint = difflib.get_close_matches(rule.metric, known, n=1)
            raise ConfigError(UNKNOWN_METRIC.format(metric=rule.metric, known=", ".join(known),
                                                    hint=f"; did you mean {hint[0]!r}?" if hint else ""))


def comparison_gates(
    *,
    rules: Sequence[NonInferiorityRule],
    champion: str | None,
    challenger_version: str,
    predictions: Path | None,
    manifest: Path | None,
    model_uri: str | None,
    n_resamples: int,
    seed: int,
    threshold: float,
) -> list[GateResult]:
    """Non-inferiority rules as gate results, the champion predicting the challenger's test cases.

    Args:
        rules: the policy's non-inferiority rules.
        champion: version holding ``champion`` (None: the first model passes these rules).
        challenger_version: the version being promoted.
        predictions: the challenger's test predictions (evaluation contract table).
        manifest: the manifest of its test set (images relative to its folder).
        model_uri: URI of the champion's model (``models:/<name>/<version>``).
        n_resamples: paired bootstrap resamples.
        seed: bootstrap seed.
        threshold: decision threshold (binary).
    """
    if not rules:
        return []
    name = lambda rule: f"non_inferiority.{rule.metric}"  # noqa: E731
    if champion is None or champion == challenger_version:
        return [GateResult(name(r), ">=", -r.margin, None, True, "no champion yet: nothing to compare with") for r in rules]
    if predictions is None or manifest is None or not predictions.exists() or not manifest.exists():
        why = "the challenger's test predictions or manifest are not available here"
        return [GateResult(name(r), ">=", -r.margin, None, False, why) for r in rules]
    from components.data.ingest import load_manifest  # noqa: PLC0415
    from components.evaluation.report import check_predictions, read_table  # noqa: PLC0415
    from components.inference.predict import predict_images  # noqa: PLC0415 (torch, MONAI)

    table = read_table(predictions)
    cases = load_manifest(manifest, columns=COMPARED_COLUMNS)
    joined, y_true, prob = check_predictions(table, cases, path=str(predictions))
    champion_prob = predict_images(model_uri, [manifest.parent / p for p in joined["image"]])
    champion_prob = champion_prob[:, 1] if champion_prob.shape[1] == 2 else champion_prob
    patients = joined["patient_id"].astype(str).to_numpy()
    gates = []
    for rule in rules:
        result = paired_noninferiority(
            y_true, prob, champion_prob, patients, metric=rule.metric, margin=rule.margin,
            level=rule.level, n_resamples=n_resamples, seed=seed, threshold=threshold,
        )
        verdict = ">=" if result.passed else "<"
        reason = (
            f"{rule.metric}: challenger {result.challenger:.4f} vs champion {champion} {result.champion:.4f}; "
            f"{rule.level:.0%} lower bound of the improvement {result.lower_bound:+.4f} {verdict} -{rule.margin:g}"
        )
        gates.append(GateResult(name(rule), ">=", -rule.margin, result.lower_bound, result.passed, reason))
    return gates
