"""DICOM results: a SEG that reads back (highdicom and pydicom) as the mask it was written from, slice by
source slice, and a structured report whose figures are the probabilities."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from components.data.sources import read_source
from components.data.synthetic_segmentation import generate_segmentation_export
from components.monitoring.dicom_results import write_report, write_segmentation
from components.monitoring.predict import ModelRef

MODEL = ModelRef(name="seg", version="3", run_id="r", data_version="v1", dataset="seg", task="segmentation",
                 threshold=0.5)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory) -> Path:
    """Two synthetic CT series (24x24 pixels, 6 slices) with NIfTI masks on ingestion's grid."""
    return generate_segmentation_export(tmp_path_factory.mktemp("ct"), n_patients=2, image_size=24, depth=6,
                                        seed=11, fmt="dicom").folder


def test_a_seg_reads_back_as_its_mask_on_each_source_slice(ct_series, tmp_path):
    series = ct_series / "images" / "p0000"
    mask = np.asarray(nib.load(ct_series / "masks" / "p0000_seg.nii.gz").dataobj).astype(np.uint8)
    mask[0, 0, :] = 2  # a second class, on every slice
    image = read_source(series, fmt="dicom", rel_path="p0000")
    assert image.array.shape == mask.shape and mask[..., :-1].any()
    # the files in reverse position order, so that slice order is not file order
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    for k, f in enumerate(sorted(series.iterdir())[::-1]):
        (shuffled / f"{k:02d}.dcm").write_bytes(f.read_bytes())
    write_segmentation(mask, shuffled, tmp_path / "seg.dcm", MODEL, class_names=["background", "lesion", "rim"])

    seg = hd.seg.segread(tmp_path / "seg.dcm")
    sources = {float(ds.ImagePositionPatient[2]): ds for ds in map(pydicom.dcmread, series.iterdir())}
    assert seg.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    assert [d.SegmentLabel for d in seg.SegmentSequence] == ["lesion", "rim"]
    for k, z in enumerate(sorted(sources)):  # slice k of ingestion's volume lies at z = 2k mm
        uid = sources[z].SOPInstanceUID
        read = seg.get_pixels_by_source_instance([uid], combine_segments=True, relabel=False)[0]
        np.testing.assert_array_equal(read, mask[:, :, k], err_msg=f"slice {k}")
    assert pydicom.dcmread(tmp_path / "seg.dcm").pixel_array.shape == (2 * mask.shape[2], *mask.shape[:2])


def test_a_seg_refuses_a_mask_of_another_depth(ct_series, tmp_path):
    with pytest.raises(ValueError, match="the mask has 5 slices, the source 6 frames"):
        write_segmentation(np.zeros((24, 24, 5), np.uint8), ct_series / "images" / "p0001", tmp_path / "seg.dcm",
                           MODEL, class_names=["background", "lesion"])
    assert not (tmp_path / "seg.dcm").exists()


def test_a_report_holds_the_probabilities_and_the_decision(ct_series, tmp_path):
    source = sorted((ct_series / "images" / "p0001").iterdir())[2]
    write_report(np.array([0.2, 0.7, 0.1]), "label 1", source, tmp_path / "sr.dcm", MODEL,
                 class_names=["normal", "nodule", "mass"])
    report = hd.sr.srread(tmp_path / "sr.dcm")
    (group,) = report.content.get_image_measurement_groups()
    assert {m.name.meaning: m.value for m in group.get_measurements()} == pytest.approx(
        {"Probability of normal": 0.2, "Probability of nodule": 0.7, "Probability of mass": 0.1})
    (finding,) = hd.sr.utils.find_content_items(group[0], name=codes.DCM.Finding)
    assert finding.ConceptCodeSequence[0].CodeMeaning == "label 1"
    assert report.PatientID == pydicom.dcmread(source).PatientID and report.Modality == "SR"
