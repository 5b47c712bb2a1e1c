"""medflow predict: a registered version on a folder of new studies, with lineage, drift and bad input."""

from __future__ import annotations

import json
import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import highdicom as hd
import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient
from pydicom.sr.codedict import codes

from components import paths
from components.config import load_config
from components.data.sources import pseudonymise
from components.data.synthetic_segmentation import write_dicom_series
from components.errors import ConfigError, PredictError, RegistryError
from components.inference.evaluate import evaluate_run
from components.monitoring.predict import predict_source
from components.registry.register import register_model
from tests.conftest import SALT


def _logged_text(run_id: str) -> str:
    """Everything the batch's MLflow run holds: params, metrics, tags and the text of its artifacts."""
    client = MlflowClient(paths.tracking_uri())
    run = client.get_run(run_id)
    texts = [json.dumps([run.data.params, run.data.metrics, run.data.tags])]
    for artifact in client.list_artifacts(run_id):
        texts.append(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact.path)).read_text())
    return "\n".join(texts)


def _test_images_scaled(manifest_path: Path, folder: Path, gain: float) -> int:
    """The test split's NIfTI images times ``gain`` (a scanner that much brighter) in ``folder``; their count."""
    test = pd.read_parquet(manifest_path).query("split == 'test'")
    folder.mkdir()
    for image in test["image"]:
        nifti = nib.load(manifest_path.parent / image)
        nib.save(nib.Nifti1Image(nifti.get_fdata(dtype=np.float32) * gain, nifti.affine), folder / Path(image).name)
    return len(test)


@pytest.fixture
def devices_chosen(monkeypatch) -> list[str]:
    """Every device a loaded version is moved to, in order: on a machine without a GPU every choice would read
    "cpu" after the fact, so the choices themselves are recorded (the version's own model_config first)."""
    from components.registry.model import MedflowModel  # noqa: PLC0415

    chosen, original = [], MedflowModel.use_device
    monkeypatch.setattr(MedflowModel, "use_device",
                        lambda self, choice, **kwargs: chosen.append(choice) or original(self, choice, **kwargs))
    return chosen


def test_a_dicom_export_gets_one_row_per_file_equal_to_the_pyfuncs_probabilities(registered, small_export, workspace):
    out = workspace / "out"
    result = predict_source("tiny@challenger", small_export.folder, "dicom", out)
    files = sorted(p for p in small_export.folder.rglob("*.dcm"))
    table = pd.read_csv(out / "predictions.csv", dtype={"version": str, "data_version": str})
    assert result.n_predicted == len(table) == len(files) and result.skipped == []
    assert set(table["path"]) == {str(p.relative_to(small_export.folder)) for p in files}
    assert (table["model"] == "tiny").all() and (table["version"] == "1").all() and (table["data_version"] == "v1").all()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "predictions.parquet"), table, check_dtype=False)

    # the same cases as ingestion wrote them (found by their pseudonym), through the pyfunc
    manifest = pd.read_parquet(registered).set_index("case_id")
    case_ids = [pseudonymise(str(pydicom.dcmread(small_export.folder / p, stop_before_pixels=True).SOPInstanceUID),
                             salt=SALT, prefix="C") for p in table["path"]]
    images = np.stack([nib.load(registered.parent / manifest.at[c, "image"]).get_fdata(dtype=np.float32) for c in case_ids])
    expected = mlflow.pyfunc.load_model("models:/tiny/1").predict(images)
    np.testing.assert_allclose(table[["prob_0", "prob_1"]].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    threshold = json.loads((workspace / "eval" / "report.json").read_text())["threshold"]
    assert (table["prediction"] == (table["prob_1"] >= threshold).astype(int)).all()

    # each result as a TID 1500 structured report in the source's study, referencing the source image
    assert result.no_dicom == [] and table["dicom"].str.endswith("_sr.dcm").all()
    for _, row in table.iloc[:5].iterrows():
        source = pydicom.dcmread(small_export.folder / row["path"])
        report = hd.sr.srread(out / row["dicom"])
        assert report.StudyInstanceUID == source.StudyInstanceUID and report.PatientID == source.PatientID
        assert report.SeriesInstanceUID != source.SeriesInstanceUID
        (group,) = report.content.get_image_measurement_groups()
        assert [image.referenced_sop_instance_uid for image in group.source_images] == [source.SOPInstanceUID]
        algorithm = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
                     for item in group[0].ContentSequence if item.ValueType == "TEXT"}  # TID 4019, no getter
        assert algorithm["Algorithm Name"] == "tiny" and algorithm["Algorithm Version"] == "1"
        probabilities = {m.name.value: m.value for m in group.get_measurements()}
        assert probabilities.keys() == {"P0", "P1"}
        np.testing.assert_allclose([probabilities["P0"], probabilities["P1"]], row[["prob_0", "prob_1"]].to_numpy(float),
                                   atol=1e-6)
        (finding,) = hd.sr.utils.find_content_items(group[0], name=codes.DCM.Finding)
        assert finding.ConceptCodeSequence[0].CodeMeaning == f"label {row['prediction']}"

    record = json.loads((out / "predict.json").read_text())
    assert record["model"]["name"] == "tiny" and record["model"]["data_version"] == "v1"
    assert record["n_inputs"] == len(files) and record["mlflow_run_id"] == result.run_id
    # where the network ran: a GPU under the default --device auto when the machine has one
    assert record["device"] == result.device == ("cuda:0" if torch.cuda.is_available() else "cpu")
    drift = json.loads((out / "drift.json").read_text())
    assert drift["notes"] == [] and {t["fact"] for t in drift["tests"]} >= {"input.mean", "input.modality",
                                                                              "prediction.confidence", "embedding.features"}
    # what medflow logs holds counts and figures, never a source path or a DICOM UID
    logged = _logged_text(result.run_id)
    run = MlflowClient(paths.tracking_uri()).get_run(result.run_id)
    assert run.data.metrics["n_predicted"] == len(files) and run.data.params["version"] == "1"
    assert run.data.params["device"] == result.device
    assert MlflowClient(paths.tracking_uri()).get_experiment(run.info.experiment_id).name == "medflow-predict"
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files[:20]]
    assert not [x for x in [*table["path"][:20], *uids, str(small_export.folder)] if x in logged]


def test_a_batch_from_a_brighter_scanner_drifts_and_the_same_images_do_not(registered, workspace):
    same, brighter = workspace / "same", workspace / "brighter"
    n_test = _test_images_scaled(registered, same, 1.0)
    _test_images_scaled(registered, brighter, 2.5)
    steady = predict_source("tiny/1", same, "nifti", workspace / "p1")
    assert steady.drift["detected"] is False, (steady.drift["drifted"], steady.drift["tests"])
    cached = list((paths.medflow_home() / "cache" / "drift").glob("*.npy"))  # the training features, once a version
    assert len(cached) == 1 and np.load(cached[0]).shape[0] == (pd.read_parquet(registered)["split"] == "train").sum()
    embedding = next(t for t in steady.drift["tests"] if t["fact"] == "embedding.features")
    assert embedding["test"] == "mmd_permutation" and embedding["n_batch"] == n_test
    shifted = predict_source("tiny/1", brighter, "nifti", workspace / "p2")
    assert "input.mean" in shifted.drift["drifted"] and shifted.drift["detected"]
    mean = next(t for t in shifted.drift["tests"] if t["fact"] == "input.mean")
    assert mean["p_value"] < shifted.drift["alpha_per_test"]
    page = (workspace / "p2" / "drift.html").read_text()
    assert f"<b>Drift detected</b> in {', '.join(shifted.drift['drifted'])}." in page
    assert "embedding.features" in shifted.drift["drifted"]  # the brighter images move the features too
    plotted = [t for t in shifted.drift["tests"] if "p_value" in t]
    assert page.count("<img alt='drift figure'") == len(plotted) >= 4  # mean, std, confidence, probability, features
    assert "No drift detected" in (workspace / "p1" / "drift.html").read_text()
    run = MlflowClient(paths.tracking_uri()).get_run(shifted.run_id)
    assert run.data.metrics["drift_detected"] == 1.0 and run.data.metrics["drift_input_mean_p_value"] == mean["p_value"]


def test_inputs_stream_through_in_batches_of_one_shape_and_rows_keep_the_inputs_order(registered, workspace,
                                                                                      monkeypatch):
    import components.monitoring.predict as predict_module  # noqa: PLC0415 (its constant and drift call, patched)
    from components.training.backbones import penultimate  # noqa: PLC0415
    from components.training.preprocess import array_transform  # noqa: PLC0415

    manifest = pd.read_parquet(registered)
    folder = workspace / "mixed"
    folder.mkdir()
    images = []
    for k, image in enumerate(manifest["image"][:23]):  # every third one larger: two shapes, interleaved
        array = nib.load(registered.parent / image).get_fdata(dtype=np.float32)
        array = np.kron(array, np.ones((2, 2), dtype=np.float32)) if k % 3 == 0 else array
        images.append(array)
        nib.save(nib.Nifti1Image(array, np.eye(4)), folder / f"case{k:02d}.nii.gz")
    calls = []
    monkeypatch.setattr(predict_module, "EMBEDDING_BATCH", 6)
    original = predict_module.embedding_drift
    monkeypatch.setattr(predict_module, "embedding_drift",
                        lambda *args, **kwargs: calls.append(args[2]) or original(*args, **kwargs))
    result = predict_source("tiny/1", folder, "nifti", workspace / "out", batch_size=4)

    table = pd.read_csv(workspace / "out" / "predictions.csv")
    assert list(table["path"]) == [f"case{k:02d}.nii.gz" for k in range(23)] and result.n_predicted == 23
    pyfunc = mlflow.pyfunc.load_model("models:/tiny/1")
    expected = np.concatenate([pyfunc.predict(image[None]) for image in images])
    np.testing.assert_allclose(table[["prob_0", "prob_1"]].to_numpy(), expected, rtol=1e-5, atol=1e-6)
    # the embedding test compares the features of 6 inputs drawn at random, taken from the predicting pass
    python_model = pyfunc.unwrap_python_model()
    drawn = sorted(np.random.default_rng(0).choice(23, 6, replace=False))
    encoder, transform = penultimate(python_model.model, 2), array_transform(python_model.spec)
    with torch.no_grad():
        wanted = {k: encoder(transform(images[k])[None]).reshape(-1).numpy() for k in drawn}
    (features,) = calls
    assert features.shape == (6, len(wanted[drawn[0]]))
    for row in features:  # in the order batches were predicted: each row is one drawn input's features
        assert min(np.abs(row - w).max() for w in wanted.values()) < 1e-4
    embedding = next(t for t in result.drift["tests"] if t["fact"] == "embedding.features")
    assert embedding["n_batch"] == 6


def test_inputs_of_many_shapes_wait_in_bounded_memory(registered, workspace, monkeypatch):
    """CT series of many depths: each input its own shape. Partial batches are predicted oldest first once a
    window of inputs waits, instead of all waiting for the end of the source."""
    import components.monitoring.predict as predict_module  # noqa: PLC0415 (its reader, wrapped)

    manifest = pd.read_parquet(registered)
    folder = workspace / "shapes"
    folder.mkdir()
    images = []
    for k, image in enumerate(manifest["image"][:30]):  # 30 inputs, 30 shapes
        array = nib.load(registered.parent / image).get_fdata(dtype=np.float32)
        array = array[: array.shape[0] - k % 15, : array.shape[1] - k // 15]
        images.append(array)
        nib.save(nib.Nifti1Image(array, np.eye(4)), folder / f"case{k:02d}.nii.gz")
    lock, counts, waiting = threading.Lock(), {"read": 0, "predicted": 0}, []
    original_read, original_predict = predict_module._read, mlflow.pyfunc.PyFuncModel.predict

    def read(*args, **kwargs):
        result = original_read(*args, **kwargs)
        with lock:
            counts["read"] += 1
        return result

    def predict(self, data, *args, **kwargs):
        with lock:
            waiting.append(counts["read"] - counts["predicted"])
            counts["predicted"] += len(data)
        return original_predict(self, data, *args, **kwargs)

    monkeypatch.setattr(predict_module, "_read", read)
    monkeypatch.setattr(mlflow.pyfunc.PyFuncModel, "predict", predict)
    predict_source("tiny/1", folder, "nifti", workspace / "out", batch_size=4)

    window = 8  # max(2 * batch_size, 8): up to window + 1 read ahead of the loop, as many in partial batches
    assert counts["predicted"] == 30 and max(waiting) <= 2 * (window + 1), waiting
    table = pd.read_csv(workspace / "out" / "predictions.csv")
    pyfunc = mlflow.pyfunc.load_model("models:/tiny/1")
    expected = np.concatenate([original_predict(pyfunc, image[None]) for image in images])
    np.testing.assert_allclose(table[["prob_0", "prob_1"]].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_bad_input_is_one_line_and_nothing_is_half_written(registered, small_export, workspace):
    with pytest.raises(RegistryError, match="no registered model version 'nope@champion'"):
        predict_source("nope@champion", small_export.folder, "dicom", workspace / "out")
    with pytest.raises(RegistryError, match="names no version"):
        predict_source("tiny", small_export.folder, "dicom", workspace / "out")
    with pytest.raises(PredictError, match="--batch-size must be at least 1, not 0"):
        predict_source("tiny/1", small_export.folder, "dicom", workspace / "out", batch_size=0)
    with pytest.raises(PredictError, match="--drift-alpha must be between 0 and 1, not 5"):
        predict_source("tiny/1", small_export.folder, "dicom", workspace / "out", drift_alpha=5)
    with pytest.raises(ConfigError, match="--device must be one of auto, cpu, cuda, not 'gpu'"):
        predict_source("tiny/1", small_export.folder, "dicom", workspace / "out", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device is 'cuda' but no CUDA device is available"):
            predict_source("tiny/1", small_export.folder, "dicom", workspace / "out", device="cuda")
    (workspace / "empty").mkdir()
    with pytest.raises(PredictError, match="holds no nifti input"):
        predict_source("tiny/1", workspace / "empty", "nifti", workspace / "out")
    with pytest.raises(PredictError, match="does not exist"):
        predict_source("tiny/1", workspace / "nowhere", "dicom", workspace / "out")

    broken = workspace / "broken"
    shutil.copytree(small_export.folder, broken)
    (broken / "images" / "zz_truncated.dcm").write_bytes((broken / "images").glob("*.dcm").__next__().read_bytes()[:300])
    with pytest.raises(PredictError, match="zz_truncated.dcm.*--strict: nothing was predicted"):
        predict_source("tiny/1", broken, "dicom", workspace / "out", strict=True)
    assert not (workspace / "out").exists() and not list(workspace.glob(".out.*"))
    result = predict_source("tiny/1", broken, "dicom", workspace / "out")
    assert [s["path"] for s in result.skipped] == ["images/zz_truncated.dcm"]
    assert len(pd.read_csv(workspace / "out" / "predictions.csv")) == result.n_inputs - 1

    (workspace / "out" / "predict.json").write_text(json.dumps({"model": {"name": "other", "version": "7"}}))
    with pytest.raises(PredictError, match="already holds predictions of other version 7.*--overwrite"):
        predict_source("tiny/1", broken, "dicom", workspace / "out")
    predict_source("tiny/1", broken, "dicom", workspace / "out", overwrite=True)
    assert json.loads((workspace / "out" / "predict.json").read_text())["model"]["name"] == "tiny"


def test_the_device_asked_for_is_where_the_network_moves(registered, workspace, devices_chosen):
    """--device reaches the loaded version."""
    folder = workspace / "three"
    folder.mkdir()
    for image in pd.read_parquet(registered)["image"][:3]:
        shutil.copy(registered.parent / image, folder / Path(image).name)
    result = predict_source("tiny/1", folder, "nifti", workspace / "out", device="cpu")
    assert devices_chosen[-1] == "cpu" and result.device == "cpu" and result.n_predicted == 3


def test_the_nightly_flow_scores_a_timed_batch_and_announces_only_drift(registered, workspace, monkeypatch,
                                                                        devices_chosen):
    """flows/predict.py's medflow-predict (the nightly deployment's entry point) as a plain function: each batch
    in out/<UTC time>/ on the device asked for, medflow.drift.detected emitted for the brighter batch alone."""
    import flows.predict as flow  # noqa: PLC0415

    events, artifacts = [], []
    monkeypatch.setattr(flow, "emit_event", lambda **event: events.append(event))
    monkeypatch.setattr(flow, "create_markdown_artifact", lambda **artifact: artifacts.append(artifact))
    n_test = _test_images_scaled(registered, workspace / "same", 1.0)
    _test_images_scaled(registered, workspace / "brighter", 2.5)

    steady = flow.predict_workspace.fn(str(workspace), "same", model="tiny/1", format="nifti", out="nightly",
                                       device="cpu")
    assert steady["drifted"] == [] and events == [] and devices_chosen[-1] == "cpu"
    shifted = flow.predict_workspace.fn(str(workspace), str(workspace / "brighter"), model="tiny/1",
                                        format="nifti", out="nightly")
    assert devices_chosen[-1] == "auto"  # the flow's default, as the command's
    for summary in (steady, shifted):
        batch = workspace / summary["out"]
        assert batch.parent == workspace / "nightly" and len(batch.name) == len("20261201T010000Z")
        assert summary["n_predicted"] == len(pd.read_csv(batch / "predictions.csv")) == n_test
    assert "input.mean" in shifted["drifted"] and steady["out"] != shifted["out"]
    (event,) = events
    assert event["event"] == flow.DRIFT_EVENT and event["resource"]["prefect.resource.id"] == "medflow.model.tiny"
    assert (event["resource"]["medflow.workspace"], event["resource"]["medflow.model_version"]) == (str(workspace), "1")
    assert event["payload"] == {"drifted": shifted["drifted"], "n_batch": n_test,
                                "mlflow_run_id": shifted["mlflow_run_id"]}
    assert [a["markdown"].splitlines()[0] for a in artifacts] == [f"# {n_test} of {n_test} studies predicted"] * 2


def test_a_batch_started_in_the_same_second_as_another_waits_for_the_next(tmp_path, monkeypatch):
    """Two nightly runs into one out/ within a second get a folder each, both named by their UTC second."""
    import flows.predict as flow  # noqa: PLC0415

    start = datetime(2026, 12, 1, 1, 0, 0, 250_000, tzinfo=timezone.utc)
    clock = iter([start, start, start + timedelta(seconds=1)])
    sleeps = []
    monkeypatch.setattr(flow, "datetime", SimpleNamespace(now=lambda tz: next(clock)))
    monkeypatch.setattr(flow, "time", SimpleNamespace(sleep=sleeps.append))
    first, second = flow.reserve_batch(tmp_path / "nightly"), flow.reserve_batch(tmp_path / "nightly")
    assert (first.name, second.name) == ("20261201T010000Z", "20261201T010001Z")
    assert sleeps == [pytest.approx(0.75)] and first.is_dir() and not any(first.iterdir())


def test_a_nightly_run_refused_leaves_no_batch_folder(workspace):
    """The folder reserved for a batch goes when the batch is refused before anything is written."""
    import flows.predict as flow  # noqa: PLC0415

    with pytest.raises(ConfigError, match="tpu"):
        flow.predict_workspace.fn(str(workspace), "same", model="tiny/1", format="nifti", out="nightly", device="tpu")
    assert not any((workspace / "nightly").glob("*"))


def test_a_segmentation_version_writes_each_volumes_mask_as_its_pyfunc_segments_it(workspace, seg_dataset):
    from components.training.segmentation import train_segmenter

    config = load_config(overrides=["data.task=segmentation", "train.model=unet", "train.model_kwargs={}",
                                    "train.epochs=1", "train.batch_size=4", "train.samples_per_volume=2",
                                    "train.patch_size=[16, 16, 8]", "evaluate.n_bootstrap=0", "registry.model_name=seg",
                                    "registry.experiment=test-predict-seg", "data.name=seg"], environ={})
    trained = train_segmenter(manifest_path=seg_dataset, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=seg_dataset, config=config, out_dir=workspace / "eval")
    register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                   report_path=evaluation.report, config=config)
    manifest = pd.read_parquet(seg_dataset)
    shutil.copytree(seg_dataset.parent, workspace / "data" / "seg")  # the training data version, for drift
    (workspace / "data" / "seg.dvc").write_text("outs:\n- md5: v1.dir\n  path: seg\n")
    source = workspace / "new"
    source.mkdir()
    for image in manifest[manifest["split"] == "test"]["image"]:
        shutil.copy(seg_dataset.parent / image, source / Path(image).name)
    (source / "flat.nii.gz").write_bytes(b"")  # unreadable: listed, the rest predicted
    result = predict_source("seg@challenger", source, "nifti", workspace / "out")
    assert [s["path"] for s in result.skipped] == ["flat.nii.gz"] and "not a readable NIfTI" in result.skipped[0]["reason"]
    table = pd.read_csv(workspace / "out" / "predictions.csv")
    served = mlflow.pyfunc.load_model("models:/seg/1")
    for row in table.itertuples():
        volume = nib.load(source / row.path)
        written = nib.load(workspace / "out" / row.mask)
        expected = served.predict(volume.get_fdata(dtype=np.float32)[None])[0].argmax(axis=0)
        np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
        np.testing.assert_allclose(written.affine, volume.affine)
        assert row.foreground == pytest.approx((expected > 0).mean())
    assert "prediction.foreground" in {t["fact"] for t in result.drift["tests"]}

    # the same volumes as CT series: a DICOM SEG per series that reads back as its NIfTI mask
    series = workspace / "series"
    for image in manifest[manifest["split"] == "test"]["image"]:
        write_dicom_series(series / Path(image).name.split(".")[0], nib.load(seg_dataset.parent / image).get_fdata(),
                           patient_id=Path(image).name, seed=1)
    dicom = predict_source("seg@challenger", series, "dicom", workspace / "out-dicom")
    table = pd.read_csv(workspace / "out-dicom" / "predictions.csv")
    assert dicom.n_predicted == len(table) == len(list(series.iterdir())) and dicom.no_dicom == []
    for row in table.itertuples():
        mask = np.asarray(nib.load(workspace / "out-dicom" / row.mask).dataobj)
        seg = hd.seg.segread(workspace / "out-dicom" / row.dicom)
        slices = sorted(map(pydicom.dcmread, (series / row.path).iterdir()), key=lambda ds: float(ds.ImagePositionPatient[2]))
        read = seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in slices], combine_segments=True)
        np.testing.assert_array_equal(np.moveaxis(read, 0, -1) > 0, mask > 0)
        assert seg.StudyInstanceUID == slices[0].StudyInstanceUID
