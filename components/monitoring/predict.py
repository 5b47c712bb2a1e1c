"""``medflow predict``: a registered model on a folder of new studies.

The inputs are read with ingestion's own readers (:func:`components.data.sources.read_source`: DICOM files or
series folders, NIfTI, PNG/JPEG), so a study is seen exactly as a training case was, and predicted by the
version's pyfunc (its preprocessing and temperature) in batches of equal shapes. The output folder holds

- ``predictions.csv`` and ``predictions.parquet``: one row per input (its path in the source, the model, its
  version and the data version it was trained on, each class's probability and the decision at the model's
  threshold; for segmentation the mask file and its foreground fraction);
- ``masks/`` (segmentation): NIfTI masks in the input's geometry;
- ``dicom/`` (DICOM input): each result as a DICOM object for the PACS, a SEG for a mask and a TID 1500
  structured report for a classification (see :mod:`components.monitoring.dicom_results`);
- ``predict.json``: the lineage (model, version, run, training data version, source, counts) and every input
  that could not be predicted, with the reason;
- ``drift.json`` and ``drift.html`` (with a plot per test): this batch against the model's training data (see
  :mod:`components.monitoring.drift`).

It is written to a temporary folder and moved into place, so a failure leaves nothing half-written. The
batch's MLflow run (experiment ``medflow-predict``) holds counts, the model version and the
drift figures, never a path or a DICOM UID: predictions go back to the hospital, what medflow logs does not.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from components import lineage, paths
from components.data.dicom import IGNORED_NAMES
from components.data.ingest import default_workers
from components.data.sources import FORMATS, NIFTI_SUFFIXES, PNG_SUFFIXES, image_facts, read_source
from components.errors import IngestError, PredictError, RegistryError
from components.monitoring.drift import EMBEDDING_BATCH, batch_drift, embedding_drift
from components.monitoring.drift_page import write_drift_html
from components.inference.results import REPORT_DIR
from components.progress import track

BATCH_SIZE = 32
NOT_DICOM = (".csv", ".txt", ".json", ".md", ".parquet", ".html", ".xml", ".yaml", ".yml")
PREDICT_RECORD = "predict.json"


@dataclass(frozen=True)
class ModelRef:
    """A registered version and what predicting with it needs from its training run."""

    name: str
    version: str
    run_id: str
    data_version: str
    dataset: str
    task: str
    threshold: float

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


@dataclass
class BatchResult:
    """What one ``medflow predict`` did."""

    out_dir: Path
    model: ModelRef
    n_inputs: int
    n_predicted: int
    skipped: list[dict] = field(default_factory=list)
    drift: dict | None = None
    run_id: str = ""
    no_dicom: list[dict] = field(default_factory=list)
    device: str = "cpu"  # where the network ran, as torch names it (cpu, cuda:0)


def resolve_model(reference: str) -> ModelRef:
    """``NAME@alias``, ``NAME/VERSION`` or ``models:/`` either: the version, its lineage and its threshold.

    Raises:
        RegistryError: the model, alias or version does not exist, or its run has no evaluation.
    """
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = MlflowClient()
    ref = reference.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in ref:
            name, number = ref.split("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise RegistryError(f"{reference!r} names no version: give NAME@ALIAS (e.g. {ref}@champion) or NAME/VERSION")
    except MlflowException as exc:
        raise RegistryError(f"no registered model version {reference!r} in {paths.tracking_uri()}") from exc
    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = json.loads(Path(mlflow.artifacts.download_artifacts(
                run_id=version.run_id, artifact_path=f"{REPORT_DIR}/report.json", dst_path=tmp)).read_text())
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"version {version.version} of {name} has no evaluation in run {version.run_id}") from exc
    return ModelRef(name=name, version=str(version.version), run_id=version.run_id,
                    data_version=version.tags.get(lineage.TAG_DATA_VERSION, ""),
                    dataset=version.tags.get(lineage.TAG_DATASET, ""), task=report["task"],
                    threshold=float(report.get("threshold", 0.5)))


def list_inputs(source: Path, fmt: str) -> list[Path]:
    """The cases of a source folder: each NIfTI or PNG/JPEG file; for DICOM each file, except that a folder
    whose files are all one series is one case (a CT or MR volume).

    Raises:
        PredictError: the folder does not exist, or holds no input of the format.
    """
    if fmt not in FORMATS:
        raise PredictError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if not source.is_dir():
        raise PredictError(f"the source folder {source} does not exist")
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.startswith("."))
    if fmt == "nifti":
        found = [p for p in files if p.name.lower().endswith(NIFTI_SUFFIXES)]
    elif fmt == "png":
        found = [p for p in files if p.name.lower().endswith(PNG_SUFFIXES)]
    else:
        found = _dicom_cases([p for p in files if p.name not in IGNORED_NAMES and not p.name.lower().endswith(NOT_DICOM)])
    if not found:
        raise PredictError(f"{source} holds no {fmt} input")
    return found


def _dicom_cases(files: list[Path]) -> list[Path]:
    """Files, with each folder of one multi-file series replaced by the folder (ingest's series case)."""
    import pydicom  # noqa: PLC0415

    series: dict[Path, dict[str, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in files:
        try:
            uid = str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
                      .get("SeriesInstanceUID", ""))
        except Exception:  # noqa: BLE001 (not DICOM: it is listed, and read_source says why it cannot be read)
            uid = f"unreadable:{path}"
        series[path.parent][uid].append(path)
    cases = []
    for folder, by_uid in series.items():
        if len(by_uid) == 1 and len(next(iter(by_uid.values()))) > 1 and not next(iter(by_uid)).startswith("unreadable"):
            cases.append(folder)
        else:
            cases += [p for members in by_uid.values() for p in members]
    return sorted(cases)


def _check_output(out_dir: Path, model: ModelRef, *, overwrite: bool) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    record = out_dir / PREDICT_RECORD
    previous = json.loads(record.read_text()).get("model", {}) if record.is_file() else None
    same = previous is not None and (previous.get("name"), previous.get("version")) == (model.name, model.version)
    if not same and not overwrite:
        held = (f"predictions of {previous.get('name')} version {previous.get('version')}" if previous is not None
                else "other files")
        raise PredictError(f"{out_dir} already holds {held}: choose another --out, or pass --overwrite")


def _read(path: Path, fmt: str, source: Path, *, task: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The input's array and affine as ingestion reads them; refused when the model cannot take its shape."""
    image = read_source(path, fmt=fmt, rel_path=str(path.relative_to(source)))
    array = np.squeeze(image.array) if image.array.ndim == 3 and 1 in image.array.shape else image.array
    wanted = 3 if task == "segmentation" else 2
    if array.ndim != wanted:
        kind = "volumes (H, W, D)" if wanted == 3 else "2D images"
        raise IngestError(f"{path}: shape {image.array.shape}; the model reads {kind}")
    return array.astype(np.float32), image.affine, image.modality


def predict_source(
    reference: str, source: Path, fmt: str, out_dir: Path, *, strict: bool = False, overwrite: bool = False,
    batch_size: int = BATCH_SIZE, drift_alpha: float = 0.01, experiment: str = "medflow-predict",
    dicom_results: bool = True, device: str = "auto",
) -> BatchResult:
    """Predict every input of ``source`` with the registered version ``reference`` into ``out_dir``.

    Raises:
        RegistryError: an unknown model, alias or version.
        PredictError: a batch size under 1 or a drift alpha outside (0, 1), a missing or empty source, an
            output folder holding another model's predictions, no input the model can read, or (``strict``)
            any unreadable input.
        ConfigError: a ``device`` other than auto, cpu and cuda, or cuda without a GPU.
    """
    from components.training.loop import select_device  # noqa: PLC0415 (torch, as the pyfunc)

    select_device(device, setting="--device")  # refused before anything is read or loaded
    if batch_size < 1:
        raise PredictError(f"--batch-size must be at least 1, not {batch_size}")
    if not 0 < drift_alpha < 1:
        raise PredictError(f"--drift-alpha must be between 0 and 1, not {drift_alpha:g}")
    model = resolve_model(reference)
    inputs = list_inputs(source, fmt)
    _check_output(out_dir, model, overwrite=overwrite)
    pyfunc = mlflow.pyfunc.load_model(model.uri)
    ran_on = str(pyfunc.unwrap_python_model().use_device(device, setting="--device"))  # the network's and features'
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        rows, facts, skipped, no_dicom, features = _predict(pyfunc, model, inputs, fmt, source, staging, strict=strict,
                                                          batch_size=batch_size, dicom_results=dicom_results)
        if not rows:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            raise PredictError(f"no input of {source} could be predicted ({len(skipped)} unreadable: {reasons})")
        table = pd.DataFrame(rows)
        table.to_csv(staging / "predictions.csv", index=False)
        table.to_parquet(staging / "predictions.parquet", index=False)
        n_classes = sum(str(c).startswith("prob_") for c in table.columns)
        samples: dict = {}
        embedding = embedding_drift(pyfunc.unwrap_python_model(), model, features, n_classes, samples=samples)
        drift = batch_drift(model, facts=pd.DataFrame(facts), predictions=table, alpha=drift_alpha, embedding=embedding,
                            samples=samples)
        (staging / "drift.json").write_text(json.dumps(drift, indent=2, default=str) + "\n")
        write_drift_html(drift, samples, staging / "drift.html")
        result = BatchResult(out_dir=out_dir, model=model, n_inputs=len(inputs), n_predicted=len(rows),
                             skipped=skipped, drift=drift, no_dicom=no_dicom, device=ran_on)
        result.run_id = _log_batch(result, fmt=fmt, experiment=experiment, page=staging / "drift.html")
        (staging / PREDICT_RECORD).write_text(json.dumps({
            "model": asdict(model), "source": str(source), "format": fmt,
            "predicted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "code_version": lineage.code_version(), "mlflow_run_id": result.run_id,
            "n_inputs": len(inputs), "n_predicted": len(rows), "device": ran_on, "skipped": skipped,
            "no_dicom_result": no_dicom,
        }, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.replace(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


def _read_ahead(inputs: list[Path], read: Callable[[Path], tuple], *, window: int,
                workers: int) -> Iterator[tuple[int, Path, Future]]:
    """Each input, in order, with its position and the future of its reading. Threads read up to ``window``
    inputs ahead of the consumer, so memory holds a window of arrays however many inputs there are, and files
    are read while the network computes (torch releases the GIL; a thread shares the arrays, where a process
    would pickle each volume through a pipe)."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medflow-read") as pool:
        pending: deque[tuple[int, Path, Future]] = deque()
        for index, path in enumerate(inputs):
            pending.append((index, path, pool.submit(read, path)))
            if len(pending) > window:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def _predict(pyfunc, model: ModelRef, inputs: list[Path], fmt: str, source: Path, staging: Path, *, strict: bool,
             batch_size: int, dicom_results: bool = True
             ) -> tuple[list[dict], list[dict], list[dict], list[dict], np.ndarray | None]:
    """Rows of predictions (in the inputs' order), the inputs' image facts (for drift), the inputs skipped with
    their reasons, the inputs predicted without a DICOM result, with theirs, and the penultimate features of
    up to ``EMBEDDING_BATCH`` inputs drawn at random (a classifier's, for embedding drift; else None).

    Inputs are read ahead of the network and predicted as soon as ``batch_size`` of one shape are read, so
    reading and predicting overlap and memory holds a few batches, not the whole source. Where inputs come in
    many shapes, the oldest partial batch is predicted once more than a window of inputs wait, so memory stays
    bounded however many shapes there are."""
    rows, facts, skipped, jobs, features = [], [], [], [], []
    drawn = (set(np.random.default_rng(0).choice(len(inputs), EMBEDDING_BATCH, replace=False).tolist())
             if len(inputs) > EMBEDDING_BATCH else None)
    from components.training.backbones import captured_features  # noqa: PLC0415 (torch, as the pyfunc)

    python_model = pyfunc.unwrap_python_model()
    capture = (nullcontext(None) if model.task == "segmentation"
               else captured_features(python_model.model, python_model.num_classes))

    def _refuse(message: str) -> None:
        if strict:
            raise PredictError(f"{message} (--strict: nothing was predicted)")

    def _run(batch: list[tuple], captured: list | None) -> None:
        try:
            probabilities = np.asarray(pyfunc.predict(np.stack([item[2] for item in batch])))
        except MlflowException as exc:  # the pyfunc's refusal (non-finite values, too small): the batch's inputs
            _refuse(exc.message)
            skipped.extend({"path": str(path.relative_to(source)), "reason": exc.message} for _, path, *_ in batch)
            return
        finally:
            batch_features = np.concatenate([t.numpy() for t in captured]) if captured else None
            if captured:
                captured.clear()
        for k, ((index, path, array, affine, modality), prob) in enumerate(zip(batch, probabilities)):
            row = _row(model, path.relative_to(source), prob, affine, staging, index=len(rows))
            if fmt == "dicom" and dicom_results:
                jobs.append((len(rows), _dicom_job(model, path, prob, row, staging, index=len(rows))))
            rows.append((index, row))
            facts.append({**image_facts(array, affine), "modality": modality})
            if batch_features is not None and (drawn is None or index in drawn):
                features.append(batch_features[k])

    groups: dict[tuple, list[tuple]] = defaultdict(list)
    read = partial(_read, fmt=fmt, source=source, task=model.task)
    window = max(2 * batch_size, 8)
    with capture as captured:
        ahead = _read_ahead(inputs, read, window=window, workers=min(4, default_workers()))
        description = f"Predicting with {model.name} v{model.version}"
        for index, path, future in track(ahead, total=len(inputs), description=description):
            try:
                array, affine, modality = future.result()
            except IngestError as exc:
                _refuse(str(exc))
                skipped.append({"path": str(path.relative_to(source)), "reason": str(exc).removeprefix(f"{path}: ")})
                continue
            group = groups[array.shape]
            group.append((index, path, array, affine, modality))
            if len(group) == batch_size:
                _run(groups.pop(array.shape), captured)
            elif sum(map(len, groups.values())) > window:  # many shapes (CT series of many depths): oldest first
                _run(groups.pop(next(iter(groups))), captured)
        for group in list(groups.values()):
            _run(group, captured)
    no_dicom = []
    if jobs:
        from components.monitoring.dicom_results import write_results  # noqa: PLC0415 (DICOM only)

        (staging / "dicom").mkdir(exist_ok=True)
        for (position, job), reason in zip(jobs, write_results([job for _, job in jobs])):
            row = rows[position][1]
            row["dicom"] = "" if reason else str(job.out.relative_to(staging))
            if reason:
                no_dicom.append({"path": row["path"], "reason": reason})
    rows.sort(key=lambda item: item[0])
    return [row for _, row in rows], facts, skipped, no_dicom, (np.stack(features) if features else None)


def _row(model: ModelRef, rel_path: Path, prob: np.ndarray, affine: np.ndarray, staging: Path, *, index: int) -> dict:
    """One input's row of ``predictions.csv``; a segmentation's mask is written into ``staging/masks/``."""
    row = {"path": str(rel_path), "model": model.name, "version": model.version, "data_version": model.data_version}
    if model.task == "segmentation":
        mask = prob.argmax(axis=0).astype(np.uint8)
        (staging / "masks").mkdir(exist_ok=True)
        mask_rel = f"masks/{index:06d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(mask, affine), staging / mask_rel)
        return row | {"mask": mask_rel, "foreground": float((mask > 0).mean()), "confidence": float(prob.max(axis=0).mean())}
    row |= {f"prob_{k}": float(p) for k, p in enumerate(prob)}
    if model.task == "multilabel":
        row["prediction"] = "|".join(str(k) for k, p in enumerate(prob) if p >= model.threshold)
    elif len(prob) == 2:
        row["prediction"] = int(prob[1] >= model.threshold)
    else:
        row["prediction"] = int(prob.argmax())
    return row | {"confidence": float(prob.max())}


def _dicom_job(model: ModelRef, path: Path, prob: np.ndarray, row: dict, staging: Path, *, index: int):
    """The DICOM result of one predicted DICOM input, to be written into ``staging/dicom/``."""
    from components.monitoring.dicom_results import Algorithm, ResultJob  # noqa: PLC0415 (DICOM only)

    names = tuple(f"label {k}" for k in range(len(prob)))
    algorithm = Algorithm(model.name, model.version)
    if model.task == "segmentation":
        return ResultJob(source=path, out=staging / f"dicom/{index:06d}_seg.dcm", algorithm=algorithm,
                         class_names=("background", *names[1:]), mask=staging / row["mask"])
    decision = str(row["prediction"])
    return ResultJob(source=path, out=staging / f"dicom/{index:06d}_sr.dcm", algorithm=algorithm, class_names=names,
                     probabilities=tuple(map(float, prob)), decision=f"label {decision}" if decision else "no label")


def _log_batch(result: BatchResult, *, fmt: str, experiment: str, page: Path) -> str:
    """The batch's MLflow run: counts, the model version and the drift figures; no path, no UID."""
    from components.tracking import use_experiment  # noqa: PLC0415

    model = result.model
    experiment_id = use_experiment(experiment)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"predict {model.name} v{model.version} {stamp}",
                          tags={lineage.TAG_DATA_VERSION: model.data_version, lineage.TAG_DATASET: model.dataset,
                                "medflow.model": model.name, "medflow.model_version": model.version,
                                **{lineage.TAG_ORCHESTRATION + k: v for k, v in lineage.orchestration().items()}}) as run:
        mlflow.log_params({"model": model.name, "version": model.version, "format": fmt, "task": model.task,
                           "threshold": model.threshold, "device": result.device})
        mlflow.log_metrics({"n_inputs": result.n_inputs, "n_predicted": result.n_predicted,
                            "n_skipped": len(result.skipped), **(result.drift or {}).get("metrics", {})})
        mlflow.log_dict(result.drift or {}, "drift.json")
        mlflow.log_artifact(str(page))  # figures of intensities, probabilities and features: no path, no UID
        return run.info.run_id

