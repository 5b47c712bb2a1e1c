"""Two models on the same cases: the paired difference of every metric and its interval, against
scikit-learn on the same resamples and scipy's BCa."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from components.evaluation.bootstrap import resample_patients
from components.registry.compare import compare_predictions


def _two_models(n=90, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    good = np.clip(0.5 + (y - 0.5) * 0.6 + rng.normal(0, 0.2, n), 0.01, 0.99)
    weak = np.clip(0.5 + (y - 0.5) * 0.1 + rng.normal(0, 0.3, n), 0.01, 0.99)
    sex = rng.choice(["F", "M"], n)
    return y, good, weak, sex


def test_the_paired_auc_difference_is_scipys_bca_over_scikit_learns_resampled_differences():
    y, good, weak, sex = _two_models()
    patients = np.arange(len(y))  # one case per patient: scipy's jackknife leaves out the same units as ours
    metrics, fairness = compare_predictions(y, good, weak, patients, groups={"sex": sex}, n_resamples=300, seed=4)
    auc = next(r for r in metrics if r.name == "auc")
    assert auc.a == pytest.approx(roc_auc_score(y, good)) and auc.b == pytest.approx(roc_auc_score(y, weak))
    assert auc.difference == pytest.approx(auc.a - auc.b)
    weights = np.concatenate(list(resample_patients(len(y), n_resamples=300, rng=np.random.default_rng(4))))
    diffs = np.array([roc_auc_score(y, good, sample_weight=w) - roc_auc_score(y, weak, sample_weight=w)
                      for w in weights])
    reference = stats.bootstrap((y, good, weak), lambda t, p, q: roc_auc_score(t, p) - roc_auc_score(t, q),
                                paired=True, vectorized=False, method="BCa", n_resamples=0,
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=diffs))
    low, high = reference.confidence_interval
    assert auc.ci95 == pytest.approx([min(low, auc.difference), max(high, auc.difference)], abs=1e-9)
    assert auc.better == "a" and auc.ci95[0] > 0
    ece = next(r for r in metrics if r.name == "ece")
    assert ece.ci95[0] <= ece.difference <= ece.ci95[1]
    assert {r.name for r in fairness} == {"sex.auc_gap", "sex.es_auc"}


def test_a_model_compared_with_itself_differs_by_nothing():
    y, good, _, sex = _two_models(seed=1)
    metrics, fairness = compare_predictions(y, good, good.copy(), np.arange(len(y)) // 2, groups={"sex": sex},
                                            n_resamples=100)
    for row in [*metrics, *fairness]:
        if row.difference is not None:
            assert row.difference == 0 and row.ci95 == [0.0, 0.0] and row.better == ""


def test_segmentations_compare_on_mean_dice_and_hd95_with_scipys_bca_of_the_paired_means():
    from components.registry.compare import compare_segmentations  # noqa: PLC0415

    rng = np.random.default_rng(7)
    n = 60
    sex = np.array(["F", "M"] * (n // 2))
    dice_a = np.clip(rng.normal(0.85, 0.05, n), 0, 1)
    dice_b = np.clip(dice_a - 0.04 - 0.05 * (sex == "F") + rng.normal(0, 0.03, n), 0, 1)  # worse, more so for F
    hd_a, hd_b = rng.gamma(2, 1.5, n), rng.gamma(2, 2.0, n)
    dice_a[3] = dice_b[3] = np.nan  # an empty true mask: no Dice, left out of the means
    patients = np.arange(n)  # one case per patient: scipy's jackknife leaves out the same units as ours
    metrics, fairness = compare_segmentations({"dice": dice_a, "hd95": hd_a}, {"dice": dice_b, "hd95": hd_b}, patients,
                                              groups={"sex": (sex, ["F", "M"])}, n_resamples=300, seed=4)
    dice, hd95 = metrics
    assert dice.a == pytest.approx(np.nanmean(dice_a)) and dice.b == pytest.approx(np.nanmean(dice_b))
    assert hd95.difference == pytest.approx(hd_a.mean() - hd_b.mean())
    known = ~np.isnan(dice_a)
    weights = np.concatenate(list(resample_patients(n, n_resamples=300, rng=np.random.default_rng(4))))
    diffs = np.array([np.average(dice_a[known] - dice_b[known], weights=w[known]) for w in weights])
    reference = stats.bootstrap((dice_a[known] - dice_b[known],), np.mean, method="BCa", n_resamples=0,
                                bootstrap_result=SimpleNamespace(bootstrap_distribution=diffs))
    low, high = reference.confidence_interval
    # scipy's jackknife leaves out each of the 59 known cases; ours each of 60 patients (one with no Dice), the same
    assert dice.ci95 == pytest.approx([low, high], abs=1e-9) and dice.better == "a"
    (gap,) = fairness
    by_group = lambda d: [np.nanmean(d[sex == g]) for g in ("F", "M")]  # noqa: E731
    assert gap.name == "sex.dice_gap"
    assert gap.a == pytest.approx(np.ptp(by_group(dice_a))) and gap.b == pytest.approx(np.ptp(by_group(dice_b)))
    assert gap.ci95[0] <= gap.difference <= gap.ci95[1] and gap.better == "a"


@pytest.mark.parametrize("damaged", ["image", "logged mask"])
def test_comparing_segmentations_names_a_file_it_cannot_read_with_its_case(tmp_path, seg2d_dataset, monkeypatch,
                                                                         damaged):
    import shutil

    import mlflow
    import nibabel as nib
    import pandas as pd

    from components.errors import EvaluationError
    from components.registry.compare import _segmentation_cases
    from components.registry.noninferiority import COMPARED_COLUMNS

    root = tmp_path / "data"
    shutil.copytree(seg2d_dataset.parent, root)
    manifest = pd.read_parquet(root / seg2d_dataset.name)
    test = manifest[manifest["split"] == "test"]
    folder = tmp_path / "report"
    (folder / "masks").mkdir(parents=True)
    for case, label in zip(test["case_id"], test["label"]):  # the evaluated version's masks: the true ones
        shutil.copy(root / label, folder / f"masks/{case}_mask.nii.gz")
    table = pd.DataFrame({"case_id": test["case_id"], "mask": [f"masks/{c}_mask.nii.gz" for c in test["case_id"]]})

    class Segmenter:  # the second version's pyfunc: background everywhere
        def predict(self, volume):
            return np.stack([np.ones_like(volume), np.zeros_like(volume)], axis=1)

    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda uri: Segmenter())
    first, second, joined = _segmentation_cases(folder, table, root / seg2d_dataset.name, "models:/seg/2",
                                                columns=[*COMPARED_COLUMNS, "sex", "scanner"])
    assert np.all(first["dice"] == 1.0) and len(second["dice"]) == len(test)  # the files as they are: read
    assert list(joined.columns) == ["case_id", "patient_id", "image", "label", "sex"]  # those the manifest has
    assert joined["case_id"].tolist() == test["case_id"].tolist()
    case = str(test["case_id"].iloc[-1])
    path = root / test["image"].iloc[-1] if damaged == "image" else folder / f"masks/{case}_mask.nii.gz"
    path.write_bytes(path.read_bytes()[:-20])  # cut short: the header reads, gzip runs out in the voxels
    assert nib.load(path).shape
    with pytest.raises(EvaluationError) as info:
        _segmentation_cases(folder, table, root / seg2d_dataset.name, "models:/seg/2")
    assert str(info.value).startswith(f"{case}: {damaged} {path} cannot be read (")


def test_a_classifier_is_compared_on_the_first_versions_cases_read_from_the_manifests_own_columns(tmp_path,
                                                                                                 monkeypatch):
    import pandas as pd

    from components.errors import EvaluationError
    from components.registry import compare
    from components.registry.noninferiority import COMPARED_COLUMNS

    y, good, weak, sex = _two_models(40, seed=5)
    cases = [f"c{i}" for i in range(len(y))]
    table = pd.DataFrame({"case_id": cases[::-1], "y_true": y[::-1], "prob": good[::-1]})  # the first version's
    manifest = pd.DataFrame({"case_id": cases, "patient_id": [f"p{i // 2}" for i in range(len(y))], "split": "test",
                             "label": y, "image": [f"images/{c}.nii.gz" for c in cases], "sex": sex,
                             "sha256": "0" * 64})
    manifest.to_parquet(tmp_path / "m.parquet")
    asked = []

    def second(uri, images):  # the second version's pyfunc: two classes' probabilities of the images asked for
        asked.append((uri, images))
        return np.stack([1 - weak, weak], axis=1)[[int(Path(p).name[1:-7]) for p in images]]

    monkeypatch.setattr(compare, "predict_images", second)
    joined, y_true, prob_a, prob_b = compare._classification_cases(
        table, tmp_path / "m.parquet", "models:/m/1", columns=[*COMPARED_COLUMNS, "sex", "race"], name="version 2's")
    assert asked == [("models:/m/1", [tmp_path / f"images/{c}.nii.gz" for c in cases[::-1]])]
    np.testing.assert_array_equal(y_true, y[::-1])
    np.testing.assert_array_equal(prob_a, good[::-1])
    np.testing.assert_array_equal(prob_b, weak[::-1])  # the positive class's, as the first version's
    assert {"patient_id", "image", "label", "sex"} <= set(joined.columns)
    assert set(joined.columns).isdisjoint({"split", "sha256"})  # only the columns asked for are read
    flipped = manifest.assign(label=np.where(manifest["case_id"] == "c7", 1 - y, y))
    flipped.to_parquet(tmp_path / "m.parquet")
    with pytest.raises(EvaluationError, match="c7"):  # the manifest's labels are read and checked
        compare._classification_cases(table, tmp_path / "m.parquet", "models:/m/1", columns=list(COMPARED_COLUMNS),
                                      name="version 2's")
