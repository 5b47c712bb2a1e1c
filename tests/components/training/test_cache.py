"""train.cache auto: the preprocessed samples stay in memory while they fit the budget, on disk beyond it, and
the run says which and why; a budget below one batch is refused."""

from __future__ import annotations

import mlflow
import pytest

from components import paths
from components.config import load_config
from components.errors import ConfigError
from components.training.classification import train_classifier
from components.training.datasets import plan_cache

TINY = ["train.epochs=1", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-cache"]
SAMPLE = 4 * 32 * 32  # one preprocessed 32x32 float32 image


def test_auto_chooses_memory_within_the_budget_and_disk_beyond_it():
    train = load_config(overrides=["train.cache_max_gb=0.001"], environ={}).train  # 1 MiB: 256 samples
    fits, spills = plan_cache(train, n_samples=200, sample_bytes=SAMPLE), plan_cache(train, n_samples=300, sample_bytes=SAMPLE)
    assert fits.mode == "memory" and "fit the cache budget of 0.00 GB (train.cache_max_gb)" in fits.reason
    assert spills.mode == "disk" and "exceed the cache budget" in spills.reason and ".medflow/cache/" in spills.reason
    default = plan_cache(load_config(environ={}).train, n_samples=200, sample_bytes=SAMPLE)
    assert default.mode == "memory" and "a quarter of the" in default.reason  # the machine's available memory
    chosen = plan_cache(load_config(overrides=["train.cache=none"], environ={}).train, n_samples=10**9, sample_bytes=SAMPLE)
    assert (chosen.mode, chosen.reason) == ("none", "train.cache is none")


def test_a_budget_below_one_batch_is_one_line():
    train = load_config(overrides=["train.cache_max_gb=0.00001", "train.batch_size=32"], environ={}).train
    with pytest.raises(ConfigError, match=r"train.cache_max_gb=1e-05 holds less than one batch of 32 samples .*"
                                          r"raise it, lower train.batch_size, or set train.cache: disk"):
        plan_cache(train, n_samples=100, sample_bytes=SAMPLE)


def test_a_run_over_its_budget_trains_from_the_disk_cache_with_the_same_result(workspace, small_dataset):
    runs = {}
    for budget in ("1", "0.0002"):  # 1 GB holds the small dataset; 0.2 MB holds a batch but not the dataset
        config = load_config(overrides=[*TINY, f"train.cache_max_gb={budget}"], environ={})
        runs[budget] = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    client = mlflow.MlflowClient(paths.tracking_uri())
    memory, disk = (client.get_run(runs[b].run_id).data for b in ("1", "0.0002"))
    assert memory.params["cache"] == "memory" and disk.params["cache"] == "disk"
    assert "kept on disk" in disk.tags["medflow.cache"]
    assert any((workspace / ".medflow" / "cache").iterdir())
    assert disk.metrics["val_auc"] == pytest.approx(memory.metrics["val_auc"], abs=1e-6)
    assert disk.metrics["train_loss"] == pytest.approx(memory.metrics["train_loss"], rel=1e-5)


def test_intensity_statistics_are_numpys_over_every_voxel_with_one_image_in_memory_at_a_time(tmp_path):
    import tracemalloc

    import nibabel as nib
    import numpy as np

    from components.training.preprocess import intensity_stats

    rng = np.random.default_rng(0)
    shapes = [(100, 100, 100), (90, 110, 100), (100, 100, 95), (100, 100, 100), (80, 100, 100), (100, 100, 100)]
    images = [rng.normal(40.0 * k, 10.0 + k, size=shape).astype(np.float32) for k, shape in enumerate(shapes)]
    paths_ = []
    for k, image in enumerate(images):
        paths_.append(tmp_path / f"image{k}.nii")
        nib.save(nib.Nifti1Image(image, np.eye(4)), paths_[-1])
    flat = np.concatenate([image.astype(np.float64).ravel() for image in images])
    expected = (flat.mean(), flat.std())
    del images, flat
    tracemalloc.start()
    mean, std = intensity_stats(iter(paths_))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose([mean, std], expected, rtol=1e-9)
    # one image of a million voxels is 8 MB as float64: reading all six before the statistics held over 50 MB
    assert peak < 3 * 8 * 10**6, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_voxel_or_no_image_is_one_line_naming_the_file(tmp_path, value):
    import nibabel as nib
    import numpy as np

    from components.errors import DataValidationError
    from components.training.preprocess import intensity_stats

    image = np.ones((8, 8, 4), dtype=np.float32)
    image[1, 2, 3] = value
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "bad.nii")
    with pytest.raises(DataValidationError, match=rf"^{tmp_path / 'bad.nii'}: 1 NaN or infinite voxel\(s\); .*medflow validate"):
        intensity_stats([tmp_path / "bad.nii"])
    with pytest.raises(DataValidationError, match="no training images"):
        intensity_stats([])
