"""The DICOM reader on pydicom's own files: transfer syntaxes, multi-frame, series, geometry."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

with warnings.catch_warnings():  # nibabel calls its DICOM readers experimental; only their affine is used
    warnings.simplefilter("ignore")
    from nibabel.nicom import dicomwrappers
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut

from components.data.dicom import LPS_TO_RAS, read_dicom_case
from components.errors import IngestError

from tests.components.data.conftest import traced_peak

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _file(name: str) -> Path:
    return Path(get_testdata_file(name))


def _reference(name: str) -> np.ndarray:
    """Pixels of an uncompressed file after the modality LUT, frames last (independent of medflow)."""
    ds = pydicom.dcmread(_file(name))
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    return np.moveaxis(values, 0, -1) if int(ds.get("NumberOfFrames", 1) or 1) > 1 else values


@pytest.mark.parametrize(
    ("compressed", "uncompressed"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),
        ("SC_rgb_rle.dcm", "SC_rgb.dcm"),
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm"),
        ("OBXXXX1A_rle_2frame.dcm", "OBXXXX1A_2frame.dcm"),
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_uncompressed_values(compressed, uncompressed):
    case = read_dicom_case(_file(compressed))
    reference = _reference(uncompressed)
    if reference.shape[-1] == 3 and case.array.shape[-1] != 3:  # colour: medflow keeps the ITU-R 601 luma
        reference = reference @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    np.testing.assert_allclose(case.array, reference, rtol=0, atol=1e-3)


def test_the_modality_lut_is_applied():
    case = read_dicom_case(_file("693_UNCR.dcm"))
    ds = pydicom.dcmread(_file("693_UNCR.dcm"))
    assert float(ds.RescaleIntercept) == -1024
    np.testing.assert_array_equal(case.array, ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_UNCR.dcm"])
def test_in_plane_geometry_agrees_with_nibabel(name):
    ours = read_dicom_case(_file(name)).affine
    theirs = LPS_TO_RAS @ dicomwrappers.wrapper_from_file(_file(name)).affine
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_multi_frame_file_keeps_every_frame():
    case = read_dicom_case(_file("emri_small.dcm"))
    assert case.array.shape == (64, 64, 10)
    np.testing.assert_array_equal(case.array, _reference("emri_small.dcm"))


def test_legacy_multi_frame_frames_lie_at_their_grid_offsets():
    ds = pydicom.dcmread(_file("rtdose.dcm"))
    case = read_dicom_case(_file("rtdose.dcm"))
    assert case.array.shape == (10, 10, 15)
    offsets = np.asarray(ds.GridFrameOffsetVector, dtype=float)
    assert case.affine[2, 2] == pytest.approx(offsets[1] - offsets[0])


@pytest.fixture
def ct_series(tmp_path):
    """pydicom's five-slice CT series, files renamed so that their names do not follow their positions."""
    folder = tmp_path / "series"
    folder.mkdir()
    for i, path in enumerate(sorted((TEST_FILES / "dicomdirtests" / "98892001" / "CT5N").iterdir(), reverse=True)):
        shutil.copy(path, folder / f"slice{i}")
    return folder


def test_a_series_folder_becomes_one_volume_sorted_by_position(ct_series):
    case = read_dicom_case(ct_series)
    datasets = [pydicom.dcmread(p) for p in ct_series.iterdir()]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert case.array.shape == (16, 16, len(datasets))
    for k, ds in enumerate(datasets):
        np.testing.assert_array_equal(case.array[..., k], apply_modality_lut(ds.pixel_array, ds))
        # voxel (0, 0, k) lies at slice k's ImagePositionPatient (LPS -> RAS)
        lps = np.asarray(ds.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(case.affine @ [0, 0, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-3)
    assert case.case_uid == datasets[0].SeriesInstanceUID


def test_a_large_series_is_decoded_into_its_volume_one_file_at_a_time(large_ct_series):
    """A CT series peaks at about its volume: no file's pixel data is held once decoded, no list of frames."""
    folder, expected = large_ct_series
    case, peak = traced_peak(read_dicom_case, folder)
    np.testing.assert_array_equal(case.array, expected)
    assert case.array.flags.c_contiguous and case.array.dtype == np.float32
    # on top, the parsed headers (about 0.1 MiB a file here) and one slice's working copies; before, also every
    # file's pixel data, each decoded frame and their stack: 3.1 volumes
    assert peak < 1.3 * case.array.nbytes, f"peak {peak / 2**20:.1f} MiB for a {case.array.nbytes / 2**20:.1f} MiB volume"


def test_a_series_with_uneven_slices_is_refused():
    folder = TEST_FILES / "dicomdirtests" / "77654033" / "CT2"
    with pytest.raises(IngestError, match=r"CT2: uneven slice spacing \(1\.25 to 202\.5 mm\)"):
        read_dicom_case(folder)


def test_a_folder_of_several_series_is_refused():
    folder = TEST_FILES / "dicomdirtests" / "98892003" / "MR2"
    with pytest.raises(IngestError, match=r"MR2: folder holds 3 series; a labels row must name one series"):
        read_dicom_case(folder)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("rtplan.dcm", "DICOM without pixel data"),
        ("MR_truncated.dcm", "cannot decode pixel data"),
        ("no_meta.dcm", "not a DICOM file"),
    ],
)
def test_unusable_files_are_named(name, message):
    with pytest.raises(IngestError) as info:
        read_dicom_case(_file(name))
    assert str(info.value).startswith(f"{_file(name)}: {message}")


def test_every_file_pydicom_ships_is_read_or_refused_naming_it():
    """Headers are parsed as they are read, so every failure must still come out as an IngestError that names
    the file: pydicom's ~190 files hold bad VRs, missing meta, truncated data, sequences of every kind."""
    files = sorted(p for p in TEST_FILES.parent.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc"))
    read, refused = [], {}
    for path in files:
        try:
            read.append(read_dicom_case(path).array.shape)
        except IngestError as exc:
            assert str(exc).startswith(f"{path}: "), exc
            refused[path.name] = str(exc)
    assert len(read) > 90 and len(refused) > 80, (len(read), len(refused))
    assert "inconsistent DICOM header (ValueError" in refused["badVR.dcm"]
    assert "cannot decode pixel data" in refused["MR_truncated.dcm"]


def test_a_value_too_short_for_its_vr_is_reported_naming_the_file(tmp_path):
    data = _file("CT_small.dcm").read_bytes()
    rows = data.index(b"\x28\x00\x10\x00US\x02\x00")  # Rows, explicit VR little endian, 2 bytes
    path = tmp_path / "bad_rows.dcm"
    path.write_bytes(data[:rows] + b"\x28\x00\x10\x00US\x03\x00\x80\x00\x00" + data[rows + 10:])
    with pytest.raises(IngestError, match=r"bad_rows\.dcm: inconsistent DICOM header \(BytesLengthException"):
        read_dicom_case(path)
