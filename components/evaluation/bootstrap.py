"""Patient-level bootstrap confidence intervals, vectorised over resamples.

Intervals are BCa (bias-corrected and accelerated) as ``scipy.stats.bootstrap``
defines it: the bias correction from the share of resamples below the estimate,
the acceleration from a leave-one-patient-out jackknife (over at most
``JACKKNIFE_GROUPS`` groups of patients, so a large test set costs at most that
many extra evaluations). ECE, MCE and the fairness gaps are biased upward on
resampling, so the plain percentile interval can miss its own estimate; BCa
corrects for that. Where even BCa's interval misses the estimate (nearly every
resample on one side of it), the interval is widened to reach it, so that a
reported interval always holds its estimate.

A resample draws patients with replacement; every image of a drawn patient
comes along, so a resample is a (B, N) matrix of case weights (how often each
case was drawn). Each metric is computed for all B resamples at once as a
weighted metric. scikit-learn and torchmetrics score one resample per call,
which is hundreds of times slower here; tests check every weighted metric
against scikit-learn's ``sample_weight`` versions.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import ndtr, ndtri

from components.evaluation.declarations import ECE_BINS, MetricSettings, WeightedSums, metrics_for

CHUNK = 32
JACKKNIFE_GROUPS = 100  # at most this many leave-a-group-out rows; one patient per group up to 100 patients

def weighted_declarations(settings: MetricSettings) -> tuple:
    """The metrics with a weighted form for these settings (the graded ones too when ordinal)."""
    return tuple(m for m in metrics_for("binary", ordinal=settings.ordinal) if m.weighted is not None)
EPS = np.finfo(np.float64).eps
UNDEFINED_IN_A_RESAMPLE = ("auc", "sensitivity_at_specificity")  # NaN where a resample lacks a class


def resample_patients(
    n_patients: int, *, n_resamples: int, rng: np.random.Generator, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """How often each patient is drawn in each resample: (chunk, P) float arrays, ``chunk`` rows at a time."""
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        # n_patients uniform draws per row, counted: the multinomial, an order of magnitude
        # faster than Generator.multinomial with this many categories
        draws = rng.integers(0, n_patients, size=(b, n_patients)) + (np.arange(b) * n_patients)[:, None]
        yield np.bincount(draws.ravel(), minlength=b * n_patients).reshape(b, n_patients).astype(np.float64)
        done += b


def resample_weights(
    patient_codes: np.ndarray, *, n_resamples: int, rng: np.random.Generator, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """Case weights of patient-level resamples, ``chunk`` rows at a time.

    Args:
        patient_codes: (N,) integer code of each case's patient, 0..P-1.
        n_resamples: total rows B to yield.
        rng: random source.
        chunk: rows per yielded (chunk, N) array, to bound memory.
    """
    n_patients = int(patient_codes.max()) + 1
    for counts in resample_patients(n_patients, n_resamples=n_resamples, rng=rng, chunk=chunk):
        yield counts[:, patient_codes]


class WeightedMetrics:
    """Every contract metric of one set of predictions, for many weight rows at once.

    The constructor prepares, once, a dense matrix of the per-case terms of every
    linear metric (bin counts and sums for ECE, confusion counts, Brier, NLL) and a
    sparse indicator of score levels for each AUC; a call then costs one dense and
    one sparse product with the (B, N) weights.
    """

    def __init__(
        self, y_true: np.ndarray, prob: np.ndarray, *, threshold: float, n_bins: int = ECE_BINS,
        units: np.ndarray | None = None, settings: MetricSettings = MetricSettings(),
    ) -> None:
        y = np.asarray(y_true).astype(int)
        prob = np.asarray(prob, dtype=np.float64)
        self.settings, self.declared = settings, weighted_declarations(settings)
        # multi-label: one binary evaluator per label, macro-averaged in __call__ (a label has no grades)
        label_settings = MetricSettings(specificity=settings.specificity)
        self.labels = [WeightedMetrics(y[:, j], prob[:, j], threshold=threshold, n_bins=n_bins, units=units,
                                       settings=label_settings)
                       for j in range(y.shape[1])] if y.ndim == 2 else []
        if self.labels:
            self.declared = weighted_declarations(label_settings)
            return
        # weights are given per unit (a patient: all its cases share the weight) or, by default, per case;
        # summing each case's terms into its unit once makes every call smaller
        n = len(y)
        units = np.arange(n) if units is None else np.asarray(units)
        n_units = int(units.max()) + 1 if n else 0
        to_units = sparse.csr_matrix((np.ones(n), (units, np.arange(n))), shape=(n_units, n))
        self.binary = prob.ndim == 1
        k = 2 if self.binary else prob.shape[1]
        if self.binary:
            pred = (prob >= threshold).astype(int)
            confidence, accuracy = prob, (y == 1).astype(float)
            p_true = np.where(y == 1, prob, 1 - prob)
            brier = (prob - y) ** 2
            scores = {1: prob}
        else:
            pred = prob.argmax(axis=1)
            confidence, accuracy = prob.max(axis=1), (pred == y).astype(float)
            p_true = prob[np.arange(len(y)), y]
            brier = np.sum((prob - np.eye(k)[y]) ** 2, axis=1)
            scores = {c: prob[:, c] for c in range(k)}
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # as torchmetrics bins: [edge_i, edge_i+1), and a confidence of exactly 1 in a bin of its own
        onehot = np.eye(n_bins + 1)[np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins)]
        confusion = [((pred == c) & (y == c), (pred == c) & (y != c), (pred != c) & (y == c)) for c in range(k)]
        self.k, self.n_levels = k, n_bins + 1
        pairs = np.eye(k * k)[y * k + pred]  # (true, predicted) one-hot: the full confusion matrix, for kappa
        features = np.column_stack([
            onehot, onehot * accuracy[:, None], onehot * confidence[:, None],
            *[np.column_stack(parts) for parts in confusion],
            pairs, brier, -np.log(np.clip(p_true, EPS, 1 - EPS)), np.ones(n),
        ])
        self.features = to_units @ features
        self.levels = [(self._level_indicator(scores[c], y == c) @ to_units.T).tocsr() for c in sorted(scores)]

    @staticmethod
    def _level_indicator(score: np.ndarray, positive: np.ndarray) -> sparse.csr_matrix:
        """(2U, N) sparse: row u marks the positives at score level u, row U + u every case at it."""
        levels, index = np.unique(score, return_inverse=True)
        u, n = len(levels), len(score)
        rows = np.concatenate([index[positive], u + index])
        cols = np.concatenate([np.flatnonzero(positive), np.arange(n)])
        return sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(2 * u, n))

    @staticmethod
    def _level_weights(indicator: sparse.csr_matrix, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative weight at each score level, ascending: (B, U) each. (Weights laid out
        case-major, as :func:`resample_patients` gives them, are multiplied without a copy.)"""
        counts = (indicator @ weights.T).T  # (B, 2U), rows by ascending score level
        u = counts.shape[1] // 2
        return counts[:, :u], counts[:, u:] - counts[:, :u]

    @staticmethod
    def _sensitivity_at_specificity(level_weights: tuple[np.ndarray, np.ndarray], specificity: float) -> np.ndarray:
        """The highest sensitivity among thresholds (each score level, predicting positive at or above it, and
        one above every score) whose specificity reaches the target: (B,), NaN without positives or negatives.
        ``level_weights``: :meth:`_level_weights`."""
        pos_w, neg_w = level_weights
        positives, negatives = pos_w.sum(axis=1), neg_w.sum(axis=1)
        # weight at or above each level: totals minus what lies below it
        tp = positives[:, None] - (np.cumsum(pos_w, axis=1) - pos_w)
        fp = negatives[:, None] - (np.cumsum(neg_w, axis=1) - neg_w)
        with np.errstate(invalid="ignore", divide="ignore"):
            sensitivity = tp / positives[:, None]
            allowed = 1 - fp / negatives[:, None] >= specificity - 1e-12
            best = np.where(allowed, sensitivity, 0.0).max(axis=1, initial=0.0)
            return np.where((positives > 0) & (negatives > 0), best, np.nan)

    @staticmethod
    def _auc(level_weights: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """ROC AUC from :meth:`_level_weights`: (B,), NaN without positives or negatives."""
        pos_w, neg_w = level_weights
        below = np.cumsum(neg_w, axis=1) - neg_w
        num = (pos_w * (below + 0.5 * neg_w)).sum(axis=1)
        denom = pos_w.sum(axis=1) * neg_w.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(denom > 0, num / denom, np.nan)

    def __call__(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``{metric: (B,) values}`` for (B, N) case weights, or (B, P) unit weights when built with ``units``."""
        if self.labels:
            per_label = [evaluate(weights) for evaluate in self.labels]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no label's AUC gives NaN
                return {name: np.nanmean([m[name] for m in per_label], axis=0) if name in UNDEFINED_IN_A_RESAMPLE
                        else np.mean([m[name] for m in per_label], axis=0) for name in per_label[0]}
        z = weights @ self.features
        nb, k = self.n_levels, self.k
        conf = z[:, 3 * nb:3 * nb + 3 * k].reshape(len(z), k, 3)
        tp, fp, fn = conf[:, :, 0], conf[:, :, 1], conf[:, :, 2]
        total = z[:, -1]
        start = 3 * nb + 3 * k
        levels = [self._level_weights(indicator, weights) for indicator in self.levels]  # one product each
        sums = WeightedSums(
            binary=self.binary, bin_count=z[:, :nb], bin_accuracy=z[:, nb:2 * nb], bin_confidence=z[:, 2 * nb:3 * nb],
            tp=tp, fp=fp, fn=fn, tn=total[:, None] - tp - fp - fn, brier=z[:, -3], nll=z[:, -2], total=total,
            auc=np.mean([self._auc(level) for level in levels], axis=0),
            sensitivity_at_specificity=np.mean([self._sensitivity_at_specificity(level, self.settings.specificity)
                                                for level in levels], axis=0),
            confusion=z[:, start:start + k * k].reshape(len(z), k, k),
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return {m.name: m.weighted(sums) for m in self.declared}


def weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the cases ``positive`` against the rest, for each (B, N) weight row: (B,)
    (NaN where a row weighs no positive or no negative case)."""
    indicator = WeightedMetrics._level_indicator(np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool))
    return WeightedMetrics._auc(WeightedMetrics._level_weights(indicator, np.asarray(weights, dtype=np.float64)))


def jackknife_rows(n_patients: int, *, groups: int = JACKKNIFE_GROUPS, chunk: int = CHUNK) -> Iterator[np.ndarray]:
    """Leave-one-out weight rows over patients, ``chunk`` rows at a time: (rows, P) arrays of ones with one
    patient (or, past ``groups`` patients, one of ``groups`` interleaved groups of patients) set to zero."""
    n_groups = min(n_patients, groups)
    member = np.arange(n_patients) % n_groups
    for start in range(0, n_groups, chunk):
        left_out = np.arange(start, min(start + chunk, n_groups))
        yield (member[None, :] != left_out[:, None]).astype(np.float64)


def bca_interval(estimate: float | None, resampled: np.ndarray, jackknifed: np.ndarray,
                 level: float = 0.95) -> list[float] | None:
    """BCa interval of a statistic, as ``scipy.stats.bootstrap(method="BCa")`` computes it, widened to hold
    ``estimate`` when it does not (see the module docstring); the percentile interval where BCa is undefined
    (every resample on one side, or no estimate). NaN resamples (an AUC of one class) are dropped.

    Args:
        estimate: the statistic on the whole sample.
        resampled: (B,) the statistic on each bootstrap resample.
        jackknifed: (J,) the statistic on each leave-one-out row (:func:`jackknife_rows`).
        level: two-sided confidence level.
    """
    values = np.asarray(resampled, dtype=np.float64)
    values = values[~np.isnan(values)]
    if not len(values):
        return None
    alpha = (1 - level) / 2
    alphas = np.array([alpha, 1 - alpha])
    if estimate is not None and np.isfinite(estimate):
        share = (np.count_nonzero(values < estimate) + np.count_nonzero(values <= estimate)) / (2 * len(values))
        z0 = ndtri(share)
        jack = np.asarray(jackknifed, dtype=np.float64)
        jack = jack[~np.isnan(jack)]
        spread = jack.mean() - jack if len(jack) else np.zeros(0)
        denominator = np.sum(spread ** 2) ** 1.5
        accel = np.sum(spread ** 3) / (6 * denominator) if denominator > 0 else 0.0
        if np.isfinite(z0):
            z = np.array([ndtri(alpha), -ndtri(alpha)])
            with np.errstate(divide="ignore", invalid="ignore"):
                bca = ndtr(z0 + (z0 + z) / (1 - accel * (z0 + z)))
            if np.all(np.isfinite(bca)):
                alphas = np.clip(bca, 0.0, 1.0)
    low, high = (float(v) for v in np.quantile(values, alphas))
    if estimate is not None and np.isfinite(estimate):
        low, high = min(low, float(estimate)), max(high, float(estimate))
    return [low, high]


def weighted_metrics(y_true: np.ndarray, prob: np.ndarray, weights: np.ndarray, *, threshold: float,
                     settings: MetricSettings = MetricSettings()) -> dict:
    """Every contract metric for each weight row: ``{metric: (B,) array}``.

    Args:
        y_true: (N,) integer classes, or (N, L) 0/1 labels (multi-label).
        prob: (N,) positive-class probability, (N, K) class probabilities or (N, L) label probabilities.
        weights: (B, N) non-negative case weights.
        threshold: decision threshold (binary).
        settings: the target specificity, and whether the classes are ordered grades.
    """
    return WeightedMetrics(y_true, prob, threshold=threshold, settings=settings)(weights)


@dataclass(frozen=True)
class BootstrapIntervals:
    """BCa intervals: ``overall[metric]``, ``groups[attribute][group][metric]`` and ``gaps[attribute]``
    (``auc_gap``, ``es_auc``); None where undefined in every resample."""

    overall: dict
    groups: dict
    gaps: dict


class ResampledStatistics:
    """Every metric of one set of predictions, each attribute's group metrics and the fairness gaps, for
    many patient weight rows at once (bootstrap resamples, jackknife rows, or a row of ones for the point).

    Calling it with chunks of (rows, P) patient weights gives ``(overall, groups, gaps)``:
    ``{metric: (rows,)}``, ``{attribute: {group: {metric: (rows,)}}}`` and
    ``{attribute: {"auc_gap": (rows,), "es_auc": (rows,)}}``.
    """

    def __init__(self, y_true: np.ndarray, prob: np.ndarray, codes: np.ndarray, *, threshold: float,
                 groups: Mapping[str, np.ndarray] | None = None,
                 compared: Mapping[str, Sequence[str]] | None = None,
                 settings: MetricSettings = MetricSettings()) -> None:
        labels = {a: np.asarray(v).astype(str) for a, v in dict(groups or {}).items()}
        self.members = {a: {g: lab == g for g in np.unique(lab)} for a, lab in labels.items()}
        self.compared = compared
        self.evaluate_all = WeightedMetrics(y_true, prob, threshold=threshold, units=codes, settings=settings)
        self.evaluate_group, self.group_patients = {}, {}
        for attribute, masks in self.members.items():
            self.evaluate_group[attribute] = {}
            for group, mask in masks.items():
                # the group's own patients, renumbered 0..P_g-1; a call takes their columns of the counts
                present, local = np.unique(codes[mask], return_inverse=True)
                self.group_patients[attribute, group] = present
                self.evaluate_group[attribute][group] = WeightedMetrics(
                    np.asarray(y_true)[mask], prob[mask], threshold=threshold, units=local, settings=settings
                )

    def __call__(self, weight_chunks) -> tuple[dict, dict, dict]:
        members, compared = self.members, self.compared
        overall: dict[str, list] = {}
        by_group: dict[str, dict[str, dict[str, list]]] = {a: {g: {} for g in m} for a, m in members.items()}
        gaps: dict[str, dict[str, list]] = {a: {"auc_gap": [], "es_auc": []} for a in members}
        for weights in weight_chunks:
            # (P, rows), copied once: a group's patients are then a gather of rows, and every sparse product
            # takes the transpose of a view of it without copying
            by_patient = np.ascontiguousarray(weights.T)
            metrics = self.evaluate_all(by_patient.T)
            for name, values in metrics.items():
                overall.setdefault(name, []).append(values)
            for attribute, masks in members.items():
                aucs = []
                for group in masks:
                    group_metrics = self.evaluate_group[attribute][group](
                        by_patient[self.group_patients[attribute, group]].T)
                    for name, values in group_metrics.items():
                        by_group[attribute][group].setdefault(name, []).append(values)
                    if compared is None or group in compared.get(attribute, masks):
                        aucs.append(group_metrics["auc"])
                stacked = np.stack(aucs) if aucs else np.full((1, len(weights)), np.nan)
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are dropped by the interval
                    defined = (~np.isnan(stacked)).sum(axis=0)
                    gap = np.where(defined >= 2, np.nanmax(stacked, axis=0) - np.nanmin(stacked, axis=0), np.nan)
                    spread = np.nansum(np.abs(stacked - metrics["auc"]), axis=0)
                    es = np.where(defined >= 1, metrics["auc"] / (1 + spread), np.nan)
                gaps[attribute]["auc_gap"].append(gap)
                gaps[attribute]["es_auc"].append(es)
        join = lambda chunks: np.concatenate(chunks)  # noqa: E731
        return ({n: join(c) for n, c in overall.items()},
                {a: {g: {n: join(c) for n, c in gm.items()} for g, gm in ag.items()} for a, ag in by_group.items()},
                {a: {n: join(c) for n, c in gm.items()} for a, gm in gaps.items()})


def patient_codes(patient_ids: np.ndarray) -> np.ndarray:
    """Each case's patient as 0..P-1."""
    return np.unique(np.asarray(patient_ids), return_inverse=True)[1]


def bootstrap_ci(
    y_true: np.ndarray,
    prob: np.ndarray,
    patient_ids: np.ndarray,
    *,
    threshold: float,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    groups: Mapping[str, np.ndarray] | None = None,
    compared: Mapping[str, Sequence[str]] | None = None,
    settings: MetricSettings = MetricSettings(),
) -> BootstrapIntervals:
    """BCa confidence intervals of every metric, resampling patients (see the module docstring).

    Args:
        y_true: (N,) classes.
        prob: (N,) or (N, K) probabilities.
        patient_ids: (N,) patient of each case.
        threshold: decision threshold (binary).
        n_resamples: number of resamples B.
        seed: random seed.
        level: two-sided confidence level.
        groups: attribute -> (N,) group label of each case, for group intervals.
        compared: attribute -> the groups the fairness gaps compare (default: all).
        settings: the target specificity, and whether the classes are ordered grades.

    The same resamples serve the overall, group and gap intervals, so a gap's
    interval reflects the groups' joint variation.
    """
    if n_resamples == 0:
        return BootstrapIntervals({}, {}, {})
    codes = patient_codes(patient_ids)
    n_patients = int(codes.max()) + 1
    statistics = ResampledStatistics(y_true, prob, codes, threshold=threshold, groups=groups, compared=compared,
                                     settings=settings)
    resampled = statistics(resample_patients(n_patients, n_resamples=n_resamples, rng=np.random.default_rng(seed)))
    jackknifed = statistics(jackknife_rows(n_patients))
    point = statistics([np.ones((1, n_patients))])

    def interval(path: tuple) -> list[float] | None:
        def at(tree):
            for key in path:
                tree = tree[key]
            return tree
        estimate = float(at(point)[0])
        return bca_interval(None if np.isnan(estimate) else estimate, at(resampled), at(jackknifed), level)

    return BootstrapIntervals(
        overall={name: interval((0, name)) for name in resampled[0]},
        groups={a: {g: {n: interval((1, a, g, n)) for n in m} for g, m in gm.items()} for a, gm in resampled[1].items()},
        gaps={a: {n: interval((2, a, n)) for n in gm} for a, gm in resampled[2].items()},
    )


def per_class_intervals(y_true: np.ndarray, prob: np.ndarray, patient_ids: np.ndarray, *, n_resamples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """BCa intervals of each class's one-vs-rest (or each label's) AUC over the same patient resamples as
    :func:`bootstrap_ci` draws with this seed: ``{"<k>": [low, high] or None}``."""
    y = np.asarray(y_true).astype(int)
    codes = patient_codes(patient_ids)
    n_patients = int(codes.max()) + 1
    intervals = {}
    for k in range(prob.shape[1]):
        positive = y[:, k] == 1 if y.ndim == 2 else y == k

        def auc(patient_rows, score=prob[:, k], positive=positive):
            return np.concatenate([weighted_auc(score, positive, rows[:, codes]) for rows in patient_rows])

        resampled = auc(resample_patients(n_patients, n_resamples=n_resamples, rng=np.random.default_rng(seed)))
        estimate = float(auc([np.ones((1, n_patients))])[0])
        intervals[str(k)] = bca_interval(None if np.isnan(estimate) else estimate, resampled,
                                         auc(jackknife_rows(n_patients)), level)
    return intervals


def difference_intervals(first: tuple[np.ndarray, np.ndarray, np.ndarray], second: tuple[np.ndarray, np.ndarray, np.ndarray],
                         *, threshold: float, settings: MetricSettings = MetricSettings(), n_resamples: int = 1000,
                         seed: int = 0, level: float = 0.95) -> dict[str, list[float] | None]:
    """Intervals of ``second - first`` for every metric, where the two are predictions of different patients
    (an internal and an external test set): each resample draws patients of each set independently, with
    replacement, and the interval is the percentile interval of the resampled differences, widened to hold
    the difference itself. Each set is ``(y_true, prob, patient_ids)``."""
    alpha = (1 - level) / 2
    draws = []
    for offset, (y_true, prob, patient_ids) in enumerate((first, second)):
        codes = patient_codes(patient_ids)
        n_patients = int(codes.max()) + 1
        evaluate = WeightedMetrics(y_true, prob, threshold=threshold, units=codes, settings=settings)
        rows = resample_patients(n_patients, n_resamples=n_resamples, rng=np.random.default_rng([seed, offset]))
        resampled = [evaluate(w) for w in rows]
        draws.append(({name: np.concatenate([r[name] for r in resampled]) for name in resampled[0]},
                      evaluate(np.ones((1, n_patients)))))
    (first_resampled, first_point), (second_resampled, second_point) = draws
    intervals = {}
    for name in first_point:
        values = second_resampled[name] - first_resampled[name]
        values = values[~np.isnan(values)]
        estimate = float(second_point[name][0] - first_point[name][0])
        if not len(values) or np.isnan(estimate):
            intervals[name] = None
            continue
        low, high = (float(v) for v in np.quantile(values, [alpha, 1 - alpha]))
        intervals[name] = [min(low, estimate), max(high, estimate)]
    return intervals
