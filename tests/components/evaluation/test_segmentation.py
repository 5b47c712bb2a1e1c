from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_calibration_error

from components.config import load_config
from components.data.ingest import load_manifest
from components.errors import EvaluationError
from components.evaluation.segmentation import case_dice, case_metrics, evaluate_segmentation
from components.inference.segmentation import evaluate_segmentation_run
from components.training.models import build_segmenter, segmenter_kwargs
from components.training.preprocess import SegmentationSpec

SPACING = (1.0, 0.8, 2.0)


def _sphere(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2).astype(np.uint8)


def _surface_distances(a, b, spacing):
    """Distances (mm) from each surface voxel of a to the surface of b (scipy's exact EDT)."""
    surface = lambda m: m & ~ndimage.binary_erosion(m)  # noqa: E731
    sa, sb = surface(a.astype(bool)), surface(b.astype(bool))
    return ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]


def test_dice_and_hd95_match_numpy_and_scipy():
    truth = _sphere((40, 40, 20), (20, 20, 10), 8)
    pred = _sphere((40, 40, 20), (22, 19, 10), 7)
    m = case_metrics(pred, truth, spacing=SPACING, num_classes=2)
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    hd95 = max(np.percentile(_surface_distances(pred, truth, SPACING), 95),
               np.percentile(_surface_distances(truth, pred, SPACING), 95))
    assert m["dice"] == pytest.approx(dice)
    assert m["hd95"] == pytest.approx(hd95, rel=1e-5)


@pytest.mark.parametrize("case", ["noisy", "shifted", "pred empty", "truth empty", "both empty", "three classes"])
def test_hd95_equals_monais_where_monai_can_take_its_percentile(case):
    """medflow takes HD95's percentile with numpy because MONAI's torch.quantile refuses over 16M surface
    distances (a full-size CT); below that the two agree, empty masks included."""
    import warnings  # noqa: PLC0415

    from monai.metrics import compute_hausdorff_distance  # noqa: PLC0415
    from monai.networks.utils import one_hot  # noqa: PLC0415

    rng = np.random.default_rng(5)
    truth = _sphere((30, 28, 12), (15, 14, 6), 6).astype(np.int64)
    pred = {"noisy": (rng.random(truth.shape) < 0.3).astype(np.int64), "shifted": np.roll(truth, 3, axis=0),
            "pred empty": np.zeros_like(truth), "truth empty": truth, "both empty": np.zeros_like(truth),
            "three classes": np.roll(truth, 2, axis=1) * 2}[case]
    truth = {"truth empty": np.zeros_like(truth), "both empty": np.zeros_like(truth),
             "three classes": truth + np.roll(truth, 1, axis=2)}.get(case, truth)
    classes = 3 if case == "three classes" else 2
    p, t = (one_hot(torch.as_tensor(a)[None, None], num_classes=classes) for a in (pred, truth))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = compute_hausdorff_distance(p, t, include_background=False, percentile=95, spacing=list(SPACING))[0]
        from components.evaluation.segmentation import hd95  # noqa: PLC0415

        ours = [hd95(p[0, c], t[0, c], spacing=SPACING, class_index=c) for c in range(1, classes)]
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5)


@pytest.mark.parametrize("shape", [(40, 36), (30, 28, 12)])
def test_surface_distances_are_the_same_by_kd_tree_and_by_distance_transform(shape):
    """HD95 takes whichever way is cheaper for the sizes; both must give the same distances."""
    from monai.metrics.utils import get_mask_edges  # noqa: PLC0415

    from components.evaluation.segmentation import surface_distances  # noqa: PLC0415

    rng = np.random.default_rng(len(shape))
    truth = torch.as_tensor(_sphere(shape, [s // 2 for s in shape], 5).astype(bool))
    pred = torch.as_tensor(rng.random(shape) < 0.2) | truth
    edges = get_mask_edges(pred, truth, crop=True)
    for a, b in (edges, edges[::-1]):
        by_tree = surface_distances(a, b, spacing=SPACING[:len(shape)], dense=False)
        by_grid = surface_distances(a, b, spacing=SPACING[:len(shape)], dense=True)
        assert len(by_tree) == int(a.sum())
        np.testing.assert_allclose(np.sort(by_grid), np.sort(by_tree), rtol=1e-6)


def test_hd95_takes_the_transform_for_a_ragged_mask_and_the_tree_for_a_small_surface(monkeypatch):
    """Both ways are exact, so only this says the cost model chooses as documented: the ragged prediction's many
    surface voxels querying the sphere's few take the distance transform; the few querying the many, the tree."""
    from components.evaluation import segmentation  # noqa: PLC0415

    calls = []
    transform = ndimage.distance_transform_edt
    monkeypatch.setattr(segmentation.ndimage, "distance_transform_edt",
                        lambda grid, **kw: calls.append(int((~grid).sum())) or transform(grid, **kw))
    rng = np.random.default_rng(3)
    truth = _sphere((60, 60, 30), (30, 30, 15), 4)
    pred = ((rng.random(truth.shape) < 0.3) | truth.astype(bool)).astype(np.uint8)
    ours = case_metrics(pred, truth, spacing=SPACING, num_classes=2)["hd95"]
    surface = int(truth.sum() - ndimage.binary_erosion(truth).sum())
    assert calls == [surface]  # one transform: of the sphere's surface, which the ragged mask queries
    expected = max(np.percentile(_surface_distances(pred, truth, SPACING), 95),
                   np.percentile(_surface_distances(truth, pred, SPACING), 95))
    assert ours == pytest.approx(expected, rel=1e-5)


def test_an_empty_truth_has_no_dice():
    empty = np.zeros((10, 10), dtype=np.uint8)
    assert case_metrics(empty, empty, spacing=(1, 1), num_classes=2) == {"dice": None, "hd95": None}


@pytest.mark.parametrize("classes", [2, 3])
def test_case_dice_is_case_metrics_dice(classes):
    rng = np.random.default_rng(classes)
    truth = _sphere((24, 24, 10), (12, 12, 5), 5) * rng.integers(1, classes, size=(24, 24, 10))
    for pred in (np.roll(truth, 2, axis=0), np.zeros_like(truth), rng.integers(0, classes, size=truth.shape)):
        assert case_dice(pred, truth, num_classes=classes) == case_metrics(
            pred, truth, spacing=SPACING, num_classes=classes)["dice"]


def test_the_reports_overlays_rank_cases_by_dice_without_computing_hd95_again(tmp_path, monkeypatch):
    """HD95 of a full-size CT takes minutes; evaluation computed it a second time for the overlays."""
    from components.inference.segmentation import _overlays  # noqa: PLC0415

    truth = _sphere((20, 20, 8), (10, 10, 4), 5)
    rows = []
    (tmp_path / "masks").mkdir()
    for i, shift in enumerate([0, 4, 1, 2]):
        for name, volume in ((f"image{i}.nii.gz", truth.astype(np.float32)), (f"label{i}.nii.gz", truth),
                             (f"masks/c{i}_mask.nii.gz", np.roll(truth, shift, axis=0))):
            nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / name)
        rows.append({"case_id": f"c{i}", "image": f"image{i}.nii.gz", "label": f"label{i}.nii.gz"})

    def refuse(*args, **kwargs):
        raise AssertionError("HD95 computed for the overlays")

    monkeypatch.setattr("components.evaluation.segmentation.hd95", refuse)
    overlays = _overlays(pd.DataFrame(rows), root=tmp_path, out_dir=tmp_path, num_classes=2)
    assert [o.case_id for o in overlays] == ["c1", "c2", "c0"]  # lowest, median and highest Dice
    assert overlays[-1].dice == pytest.approx(1.0)


def test_a_group_of_one_patient_has_its_point_interval_without_a_warning():
    import warnings  # noqa: PLC0415

    from components.evaluation.segmentation import _mean_ci  # noqa: PLC0415

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _mean_ci(np.array([0.5, 0.7]), np.array(["p", "p"]), n_resamples=50, seed=0) == [0.6, 0.6]


def _dataset(tmp: Path, n=24):
    rng = np.random.default_rng(0)
    rows, preds = [], []
    (tmp / "data" / "labels").mkdir(parents=True)
    (tmp / "pred").mkdir()
    for i in range(n):
        sex = "F" if i % 2 else "M"
        truth = _sphere((24, 24, 12), (12, 12, 6), 5)
        shift = 3 if sex == "F" else 1  # the model is worse for F
        pred = _sphere((24, 24, 12), (12 + shift, 12, 6), 5)
        prob = np.clip(0.8 * pred + rng.random(pred.shape) * 0.2, 0, 1).astype(np.float32)
        affine = np.diag([*SPACING, 1.0])
        nib.save(nib.Nifti1Image(truth, affine), tmp / "data" / "labels" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(pred, affine), tmp / "pred" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(prob, affine), tmp / "pred" / f"c{i}-prob.nii.gz")
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i // 2}", "label": f"labels/c{i}.nii.gz", "sex": sex})
        preds.append({"case_id": f"c{i}", "mask": f"c{i}.nii.gz", "prob_map": f"c{i}-prob.nii.gz"})
    return pd.DataFrame(preds), pd.DataFrame(rows)


def _evaluate(tmp, predictions, manifest, **kwargs):
    return evaluate_segmentation(predictions, manifest, predictions_root=tmp / "pred", manifest_root=tmp / "data",
                                 n_bootstrap=200, min_group_size=5, **kwargs)


def test_report_has_groups_es_dice_and_voxel_calibration(tmp_path):
    predictions, manifest = _dataset(tmp_path)
    report = _evaluate(tmp_path, predictions, manifest)
    assert report.task == "segmentation" and report.n == 24 and report.n_patients == 12
    f, m = report.groups["sex"]["F"]["dice"], report.groups["sex"]["M"]["dice"]
    assert f < m
    assert report.fairness["sex"]["dice_gap"] == pytest.approx(m - f)
    dice = report.overall["dice"]
    assert report.fairness["sex"]["es_dice"] == pytest.approx(dice / (1 + abs(f - dice) + abs(m - dice)))
    low, high = report.ci95["dice"]
    assert low <= dice <= high
    probs = np.concatenate([nib.load(tmp_path / "pred" / p).get_fdata().ravel() for p in predictions["prob_map"]])
    truths = np.concatenate([nib.load(tmp_path / "data" / p).get_fdata().ravel() for p in manifest["label"]])
    expected = binary_calibration_error(torch.tensor(probs), torch.tensor(truths.astype(int)), n_bins=15).item()
    assert report.overall["voxel_ece"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("case", ["shape", "labels", "missing", "prob", "cut short"])
def test_bad_volumes_name_the_case(tmp_path, case):
    predictions, manifest = _dataset(tmp_path, n=4)
    affine = np.diag([*SPACING, 1.0])
    if case == "shape":
        nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), affine), tmp_path / "pred" / "c1.nii.gz")
        expected = "c1: predicted mask c1.nii.gz has shape (5, 5, 5), its true mask (24, 24, 12)"
    elif case == "labels":
        nib.save(nib.Nifti1Image(np.full((24, 24, 12), 3, np.uint8), affine), tmp_path / "pred" / "c1.nii.gz")
        expected = "c1: predicted mask c1.nii.gz has labels outside 0..1"
    elif case == "missing":
        predictions.loc[2, "mask"] = "gone.nii.gz"
        expected = f"c2: predicted mask {tmp_path / 'pred' / 'gone.nii.gz'} cannot be read"
    elif case == "cut short":  # gzip's EOFError, which is not an OSError
        path = tmp_path / "pred" / "c2.nii.gz"
        path.write_bytes(path.read_bytes()[:-40])
        expected = f"c2: predicted mask {path} cannot be read (Compressed file ended"
    else:
        nib.save(nib.Nifti1Image(np.full((24, 24, 12), 1.5, np.float32), affine), tmp_path / "pred" / "c3-prob.nii.gz")
        expected = "c3: probability map c3-prob.nii.gz must match its mask's shape and lie in [0, 1]"
    with pytest.raises(EvaluationError) as info:
        _evaluate(tmp_path, predictions, manifest)
    assert str(info.value).startswith(expected)


def test_group_dice_intervals_are_scipys_bca_intervals_of_the_group_mean(tmp_path):
    from scipy import stats  # noqa: PLC0415

    rng = np.random.default_rng(4)
    (tmp_path / "data" / "labels").mkdir(parents=True)
    (tmp_path / "pred").mkdir()
    rows, preds = [], []
    for i in range(30):  # one case per patient, Dice varying case to case
        truth = _sphere((24, 24, 12), (12, 12, 6), 5)
        pred = _sphere((24, 24, 12), (12 + int(rng.integers(0, 5)), 12, 6), int(rng.integers(3, 7)))
        nib.save(nib.Nifti1Image(truth, np.eye(4)), tmp_path / "data" / "labels" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(pred, np.eye(4)), tmp_path / "pred" / f"c{i}.nii.gz")
        rows.append({"case_id": f"c{i}", "patient_id": f"p{i}", "label": f"labels/c{i}.nii.gz", "sex": "FM"[i % 2]})
        preds.append({"case_id": f"c{i}", "mask": f"c{i}.nii.gz"})
    predictions, manifest = pd.DataFrame(preds), pd.DataFrame(rows)
    report = evaluate_segmentation(predictions, manifest, predictions_root=tmp_path / "pred",
                                   manifest_root=tmp_path / "data", n_bootstrap=4000, min_group_size=5)
    for sex, group in report.groups["sex"].items():
        dice = np.array([case_metrics(np.asarray(nib.load(tmp_path / "pred" / f"c{i}.nii.gz").dataobj),
                                      np.asarray(nib.load(tmp_path / "data" / "labels" / f"c{i}.nii.gz").dataobj),
                                      spacing=(1, 1, 1), num_classes=2)["dice"] for i in range(30) if "FM"[i % 2] == sex])
        low, high = group["ci95"]["dice"]
        assert group["dice"] == pytest.approx(dice.mean()) and low <= group["dice"] <= high
        reference = stats.bootstrap((dice,), np.mean, method="BCa", n_resamples=4000,
                                    rng=np.random.default_rng(0)).confidence_interval
        assert (low, high) == pytest.approx((reference.low, reference.high), abs=0.01)


def test_calibration_bins_are_the_same_taken_a_slab_at_a_time():
    from components.evaluation.segmentation import calibration_bins

    rng = np.random.default_rng(3)
    prob = rng.random((7, 5, 6)).astype(np.float32)
    prob.flat[:4] = [0.0, 1.0, 1 / 15, 0.5]  # an edge, and a confidence of exactly 1 in a bin of its own
    truth = np.asfortranarray(rng.random((7, 5, 6)) < prob)  # nibabel's layout, while prob is C-ordered
    whole = calibration_bins(prob, truth, chunk=10**9)
    edges = np.linspace(0.0, 1.0, 16)
    index = np.clip(np.searchsorted(edges, prob.ravel(), side="right") - 1, 0, 15)
    expected = np.array([[np.sum(index == b), np.sum(truth.ravel()[index == b]), np.sum(prob.ravel()[index == b])]
                         for b in range(16)]).T
    np.testing.assert_allclose(whole, expected, rtol=1e-6)
    assert whole[0, 15] == 1  # the 1.0
    for chunk in (1, 30, 61):  # a slab of one row, exactly one row of 30 voxels, two rows
        np.testing.assert_allclose(calibration_bins(prob, truth, chunk=chunk), whole, rtol=1e-12)


@pytest.mark.parametrize(("split", "damage"), [("val", "missing"), ("test", "missing"), ("val", "shape"),
                                               ("test", "shape"), ("test", "image")])
def test_a_val_or_test_case_with_a_bad_file_is_named_before_anything_is_segmented(tmp_path, seg2d_dataset, split,
                                                                                    damage):
    root = tmp_path / "data"
    shutil.copytree(seg2d_dataset.parent, root)
    manifest = load_manifest(root / seg2d_dataset.name)
    case, image, label = manifest.loc[manifest["split"] == split, ["case_id", "image", "label"]].iloc[-1]
    if damage == "missing":
        (root / label).unlink()
        expected = f"{case}: true mask {root / label} cannot be read"
    elif damage == "image":
        (root / image).write_bytes(b"not a NIfTI file")
        expected = f"{case}: image {root / image} cannot be read"
    else:
        nib.save(nib.Nifti1Image(np.zeros((16, 16), np.uint8), np.eye(4)), root / label)
        expected = f"{case}: true mask {root / label} has shape (16, 16), its image (32, 32)"
    config = load_config(overrides=["data.task=segmentation", "train.model=unet", "train.model_kwargs={}",
                                    "train.loss=dice_ce", "evaluate.n_bootstrap=0"], environ={})
    model = build_segmenter("unet", spatial_dims=2, in_channels=1, num_classes=2, patch_size=(32, 32),
                            kwargs=segmenter_kwargs("unet", patch_size=(32, 32)))
    segmented = []
    with pytest.raises(EvaluationError) as info:
        evaluate_segmentation_run(model=_Spy(model, segmented), spec=SegmentationSpec((32, 32), 0.0, 1.0),
                                  run_id="never-logged", manifest_path=root / seg2d_dataset.name, config=config,
                                  out_dir=tmp_path / "out", device=torch.device("cpu"))
    assert str(info.value).startswith(expected)
    assert segmented == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("split", "damage"), [("val", "cut short"), ("test", "cut short"), ("test", "corrupt")])
def test_an_image_that_cannot_be_read_is_named_with_its_case(tmp_path, seg2d_dataset, split, damage):
    """Cut short, its header still reads (the check before segmenting passes it) and gzip's EOFError comes when its
    voxels are read; corrupt, zlib's error (not an OSError) comes as soon as the small file is read."""
    root = tmp_path / "data"
    shutil.copytree(seg2d_dataset.parent, root)
    manifest = load_manifest(root / seg2d_dataset.name)
    case, image = manifest.loc[manifest["split"] == split, ["case_id", "image"]].iloc[-1]
    compressed = (root / image).read_bytes()
    if damage == "cut short":
        (root / image).write_bytes(compressed[:-20])
        assert nib.load(root / image).shape  # the header is whole
    else:
        middle = len(compressed) // 2
        (root / image).write_bytes(compressed[:middle] + bytes(b ^ 0xFF for b in compressed[middle:middle + 40])
                                   + compressed[middle + 40:])
    config = load_config(overrides=["data.task=segmentation", "train.model=unet", "train.model_kwargs={}",
                                    "train.loss=dice_ce", "evaluate.n_bootstrap=0"], environ={})
    model = build_segmenter("unet", spatial_dims=2, in_channels=1, num_classes=2, patch_size=(32, 32),
                            kwargs=segmenter_kwargs("unet", patch_size=(32, 32)))
    with pytest.raises(EvaluationError) as info:
        evaluate_segmentation_run(model=model, spec=SegmentationSpec((32, 32), 0.0, 1.0), run_id="never-logged",
                                  manifest_path=root / seg2d_dataset.name, config=config, out_dir=tmp_path / "out",
                                  device=torch.device("cpu"))
    assert str(info.value).startswith(f"{case}: image {root / image} cannot be read (")


def test_an_image_read_for_a_registered_models_predictions_names_its_file(tmp_path):
    """What ``medflow compare`` and the non-inferiority gate read the dataset's images with."""
    from components.inference.predict import read_image

    whole, cut = tmp_path / "whole.nii.gz", tmp_path / "cut.nii.gz"
    voxels = np.arange(24 * 24 * 12, dtype=np.float32).reshape(24, 24, 12)
    nib.save(nib.Nifti1Image(voxels, np.diag([*SPACING, 1.0])), whole)
    read, affine = read_image(whole)
    np.testing.assert_array_equal(read, voxels)
    np.testing.assert_allclose(affine, np.diag([*SPACING, 1.0]), rtol=1e-6)  # stored in float32
    cut.write_bytes(whole.read_bytes()[:-20])
    with pytest.raises(EvaluationError) as info:
        read_image(cut)
    assert str(info.value).startswith(f"{cut} cannot be read (Compressed file ended")


class _Spy(torch.nn.Module):
    """The network, counting the patches it is asked to segment."""

    def __init__(self, model: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.model, self.calls = model, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        return self.model(x)
