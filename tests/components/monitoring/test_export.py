"""medflow export: the served classifier as ONNX, equal to its pyfunc under onnxruntime, logged to its version."""

from __future__ import annotations

from dataclasses import replace

import mlflow
import nibabel as nib
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from components import paths
from components.errors import PredictError, RegistryError
from components.inference.predict import predict_arrays
from components.monitoring import export as export_module
from components.monitoring.export import ServedClassifier, export_model
from components.training.models import build_classifier
from components.training.preprocess import PreprocessSpec


def test_the_graph_of_a_registered_version_predicts_as_its_pyfunc(registered, workspace):
    result = export_model("tiny@challenger", workspace / "tiny.onnx")
    manifest = pd.read_parquet(registered)
    test = manifest[manifest["split"] == "test"]
    assert result.checked_on.startswith(f"{len(test)} test images of small@v1") and result.n_checked == len(test)
    images = np.stack([nib.load(registered.parent / p).get_fdata(dtype=np.float32) for p in test["image"]])
    session = onnxruntime.InferenceSession(str(workspace / "tiny.onnx"))
    exported = session.run(None, {"images": images})[0]
    expected = mlflow.pyfunc.load_model("models:/tiny/1").predict(images)
    assert exported.shape == expected.shape == (len(test), 2)
    np.testing.assert_allclose(exported, expected, atol=1e-5)
    assert result.max_abs_diff == pytest.approx(np.abs(exported - expected).max(), abs=1e-6)
    one = session.run(None, {"images": images[:1]})[0]  # any batch size
    np.testing.assert_allclose(one, expected[:1], atol=1e-5)

    client = MlflowClient(paths.tracking_uri())
    version = client.get_model_version("tiny", "1")
    assert version.tags["medflow.onnx"] == f"runs:/{version.run_id}/onnx/tiny.onnx" == result.artifact_uri
    assert {a.path for a in client.list_artifacts(version.run_id, "onnx")} == {"onnx/tiny.onnx", "onnx/export.json"}


def test_another_input_size_is_resized_inside_the_graph(registered, workspace):
    result = export_model("tiny/1", workspace / "big.onnx", input_size=(48, 40))
    assert "drawn from the training intensity distribution" in result.checked_on and "no image of 48x40" in result.checked_on
    images = np.random.default_rng(1).normal(size=(3, 48, 40)).astype(np.float32)
    exported = onnxruntime.InferenceSession(str(workspace / "big.onnx")).run(None, {"images": images})[0]
    np.testing.assert_allclose(exported, mlflow.pyfunc.load_model("models:/tiny/1").predict(images), atol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_module_equals_the_pyfuncs_preprocessing_for_a_backbones_channels(multilabel):
    """The pretrained-backbone path (min-max scaling, three channels, per-channel statistics) and sigmoid."""
    torch.manual_seed(0)
    network = build_classifier("densenet", spatial_dims=2, in_channels=3, num_classes=3,
                               kwargs={"init_features": 8, "growth_rate": 4, "block_config": [1, 1]}).eval()
    spec = PreprocessSpec(spatial_size=(24, 24), mean=0.0, std=1.0, channels=3,
                          channel_mean=(0.485, 0.456, 0.406), channel_std=(0.229, 0.224, 0.225))
    images = np.random.default_rng(2).uniform(-100, 900, size=(4, 37, 29)).astype(np.float32)
    images[3] = 5.0  # a flat image: scaled to zeros, as MONAI's ScaleIntensity does
    module = ServedClassifier(network, spec, temperature=1.7, multilabel=multilabel).eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(images)).numpy()
    expected = predict_arrays(network, spec, images, temperature=1.7, multilabel=multilabel)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_bad_input_is_one_line_and_writes_nothing(registered, workspace, monkeypatch):
    with pytest.raises(PredictError, match="--format must be one of onnx, not 'tflite'"):
        export_model("tiny/1", workspace / "m.tflite", fmt="tflite")
    with pytest.raises(RegistryError, match="no registered model version 'nope@champion'"):
        export_model("nope@champion", workspace / "m.onnx")
    with pytest.raises(PredictError, match="--input-size 8 8 is smaller than the model reads"):
        export_model("tiny/1", workspace / "m.onnx", input_size=(8, 8))
    monkeypatch.setattr(export_module, "TOLERANCE", -1.0)  # any difference at all: refused, nothing logged
    with pytest.raises(PredictError, match="differs from its pyfunc by .* nothing was exported"):
        export_model("tiny/1", workspace / "m.onnx")
    run_id = MlflowClient(paths.tracking_uri()).get_model_version("tiny", "1").run_id
    assert MlflowClient(paths.tracking_uri()).list_artifacts(run_id, "onnx") == []
    segmentation = replace(export_module.resolve_model("tiny/1"), task="segmentation")
    monkeypatch.setattr(export_module, "resolve_model", lambda reference: segmentation)
    with pytest.raises(PredictError, match="is a segmentation model: ONNX export covers classifiers"):
        export_model("tiny/1", workspace / "m.onnx")
    assert not list(workspace.glob("m.*")) and not list(workspace.glob("tmp*"))


def test_a_test_image_cut_short_is_named_before_anything_is_exported(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from components.errors import UnreadableImage

    root = tmp_path / "data" / "small"
    (root / "images").mkdir(parents=True)
    for name in ("a", "b"):
        nib.save(nib.Nifti1Image(np.ones((32, 32), dtype=np.float32), np.eye(4)), root / f"images/{name}.nii.gz")
    manifest = pd.DataFrame({"image": ["images/a.nii.gz", "images/b.nii.gz"], "split": ["test", "test"]})
    monkeypatch.setattr(export_module, "data_manifest", lambda dataset, version: manifest)
    monkeypatch.setattr(export_module.paths, "data_root", lambda: tmp_path / "data")
    model = SimpleNamespace(dataset="small", data_version="0123456789abcdef")
    spec = PreprocessSpec(spatial_size=(32, 32), mean=0.0, std=1.0)
    images, checked_on = export_module._check_images(model, spec, (32, 32))
    assert images.shape == (2, 32, 32) and checked_on == "2 test images of small@0123456789ab"
    cut = root / "images/b.nii.gz"
    cut.write_bytes(cut.read_bytes()[:-20])
    with pytest.raises(UnreadableImage, match=f"^{cut}: cannot be read \\(EOFError: "):
        export_module._check_images(model, spec, (32, 32))
