"""Predictions as DICOM objects a PACS stores and shows next to the source study (highdicom writes them).

- **Segmentation: DICOM SEG** (Segmentation Storage, binary, one segment per foreground class). Each frame
  references the source slice it was predicted on, so a viewer overlays the mask on the series.
- **Classification: DICOM Structured Report**, TID 1500 Measurement Report in a Comprehensive 3D SR, holding
  the decision as a qualitative evaluation and each class's calibrated probability as a measurement, with the
  model named as the algorithm (name, version). This is the object the IHE AI Results profile (AIR) specifies
  for classifier output: it is machine-readable (a secondary capture with text burned into pixels is not),
  PACS archives store it as any SR, and viewers that read TID 1500 (OHIF, 3D Slicer, most vendor viewers)
  list its findings against the referenced image.

Both carry the source's patient and study (so they file into the same study in the PACS) and new series and
instance UIDs; they are written next to the other predictions, which go back to the hospital. Nothing here is
logged to MLflow.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from components.data.dicom import IGNORED_NAMES, frame_plane
from components.data.ingest import default_workers
from components.progress import track

MANUFACTURER = "medflow"
SCHEME = "99MEDFLOW"  # a private coding scheme (PS3.3 8.2) for the model's own class names
SERIES_NUMBER = {"seg": 9801, "sr": 9802}
PARALLEL_MIN = 32  # results below this are written in this process (a worker pool costs about a second)
PROCEDURES = {"CT": codes.cid100.CTUnspecifiedBodyRegion, "MR": codes.cid100.MRIUnspecifiedBodyRegion,
              "PT": codes.cid100.PETUnspecifiedBodyRegion, "NM": codes.cid100.NMUnspecifiedBodyRegion,
              "CR": codes.cid100.XRUnspecifiedBodyRegion, "DX": codes.cid100.XRUnspecifiedBodyRegion}  # CID 100


# Type 2 attributes of the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1): present, possibly
# empty, in a valid image, but exports often drop them, and highdicom copies them into every result.
TYPE2_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")


def source_datasets(path: Path, *, pixels: bool = True) -> list[pydicom.Dataset]:
    """The DICOM datasets of one predicted case (a file, or a series folder), with the patient and study
    attributes a result copies (empty where the source omits them); with their pixel data when ``pixels``
    (a SEG checks its frames against them; a report only references them)."""
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".") and p.name not in IGNORED_NAMES)
    datasets = [pydicom.dcmread(f, stop_before_pixels=not pixels) for f in files]
    for ds in datasets:
        for keyword in TYPE2_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
    return datasets


def _frames_in_volume_order(datasets: list[pydicom.Dataset]) -> list[tuple[int, int]]:
    """(dataset, frame) of each slice of the volume ingestion reads, in its slice order (by position along the
    slice normal, as :mod:`components.data.dicom` sorts them)."""
    frames = [(d, f) for d, ds in enumerate(datasets) for f in range(int(ds.get("NumberOfFrames", 1) or 1))]
    planes = [frame_plane(datasets[d], f) for d, f in frames]
    if len(frames) == 1 or any(p is None for p in planes):
        return frames
    normal = np.cross(planes[0][0][:3], planes[0][0][3:])
    order = np.argsort([float(np.dot(normal, p[1])) for p in planes], kind="stable")
    return [frames[i] for i in order]


def _algorithm(model) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=model.name, version=str(model.version),
                                              family=codes.cid7162.ArtificialIntelligence)


def write_segmentation(mask: np.ndarray, source: Path, out_path: Path, model, *, class_names: list[str]) -> None:
    """``mask`` (rows, columns[, slices]; class per voxel, as predicted on ``source``) as a DICOM SEG."""
    datasets = source_datasets(source)
    order = _frames_in_volume_order(datasets)
    volume = mask if mask.ndim == 3 else mask[..., None]
    if volume.shape[2] != len(order):
        raise ValueError(f"{source}: the mask has {volume.shape[2]} slices, the source {len(order)} frames")
    # highdicom pairs frames with source images in the images' order; a multi-frame source is one image
    per_frame = {frame: volume[:, :, k] for k, frame in enumerate(order)}
    pixels = np.stack([per_frame[frame] for frame in sorted(per_frame)])
    present = [c for c in range(1, len(class_names)) if (pixels == c).any()] or [1]
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=class_names[c],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=_algorithm(model),
    ) for n, c in enumerate(present, start=1)]
    labelled = np.zeros(pixels.shape, dtype=np.uint8)
    for n, c in enumerate(present, start=1):
        labelled[pixels == c] = n
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=labelled, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER["seg"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=model.name, software_versions=str(model.version), device_serial_number="0",
        series_description=f"{model.name} v{model.version} segmentation"[:64], omit_empty_frames=False,
    )
    seg.save_as(out_path)


def write_report(probabilities: np.ndarray, decision: str, source: Path, out_path: Path, model, *,
                 class_names: list[str]) -> None:
    """A classifier's result on ``source`` as a TID 1500 Measurement Report (Comprehensive 3D SR)."""
    datasets = source_datasets(source, pixels=False)
    first = datasets[0]
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(first)
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=str(model.version))
    measurements = [hd.sr.Measurement(
        name=hd.sr.CodedConcept(value=f"P{k}", scheme_designator=SCHEME, meaning=f"Probability of {name}"[:64]),
        value=float(p), unit=codes.UCUM.NoUnits, algorithm_id=algorithm,
    ) for k, (name, p) in enumerate(zip(class_names, probabilities))]
    finding = hd.sr.QualitativeEvaluation(
        name=codes.DCM.Finding,
        value=hd.sr.CodedConcept(value=decision.replace(" ", "")[:16], scheme_designator=SCHEME, meaning=decision[:64]),
    )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"{model.name} v{model.version}"[:64]),
        algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[finding], source_images=[image],
    )
    observer = hd.sr.DeviceObserverIdentifyingAttributes(uid=generate_uid(), name=MANUFACTURER,
                                                         model_name=f"{model.name} v{model.version}"[:64])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=observer)),
        procedure_reported=PROCEDURES.get(str(first.get("Modality", "")), codes.cid100.ImagingProcedure),
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=datasets, content=report, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER["sr"],
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER, is_complete=True,
        series_description=f"{model.name} v{model.version} result"[:64],
    )
    sr.save_as(out_path)


@dataclass(frozen=True)
class Algorithm:
    """The model as a result names it."""

    name: str
    version: str


@dataclass(frozen=True)
class ResultJob:
    """One DICOM result to write: a SEG from the NIfTI ``mask`` file, or an SR from ``probabilities``."""

    source: Path
    out: Path
    algorithm: Algorithm
    class_names: tuple[str, ...]
    mask: Path | None = None
    probabilities: tuple[float, ...] = ()
    decision: str = ""


def write_result(job: ResultJob) -> str:
    """Write one result; "" when written, else why the source's headers do not allow one."""
    try:
        if job.mask is not None:
            mask = np.asarray(nib.load(job.mask).dataobj).astype(np.uint8)
            write_segmentation(mask, job.source, job.out, job.algorithm, class_names=list(job.class_names))
        else:
            write_report(np.asarray(job.probabilities), job.decision, job.source, job.out, job.algorithm,
                         class_names=list(job.class_names))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:  # highdicom's refusals of incomplete headers
        job.out.unlink(missing_ok=True)
        return str(exc) or type(exc).__name__
    return ""


def write_results(jobs: list[ResultJob], *, workers: int | None = None) -> list[str]:
    """Write every job (in worker processes when there are many: highdicom builds each object in Python, some
    tens of milliseconds apiece); for each, "" or why it could not be written."""
    workers = workers or default_workers()  # as ingestion converts: a process per core, at most 8
    description = f"Writing {len(jobs)} DICOM result(s)"
    if workers <= 1 or len(jobs) < PARALLEL_MIN:
        return [write_result(j) for j in track(jobs, description=description)]
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        chunk = max(1, min(32, len(jobs) // (workers * 8)))
        return list(track(pool.map(write_result, jobs, chunksize=chunk), total=len(jobs), description=description))
