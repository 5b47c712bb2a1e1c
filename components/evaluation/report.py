"""``evaluate_predictions``: any predictions table + a manifest -> report.json.

Predictions have ``case_id``, ``y_true`` and ``prob`` (binary) or
``prob_0..prob_{K-1}`` (multiclass); a multi-label table has
``y_true_0..y_true_{L-1}`` (0/1) and ``prob_0..prob_{L-1}`` instead. Group
columns come from the manifest joined on ``case_id``. The report follows shared/DESIGN.md's evaluation contract.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.labels import label_matrix, parse_label_set
from components.errors import EvaluationError
from components.evaluation.intervals import bootstrap_ci, per_class_intervals
from components.evaluation.declarations import DEFAULT_SPECIFICITY, MetricSettings
from components.evaluation.fairness import fairness_summary, group_metrics
from components.evaluation.metrics import classification_metrics, per_class_auc

DEFAULT_ATTRIBUTES = ("sex", "age_group", "race", "site")
MAX_LISTED = 5
PROB_TOLERANCE = 1e-4

NO_PROB_COLUMNS = "{path}: predictions need a 'prob' column (binary) or prob_0..prob_K-1 (multiclass)"
MISSING_COLUMN = "{path}: missing column {column!r}"
DUPLICATE_IDS = "{path}: duplicate case_id(s): {ids}"
UNKNOWN_IDS = "{path}: case_id(s) not in the manifest: {ids}"
NAN_VALUES = "{path}: NaN in {column} for case_id(s): {ids}"
OUT_OF_RANGE = "{path}: probabilities outside [0, 1] for case_id(s): {ids}"
NOT_NORMALISED = "{path}: class probabilities do not sum to 1 for case_id(s): {ids}"
BAD_LABELS = "{path}: y_true not in the class set {classes} for case_id(s): {ids}"
TEXT_LABELS = ("{path}: {column} holds text ({values}); give class numbers 0..{last} in the order of the probability "
               "columns (e.g. map {example})")
CONTRADICTED = ("{path}: y_true differs from the manifest's label for {count} of {n} cases ({ids}); are these "
                "predictions for this manifest, or were the labels recoded?")
LABEL_COLUMNS = "{path}: multi-label tables need y_true_j and prob_j for the same labels, got {y} and {prob}"
UNKNOWN_ATTRIBUTE = "manifest has no column {attribute!r} for the declared attribute"


@dataclass(frozen=True)
class EvaluationReport:
    """The evaluation of one set of predictions (see DESIGN.md for each field)."""

    task: str
    n: int
    n_patients: int
    threshold: float
    overall: dict
    ci95: dict
    groups: dict
    fairness: dict
    warnings: list[str] = field(default_factory=list)
    calibration: dict | None = None  # temperature scaling: the temperature and the metrics before/after
    shortcuts: dict | None = None  # attribute -> the shortcut audit (components.evaluation.shortcuts)
    per_class: dict | None = None  # multiclass and multi-label: "<k>" -> n_positive, auc and its ci95
    target_specificity: float = DEFAULT_SPECIFICITY  # where overall.sensitivity_at_specificity is read
    ordinal: bool = False  # ordered grades: overall.qwk
    external: dict | None = None  # study.external_sites: the contract on those sites' cases
    external_delta: dict | None = None  # external minus internal, per metric, with ci95

    def to_dict(self) -> dict:
        return asdict(self)

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)
        return path


def read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet table."""
    try:
        return pd.read_parquet(path) if Path(path).suffix == ".parquet" else pd.read_csv(path)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"cannot read {path}: {exc}") from exc


def _ids(values: Sequence) -> str:
    values = list(values)
    more = f" (+{len(values) - MAX_LISTED} more)" if len(values) > MAX_LISTED else ""
    return ", ".join(str(v) for v in values[:MAX_LISTED]) + more


def _numbered(predictions: pd.DataFrame, prefix: str) -> list[str]:
    found = sorted((int(m.group(1)), c) for c in predictions.columns if (m := re.fullmatch(prefix + r"_(\d+)", str(c))))
    return [c for i, (j, c) in enumerate(found) if i == j]


def probability_columns(predictions: pd.DataFrame, *, path: str = "predictions") -> list[str]:
    """``["prob"]`` for a binary table, ``prob_0..prob_{K-1}`` for a multiclass or multi-label one."""
    if "prob" in predictions.columns:
        return ["prob"]
    numbered = _numbered(predictions, "prob")
    if len(numbered) < 2 and not (numbered and "y_true_0" in predictions.columns):
        raise EvaluationError(NO_PROB_COLUMNS.format(path=path))
    return numbered


def label_columns(predictions: pd.DataFrame) -> list[str]:
    """``["y_true"]``, or ``y_true_0..y_true_{L-1}`` for a multi-label table."""
    return ["y_true"] if "y_true" in predictions.columns else _numbered(predictions, "y_true")


def check_predictions(
    predictions: pd.DataFrame, manifest: pd.DataFrame, *, path: str = "predictions"
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Join predictions with the manifest and check them.

    Returns:
        The joined table, ``y_true`` (N,) and ``prob`` (N,) or (N, K).

    Raises:
        EvaluationError: naming the rows (case ids) at fault.
    """
    targets = label_columns(predictions)
    for column in ["case_id", *([] if targets else ["y_true"])]:
        if column not in predictions.columns:
            raise EvaluationError(MISSING_COLUMN.format(path=path, column=column))
    if "case_id" not in manifest.columns:
        raise EvaluationError(MISSING_COLUMN.format(path="manifest", column="case_id"))
    columns = probability_columns(predictions, path=path)
    multilabel = targets != ["y_true"]
    if multilabel and len(targets) != len(columns):
        raise EvaluationError(LABEL_COLUMNS.format(path=path, y=targets, prob=columns))
    ids = predictions["case_id"].astype(str)
    if ids.duplicated().any():
        raise EvaluationError(DUPLICATE_IDS.format(path=path, ids=_ids(ids[ids.duplicated()].unique())))
    # an index lookup: pandas 3.1's isin on its string dtype took a second for 100,000 ids
    manifest_ids = manifest["case_id"].astype(str)
    known = pd.Index(manifest_ids.unique())
    unknown = ids[known.get_indexer(ids) < 0]
    if len(unknown):
        raise EvaluationError(UNKNOWN_IDS.format(path=path, ids=_ids(unknown)))
    # the predicted cases' rows: the copies below then grow with the predictions, not with every split's cases
    manifest = manifest[pd.Index(ids).get_indexer(manifest_ids) >= 0]
    for column in [*targets, *columns]:
        nan = ids[predictions[column].isna().to_numpy()]
        if len(nan):
            raise EvaluationError(NAN_VALUES.format(path=path, column=column, ids=_ids(nan)))
    prob = predictions[columns].to_numpy(dtype=np.float64)
    bad = ids[((prob < 0) | (prob > 1)).any(axis=1)]
    if len(bad):
        raise EvaluationError(OUT_OF_RANGE.format(path=path, ids=_ids(bad)))
    n_classes = 2 if columns == ["prob"] or multilabel else len(columns)
    if len(columns) > 1 and not multilabel:
        bad = ids[np.abs(prob.sum(axis=1) - 1) > PROB_TOLERANCE]
        if len(bad):
            raise EvaluationError(NOT_NORMALISED.format(path=path, ids=_ids(bad)))
    for column in targets:
        if not pd.api.types.is_numeric_dtype(predictions[column]) and not pd.api.types.is_bool_dtype(predictions[column]):
            numbers = pd.to_numeric(predictions[column], errors="coerce")
            if numbers.isna().any():
                values = sorted(map(str, predictions[column][numbers.isna()].unique()))
                example = ", ".join(f"{v}={i}" for i, v in enumerate(values[:n_classes]))
                raise EvaluationError(TEXT_LABELS.format(path=path, column=column, last=n_classes - 1, example=example,
                                                         values=", ".join(repr(v) for v in values[:MAX_LISTED])))
    y_float = predictions[targets].apply(pd.to_numeric).to_numpy(dtype=np.float64)
    bad = ids[~np.isin(y_float, np.arange(n_classes)).all(axis=1)]
    if len(bad):
        raise EvaluationError(BAD_LABELS.format(path=path, classes=list(range(n_classes)), ids=_ids(bad)))
    _check_against_manifest(ids, y_float, manifest, multilabel=multilabel, path=path)
    if not multilabel:
        y_float = y_float[:, 0]
        # contract layout: (N,) positive-class probability for binary tables, given either way
        prob = prob[:, 0] if columns == ["prob"] else prob[:, 1] if prob.shape[1] == 2 else prob
    extra = manifest.drop(columns=[c for c in manifest.columns if c in predictions.columns and c != "case_id"])
    extra = extra.assign(case_id=extra["case_id"].astype(str)).drop_duplicates("case_id")
    joined = predictions.assign(case_id=ids).merge(extra, on="case_id", how="left", validate="one_to_one")
    return joined, y_float.astype(int), prob


def _check_against_manifest(ids: pd.Series, y: np.ndarray, manifest: pd.DataFrame, *, multilabel: bool,
                            path: str) -> None:
    """Refuse labels that contradict the manifest's own ``label`` column, where it holds class labels
    (class numbers, or ``0|2`` sets for multi-label; mask paths and text are not compared)."""
    if "label" not in manifest.columns:
        return
    labels = manifest.assign(case_id=manifest["case_id"].astype(str)).drop_duplicates("case_id").set_index("case_id")
    cells = labels["label"].reindex(ids.to_numpy())
    if multilabel:
        n_labels = y.shape[1]
        sets = cells.map(lambda v: parse_label_set(v, n_labels) if isinstance(v, str) else None)
        known = sets.notna().to_numpy()
        if not known.any():
            return
        expected = label_matrix(sets[known], n_labels)
        differs = np.zeros(len(ids), dtype=bool)
        differs[known] = (expected != y[known]).any(axis=1)
    else:
        expected = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64)
        known = ~np.isnan(expected)
        if not known.any():
            return
        differs = known & (expected != y[:, 0])
    if differs.any():
        raise EvaluationError(CONTRADICTED.format(path=path, count=int(differs.sum()), n=len(ids),
                                                  ids=_ids(ids[differs])))


def evaluate_predictions(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame,
    *,
    attributes: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 10,
    source: str = "predictions",
    target_specificity: float = DEFAULT_SPECIFICITY,
    ordinal: bool = False,
) -> EvaluationReport:
    """Evaluate predictions against the evaluation contract.

    Args:
        predictions: ``case_id``, ``y_true``, ``prob`` or ``prob_0..prob_{K-1}``.
        manifest: at least ``case_id``; ``patient_id`` for the bootstrap (else each
            case is its own patient) and the group columns.
        attributes: group columns to break down by; those of :data:`DEFAULT_ATTRIBUTES`
            present in the manifest when None.
        threshold: decision threshold on the positive-class probability (binary).
        n_bootstrap: patient-level resamples for ``ci95``; 0 skips it.
        seed: bootstrap seed.
        min_group_size: groups smaller than this are reported with a warning and
            left out of the fairness gaps.
        source: name of the predictions in error messages.
        target_specificity: the specificity at which ``overall.sensitivity_at_specificity`` is read.
        ordinal: the classes are ordered grades: adds ``overall.qwk`` (quadratic weighted kappa).
    """
    joined, y_true, prob = check_predictions(predictions, manifest, path=source)
    if not 0 < target_specificity < 1:
        raise EvaluationError(f"target specificity must be between 0 and 1, not {target_specificity:g}")
    if ordinal and y_true.ndim == 2:
        raise EvaluationError(f"{source}: ordinal grades need one class per case, not multi-label columns")
    settings = MetricSettings(specificity=target_specificity, ordinal=ordinal)
    if attributes is None:
        attributes = [a for a in DEFAULT_ATTRIBUTES if a in joined.columns]
    for attribute in attributes:
        if attribute not in joined.columns:
            raise EvaluationError(UNKNOWN_ATTRIBUTE.format(attribute=attribute))
    patients = joined["patient_id"].astype(str).to_numpy() if "patient_id" in joined else joined["case_id"].to_numpy()
    overall = classification_metrics(y_true, prob, threshold=threshold, settings=settings)
    groups, fairness, warnings = {}, {}, []
    for attribute in attributes:
        column = joined[attribute]
        groups[attribute] = group_metrics(y_true, prob, column, threshold=threshold, settings=settings)
        for group, metrics in groups[attribute].items():
            if metrics["n"] < min_group_size:
                warnings.append(
                    f"{attribute}={group}: {metrics['n']} cases, below min_group_size {min_group_size}; "
                    "left out of the fairness gaps"
                )
        fairness[attribute] = fairness_summary(
            y_true, prob, column, groups[attribute],
            overall_auc=overall["auc"], threshold=threshold, min_group_size=min_group_size,
        )
    intervals = bootstrap_ci(
        y_true, prob, patients, threshold=threshold, n_resamples=n_bootstrap, seed=seed,
        groups={a: joined[a].fillna("unknown").astype(str).to_numpy() for a in attributes},
        compared={a: fairness[a]["groups_compared"] for a in attributes}, settings=settings,
    )
    per_class = per_class_auc(y_true, prob) if prob.ndim == 2 else None
    if per_class is not None and n_bootstrap:
        for k, interval in per_class_intervals(y_true, prob, patients, n_resamples=n_bootstrap, seed=seed).items():
            per_class[k]["ci95"] = {"auc": interval}
    if n_bootstrap:
        for attribute in attributes:
            for group, metrics in groups[attribute].items():
                metrics["ci95"] = intervals.groups[attribute][group]
            fairness[attribute]["ci95"] = intervals.gaps[attribute]
    ci95 = intervals.overall
    return EvaluationReport(
        task="multilabel" if y_true.ndim == 2 else "binary" if prob.ndim == 1 else "multiclass",
        n=len(y_true),
        n_patients=len(np.unique(patients)),
        threshold=threshold,
        overall=overall,
        ci95=ci95,
        groups=groups,
        fairness=fairness,
        warnings=warnings,
        per_class=per_class,
        target_specificity=target_specificity,
        ordinal=ordinal,
    )
