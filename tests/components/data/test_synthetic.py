from __future__ import annotations

import filecmp

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from components.data.synthetic import LESION_AMPLITUDE, generate_export, make_image
from components.errors import ConfigError


def test_export_is_real_dicom_with_identifiers_and_a_labels_csv(small_export):
    labels = pd.read_csv(small_export.labels_csv)
    assert list(labels.columns) == ["path", "label", "sex", "age", "race", "site"]
    assert len(labels) == small_export.n_images > small_export.n_patients  # some patients have several images
    ds = pydicom.dcmread(small_export.folder / labels.loc[0, "path"])
    assert str(ds.PatientName) and ds.PatientID.startswith("MRN")
    assert ds.pixel_array.shape == (32, 32)
    assert set(labels["label"]) == {0, 1}
    assert set(labels["sex"]) == {"F", "M"}


def test_same_seed_same_export(tmp_path):
    a = generate_export(tmp_path / "a", n_patients=5, image_size=16, seed=1)
    b = generate_export(tmp_path / "b", n_patients=5, image_size=16, seed=1)
    assert filecmp.cmp(a.labels_csv, b.labels_csv, shallow=False)
    for path in pd.read_csv(a.labels_csv)["path"]:
        assert filecmp.cmp(a.folder / path, b.folder / path, shallow=False)


def _pixels(path):
    ds = pydicom.dcmread(path)
    return apply_modality_lut(ds.pixel_array, ds)


def test_bias_fades_the_lesions_of_women_only(tmp_path):
    fair = generate_export(tmp_path / "fair", n_patients=40, image_size=32, bias=0.0, seed=2)
    biased = generate_export(tmp_path / "biased", n_patients=40, image_size=32, bias=1.0, seed=2)
    labels = pd.read_csv(fair.labels_csv)
    pd.testing.assert_frame_equal(labels, pd.read_csv(biased.labels_csv))
    for row in labels.itertuples():
        diff = _pixels(fair.folder / row.path) - _pixels(biased.folder / row.path)
        if row.sex == "F" and row.label == 1:
            # stored values are 1000 x intensity, so the faded 3/4 of the lesion peak shows up here
            assert diff.max() == pytest.approx(0.75 * LESION_AMPLITUDE * 1000, rel=0.05)
        else:
            assert not diff.any()


def test_lesion_adds_its_amplitude():
    rng = np.random.default_rng(0)
    plain = make_image(np.random.default_rng(0), size=32, lesion=0.0, contrast=1.0, noise=0.0)
    with_lesion = make_image(rng, size=32, lesion=LESION_AMPLITUDE, contrast=1.0, noise=0.0)
    assert (with_lesion - plain).max() == pytest.approx(LESION_AMPLITUDE, rel=0.1)


def test_bias_outside_unit_interval_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"bias must be in \[0, 1\], got 1.5"):
        generate_export(tmp_path, n_patients=2, bias=1.5)


def test_every_patient_has_its_own_record_number_and_every_image_its_own_uid(tmp_path):
    import pydicom

    # seed 1 draws five repeated record numbers among 5,000 patients (the birthday problem over 9e6 numbers)
    export = generate_export(tmp_path / "e", n_patients=5000, image_size=8, seed=1, max_images_per_patient=1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((export.folder / "images").glob("*.dcm"))]
    assert len({h.PatientID for h in headers}) == 5000
    assert len({h.SOPInstanceUID for h in headers}) == len(headers)


@pytest.mark.parametrize("coarse", [False, True])
def test_a_volume_has_its_texture_and_lesions_whichever_way_it_is_drawn(coarse, monkeypatch):
    """Full-size volumes draw their texture on a coarse grid (made the rule here for a small one): the same
    tissue level and spread, and lesions their amplitude brighter."""
    import components.data.synthetic_segmentation as seg  # noqa: PLC0415 (its size threshold, patched)

    monkeypatch.setattr(seg, "COARSE_VOXELS", 0 if coarse else seg.COARSE_VOXELS)
    image, mask = seg.make_volume(np.random.default_rng(4), shape=(96, 80, 40), lesion=0.8, contrast=1.0, noise=0.0)
    assert image.shape == mask.shape == (96, 80, 40) and image.dtype == np.float32 and mask.dtype == np.uint8
    assert 0.001 < mask.mean() < 0.1
    from scipy import ndimage  # noqa: PLC0415

    tissue = image[ndimage.binary_dilation(mask, iterations=3) == 0]
    core = image[ndimage.binary_erosion(mask, iterations=2) > 0]
    assert tissue.mean() == pytest.approx(0.35, abs=0.05) and tissue.std() == pytest.approx(0.15, rel=0.25)
    assert core.mean() - tissue.mean() == pytest.approx(0.8, abs=0.15)
