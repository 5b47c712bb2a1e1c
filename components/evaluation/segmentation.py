"""Segmentation evaluation: Dice and HD95 per case (MONAI), the group breakdown
with ES-Dice, voxel-level calibration, and patient-level bootstrap intervals.

Predictions: ``case_id``, ``mask`` (predicted label map, NIfTI) and optionally
``prob_map`` (foreground probability, NIfTI, binary tasks) with paths relative
to the predictions file; the manifest's ``label`` column holds the true mask
path relative to the manifest's folder. Layout of every volume: (H, W[, D]).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance, get_mask_edges, get_surface_distance
from scipy import ndimage

from components.data.sources import NIFTI_ERRORS
from components.errors import EvaluationError
from components.evaluation.bootstrap import jackknife_rows, resample_weights
from components.evaluation.intervals import bca_interval
from components.evaluation.fairness import equity_scaled
from components.evaluation.metrics import ECE_BINS
from components.evaluation.report import DEFAULT_ATTRIBUTES, DUPLICATE_IDS, MISSING_COLUMN, UNKNOWN_IDS, EvaluationReport, _ids

SEG_METRICS = ("dice", "hd95")
# a KD-tree query step costs about 1.9x a distance-transform voxel (scipy, measured on a full-size CT)
DENSE_PER_QUERY = 0.54
BAD_VOLUME = "{case}: {what} {path} {problem}"
CALIBRATION_CHUNK = 1 << 22  # voxels binned at a time for the voxel ECE


def load_volume(path: Path, *, case: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Voxel array and voxel spacing (mm) of a NIfTI file."""
    try:
        image = nib.load(path)
        return np.asarray(image.dataobj), np.asarray(image.header.get_zooms()[: len(image.shape)], dtype=float)
    except NIFTI_ERRORS as exc:
        raise EvaluationError(BAD_VOLUME.format(case=case, what=what, path=path, problem=f"cannot be read ({exc})")) from exc


def case_metrics(pred: np.ndarray, truth: np.ndarray, *, spacing: Sequence[float], num_classes: int) -> dict:
    """Dice (mean over foreground classes) and HD95 in mm of one case; None where undefined.

    Args:
        pred: (H, W[, D]) predicted label map.
        truth: (H, W[, D]) true label map, same shape.
        spacing: voxel size in mm per axis.
        num_classes: label values are 0 (background) .. num_classes - 1.
    """
    dice = _dice(pred, truth, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an empty class gives inf/nan, reported as None below
        # MONAI 1.6 passes its own deprecated get_mask_edges argument from get_edge_surface_distance
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        hd = [hd95(torch.as_tensor(pred == c), torch.as_tensor(truth == c), spacing=spacing, class_index=c)
              for c in range(1, num_classes)]
    finite = lambda v: [float(x) for x in v if math.isfinite(float(x))]  # noqa: E731
    dices, hds = finite(dice), finite(hd)
    return {"dice": float(np.mean(dices)) if dices else None, "hd95": float(np.mean(hds)) if hds else None}


def case_dice(pred: np.ndarray, truth: np.ndarray, *, num_classes: int) -> float | None:
    """Dice of one case alone, as ``case_metrics`` gives it: without HD95, whose surface distances cost
    minutes on a full-size CT, for callers that only rank cases (the report's overlays)."""
    dice = _dice(pred, truth, num_classes)
    known = [float(x) for x in dice if math.isfinite(float(x))]
    return float(np.mean(known)) if known else None


def _dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> torch.Tensor:
    """Each foreground class's Dice (MONAI's, nan where the truth lacks the class), from the label maps as they
    are: no int64 or one-hot copies, which on a full-size CT were 1.9 GB."""
    return compute_dice(torch.as_tensor(pred)[None, None], torch.as_tensor(truth)[None, None],
                        include_background=False, ignore_empty=True, num_classes=num_classes)[0]


def hd95(pred: torch.Tensor, truth: torch.Tensor, *, spacing: Sequence[float], class_index: int) -> float:
    """The symmetric 95th-percentile Hausdorff distance (mm) of one class's binary masks, as MONAI's
    ``compute_hausdorff_distance(percentile=95)`` gives it: 0 when neither has the class, inf when one lacks it.

    MONAI takes the percentile with ``torch.quantile``, which refuses more than 16M values: a full-size CT
    (512x512x300) with a ragged prediction has more surface voxels than that, and its evaluation failed. The
    surface voxels are MONAI's (and, where a mask is empty, its whole answer); the distances are MONAI's KD-tree's
    or scipy's distance transform's, whichever is cheaper (:func:`surface_distances`); numpy takes the percentile
    (the same linear interpolation), at any size."""
    edges_pred, edges_truth = get_mask_edges(pred, truth, crop=True)
    if edges_pred.any() and edges_truth.any():
        return float(max(np.percentile(surface_distances(a, b, spacing=spacing), 95)
                         for a, b in ((edges_pred, edges_truth), (edges_truth, edges_pred))))
    _, distances, _ = get_edge_surface_distance(pred, truth, distance_metric="euclidean", spacing=list(spacing),
                                                symmetric=True, class_index=class_index)
    if len(distances) == 0:
        return 0.0
    # np.max, as MONAI's torch.max, lets a direction without distances (nan) win; Python's max would not.
    # Against an empty mask every distance is inf, and the percentile's interpolation (inf - inf) is nan, as
    # torch.quantile's: the same value, without numpy's warning.
    with np.errstate(invalid="ignore"):
        return float(np.max([np.percentile(d.cpu().numpy(), 95) if d.numel() else math.nan for d in distances]))


def surface_distances(edges_from: torch.Tensor, edges_to: torch.Tensor, *, spacing: Sequence[float],
                      dense: bool | None = None) -> np.ndarray:
    """The Euclidean distance (mm) from each voxel of ``edges_from`` to the nearest of ``edges_to`` (both
    non-empty, same shape), exactly, by the cheaper of two ways: MONAI's (a KD-tree of ``edges_to`` queried by
    every voxel of ``edges_from``) or scipy's distance transform of the whole (cropped) grid.

    MONAI takes the KD-tree on the CPU whatever the sizes; against a ragged prediction of a full-size CT (10M
    surface voxels querying a lesion's 6k) that was 56 s of a case's 58, where the transform takes 18 s.
    ``dense`` forces one way (tests); by default the queries' cost (each about log2 of the tree's size) is
    weighed against the grid's voxels, with costs per unit measured on such a case."""
    n_from, n_to = int(edges_from.sum()), int(edges_to.sum())
    if dense is None:
        dense = n_from * math.log2(n_to + 2) > DENSE_PER_QUERY * edges_to.numel()
    if not dense:
        return get_surface_distance(edges_from, edges_to, "euclidean", list(spacing)).cpu().numpy()
    grid = ndimage.distance_transform_edt(~np.asarray(edges_to.cpu(), dtype=bool), sampling=list(spacing))
    return grid[np.asarray(edges_from.cpu(), dtype=bool)].astype(np.float32)


def calibration_bins(prob: np.ndarray, truth: np.ndarray, n_bins: int = ECE_BINS, *,
                     chunk: int = CALIBRATION_CHUNK) -> np.ndarray:
    """(3, n_bins + 1) voxel counts, summed truths and summed probabilities per bin, binned as torchmetrics.

    Taken over slabs of about ``chunk`` voxels along the first axis: a full-size CT's 78M voxels would
    otherwise need 0.6 GB for each float64 weight array and its int64 bin indices."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    sums = np.zeros((3, n_bins + 1))
    if not prob.size:
        return sums
    step = max(1, chunk // (prob.size // prob.shape[0]))
    for start in range(0, prob.shape[0], step):
        p = prob[start:start + step].ravel()
        bins = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins)
        sums[0] += np.bincount(bins, minlength=n_bins + 1)
        sums[1] += np.bincount(bins[truth[start:start + step].ravel() > 0], minlength=n_bins + 1)
        sums[2] += np.bincount(bins, weights=p, minlength=n_bins + 1)
    return sums


def ece_from_bins(bins: np.ndarray) -> tuple[float, float]:
    count, hits, conf = bins
    gap = np.abs(hits - conf)
    return float(gap.sum() / count.sum()), float(np.max(np.where(count > 0, gap / np.maximum(count, 1), 0.0)))


def _mean_ci(values: np.ndarray, patients: np.ndarray, *, n_resamples: int, seed: int) -> list[float] | None:
    known = ~np.isnan(values)
    if not known.any() or n_resamples == 0:
        return None
    codes = np.unique(patients[known], return_inverse=True)[1]
    means = []
    for w in resample_weights(codes, n_resamples=n_resamples, rng=np.random.default_rng(seed)):
        means.append(w @ values[known] / w.sum(axis=1))
    with np.errstate(invalid="ignore"):  # one patient leaves nobody out of its jackknife: nan, which BCa drops
        jackknifed = [(rows[:, codes] @ values[known]) / rows[:, codes].sum(axis=1)
                      for rows in jackknife_rows(int(codes.max()) + 1)]
    return bca_interval(float(values[known].mean()), np.concatenate(means), np.concatenate(jackknifed))


def evaluate_segmentation(
    predictions: pd.DataFrame,
    manifest: pd.DataFrame,
    *,
    predictions_root: Path,
    manifest_root: Path,
    num_classes: int = 2,
    attributes: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_group_size: int = 10,
    source: str = "predictions",
) -> EvaluationReport:
    """Evaluate predicted masks against the manifest's masks (see the module docstring)."""
    for column in ("case_id", "mask"):
        if column not in predictions.columns:
            raise EvaluationError(MISSING_COLUMN.format(path=source, column=column))
    if "label" not in manifest.columns:
        raise EvaluationError(MISSING_COLUMN.format(path="manifest", column="label"))
    ids = predictions["case_id"].astype(str)
    if ids.duplicated().any():
        raise EvaluationError(DUPLICATE_IDS.format(path=source, ids=_ids(ids[ids.duplicated()].unique())))
    cases = manifest.assign(case_id=manifest["case_id"].astype(str)).drop_duplicates("case_id").set_index("case_id")
    unknown = ids[~ids.isin(cases.index)]
    if len(unknown):
        raise EvaluationError(UNKNOWN_IDS.format(path=source, ids=_ids(unknown)))
    rows, bins = [], np.zeros((3, ECE_BINS + 1))
    for record in predictions.assign(case_id=ids).itertuples(index=False):
        case = record.case_id
        pred, _ = load_volume(predictions_root / record.mask, case=case, what="predicted mask")
        truth, spacing = load_volume(manifest_root / cases.at[case, "label"], case=case, what="true mask")
        if pred.shape != truth.shape:
            raise EvaluationError(BAD_VOLUME.format(case=case, what="predicted mask", path=record.mask,
                                                    problem=f"has shape {pred.shape}, its true mask {truth.shape}"))
        if pred.min() < 0 or pred.max() >= num_classes:
            raise EvaluationError(BAD_VOLUME.format(case=case, what="predicted mask", path=record.mask,
                                                    problem=f"has labels outside 0..{num_classes - 1}"))
        rows.append({"case_id": case, **case_metrics(pred, truth, spacing=spacing, num_classes=num_classes)})
        if "prob_map" in predictions.columns and isinstance(record.prob_map, str):
            prob, _ = load_volume(predictions_root / record.prob_map, case=case, what="probability map")
            if prob.shape != truth.shape or np.nanmin(prob) < 0 or np.nanmax(prob) > 1 or np.isnan(prob).any():
                raise EvaluationError(BAD_VOLUME.format(case=case, what="probability map", path=record.prob_map,
                                                        problem="must match its mask's shape and lie in [0, 1]"))
            bins += calibration_bins(prob, truth)
    per_case = pd.DataFrame(rows).join(cases, on="case_id")
    patients = per_case["patient_id"].astype(str).to_numpy() if "patient_id" in per_case else per_case["case_id"].to_numpy()
    values = {m: per_case[m].astype(float).to_numpy() for m in SEG_METRICS}
    overall = {m: (float(np.nanmean(v)) if (~np.isnan(v)).any() else None) for m, v in values.items()}
    if bins[0].sum():
        overall["voxel_ece"], overall["voxel_mce"] = ece_from_bins(bins)
    ci95 = {m: _mean_ci(v, patients, n_resamples=n_bootstrap, seed=seed) for m, v in values.items()}
    if attributes is None:
        attributes = [a for a in DEFAULT_ATTRIBUTES if a in per_case.columns]
    groups, fairness, notices = {}, {}, []
    for attribute in attributes:
        if attribute not in per_case.columns:
            raise EvaluationError(f"manifest has no column {attribute!r} for the declared attribute")
        labels = per_case[attribute].fillna("unknown").astype(str)
        groups[attribute] = {}
        for group, frame in per_case.groupby(labels, sort=True):
            dice = frame["dice"].astype(float)
            members = (labels == group).to_numpy()
            groups[attribute][group] = {"n": len(frame), "dice": float(dice.mean()) if dice.notna().any() else None,
                                        "hd95": float(frame["hd95"].astype(float).mean()) if frame["hd95"].notna().any() else None,
                                        "ci95": {"dice": _mean_ci(values["dice"][members], patients[members],
                                                                  n_resamples=n_bootstrap, seed=seed)}}
            if len(frame) < min_group_size:
                notices.append(f"{attribute}={group}: {len(frame)} cases, below min_group_size {min_group_size}; "
                                "left out of the fairness gaps")
        compared = {g: m["dice"] for g, m in groups[attribute].items() if m["n"] >= min_group_size}
        known = [d for d in compared.values() if d is not None]
        fairness[attribute] = {
            "groups_compared": list(compared),
            "dice_gap": max(known) - min(known) if len(known) >= 2 else None,
            "es_dice": equity_scaled(overall["dice"], compared),
        }
    return EvaluationReport(
        task="segmentation", n=len(per_case), n_patients=len(np.unique(patients)), threshold=0.5,
        overall=overall, ci95=ci95, groups=groups, fairness=fairness, warnings=notices,
    )
