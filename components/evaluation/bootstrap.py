"""The patient-level bootstrap, vectorised over resamples: every metric of a set of predictions for
many patient weight rows at once. The intervals built from it are in :mod:`components.evaluation.intervals`.

A resample draws patients with replacement; every image of a drawn patient
comes along, so a resample is a (B, N) matrix of case weights (how often each
case was drawn). Each metric is computed for all B resamples at once as a
weighted metric. scikit-learn and torchmetrics score one resample per call,
which is hundreds of times slower here; tests check every weighted metric
against scikit-learn's ``sample_weight`` versions.

What a chunk of resamples costs: the linear terms of every metric (bins,
confusion, Brier, NLL) are one dense product per cell of cases that share their
groups, summed into the overall and each group's figures
(:class:`ResampledStatistics`); AUC and sensitivity at specificity are one
sparse product per evaluator over runs of one class rather than every score
level, and a few passes over its result (:meth:`WeightedMetrics._ranked`). The
resamples are float32 counts, every 32 drawn from their own random stream,
evaluated 64 at a time, each chunk drawn and evaluated on one of the threads,
one per usable core.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial

import numpy as np
import pandas as pd
from scipy import sparse
from threadpoolctl import threadpool_limits

from components.evaluation.declarations import ECE_BINS, MetricSettings, WeightedSums, metrics_for
from components.machine import ordered_map, usable_cores

STREAM = 32  # resamples drawn from one random stream spawned from the seed: every chunking draws the same ones
CHUNK = 32  # resamples a caller of resample_patients or resample_weights gets at once
# resamples ResampledStatistics evaluates at once (patient_draws' chunks): a chunk's every product and pass costs
# a fixed part besides its rows', and at 100,000 predictions chunks of 64 took 0.59 s of one core against 0.75
# for chunks of 32 (0.92 s against 1.04 for the whole bootstrap on two), and bootstrap_ci peaked 4-5 MiB higher
# (263 MiB above its start against 258 there with attributes per image, 72 against 67.5 at 25,000), when the
# jackknife's chunks of 50 still made the peak (see jackknife_rows)
EVALUATED = 64
JACKKNIFE_GROUPS = 100  # at most this many leave-a-group-out rows; one patient per group up to 100 patients
JACKKNIFE_CHUNK = 25  # at most this many jackknife rows a chunk (see jackknife_rows)
BELOW_BLOCK = 16  # rows of weights summed by one triangular product in weight_below
FLOAT32_CASES = 2 ** 23  # float32 resamples of fewer cases are summed in float32 (see ResampledStatistics._chunk)

def weighted_declarations(settings: MetricSettings) -> tuple:
    """The metrics with a weighted form for these settings (the graded ones too when ordinal)."""
    return tuple(m for m in metrics_for("binary", ordinal=settings.ordinal) if m.weighted is not None)
EPS = np.finfo(np.float64).eps
UNDEFINED_IN_A_RESAMPLE = ("auc", "sensitivity_at_specificity")  # NaN where a resample lacks a class


def patient_draws(
    n_patients: int, *, n_resamples: int, rng: np.random.Generator, chunk: int = EVALUATED
) -> list[Callable[[], np.ndarray]]:
    """The resamples of :func:`resample_patients` as calls, one per chunk of ``chunk`` rows (a multiple of
    ``STREAM``). Every ``STREAM`` rows are drawn from their own random stream (spawned from ``rng``), so chunks
    drawn in any order, on any thread, and in chunks of any size are the same resamples:
    :class:`ResampledStatistics` draws them on the threads that evaluate them."""
    if chunk % STREAM:
        raise ValueError(f"chunks of {chunk} resamples: a multiple of {STREAM} is needed")
    sizes = [min(STREAM, n_resamples - start) for start in range(0, n_resamples, STREAM)]
    streams, per_chunk = rng.spawn(len(sizes)), chunk // STREAM
    return [partial(_draw_counts, n_patients, sizes[i:i + per_chunk], streams[i:i + per_chunk])
            for i in range(0, len(sizes), per_chunk)]


def _draw_counts(n_patients: int, sizes: Sequence[int], streams: Sequence[np.random.Generator]) -> np.ndarray:
    """How often each patient is drawn in each resample, ``sizes[i]`` rows from ``streams[i]`` in turn: the
    transpose of a patient-major (P, rows) float32 array, the layout the sparse products and the gathers of
    :class:`ResampledStatistics` take without copying."""
    # n_patients uniform draws per row, counted: the multinomial, an order of magnitude faster than
    # Generator.multinomial with this many categories; counts are exact in float32 (see ResampledStatistics).
    # Each row is written whole and the chunk transposed once after: writing each row's counts down a column
    # of the patient-major array took a third longer (one cache line a patient, every row)
    counts = np.empty((sum(sizes), n_patients), dtype=np.float32)
    rows = (stream for size, stream in zip(sizes, streams) for _ in range(size))
    for row, stream in enumerate(rows):
        counts[row] = np.bincount(stream.integers(0, n_patients, size=n_patients), minlength=n_patients)
    return np.ascontiguousarray(counts.T).T


def resample_patients(
    n_patients: int, *, n_resamples: int, rng: np.random.Generator, chunk: int = CHUNK
) -> Iterator[np.ndarray]:
    """How often each patient is drawn in each resample: (chunk, P) float32 arrays, ``chunk`` rows at a time,
    drawn one after another (:func:`patient_draws`' chunks)."""
    for draw in patient_draws(n_patients, n_resamples=n_resamples, rng=rng, chunk=chunk):
        yield draw()


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
    linear metric (each confidence bin's count and summed accuracy minus confidence
    for ECE and MCE, the confusion matrix, Brier, NLL) and a sparse indicator of
    runs of one class along the scores for each AUC; a call then costs one dense
    and one sparse product with the (B, N) weights. The dense product is linear in the cases, so a caller
    that holds it summed from parts (:class:`ResampledStatistics` sums it over cells
    of cases) passes it in as ``sums``.
    """

    def __init__(
        self, y_true: np.ndarray, prob: np.ndarray, *, threshold: float, n_bins: int = ECE_BINS,
        units: np.ndarray | None = None, n_units: int | None = None, settings: MetricSettings = MetricSettings(),
    ) -> None:
        y = np.asarray(y_true).astype(int)
        prob = np.asarray(prob, dtype=np.float64)
        self.settings, self.declared = settings, weighted_declarations(settings)
        self._features: dict[np.dtype, np.ndarray] = {}
        # multi-label: one binary evaluator per label, macro-averaged in __call__ (a label has no grades)
        label_settings = MetricSettings(specificity=settings.specificity)
        self.labels = [WeightedMetrics(y[:, j], prob[:, j], threshold=threshold, n_bins=n_bins, units=units,
                                       n_units=n_units, settings=label_settings)
                       for j in range(y.shape[1])] if y.ndim == 2 else []
        if self.labels:
            self.declared = weighted_declarations(label_settings)
            self.width = sum(evaluate.width for evaluate in self.labels)
            return
        # weights are given per unit (a patient: all its cases share the weight) or, by default, per case;
        # summing each case's terms into its unit once makes every call smaller
        n = len(y)
        units = np.arange(n) if units is None else np.asarray(units)
        if n_units is None:
            n_units = int(units.max()) + 1 if n else 0
        self._to_units = sparse.csr_matrix((np.ones(n, dtype=np.float32), (units, np.arange(n))), shape=(n_units, n))
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
        bins = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, n_bins)
        self.k, self.n_levels, self.width = k, n_bins + 1, 2 * (n_bins + 1) + k * k + 2
        # each case's linear terms, laid out as the columns of features() when first needed
        self._terms = (bins, accuracy - confidence, y * k + pred, brier, -np.log(np.clip(p_true, EPS, 1 - EPS)))
        # column-major, so that a product with the (units, B) weights reads them in order
        self.levels = [(self._level_indicator(scores[c], y == c) @ self._to_units.T).tocsc() for c in sorted(scores)]

    def features(self, dtype: type = np.float64) -> np.ndarray:
        """(units, F) each unit's summed linear terms (multi-label: every label's, side by side), in ``dtype``;
        built on first use, as an evaluator always handed its ``sums`` never needs them."""
        dtype = np.dtype(dtype)
        if dtype not in self._features:
            if self.labels:
                self._features[dtype] = np.hstack([evaluate.features(dtype) for evaluate in self.labels])
            else:
                exact = np.dtype(np.float64)
                if exact not in self._features:
                    self._features[exact] = self._unit_terms()
                self._features[dtype] = self._features[exact].astype(dtype, copy=False)
        return self._features[dtype]

    def _unit_terms(self) -> np.ndarray:
        """(units, F) float64: each unit's summed linear terms: per confidence bin the count and the summed
        accuracy minus confidence, the (true, predicted) one-hot of the confusion matrix (whence tp, fp, fn),
        Brier, NLL."""
        bins, gap, pair, brier, nll = self._terms
        nb, n = self.n_levels, len(bins)
        # each case's five non-zero terms as one sparse row, summed into its unit by one sparse product: dense
        # (cases, F) one-hot rows took 0.6 s of one core to build at 100,000 cases
        last = np.full(n, self.width - 1)
        columns = np.column_stack([bins, nb + bins, 2 * nb + pair, last - 1, last])
        values = np.column_stack([np.ones(n), gap, np.ones(n), brier, nll])
        case = sparse.csr_matrix((values.ravel(), columns.ravel(), np.arange(0, 5 * n + 1, 5)), shape=(n, self.width))
        return (self._to_units @ case).toarray()

    @staticmethod
    def _level_indicator(score: np.ndarray, positive: np.ndarray) -> sparse.csc_matrix:
        """(2R, N) sparse: row r marks the positives of run r, row R + r its negatives.

        A run is a stretch of ascending score levels holding only positives, or only negatives, or one level
        holding both. Merging the levels of a run changes no AUC (the positives of a run have the same
        negatives below them) and no best threshold for a target specificity (within a run of positives the
        lowest level has the most true positives and the same false ones; within a run of negatives the next
        run's start has fewer false positives and the same true ones); a good classifier's scores fall into
        a few times fewer runs than levels.
        """
        levels, index = np.unique(score, return_inverse=True)
        index = index.ravel()
        kind = (np.bincount(index[positive], minlength=len(levels)) > 0) + 2 * (
            np.bincount(index[~positive], minlength=len(levels)) > 0)
        run = np.cumsum(np.r_[True, (kind[1:] != kind[:-1]) | (kind[1:] == 3)]) - 1  # each level's run
        r, n = int(run[-1]) + 1 if len(run) else 0, len(score)
        rows = run[index] + np.where(positive, 0, r)
        return sparse.csc_matrix((np.ones(n, dtype=np.float32), (rows, np.arange(n))), shape=(2 * r, n))

    @staticmethod
    def _level_weights(indicator: sparse.spmatrix, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative weight of each run, ascending: (R, B) each, run-major so that the sums along
        the runs read contiguous rows. (Patient-major weights, as :func:`resample_patients` gives them, are
        multiplied without a copy.)"""
        counts = indicator @ weights.T  # (2R, B)
        r = counts.shape[0] // 2
        return counts[:r], counts[r:]

    @staticmethod
    def _ranked(level_weights: tuple[np.ndarray, np.ndarray], specificity: float | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """ROC AUC and, given a target ``specificity``, the highest sensitivity among thresholds (each run's
        start, predicting positive at or above it, and one above every score) whose specificity reaches it:
        (B,) each, NaN without positives or negatives. ``level_weights``: :meth:`_level_weights`.

        A few passes over the (R, B) weights, sharing one cumulative sum: the specificity of a threshold grows
        with it, so the best one is the lowest allowed, where the negatives below reach the target share."""
        pos_w, neg_w = level_weights  # float32 for resampled counts: sums and products below go to float64
        neg_below = weight_below(neg_w)  # negative weight strictly below each run
        positives = pos_w.sum(axis=0, dtype=np.float64)
        negatives = neg_below[-1].astype(np.float64) + neg_w[-1] if len(neg_w) else np.zeros(neg_w.shape[1])
        num = (np.einsum("ij,ij->j", pos_w, neg_below, dtype=np.float64)
               + 0.5 * np.einsum("ij,ij->j", pos_w, neg_w, dtype=np.float64))
        defined = (positives > 0) & (negatives > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            auc = np.where(defined, num / (positives * negatives), np.nan)
            if specificity is None:
                return auc, None
            refused = neg_below < (specificity - 1e-12) * negatives  # the runs below the best threshold
            pos_below = np.einsum("ij,ij->j", pos_w, refused, dtype=np.float64)
            return auc, np.where(defined, (positives - pos_below) / positives, np.nan)

    def __call__(self, weights: np.ndarray, sums: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{metric: (B,) values}`` for (B, N) case weights, or (B, P) unit weights when built with ``units``;
        ``sums``, where the caller has it, is ``weights @ self.features``."""
        if sums is None:
            sums = weights @ self.features(np.float32 if weights.dtype == np.float32 else np.float64)
        z = np.asarray(sums, dtype=np.float64)  # the ratios below in full precision
        if self.labels:
            bounds = np.cumsum([0, *(evaluate.width for evaluate in self.labels)])
            per_label = [evaluate(weights, z[:, start:stop])
                         for evaluate, start, stop in zip(self.labels, bounds, bounds[1:])]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a resample with no label's AUC gives NaN
                return {name: np.nanmean([m[name] for m in per_label], axis=0) if name in UNDEFINED_IN_A_RESAMPLE
                        else np.mean([m[name] for m in per_label], axis=0) for name in per_label[0]}
        nb, k = self.n_levels, self.k
        bin_count = z[:, :nb]
        confusion = z[:, 2 * nb:2 * nb + k * k].reshape(len(z), k, k)
        tp = np.diagonal(confusion, axis1=1, axis2=2)
        fp, fn = confusion.sum(axis=1) - tp, confusion.sum(axis=2) - tp
        total = bin_count.sum(axis=1)
        ranked = [self._ranked(self._level_weights(indicator, weights), self.settings.specificity)
                  for indicator in self.levels]  # one sparse product each
        sums = WeightedSums(
            binary=self.binary, bin_count=bin_count, bin_gap=z[:, nb:2 * nb],
            tp=tp, fp=fp, fn=fn, tn=total[:, None] - tp - fp - fn, brier=z[:, -2], nll=z[:, -1], total=total,
            auc=np.mean([auc for auc, _ in ranked], axis=0),
            sensitivity_at_specificity=np.mean([sensitivity for _, sensitivity in ranked], axis=0),
            confusion=confusion,
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            return {m.name: m.weighted(sums) for m in self.declared}


def weight_below(weights: np.ndarray, block: int = BELOW_BLOCK) -> np.ndarray:
    """(R, B) -> (R, B): for each row, the sum of the rows before it (an exclusive cumulative sum down axis 0).

    numpy's cumsum along axis 0 of a row-major array walks each column down the rows, one cache line an
    element (5.4 ms for 21,700 runs of 32 float32 resamples where these figures were first taken, 3.8 ms on
    an AMD EPYC with AVX2).
    Here each block of ``block`` rows is summed by one product with a strictly lower triangular matrix (every
    column at once) and the blocks' totals are carried by a cumsum over one row a block; the rows past the
    last whole block by cumsum. Blocks of 64 took 1.1 ms on the first machine but 8.9 ms on the EPYC, where
    numpy's stacked product of such small matrices is 3.7x slower at 64 rows than at 16; blocks of 16 took
    3.5 ms there (a quarter of the multiplications of 64).
    Sums of whole numbers below 2**24 stay exact in float32, as the callers' counts are."""
    r, b = weights.shape
    whole = r // block * block
    below = np.empty_like(weights)
    blocks = weights[:whole].reshape(-1, block, b)
    totals = blocks.sum(axis=1)  # (blocks, B)
    carried = np.cumsum(totals, axis=0)
    inside = np.matmul(np.tri(block, k=-1, dtype=weights.dtype), blocks)
    inside[1:] += carried[:-1, None, :]
    below[:whole] = inside.reshape(whole, b)
    tail = weights[whole:]
    below[whole:] = np.cumsum(tail, axis=0) - tail + (carried[-1] if whole else 0)
    return below


def weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` for the cases ``positive`` against the rest, for each (B, N) weight row: (B,)
    (NaN where a row weighs no positive or no negative case)."""
    indicator = WeightedMetrics._level_indicator(np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool))
    return WeightedMetrics._ranked(WeightedMetrics._level_weights(indicator, np.asarray(weights, dtype=np.float64)))[0]


def jackknife_rows(n_patients: int, *, groups: int = JACKKNIFE_GROUPS, chunk: int | None = None
                   ) -> Iterator[np.ndarray]:
    """Leave-one-out weight rows over patients, ``chunk`` rows at a time: (rows, P) arrays of ones with one
    patient (or, past ``groups`` patients, one of ``groups`` interleaved groups of patients) set to zero.
    By default the rows are split evenly among the usable cores, in chunks of at most ``JACKKNIFE_CHUNK``: in
    chunks of 32, the 100 rows left one of two threads a chunk of 4 while the other evaluated 64; the rows are
    float64, and two chunks of 50 in flight at once were the bootstrap's peak (244-266 MiB above its start at
    100,000 predictions with attributes per image, against 198 in chunks of 25; 64 against 52 at 25,000)."""
    n_groups = min(n_patients, groups)
    per_core = math.ceil(n_groups / usable_cores())
    chunk = chunk or math.ceil(per_core / math.ceil(per_core / JACKKNIFE_CHUNK))  # a core's rows in equal chunks
    member = np.arange(n_patients) % n_groups
    for start in range(0, n_groups, chunk):
        left_out = np.arange(start, min(start + chunk, n_groups))
        yield (member[None, :] != left_out[:, None]).astype(np.float64)


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


class ResampledStatistics:
    """Every metric of one set of predictions, each attribute's group metrics and the fairness gaps, for
    many patient weight rows at once (bootstrap resamples, jackknife rows, or a row of ones for the point).

    Calling it with chunks of (rows, P) patient weights gives ``(overall, groups, gaps)``:
    ``{metric: (rows,)}``, ``{attribute: {group: {metric: (rows,)}}}`` and
    ``{attribute: {"auc_gap": (rows,), "es_auc": (rows,)}}``.

    The cases are split into cells (the cases that share every attribute's group) and the weights are
    taken per unit (one patient's cases in one cell), ordered by cell. The dense product of a chunk is then
    computed once per cell, on a contiguous block of units: the overall sums are the sum over all cells and
    a group's the sum over its cells, so the groups cost no dense product of their own. The AUC's sparse
    products take each group's cases from the same units.
    """

    def __init__(self, y_true: np.ndarray, prob: np.ndarray, codes: np.ndarray, *, threshold: float,
                 groups: Mapping[str, np.ndarray] | None = None,
                 compared: Mapping[str, Sequence[str]] | None = None,
                 settings: MetricSettings = MetricSettings()) -> None:
        # each attribute's groups as codes in sorted order (pandas' hashing: sorting 100,000 strings, as
        # np.unique does, takes most of the set-up)
        factorized = {a: pd.factorize(np.asarray(v).astype(str), sort=True) for a, v in dict(groups or {}).items()}
        self.members = {a: {g: group_code == i for i, g in enumerate(names)}
                        for a, (group_code, names) in factorized.items()}
        self.compared = compared
        codes = np.asarray(codes)
        n_patients = int(codes.max()) + 1
        cell = np.zeros(len(codes), dtype=np.int64)  # the cases' combination of groups, in sorted order
        for group_code, names in factorized.values():
            cell = cell * len(names) + group_code
        cell = pd.factorize(cell, sort=True)[0]
        unit, unit_keys = pd.factorize(cell * n_patients + codes, sort=True)
        self.unit_patient = unit_keys % n_patients
        # the units' weights are the patients' columns of a chunk, taken in this order (none to take without
        # groups, or when every patient's cases share their groups and the cells follow the patients' order)
        self.gather = not np.array_equal(self.unit_patient, np.arange(n_patients))
        self.cell_bounds = np.searchsorted(unit_keys // n_patients, np.arange(int(cell.max()) + 2))
        self.n_cases = len(codes)
        self.evaluate_all = WeightedMetrics(y_true, prob, threshold=threshold, units=unit, settings=settings)
        self.evaluate_group, self.group_cells = {}, {}
        for attribute, masks in self.members.items():
            self.evaluate_group[attribute] = {}
            for group, mask in masks.items():
                self.group_cells[attribute, group] = np.unique(cell[mask])
                self.evaluate_group[attribute][group] = WeightedMetrics(
                    np.asarray(y_true)[mask], prob[mask], threshold=threshold, units=unit[mask],
                    n_units=len(unit_keys), settings=settings)

    def __call__(self, weight_chunks: Iterable[np.ndarray | Callable[[], np.ndarray]]) -> tuple[dict, dict, dict]:
        return self.each(weight_chunks)[0]

    def each(self, *row_sets: Iterable[np.ndarray | Callable[[], np.ndarray]]) -> list[tuple[dict, dict, dict]]:
        """``self(chunks)`` for each of ``row_sets`` (an interval's jackknife, resamples and point), in one pass
        over the threads: no thread waits for the last chunk of one set while the other finishes it."""
        # chunks (or the calls that draw them, :func:`patient_draws`) in parallel on the usable cores (numpy's
        # draws and counts, scipy's sparse products and BLAS release the GIL), each with a single-threaded BLAS
        # so that the threads do not contend for the cores
        tagged = ((which, chunk) for which, chunks in enumerate(row_sets) for chunk in chunks)
        with threadpool_limits(limits=1, user_api="blas"):
            parts = list(ordered_map(lambda item: (item[0], self._chunk(item[1])), tagged, workers=usable_cores()))
        return [self._joined([part for which, part in parts if which == k]) for k in range(len(row_sets))]

    @staticmethod
    def _joined(parts: list[tuple[dict, dict, dict]]) -> tuple[dict, dict, dict]:
        """The chunks' ``(overall, groups, gaps)`` concatenated along their rows."""
        join = lambda chunks: np.concatenate(chunks)  # noqa: E731
        overall, by_group, gaps = (tuple(part[i] for part in parts) for i in range(3))
        return ({n: join([c[n] for c in overall]) for n in overall[0]},
                {a: {g: {n: join([c[a][g][n] for c in by_group]) for n in gm} for g, gm in ag.items()}
                 for a, ag in by_group[0].items()},
                {a: {n: join([c[a][n] for c in gaps]) for n in gm} for a, gm in gaps[0].items()})

    def _chunk(self, weights: np.ndarray | Callable[[], np.ndarray]) -> tuple[dict, dict, dict]:
        """One chunk's ``(overall, groups, gaps)`` (see the class docstring)."""
        if callable(weights):
            weights = weights()
        members, compared, bounds = self.members, self.compared, self.cell_bounds
        # float32 resamples (counts) are summed in float32: exact for whole numbers below 2**24, which the
        # counts, the confusion and bin counts and the runs' weights stay below with fewer cases than 2**23
        # (more cases: in float64); the Brier, NLL and calibration gaps' sums carry float32's rounding
        dtype = np.float32 if weights.dtype == np.float32 and self.n_cases < FLOAT32_CASES else np.float64
        features = self.evaluate_all.features(dtype)
        # (units, rows), gathered (or copied) once unless already so: a cell's units are then a contiguous
        # block, and every sparse product takes the transpose of a view of it without copying
        by_patient = np.ascontiguousarray(weights.T, dtype=dtype)  # a view of resample_patients' chunks
        by_unit = by_patient[self.unit_patient] if self.gather else by_patient
        cell_sums = np.stack([by_unit[start:stop].T @ features[start:stop] for start, stop in zip(bounds, bounds[1:])])
        overall = self.evaluate_all(by_unit.T, cell_sums.sum(axis=0))
        by_group: dict[str, dict[str, dict]] = {a: {} for a in members}
        gaps: dict[str, dict[str, np.ndarray]] = {}
        for attribute, masks in members.items():
            aucs = []
            for group in masks:
                group_metrics = self.evaluate_group[attribute][group](
                    by_unit.T, cell_sums[self.group_cells[attribute, group]].sum(axis=0))
                by_group[attribute][group] = group_metrics
                if compared is None or group in compared.get(attribute, masks):
                    aucs.append(group_metrics["auc"])
            stacked = np.stack(aucs) if aucs else np.full((1, len(weights)), np.nan)
            with np.errstate(invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows are dropped by the interval
                defined = (~np.isnan(stacked)).sum(axis=0)
                gap = np.where(defined >= 2, np.nanmax(stacked, axis=0) - np.nanmin(stacked, axis=0), np.nan)
                spread = np.nansum(np.abs(stacked - overall["auc"]), axis=0)
                es = np.where(defined >= 1, overall["auc"] / (1 + spread), np.nan)
            gaps[attribute] = {"auc_gap": gap, "es_auc": es}
        return overall, by_group, gaps


def patient_codes(patient_ids: np.ndarray) -> np.ndarray:
    """Each case's patient as 0..P-1."""
    return np.unique(np.asarray(patient_ids), return_inverse=True)[1]
