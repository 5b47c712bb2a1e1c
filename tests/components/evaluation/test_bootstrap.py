from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, log_loss, recall_score, roc_auc_score

from components.evaluation.bootstrap import resample_weights, weighted_metrics
from components.evaluation.intervals import bootstrap_ci
from components.evaluation.metrics import classification_metrics

from .references import ece_reference, synthetic_predictions


@pytest.fixture
def weights():
    rng = np.random.default_rng(1)
    return rng.integers(0, 4, size=(5, 800)).astype(float)


def test_weighted_binary_metrics_match_scikit_learn_sample_weights(weights):
    y, prob, _ = synthetic_predictions(800)
    m = weighted_metrics(y, prob, weights, threshold=0.5)
    pred = (prob >= 0.5).astype(int)
    for b, w in enumerate(weights):
        assert m["auc"][b] == pytest.approx(roc_auc_score(y, prob, sample_weight=w))
        assert m["accuracy"][b] == pytest.approx(accuracy_score(y, pred, sample_weight=w))
        assert m["sensitivity"][b] == pytest.approx(recall_score(y, pred, sample_weight=w))
        assert m["specificity"][b] == pytest.approx(recall_score(y, pred, pos_label=0, sample_weight=w))
        assert m["f1"][b] == pytest.approx(f1_score(y, pred, sample_weight=w))
        assert m["brier"][b] == pytest.approx(np.average((prob - y) ** 2, weights=w))
        assert m["nll"][b] == pytest.approx(log_loss(y, prob, sample_weight=w), rel=1e-6)
        ece, mce = ece_reference(prob, y.astype(float), w)
        assert (m["ece"][b], m["mce"][b]) == (pytest.approx(ece), pytest.approx(mce))


def test_weighted_multiclass_metrics_match_scikit_learn_sample_weights(weights):
    y, prob, _ = synthetic_predictions(800, k=3)
    m = weighted_metrics(y, prob, weights, threshold=0.5)
    pred = prob.argmax(axis=1)
    for b, w in enumerate(weights):
        aucs = [roc_auc_score(y == c, prob[:, c], sample_weight=w) for c in range(3)]
        assert m["auc"][b] == pytest.approx(np.mean(aucs))
        assert m["sensitivity"][b] == pytest.approx(recall_score(y, pred, average="macro", sample_weight=w))
        assert m["f1"][b] == pytest.approx(f1_score(y, pred, average="macro", sample_weight=w))
        assert m["nll"][b] == pytest.approx(log_loss(y, prob, sample_weight=w), rel=1e-6)


def test_unit_weights_give_the_point_estimates():
    y, prob, _ = synthetic_predictions(400)
    point = classification_metrics(y, prob)
    weighted = weighted_metrics(y, prob, np.ones((1, 400)), threshold=0.5)
    for name, values in weighted.items():
        assert values[0] == pytest.approx(point[name], abs=1e-9), name


def test_resamples_draw_patients_not_images():
    codes = np.array([0, 0, 0, 1, 2, 2])
    for w in next(resample_weights(codes, n_resamples=50, rng=np.random.default_rng(0))):
        assert w[0] == w[1] == w[2] and w[4] == w[5]
        assert w[[0, 3, 4]].sum() == 3  # three patients drawn per resample


def test_drawn_chunks_are_the_same_in_any_order():
    """Each chunk of resamples draws from its own stream, so the threads that draw them may finish in any
    order and a seed still gives one set of resamples."""
    from components.evaluation.bootstrap import patient_draws, resample_patients

    draws = patient_draws(40, n_resamples=100, rng=np.random.default_rng(5), chunk=32)
    backwards = [draw() for draw in reversed(draws)][::-1]
    in_order = list(resample_patients(40, n_resamples=100, rng=np.random.default_rng(5), chunk=32))
    assert [len(chunk) for chunk in in_order] == [32, 32, 32, 4]
    for drawn, expected in zip(backwards, in_order):
        np.testing.assert_array_equal(drawn, expected)
    assert all((chunk.sum(axis=1) == 40).all() for chunk in in_order)  # 40 patients drawn per resample
    assert not np.array_equal(in_order[0], in_order[1])


def test_chunks_of_any_multiple_of_the_stream_are_the_same_resamples():
    """The statistics evaluate 64 resamples at once and the other callers take 32: both see one set of
    resamples for a seed, as every 32 rows come from one stream however they are chunked."""
    from components.evaluation.bootstrap import EVALUATED, STREAM, patient_draws, resample_patients

    def rows(chunk: int) -> np.ndarray:
        return np.concatenate([draw() for draw in patient_draws(
            40, n_resamples=150, rng=np.random.default_rng(5), chunk=chunk)])

    by_stream = rows(STREAM)
    assert [len(draw()) for draw in patient_draws(40, n_resamples=150, rng=np.random.default_rng(5))] == [
        EVALUATED, EVALUATED, 150 - 2 * EVALUATED]
    for chunk in (EVALUATED, 3 * STREAM, 160):
        np.testing.assert_array_equal(rows(chunk), by_stream)
    np.testing.assert_array_equal(np.concatenate(list(resample_patients(
        40, n_resamples=150, rng=np.random.default_rng(5)))), by_stream)
    with pytest.raises(ValueError, match="multiple of 32"):
        patient_draws(40, n_resamples=150, rng=np.random.default_rng(5), chunk=48)


def test_several_sets_of_rows_in_one_pass_are_each_set_on_its_own():
    from components.evaluation.bootstrap import ResampledStatistics, jackknife_rows, patient_draws

    y, prob, groups = synthetic_predictions(600)
    statistics = ResampledStatistics(y, prob, np.arange(600) // 2, threshold=0.5, groups=groups)
    def sets() -> tuple:
        draws = patient_draws(300, n_resamples=150, rng=np.random.default_rng(2))
        return jackknife_rows(300), draws, [np.ones((1, 300))]
    together = statistics.each(*sets())
    assert [len(part[0]["auc"]) for part in together] == [100, 150, 1]
    # each set's rows as one chunk of their own (float32 sums of another shape: equal to float32's rounding)
    alone = [statistics([np.concatenate([chunk() if callable(chunk) else chunk for chunk in rows])]) for rows in sets()]

    def leaves(tree, path=()):
        if isinstance(tree, (dict, tuple, list)):
            for key, value in (tree.items() if isinstance(tree, dict) else enumerate(tree)):
                yield from leaves(value, (*path, key))
        else:
            yield path, tree
    for (path, joint), (_, expected) in zip(leaves(together), leaves(alone), strict=True):
        np.testing.assert_allclose(joint, expected, rtol=1e-6, err_msg=str(path))


@pytest.mark.parametrize(("cores", "sizes"), [(1, [25] * 4), (2, [25] * 4), (3, [17] * 5 + [15]), (16, [7] * 14 + [2])])
def test_jackknife_rows_come_in_small_chunks_split_evenly_among_the_cores(monkeypatch, cores, sizes):
    """float64 rows: two chunks of 50 in flight were the bootstrap's memory peak."""
    from components.evaluation import bootstrap

    monkeypatch.setattr(bootstrap, "usable_cores", lambda: cores)
    chunks = list(bootstrap.jackknife_rows(1000))
    assert [len(chunk) for chunk in chunks] == sizes
    rows = np.concatenate(chunks)
    group = np.arange(1000) % 100  # each row leaves out one of 100 interleaved groups of patients, in order
    np.testing.assert_array_equal(rows, (group[None, :] != np.arange(100)[:, None]).astype(float))


def test_intervals_do_not_depend_on_the_number_of_threads(monkeypatch):
    from components.evaluation import bootstrap

    y, prob, groups = synthetic_predictions(600)
    patients = np.arange(600) // 2
    threaded = bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=200, groups=groups)
    monkeypatch.setattr(bootstrap, "usable_cores", lambda: 1)
    assert bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=200, groups=groups) == threaded


def test_intervals_cover_the_estimate_and_are_seeded():
    y, prob, groups = synthetic_predictions(600)
    patients = np.arange(600) // 2
    ci = bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=3).overall
    point = classification_metrics(y, prob)
    for name, (low, high) in ci.items():
        assert low <= point[name] <= high, name
    assert ci == bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=3).overall
    assert ci != bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, seed=4).overall


def test_patient_clusters_widen_the_interval():
    """Cases of one patient are not independent: resampling patients must see that."""
    y, prob, _ = synthetic_predictions(200)
    y, prob = np.repeat(y, 5), np.repeat(prob, 5)  # each patient imaged five times, identically
    by_patient = bootstrap_ci(y, prob, np.repeat(np.arange(200), 5), threshold=0.5, n_resamples=400).overall["auc"]
    by_image = bootstrap_ci(y, prob, np.arange(1000), threshold=0.5, n_resamples=400).overall["auc"]
    assert (by_patient[1] - by_patient[0]) > 1.5 * (by_image[1] - by_image[0])


def test_group_and_gap_intervals_cover_their_estimates():
    from sklearn.metrics import roc_auc_score

    y, prob, groups = synthetic_predictions(1500, seed=7)
    patients = np.arange(1500) // 3
    ci = bootstrap_ci(y, prob, patients, threshold=0.5, n_resamples=300, groups={"sex": groups["sex"]})
    aucs = {g: roc_auc_score(y[groups["sex"] == g], prob[groups["sex"] == g]) for g in ("F", "M")}
    for g, auc in aucs.items():
        low, high = ci.groups["sex"][g]["auc"]
        assert low <= auc <= high
    low, high = ci.gaps["sex"]["auc_gap"]
    assert low <= aucs["M"] - aucs["F"] <= high
    assert low > 0  # the built-in difference is significant at this size
    overall = roc_auc_score(y, prob)
    es = overall / (1 + sum(abs(a - overall) for a in aucs.values()))
    assert ci.gaps["sex"]["es_auc"][0] <= es <= ci.gaps["sex"]["es_auc"][1]


def test_gaps_only_compare_the_groups_asked_for():
    y, prob, groups = synthetic_predictions(600, seed=8)
    ci = bootstrap_ci(y, prob, np.arange(600), threshold=0.5, n_resamples=50, groups={"sex": groups["sex"]},
                      compared={"sex": ["F"]})
    assert ci.gaps["sex"]["auc_gap"] is None  # one group cannot have a gap


@pytest.mark.parametrize("k", [2, 3])
def test_patient_weights_equal_the_same_weights_on_every_case_of_the_patient(k):
    from components.evaluation.bootstrap import WeightedMetrics

    y, prob, _ = synthetic_predictions(500, k=k, seed=9)
    patients = np.random.default_rng(0).integers(0, 150, size=500)
    codes = np.unique(patients, return_inverse=True)[1]
    counts = np.random.default_rng(1).integers(0, 3, size=(4, codes.max() + 1)).astype(float)
    by_patient = WeightedMetrics(y, prob, threshold=0.5, units=codes)(counts)
    by_case = WeightedMetrics(y, prob, threshold=0.5)(counts[:, codes])
    for name in by_case:
        np.testing.assert_allclose(by_patient[name], by_case[name], rtol=1e-10, err_msg=name)


@pytest.mark.parametrize("metric", ["auc", "ece", "brier"])
def test_bca_intervals_equal_scipys_on_the_same_resamples(metric):
    """One case per patient, at most 100 patients (an exact jackknife): our BCa interval is scipy's for the
    bootstrap distribution we drew (passed to scipy.stats.bootstrap, which adds no resample of its own)."""
    from types import SimpleNamespace

    from scipy import stats

    from components.evaluation.bootstrap import jackknife_rows, resample_patients
    from components.evaluation.intervals import bca_interval
    from components.evaluation.declarations import metric as declared

    y, prob, _ = synthetic_predictions(100, seed=11)
    point = declared(metric).point
    resampled = np.concatenate([weighted_metrics(y, prob, w, threshold=0.5)[metric]
                                for w in resample_patients(100, n_resamples=400, rng=np.random.default_rng(2))])
    jackknifed = np.concatenate([weighted_metrics(y, prob, w, threshold=0.5)[metric] for w in jackknife_rows(100)])
    ours = bca_interval(point(y, prob, 0.5), resampled, jackknifed)

    reference = stats.bootstrap((y, prob), lambda a, b: point(a, b, 0.5), paired=True, vectorized=False,
                                method="BCa", n_resamples=0,
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=resampled))
    estimate = point(y, prob, 0.5)
    low, high = reference.confidence_interval
    expected = [min(low, estimate), max(high, estimate)]
    assert ours == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_a_biased_statistic_keeps_its_estimate_inside_its_interval():
    """ECE on a small, well-calibrated sample: resampling inflates it, so nearly every resample lies above the
    estimate and the percentile interval misses it; the reported interval holds it."""
    from components.evaluation.metrics import classification_metrics

    rng = np.random.default_rng(0)
    prob = rng.random(120)
    y = (rng.random(120) < prob).astype(int)  # calibrated by construction
    ci = bootstrap_ci(y, prob, np.arange(120), threshold=0.5, n_resamples=500, seed=1).overall
    point = classification_metrics(y, prob)
    # (with these draws, 1.2 % of the resamples' ECE lie below the estimate: the percentile interval
    # is 0.0996-0.179 around an ECE of 0.0911)
    for name in ("ece", "mce", "auc", "brier"):
        low, high = ci[name]
        assert low - 1e-12 <= point[name] <= high + 1e-12, (name, point[name], ci[name])


@pytest.mark.parametrize("specificity", [0.5, 0.85, 0.97])
def test_runs_of_one_class_merge_levels_and_change_no_ranking_metric(specificity):
    """Distinct scores of a good classifier fall into a few runs of one class; AUC (scikit-learn's with the
    same weights) and sensitivity at specificity (the point function on repeated cases) are unchanged."""
    from components.evaluation.bootstrap import WeightedMetrics
    from components.evaluation.declarations import MetricSettings

    rng = np.random.default_rng(12)
    y = rng.integers(0, 2, 2000)
    prob = 1 / (1 + np.exp(-(2.5 * (2 * y - 1) + rng.normal(size=2000))))  # 2,000 distinct scores
    prob[:40], prob[40:80] = 0.5, 0.5 + 1e-9  # and two adjacent tied levels, each holding both classes
    weights = rng.integers(0, 3, size=(4, 2000)).astype(float)
    indicator = WeightedMetrics._level_indicator(prob, y == 1)
    assert indicator.shape[0] // 2 < len(np.unique(prob)) // 3 and indicator.nnz == 2000
    settings = MetricSettings(specificity=specificity)
    m = weighted_metrics(y, prob, weights, threshold=0.5, settings=settings)
    for b, w in enumerate(weights):
        assert m["auc"][b] == pytest.approx(roc_auc_score(y, prob, sample_weight=w), abs=1e-12)
        repeated = np.repeat(np.arange(2000), w.astype(int))
        point = classification_metrics(y[repeated], prob[repeated], settings=settings)
        assert m["sensitivity_at_specificity"][b] == pytest.approx(point["sensitivity_at_specificity"], abs=1e-12)


def test_group_statistics_are_each_groups_own_when_patients_span_groups():
    """Cells and units: a patient imaged at two sites counts in both sites' groups, with its weight."""
    from components.evaluation.bootstrap import ResampledStatistics, WeightedMetrics, patient_codes

    y, prob, groups = synthetic_predictions(900, seed=13)
    codes = patient_codes(np.arange(900) // 3)  # three images a patient; sites drawn per image
    counts = np.random.default_rng(14).integers(0, 3, size=(5, codes.max() + 1)).astype(float)
    overall, by_group, gaps = ResampledStatistics(y, prob, codes, threshold=0.5, groups=groups)([counts])
    expected = WeightedMetrics(y, prob, threshold=0.5)(counts[:, codes])
    for name, values in expected.items():
        np.testing.assert_allclose(overall[name], values, rtol=1e-10, err_msg=name)
    sites = groups["site"].reshape(-1, 3)  # each patient's three images
    assert (sites != sites[:, :1]).any(axis=1).sum() > 100  # many patients span sites: units, not patients
    for attribute, labels in groups.items():
        aucs = []
        for group in np.unique(labels):
            mask = labels == group
            own = WeightedMetrics(y[mask], prob[mask], threshold=0.5)(counts[:, codes[mask]])
            for name, values in own.items():
                np.testing.assert_allclose(by_group[attribute][group][name], values, rtol=1e-10,
                                           err_msg=f"{attribute}={group} {name}")
            aucs.append(own["auc"])
        np.testing.assert_allclose(gaps[attribute]["auc_gap"], np.ptp(aucs, axis=0), rtol=1e-10)


def test_float32_resamples_sum_exactly_where_whole_and_in_float64_for_very_many_cases(monkeypatch):
    from components.evaluation import bootstrap
    from components.evaluation.bootstrap import ResampledStatistics, patient_codes, resample_patients

    y, prob, groups = synthetic_predictions(10_000, seed=15)  # the AUC's sums pass 2**24: float32 would round
    codes = patient_codes(np.arange(10_000) // 2)
    counts = next(resample_patients(5000, n_resamples=8, rng=np.random.default_rng(0)))
    assert counts.dtype == np.float32
    statistics = ResampledStatistics(y, prob, codes, threshold=0.5, groups=groups)
    single, double = statistics([counts]), statistics([counts.astype(np.float64)])
    for name in single[0]:
        if name in ("auc", "accuracy", "sensitivity", "specificity", "f1", "sensitivity_at_specificity"):
            assert np.array_equal(single[0][name], double[0][name]), name  # whole numbers: exact
        else:  # Brier, NLL, ECE: float32's rounding of the sums
            np.testing.assert_allclose(single[0][name], double[0][name], rtol=1e-5, err_msg=name)
    assert not np.array_equal(single[0]["nll"], double[0]["nll"])
    monkeypatch.setattr(bootstrap, "FLOAT32_CASES", 10_000)  # as if 10,000 cases were too many for float32
    assert statistics([counts])[0]["nll"].tolist() == double[0]["nll"].tolist()


@pytest.mark.parametrize("rows", [0, 1, 15, 16, 17, 1000])
def test_weight_below_is_the_exclusive_cumulative_sum_down_the_rows(rows):
    """The triangular products and their carried block totals equal numpy's cumsum: exactly for float32 counts
    (the resamples'), to rounding for float64 weights, past the last whole block too."""
    from components.evaluation.bootstrap import BELOW_BLOCK, weight_below

    assert BELOW_BLOCK == 16  # the sizes above straddle one and several whole blocks
    rng = np.random.default_rng(15)
    counts = rng.poisson(3.0, size=(rows, 32)).astype(np.float32)
    below = weight_below(counts)
    assert below.dtype == np.float32
    np.testing.assert_array_equal(below, np.cumsum(counts, axis=0) - counts)
    weights = rng.random((rows, 5))
    np.testing.assert_allclose(weight_below(weights), np.cumsum(weights, axis=0) - weights, rtol=1e-12, atol=1e-12)
