"""The labels CSV of an export: reading and checking it (:func:`read_labels`), its rows a chunk at a time
(:func:`label_rows`), age groups, and multi-label cells, a set of classes written ``0|2`` (pandas and
scikit-learn have no text form of a label set for a CSV cell; this is it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components.errors import IngestError

LABEL_SEPARATOR = "|"
REQUIRED_COLUMNS = ("path", "label")
OPTIONAL_COLUMNS = ("patient_id", "sex", "age", "race", "site")
ROWS_AT_ONCE = 1024  # rows of the labels held as dicts at once by label_rows


def parse_label_set(value: object, num_classes: int) -> str | None:
    """A multi-label cell (``"2|0"``; empty or missing for none) as its canonical form ``"0|2"``; None when invalid."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or not str(value).strip():
        return ""
    parts = [p.strip() for p in str(value).split(LABEL_SEPARATOR)]
    if not all(p.isdigit() and int(p) < num_classes for p in parts):
        return None
    return LABEL_SEPARATOR.join(str(k) for k in sorted({int(p) for p in parts}))


def label_matrix(labels: pd.Series, num_classes: int) -> np.ndarray:
    """(N, L) 0/1 of canonical multi-label cells."""
    out = np.zeros((len(labels), num_classes), dtype=np.int64)
    for i, cell in enumerate(labels):
        for k in str(cell).split(LABEL_SEPARATOR) if cell else ():
            out[i, int(k)] = 1
    return out


def age_group(age: float, bins: Sequence[int]) -> str:
    """Age group label for ``age`` in years with cut points ``bins``: ``<40``, ``40-59``, ``60+``."""
    if pd.isna(age):
        return "unknown"
    edges = list(bins)
    if age < edges[0]:
        return f"<{edges[0]}"
    for low, high in zip(edges, edges[1:]):
        if low <= age < high:
            return f"{low}-{high - 1}"
    return f"{edges[-1]}+"


def read_labels(labels_csv: Path, *, task: str, fmt: str, num_classes: int
                ) -> tuple[pd.DataFrame, list[tuple[int, str]]]:
    """Read the labels CSV of an export in ``fmt`` for ``task`` and check its rows.

    Returns:
        The table (``label`` as int for classification) and the problems of single
        rows as (row index, message); rows with problems are still in the table.

    Raises:
        IngestError: when the file cannot be read or lacks a required column.
    """
    try:
        # index_col=False: a row with more fields than the header is an error, never an implicit index
        labels = pd.read_csv(labels_csv, dtype=str, index_col=False, keep_default_na=True)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise IngestError(f"cannot read labels file {labels_csv}: {exc}") from exc
    labels = labels.reset_index(drop=True)
    required = ("path",) if task == "unlabelled" else REQUIRED_COLUMNS
    missing = [c for c in required if c not in labels.columns]
    if fmt != "dicom" and "patient_id" not in labels.columns:
        missing.append("patient_id")
    if missing:
        raise IngestError(
            f"{labels_csv}: missing column(s) {', '.join(missing)}; "
            f"expected {','.join(required)} and optionally {','.join(OPTIONAL_COLUMNS)}"
            + ("" if fmt == "dicom" else f" (patient_id is required for {fmt} sources)")
        )
    duplicated = labels["path"][labels["path"].duplicated()]
    problems = [(i, f"{labels_csv} row {i + 2}: duplicate path {p}") for i, p in duplicated.items()]
    problems += [(i, f"{labels_csv} row {i + 2}: empty path") for i in labels.index[labels["path"].isna()]]
    if task == "classification":
        numeric = pd.to_numeric(labels["label"], errors="coerce")
        bad = labels.index[numeric.isna() | ~numeric.isin(range(num_classes))]
        problems += [
            (i, f"{labels_csv} row {i + 2}: label {str(labels.at[i, 'label'])!r} not in 0..{num_classes - 1}")
            for i in bad
        ]
        labels["label"] = numeric.fillna(-1).astype(int)
    elif task == "multilabel":
        parsed = [parse_label_set(v, num_classes) for v in labels["label"]]
        problems += [(i, f"{labels_csv} row {i + 2}: label {str(labels.at[i, 'label'])!r} is not a set of classes "
                         f"in 0..{num_classes - 1} written like 0{LABEL_SEPARATOR}2")
                     for i, v in zip(labels.index, parsed) if v is None]
        labels["label"] = [v if v is not None else "" for v in parsed]
    elif task == "unlabelled":  # images only: a label column, if any, is not kept
        labels["label"] = ""
    else:
        problems += [(i, f"{labels_csv} row {i + 2}: no mask path in column label")
                     for i in labels.index[labels["label"].isna()]]
    if "patient_id" in labels.columns and fmt != "dicom":
        problems += [(i, f"{labels_csv} row {i + 2}: empty patient_id")
                     for i in labels.index[labels["patient_id"].isna()]]
    if "age" in labels.columns:
        age = pd.to_numeric(labels["age"], errors="coerce")
        bad = labels.index[age.isna() & labels["age"].notna()]
        problems += [(i, f"{labels_csv} row {i + 2}: age {labels.at[i, 'age']!r} is not a number") for i in bad]
        labels["age"] = age
    return labels, problems


def label_rows(labels: pd.DataFrame, rows: int = ROWS_AT_ONCE) -> Iterator[tuple[int, dict]]:
    """Each row of ``labels`` with its index, as a dict of plain Python values (``iterrows`` builds a Series a
    row, ten times slower), ``rows`` rows at a time."""
    for start in range(0, len(labels), rows):
        chunk = labels.iloc[start:start + rows]
        yield from zip(chunk.index, chunk.to_dict("records"))
