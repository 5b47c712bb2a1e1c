"""The evaluation step of a segmentation run: segment the val and test splits by
sliding window with the run's checkpoint, fit a temperature on a sample of
validation voxels, write the calibrated test masks and foreground probability
maps, evaluate them (Dice, HD95, subgroups, voxel calibration) and log it all
to the run.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch

from components.config import RunConfig
from components.data.ingest import load_manifest
from components.data.sources import NIFTI_ERRORS
from components.errors import EvaluationError
from components.evaluation.calibration import fit_temperature
from components.evaluation.declarations import FAIRNESS, metrics_for
from components.evaluation.html_report import Overlay, render_segmentation_html
from components.evaluation.segmentation import (
    BAD_VOLUME, calibration_bins, case_dice, ece_from_bins, evaluate_segmentation, load_volume,
)
from components.inference.results import EVALUATED_COLUMNS, REPORT_DIR, ModelEvaluation
from components.inference.predict import read_image, segment_tensor, softmax
from components.progress import track
from components.training.preprocess import SegmentationSpec

VOXELS_PER_CASE = 20_000  # validation voxels per case the temperature is fitted on

FAIRNESS_LOGGED = tuple(m.name for m in metrics_for("segmentation", kind=(FAIRNESS,)))  # test_<attribute>_<name> metrics


def _check_cases(cases: pd.DataFrame, root: Path) -> None:
    """Every case's image and true mask open as NIfTI (headers only) and have the same shape.

    Raises:
        EvaluationError: naming the first case and file that do not, before anything is segmented or written (a
            mask of another shape would otherwise pair the wrong voxels in the temperature's sample).
    """
    for case, image, label in zip(cases["case_id"], cases["image"], cases["label"]):
        shapes = {}
        for what, path in (("image", root / image), ("true mask", root / label)):
            try:
                shapes[what] = nib.load(path).shape
            except NIFTI_ERRORS as exc:
                raise EvaluationError(BAD_VOLUME.format(case=case, what=what, path=path,
                                                        problem=f"cannot be read ({exc})")) from exc
        if shapes["image"] != shapes["true mask"]:
            raise EvaluationError(BAD_VOLUME.format(case=case, what="true mask", path=root / label,
                                                    problem=f"has shape {shapes['true mask']}, its image "
                                                            f"{shapes['image']}"))


def _segment_case(model: torch.nn.Module, spec: SegmentationSpec, image: Path, *, case: str,
                  device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (K, *spatial) of one case's image file, segmented on ``device``, and its affine (an image
    :func:`_check_cases` passed on its header whose voxels are cut short or corrupt is named with its case)."""
    voxels, affine = read_image(image, case=case)
    return segment_tensor(model, spec, voxels, device=device), affine


def _sample_voxels(logits: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    flat = logits.reshape(logits.shape[0], -1).T
    labels = mask.ravel().astype(np.int64)
    keep = rng.choice(len(labels), size=min(VOXELS_PER_CASE, len(labels)), replace=False)
    return flat[keep], labels[keep]


def _segment_test_case(model: torch.nn.Module, spec: SegmentationSpec, image: Path, label: Path, *, case: str,
                       temperature: float, out_dir: Path, binary: bool,
                       device: torch.device) -> tuple[dict, np.ndarray | int]:
    """Segment one test case: write its mask (and, for a binary task, its calibrated foreground probability map);
    its predictions row and its voxel calibration bins before scaling (0 when not binary).

    A function of its own so that the case's volumes (the logits alone are 0.6 GB on a full-size CT) are freed
    when it returns, not held by the caller's loop variables through the report."""
    logits, affine = _segment_case(model, spec, image, case=case, device=device)
    row = {"case_id": case, "mask": f"masks/{case}_mask.nii.gz"}
    # the logits' argmax is the calibrated probabilities' (T > 0), without their float rounding
    nib.save(nib.Nifti1Image(logits.argmax(axis=0).astype(np.uint8), affine), out_dir / row["mask"])
    if not binary:
        return row, 0
    bins = calibration_bins(softmax(logits)[1], load_volume(label, case=case, what="true mask")[0])
    row["prob_map"] = f"masks/{case}_prob.nii.gz"
    nib.save(nib.Nifti1Image(softmax(logits, temperature)[1], affine), out_dir / row["prob_map"])
    return row, bins


def _overlays(test: pd.DataFrame, *, root: Path, out_dir: Path, num_classes: int) -> list[Overlay]:
    """The test cases with the lowest, median and highest Dice, for the report's pictures."""
    scored = []
    for case, image, label in zip(test["case_id"], test["image"], test["label"]):
        truth, _ = load_volume(root / label, case=case, what="true mask")
        prediction, _ = load_volume(out_dir / f"masks/{case}_mask.nii.gz", case=case, what="predicted mask")
        dice = case_dice(prediction, truth, num_classes=num_classes)  # HD95 is the report's already
        scored.append((np.inf if dice is None or np.isnan(dice) else dice, case, image, label))
    if not scored:
        return []
    scored.sort(key=lambda s: (s[0], s[1]))
    picked = {0: scored[0], len(scored) // 2: scored[len(scored) // 2], len(scored) - 1: scored[-1]}
    return [Overlay.shown(case, np.asarray(nib.load(root / image).dataobj, dtype=np.float32),  # one case at a time
                          np.asarray(nib.load(root / label).dataobj),
                          np.asarray(nib.load(out_dir / f"masks/{case}_mask.nii.gz").dataobj),
                          None if np.isinf(dice) else float(dice))
            for _, (dice, case, image, label) in sorted(picked.items())]


def evaluate_segmentation_run(*, model: torch.nn.Module, spec: SegmentationSpec, run_id: str, manifest_path: Path,
                              config: RunConfig, out_dir: Path, device: torch.device) -> ModelEvaluation:
    """Evaluate a loaded segmentation checkpoint (on ``device``) on the test split; log the report to ``run_id``.

    Writes ``out_dir/masks/<case>_mask.nii.gz`` and ``<case>_prob.nii.gz`` (binary tasks), ``predictions.parquet``
    (``case_id, mask, prob_map``), ``report.json``, ``report.html`` and ``calibration.json``.
    """
    manifest = load_manifest(manifest_path, columns=[*EVALUATED_COLUMNS, *config.data.attributes])
    root = manifest_path.parent
    val, test = manifest[manifest["split"] == "val"], manifest[manifest["split"] == "test"]
    _check_cases(pd.concat([val, test]), root)
    rng = np.random.default_rng(config.evaluate.seed)
    sampled = [_sample_voxels(_segment_case(model, spec, root / image, case=case, device=device)[0],
                              load_volume(root / label, case=case, what="true mask")[0], rng)
               for case, image, label in track(list(zip(val["case_id"], val["image"], val["label"])),
                                               description="Segmenting val")]
    temperature = fit_temperature(np.concatenate([s[0] for s in sampled]), np.concatenate([s[1] for s in sampled]))
    binary = config.data.num_classes == 2
    masks_dir = out_dir / "masks"
    masks_dir.mkdir(parents=True, exist_ok=True)
    rows, bins_before = [], 0
    for case, image, label in track(list(zip(test["case_id"], test["image"], test["label"])),
                                    description="Segmenting test"):
        row, bins = _segment_test_case(model, spec, root / image, root / label, case=case, temperature=temperature,
                                       out_dir=out_dir, binary=binary, device=device)
        rows.append(row)
        bins_before = bins_before + bins
    predictions = pd.DataFrame(rows)
    predictions_path = out_dir / "predictions.parquet"
    predictions.to_parquet(predictions_path, index=False)
    ev = config.evaluate
    report = evaluate_segmentation(
        predictions, manifest, predictions_root=out_dir, manifest_root=root, num_classes=config.data.num_classes,
        attributes=[a for a in config.data.attributes if a in manifest.columns], n_bootstrap=ev.n_bootstrap,
        seed=ev.seed, min_group_size=ev.min_group_size, source=str(predictions_path),
    )
    before = dict(zip(("voxel_ece", "voxel_mce"), ece_from_bins(bins_before))) if binary and len(rows) else {}
    after = {k: report.overall[k] for k in ("voxel_ece", "voxel_mce") if k in report.overall}
    calibration = {"temperature": temperature, "fitted_on": f"val voxels ({sum(len(s[1]) for s in sampled)})",
                   "before": before, "after": after}
    report = dataclasses.replace(report, calibration=calibration)
    report_path = report.write_json(out_dir / "report.json")
    (out_dir / "report.html").write_text(render_segmentation_html(
        report.to_dict(), title=f"Evaluation of run {run_id} on {len(test)} test images",
        overlays=_overlays(test, root=root, out_dir=out_dir, num_classes=config.data.num_classes)))
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(out_dir), REPORT_DIR)
        metrics = {f"test_{k}": v for k, v in report.overall.items() if isinstance(v, float)}
        metrics |= {f"test_{attr}_{name}": value for attr, summary in report.fairness.items()
                    for name, value in summary.items() if name in FAIRNESS_LOGGED and value is not None}
        mlflow.log_metrics({**metrics, "temperature": temperature})
    return ModelEvaluation(run_id=run_id, report=report_path, predictions=predictions_path, temperature=temperature)
