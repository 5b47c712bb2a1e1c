"""Compare two registered versions on the same test cases: every metric of each, their paired
patient-level difference and its BCa interval (both models' predictions resampled by the same patients,
as non-inferiority resamples them), and the fairness gaps the same way.

The first version's evaluation (its test predictions, as ``medflow run`` logged them) fixes the cases;
the second version's pyfunc predicts those images, so the two models are judged on identical patients.
Segmentation versions are compared on per-case Dice and HD95 (the first version's logged masks, the
second's pyfunc segmenting the same volumes) and on each attribute's Dice gap.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import lineage, paths
from components.data.ingest import load_manifest
from components.data.versioning import read_version
from components.errors import RegistryError
from components.evaluation.bootstrap import (
    ResampledStatistics,
    jackknife_rows,
    patient_codes,
    patient_draws,
    resample_patients,
)
from components.evaluation.intervals import bca_interval
from components.evaluation.declarations import METRICS, metric as declared
from components.evaluation.report import DEFAULT_ATTRIBUTES, check_predictions, read_table
from components.inference.predict import predict_images
from components.inference.results import REPORT_DIR
from components.registry.noninferiority import COMPARED_COLUMNS
from components.registry.promote import check_version


@dataclass(frozen=True)
class Row:
    """One compared quantity: each version's value, ``a - b`` and its paired interval."""

    name: str
    a: float | None
    b: float | None
    difference: float | None
    ci95: list[float] | None
    better: str  # "a", "b" or "" (the interval holds 0, or the quantity has no direction)


@dataclass(frozen=True)
class Comparison:
    """Two versions on the first one's test cases."""

    model: str
    a: str
    b: str
    n: int
    n_patients: int
    data_version: str
    metrics: list[Row]
    fairness: list[Row]

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path


def _row(name: str, point_a, point_b, resampled, jackknifed, *, higher_is_better: bool | None) -> Row:
    a, b = float(point_a[0]), float(point_b[0])
    if np.isnan(a) or np.isnan(b):
        return Row(name, None if np.isnan(a) else a, None if np.isnan(b) else b, None, None, "")
    difference = a - b
    ci = bca_interval(difference, resampled, jackknifed)
    better = ""
    if ci is not None and higher_is_better is not None and not ci[0] <= 0 <= ci[1]:
        better = "a" if (ci[0] > 0) == higher_is_better else "b"
    return Row(name, a, b, difference, ci, better)


def compare_predictions(y_true: np.ndarray, prob_a: np.ndarray, prob_b: np.ndarray, patient_ids: np.ndarray, *,
                        groups: dict[str, np.ndarray], threshold: float = 0.5, n_resamples: int = 1000,
                        seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Metric rows and fairness rows of two sets of predictions of the same cases (see the module docstring)."""
    codes = patient_codes(patient_ids)
    n_patients = int(codes.max()) + 1
    stats_a = ResampledStatistics(y_true, prob_a, codes, threshold=threshold, groups=groups)
    stats_b = ResampledStatistics(y_true, prob_b, codes, threshold=threshold, groups=groups)

    def rows() -> tuple:  # the same weight rows through both models: the jackknife's, the resamples, the point
        return (jackknife_rows(n_patients), patient_draws(n_patients, n_resamples=n_resamples,
                                                          rng=np.random.default_rng(seed)), [np.ones((1, n_patients))])

    (jack_a, res_a, point_a), (jack_b, res_b, point_b) = stats_a.each(*rows()), stats_b.each(*rows())
    metrics = [
        _row(m.name, point_a[0][m.name], point_b[0][m.name], res_a[0][m.name] - res_b[0][m.name],
             jack_a[0][m.name] - jack_b[0][m.name], higher_is_better=m.higher_is_better)
        for m in METRICS if m.weighted is not None and m.name in point_a[0]
    ]
    fairness = [
        _row(f"{attribute}.{name}", point_a[2][attribute][name], point_b[2][attribute][name],
             res_a[2][attribute][name] - res_b[2][attribute][name],
             jack_a[2][attribute][name] - jack_b[2][attribute][name],
             higher_is_better=declared(name).higher_is_better)
        for attribute in point_a[2] for name in ("auc_gap", "es_auc")
    ]
    return metrics, fairness


def _segmentation_statistics(values: dict[str, np.ndarray], codes: np.ndarray, blocks,
                             groups: dict[str, tuple[np.ndarray, list[str]]]) -> dict[str, np.ndarray]:
    """Mean Dice and HD95 (over the cases that have them) and each attribute's Dice gap (between the groups
    the report compared) for every weight row of ``blocks`` (patients' weights)."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*values, *(f"{a}.dice_gap" for a in groups)]}
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without a group's cases: no mean
        for rows in blocks:
            weights = rows[:, codes]
            for name, v in values.items():
                known = ~np.isnan(v)
                out[name].append(weights[:, known] @ v[known] / weights[:, known].sum(axis=1))
            dice, known = values["dice"], ~np.isnan(values["dice"])
            for attribute, (labels, compared) in groups.items():
                means = np.array([weights[:, (labels == g) & known] @ dice[(labels == g) & known]
                                  / weights[:, (labels == g) & known].sum(axis=1) for g in compared])
                gap = np.nanmax(means, axis=0) - np.nanmin(means, axis=0) if len(compared) >= 2 else np.full(len(rows), np.nan)
                out[f"{attribute}.dice_gap"].append(gap)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def compare_segmentations(a: dict[str, np.ndarray], b: dict[str, np.ndarray], patient_ids: np.ndarray, *,
                          groups: dict[str, tuple[np.ndarray, list[str]]], n_resamples: int = 1000,
                          seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Metric rows (Dice, HD95) and fairness rows (Dice gaps) of two models' per-case ``dice`` and ``hd95`` on
    the same cases, the differences resampled by patient as for classifiers."""
    codes = patient_codes(patient_ids)
    n_patients = int(codes.max()) + 1

    def both(blocks):
        blocks = list(blocks)
        first, second = _segmentation_statistics(a, codes, blocks, groups), _segmentation_statistics(b, codes, blocks, groups)
        return first, second

    (point_a, point_b) = both([np.ones((1, n_patients))])
    res_a, res_b = both(resample_patients(n_patients, n_resamples=n_resamples, rng=np.random.default_rng(seed)))
    jack_a, jack_b = both(jackknife_rows(n_patients))

    def row(name: str, higher_is_better: bool) -> Row:
        return _row(name, point_a[name], point_b[name], res_a[name] - res_b[name], jack_a[name] - jack_b[name],
                    higher_is_better=higher_is_better)

    metrics = [row("dice", True), row("hd95", False)]
    fairness = [row(f"{attribute}.dice_gap", False) for attribute in groups]
    return metrics, fairness


def _segmentation_cases(folder: Path, table, manifest_path: Path, model_uri: str, *,
                        columns: list[str] | None = None) -> tuple[dict, dict, object]:
    """Per-case Dice and HD95 of the evaluated version (its logged masks) and of ``model_uri`` (its pyfunc
    segmenting the same volumes), and the joined manifest rows (of ``columns``, those the manifest has; None:
    every column)."""
    from components.evaluation.segmentation import case_metrics, load_volume  # noqa: PLC0415
    from components.inference.predict import read_image  # noqa: PLC0415
    from components.progress import track  # noqa: PLC0415

    manifest = load_manifest(manifest_path, columns=columns).assign(case_id=lambda m: m["case_id"].astype(str))
    manifest = manifest.set_index("case_id")
    joined = manifest.loc[table["case_id"].astype(str)].reset_index()
    model = mlflow.pyfunc.load_model(model_uri)
    first, second = {"dice": [], "hd95": []}, {"dice": [], "hd95": []}
    cases = list(zip(table["case_id"].astype(str), table["mask"], joined["image"], joined["label"]))
    for case_id, mask, image, label in track(cases, description="Segmenting with the second version"):
        # a file that cannot be read ends in one line naming the case and the file
        truth, spacing = load_volume(manifest_path.parent / label, case=case_id, what="true mask")
        volume, _ = read_image(manifest_path.parent / image, case=case_id)
        prob = model.predict(volume[None])
        classes = prob.shape[1]
        logged, _ = load_volume(folder / mask, case=case_id, what="logged mask")
        for scores, predicted in ((first, logged), (second, prob[0].argmax(axis=0))):
            case = case_metrics(predicted, truth, spacing=spacing, num_classes=classes)
            for name in scores:
                scores[name].append(np.nan if case[name] is None else case[name])
    as_arrays = lambda d: {k: np.asarray(v, dtype=float) for k, v in d.items()}  # noqa: E731
    return as_arrays(first), as_arrays(second), joined


def _classification_cases(table, manifest_path: Path, model_uri: str, *, columns: list[str],
                          name: str) -> tuple[object, np.ndarray, np.ndarray, np.ndarray]:
    """The evaluated version's predictions joined to the manifest's rows (of ``columns``, those the manifest has),
    their true labels and probabilities, and ``model_uri``'s probabilities of the same images (the positive
    class's where the first version's are)."""
    manifest = load_manifest(manifest_path, columns=columns)
    joined, y_true, prob_a = check_predictions(table, manifest, path=name)
    prob_b = predict_images(model_uri, [manifest_path.parent / p for p in joined["image"]])
    if prob_b.ndim == 2 and prob_b.shape[1] == 2 and prob_a.ndim == 1:
        prob_b = prob_b[:, 1]
    return joined, y_true, prob_a, prob_b


def compare_versions(*, model_name: str, a: str, b: str | None = None, n_resamples: int = 1000, seed: int = 0,
                     threshold: float = 0.5) -> Comparison:
    """Version ``a`` against ``b`` (default: the champion) on ``a``'s test cases.

    Raises:
        RegistryError: an unknown model or version, no champion to compare with, an evaluation missing from
            ``a``'s run, or a workspace that does not hold ``a``'s test data.
    """
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    check_version(client, model_name, a)
    if b is None:
        try:
            b = str(client.get_model_version_by_alias(model_name, "champion").version)
        except MlflowException as exc:
            raise RegistryError(f"{model_name} has no champion to compare version {a} with; name a version") from exc
    check_version(client, model_name, b)
    version = client.get_model_version(model_name, a)
    dataset, data_version = version.tags.get(lineage.TAG_DATASET, ""), version.tags.get(lineage.TAG_DATA_VERSION, "")
    dvc_file, manifest_path = paths.data_root() / f"{dataset}.dvc", paths.data_root() / dataset / "manifest.parquet"
    if not (dataset and dvc_file.exists() and manifest_path.exists() and read_version(dvc_file) == data_version):
        raise RegistryError(f"this workspace does not hold the test data of version {a} ({dataset}@{data_version[:12]}); "
                            f"run from its workspace, or restore it with medflow data checkout")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=REPORT_DIR,
                                                              dst_path=tmp))
        except MlflowException as exc:
            raise RegistryError(f"version {a} of {model_name} has no evaluation in run {version.run_id}") from exc
        report = json.loads((folder / "report.json").read_text())
        table = read_table(folder / "predictions.parquet")
        # the manifest's columns the comparison reads: the cases' ids, patients, images and labels, and the groups
        columns = [*COMPARED_COLUMNS, *DEFAULT_ATTRIBUTES, *report.get("fairness", {})]
        if report["task"] == "segmentation":
            first, second, joined = _segmentation_cases(folder, table, manifest_path, f"models:/{model_name}/{b}",
                                                        columns=columns)
            groups = {x: (joined[x].fillna("unknown").astype(str).to_numpy(), f["groups_compared"])
                      for x, f in report["fairness"].items() if x in joined.columns}
            metrics, fairness = compare_segmentations(first, second, joined["patient_id"].astype(str).to_numpy(),
                                                      groups=groups, n_resamples=n_resamples, seed=seed)
            return Comparison(model=model_name, a=a, b=b, n=len(joined), n_patients=int(joined["patient_id"].nunique()),
                              data_version=data_version, metrics=metrics, fairness=fairness)
    joined, y_true, prob_a, prob_b = _classification_cases(table, manifest_path, f"models:/{model_name}/{b}",
                                                           columns=columns, name=f"version {a}'s predictions")
    attributes = [x for x in DEFAULT_ATTRIBUTES if x in joined.columns]
    groups = {x: joined[x].fillna("unknown").astype(str).to_numpy() for x in attributes}
    metrics, fairness = compare_predictions(y_true, prob_a, prob_b, joined["patient_id"].astype(str).to_numpy(),
                                            groups=groups, threshold=threshold, n_resamples=n_resamples, seed=seed)
    return Comparison(model=model_name, a=a, b=b, n=len(joined), n_patients=int(joined["patient_id"].nunique()),
                      data_version=data_version, metrics=metrics, fairness=fairness)
