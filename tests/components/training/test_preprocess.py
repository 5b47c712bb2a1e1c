"""Every transform pipeline runs on plain tensors (MONAI's metadata tracking off while it runs) and gives what
MONAI's own Compose of the same transforms gives, bit for bit."""

from __future__ import annotations

import copy
import threading

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import get_track_meta
from monai.transforms import Compose, Lambdad

from components.config import PretrainConfig
from components.pretraining.views import view_transforms
from components.training.preprocess import (
    PlainCompose,
    PreprocessSpec,
    SegmentationSpec,
    array_transform,
    segmentation_array_transform,
    segmentation_transforms,
    training_transforms,
    untracked_meta,
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    out = {"2d": [], "3d": []}
    for i in range(6):
        nib.save(nib.Nifti1Image(rng.normal(100, 30, (80, 70)).astype(np.float32), np.diag([0.7, 0.8, 1, 1])),
                 folder / f"{i}.nii.gz")
        nib.save(nib.Nifti1Image(rng.normal(0, 1, (40, 36, 12)).astype(np.float32), np.eye(4)), folder / f"v{i}.nii.gz")
        nib.save(nib.Nifti1Image((rng.random((40, 36, 12)) > 0.7).astype(np.uint8), np.eye(4)), folder / f"m{i}.nii.gz")
        out["2d"].append(str(folder / f"{i}.nii.gz"))
        out["3d"].append((str(folder / f"v{i}.nii.gz"), str(folder / f"m{i}.nii.gz")))
    return out


SPEC = PreprocessSpec(spatial_size=(64, 64), mean=100.0, std=30.0)


def _pipelines(images):
    two_d = [{"image": path, "label": 1} for path in images["2d"]]
    volumes = [{"image": image, "label": mask} for image, mask in images["3d"]]
    segmentation = SegmentationSpec(patch_size=(16, 16, 8), mean=0.0, std=1.0)
    return {
        "training": (lambda: training_transforms(SPEC, augment=True), two_d),
        "validation": (lambda: training_transforms(SPEC, augment=False), two_d),
        "pretraining views": (lambda: view_transforms(SPEC, PretrainConfig()), two_d),
        "segmentation": (lambda: segmentation_transforms(segmentation, augment=True, samples=2), volumes),
    }


@pytest.mark.parametrize("name", ["training", "validation", "pretraining views", "segmentation"])
def test_each_pipeline_gives_plain_tensors_equal_to_a_tracked_compose_of_its_transforms(images, name):
    make, items = _pipelines(images)[name]
    plain = make()
    tracked = Compose(make().transforms)  # MONAI's own Compose: MetaTensors between the transforms
    plain.set_random_state(3)
    tracked.set_random_state(3)
    assert isinstance(plain, PlainCompose)
    compared = 0
    for item in items:
        ours, theirs = plain(dict(item)), tracked(dict(item))
        for a, b in zip(ours if isinstance(ours, list) else [ours], theirs if isinstance(theirs, list) else [theirs]):
            for key in ("image", "label"):
                if isinstance(a[key], int):
                    continue
                assert type(a[key]) is torch.Tensor
                assert torch.equal(a[key], torch.as_tensor(b[key]).as_subclass(torch.Tensor))
                compared += 1
    assert compared >= len(items)
    assert get_track_meta()  # put back


@pytest.mark.parametrize("name", ["training", "pretraining views", "segmentation"])
def test_epochs_leave_the_memory_cache_as_it_was(images, name):
    # the memory cache hands its samples to the random transforms without a copy: none may write into them
    from components.training.datasets import make_dataset  # noqa: PLC0415

    make, items = _pipelines(images)[name]
    dataset = make_dataset(items, make(), cache="memory", key="k")
    before = copy.deepcopy(dataset._cache)
    for _ in range(3):  # epochs: every random branch is taken on some sample
        for index in range(len(dataset)):
            dataset[index]
    for cached, kept in zip(dataset._cache, before):
        for key in ("image", "label"):
            if torch.is_tensor(kept[key]):
                assert torch.equal(cached[key], kept[key]), key


def test_the_transforms_inside_see_tracking_off_and_it_is_put_back_after_an_error():
    seen = []
    record = Lambdad(keys="image", func=lambda x: seen.append(get_track_meta()) or x)
    PlainCompose([record])({"image": torch.zeros(1, 2, 2)})
    assert seen == [False] and get_track_meta()

    def fail(x):
        raise ValueError("bad image")

    with pytest.raises(RuntimeError, match="applying transform"):  # MONAI wraps a transform's error
        PlainCompose([Lambdad(keys="image", func=fail)])({"image": torch.zeros(1, 2, 2)})
    assert get_track_meta()


@pytest.mark.parametrize("name", ["classification", "segmentation"])
def test_the_served_preprocessing_is_plain_and_equals_a_tracked_compose(name):
    rng = np.random.default_rng(1)
    pipeline, raw = {
        "classification": (array_transform(SPEC), rng.normal(100, 30, (70, 80)).astype(np.float32)),
        "segmentation": (segmentation_array_transform(SegmentationSpec(patch_size=(16, 16, 8), mean=0.0, std=1.0)),
                         rng.normal(0, 1, (20, 18, 9)).astype(np.float32)),
    }[name]
    assert isinstance(pipeline, PlainCompose)
    ours, theirs = pipeline(raw), Compose(pipeline.transforms)(raw)
    assert type(ours) is torch.Tensor
    assert torch.equal(ours, torch.as_tensor(theirs).as_subclass(torch.Tensor))
    assert get_track_meta()


def test_threads_inside_at_once_leave_tracking_off_until_the_last_one_is_out():
    # a cache's threads run transforms at once: the first one in turns tracking off, and it stays off until the
    # last one is out, whichever that is
    entered = [threading.Event() for _ in range(3)]
    leave = [threading.Event() for _ in range(3)]

    def work(k):
        with untracked_meta():
            entered[k].set()
            leave[k].wait(5)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for thread, event in zip(threads, entered):  # one after another: the first one in found tracking on
        thread.start()
        event.wait(5)
    for k in range(2):  # the first two out, the first one in among them
        leave[k].set()
        threads[k].join()
        assert not get_track_meta(), "tracking back on while thread 2 is inside"
    leave[2].set()
    threads[2].join()
    assert get_track_meta()


def test_tracking_already_off_stays_off():
    from monai.data import set_track_meta

    set_track_meta(False)
    try:
        with untracked_meta():
            pass
        assert not get_track_meta()
    finally:
        set_track_meta(True)
