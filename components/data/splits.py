"""Patient-level splits, stratified by label (and site), deterministic for a seed.

scikit-learn's group splitters re-draw every patient when the cohort grows; here
each patient's place inside its stratum is ranked by a seeded hash of its
pseudonym, so the assignment depends only on the seed and the cohort.
"""

from __future__ import annotations

import hashlib

import pandas as pd

SPLITS = ("train", "val", "test")


def assign_splits(
    cases: pd.DataFrame, *, val: float, test: float, seed: int, stratify_site: bool = True
) -> pd.Series:
    """Split name per row of ``cases``; every image of a patient gets the same split.

    Args:
        cases: one row per image with ``patient_id`` and ``label`` (and ``site``).
        val: fraction of patients in the validation split, per stratum.
        test: fraction of patients in the test split, per stratum.
        seed: the same seed and cohort give the same splits.
        stratify_site: stratify by site too when a ``site`` column exists.

    Returns:
        A Series aligned with ``cases.index`` holding ``train``, ``val`` or ``test``.
    """
    keys = ["label"] + (["site"] if stratify_site and "site" in cases.columns else [])
    patients = cases.groupby("patient_id", sort=True).agg({k: "max" for k in keys})
    patients["rank_key"] = [
        hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest() for pid in patients.index
    ]
    split_of: dict[str, str] = {}
    for _, stratum in patients.groupby(keys, sort=True):
        ordered = stratum.sort_values("rank_key").index
        n = len(ordered)
        n_test = max(1, round(n * test)) if n >= 3 else 0
        n_val = max(1, round(n * val)) if n >= 3 and val > 0 else 0
        for i, pid in enumerate(ordered):
            split_of[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return cases["patient_id"].map(split_of).rename("split")
