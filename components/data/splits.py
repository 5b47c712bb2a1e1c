"""Patient-level splits, stratified by label (and site), deterministic for a seed, stable under growth.

scikit-learn's group splitters re-draw every patient when the cohort grows; here
each patient's place inside its stratum is ranked by a seeded hash of its ID, so
the assignment depends only on the seed and the cohort. Patients that already
have a split keep it; new patients fill each stratum towards its target counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import pandas as pd

SPLITS = ("train", "val", "test")


def _targets(n: int, *, val: float, test: float) -> tuple[int, int]:
    """(test, val) patients of a stratum of ``n``; strata under 3 patients all train."""
    n_test = max(1, round(n * test)) if n >= 3 else 0
    n_val = max(1, round(n * val)) if n >= 3 and val > 0 else 0
    return n_test, n_val


def assign_splits(
    cases: pd.DataFrame,
    *,
    val: float,
    test: float,
    seed: int,
    stratify_site: bool = True,
    previous: Mapping[str, str] | None = None,
    rank_ids: pd.Series | None = None,
) -> pd.Series:
    """Split name per row of ``cases``; every image of a patient gets the same split.

    Args:
        cases: one row per image with ``patient_id`` and ``label`` (and ``site``).
        val: fraction of patients in the validation split, per stratum.
        test: fraction of patients in the test split, per stratum.
        seed: the same seed and cohort give the same splits.
        stratify_site: stratify by site too when a ``site`` column exists.
        previous: split of patients already assigned (by ``patient_id``); they keep it.
        rank_ids: per row, the ID a new patient is ranked by (default ``patient_id``).

    Returns:
        A Series aligned with ``cases.index`` holding ``train``, ``val`` or ``test``.
    """
    previous = dict(previous or {})
    keys = ["label"] + (["site"] if stratify_site and "site" in cases.columns else [])
    frame = cases.assign(rank_id=rank_ids if rank_ids is not None else cases["patient_id"])
    patients = frame.groupby("patient_id", sort=True).agg({**{k: "max" for k in keys}, "rank_id": "first"})
    patients["rank_key"] = [hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest() for rid in patients["rank_id"]]
    split_of: dict[str, str] = {}
    for _, stratum in patients.groupby(keys, sort=True):
        kept = [pid for pid in stratum.index if pid in previous]
        split_of.update({pid: previous[pid] for pid in kept})
        n_test, n_val = _targets(len(stratum), val=val, test=test)
        need_test = max(0, n_test - sum(previous[p] == "test" for p in kept))
        need_val = max(0, n_val - sum(previous[p] == "val" for p in kept))
        new = stratum.drop(index=kept).sort_values("rank_key").index
        for i, pid in enumerate(new):
            split_of[pid] = "test" if i < need_test else "val" if i < need_test + need_val else "train"
    return cases["patient_id"].map(split_of).rename("split")
