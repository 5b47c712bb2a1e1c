"""Derived tables the expectation suites run on: patients, duplicate images, groups, and drift.

Each function is plain pandas: one row per patient, per image hash, per group or
per drift quantity, so that a great-expectations column expectation on the
table names the offending patient, image or group in its examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# the previous version's manifest columns the drift tables read (the rest of it is left unread)
DRIFT_COLUMNS = ("label", "modality", "mean", "site")


def patients_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per patient with the number of splits its images fall in (leakage when > 1)."""
    return manifest.groupby("patient_id", as_index=False)["split"].nunique().rename(columns={"split": "n_splits"})


def duplicates_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct image content (sha256) with its cases and the number of splits they span."""
    grouped = manifest.groupby("sha256").agg(n_splits=("split", "nunique"),
                                             cases=("case_id", lambda c: ",".join(sorted(map(str, c)))))
    return grouped.reset_index()


def groups_table(manifest: pd.DataFrame, attributes: Sequence[str]) -> pd.DataFrame:
    """One row per (declared attribute, group) with its number of cases; a missing value is group ``unknown``."""
    rows = [
        {"attribute": a, "group": str(g), "n": int(n)}
        for a in attributes if a in manifest.columns
        for g, n in manifest[a].fillna("unknown").value_counts().items()
    ]
    return pd.DataFrame(rows, columns=["attribute", "group", "n"])


def label_drift_table(current: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """Per class: prevalence in the previous and the current version, and the absolute shift."""
    classes = sorted(set(current["label"].dropna()) | set(previous["label"].dropna()), key=str)
    now = current["label"].value_counts(normalize=True)
    before = previous["label"].value_counts(normalize=True)
    table = pd.DataFrame({"label": classes})
    table["previous"] = [float(before.get(c, 0.0)) for c in classes]
    table["current"] = [float(now.get(c, 0.0)) for c in classes]
    table["shift"] = (table["current"] - table["previous"]).abs()
    return table


def intensity_drift_table(current: pd.DataFrame, previous: pd.DataFrame) -> pd.DataFrame:
    """Per modality: mean image intensity before and now, and the shift in previous standard deviations.

    The standard deviation is that of the previous version's per-image means, so a
    shift of 1 moves the whole dataset by one typical between-image difference.
    """
    rows = []
    for modality in sorted(set(current["modality"].dropna()) & set(previous["modality"].dropna()), key=str):
        now = pd.to_numeric(current.loc[current["modality"] == modality, "mean"], errors="raise")
        before = pd.to_numeric(previous.loc[previous["modality"] == modality, "mean"], errors="raise")
        spread = float(before.std(ddof=1)) if len(before) > 1 else 0.0
        delta = abs(float(now.mean()) - float(before.mean()))
        shift = delta / spread if spread > 0 else (0.0 if delta == 0 else np.inf)
        rows.append({"modality": modality, "previous": float(before.mean()), "current": float(now.mean()), "shift": shift})
    return pd.DataFrame(rows, columns=["modality", "previous", "current", "shift"])


def site_changes(current: pd.DataFrame, previous: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Sites new in the current version, and sites it no longer has."""
    now, before = set(current["site"].dropna().astype(str)), set(previous["site"].dropna().astype(str))
    return sorted(now - before), sorted(before - now)
