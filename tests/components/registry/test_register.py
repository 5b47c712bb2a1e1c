from __future__ import annotations

import json

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from components import lineage, paths
from components.config import load_config
from components.errors import ConfigError
from components.inference.evaluate import evaluate_run
from components.registry.register import ALIAS_CHALLENGER, register_model
from components.training.classification import train_classifier

TINY = ["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=50", "registry.experiment=test-reg",
        "registry.model_name=tiny", "evaluate.min_group_size=2"]


def test_train_evaluate_register_then_serve_raw_arrays(workspace, small_dataset, monkeypatch):
    config = load_config(overrides=TINY, environ={})
    trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=config, out_dir=workspace / "eval")
    report = json.loads(evaluation.report.read_text())
    manifest = pd.read_parquet(small_dataset)
    assert report["n"] == (manifest["split"] == "test").sum()
    assert evaluation.temperature > 0
    calibration = json.loads((workspace / "eval" / "calibration.json").read_text())
    assert calibration["before"]["auc"] == pytest.approx(calibration["after"]["auc"])  # scaling keeps the ranking
    assert report["calibration"]["temperature"] == pytest.approx(evaluation.temperature)
    page = (workspace / "eval" / "report.html").read_text()
    assert "<h2>Calibration</h2>" in page and f"T = {evaluation.temperature:.3f}" in page
    logged = {a.path for a in MlflowClient(paths.tracking_uri()).list_artifacts(trained.run_id, "evaluation")}
    assert {"evaluation/report.json", "evaluation/report.html", "evaluation/predictions.parquet"} <= logged

    model = register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                           report_path=evaluation.report, config=config)
    client = MlflowClient(paths.tracking_uri())
    params = client.get_run(trained.run_id).data.params  # where it trained, and the version's model_config
    assert params["trained_on"].startswith("cuda" if torch.cuda.is_available() else "cpu")
    assert params["device"] == "auto"  # logged by MLflow with the model: no clash with the training's param
    version = client.get_model_version("tiny", model.version)
    assert version.tags[lineage.TAG_DATA_VERSION] == "v1"
    assert version.tags[lineage.TAG_CONFIG_HASH] == config.config_hash()
    assert version.tags[lineage.TAG_CODE_VERSION]
    # the shortcut audit's AUCs are tags too (declared once, tagged as declared)
    assert float(version.tags["medflow.sex_shortcut_auc"]) == pytest.approx(report["shortcuts"]["sex"]["auc"])
    assert str(client.get_model_version_by_alias("tiny", ALIAS_CHALLENGER).version) == model.version
    # a retried registration of the same run reuses its version: no duplicate
    again = register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                           report_path=evaluation.report, config=config)
    assert again.version == model.version
    assert [str(v.version) for v in client.search_model_versions("name='tiny'")] == [model.version]

    test = manifest[manifest["split"] == "test"].head(5)
    images = np.stack([nib.load(small_dataset.parent / p).get_fdata(dtype=np.float32) for p in test["image"]])
    served = mlflow.pyfunc.load_model(f"models:/tiny@{ALIAS_CHALLENGER}")
    prob = served.predict(images)
    assert prob.shape == (5, 2)
    np.testing.assert_allclose(prob.sum(axis=1), 1.0, rtol=1e-5)
    # the served model applies the fitted temperature to the very network that was evaluated
    predictions = pd.read_parquet(evaluation.predictions).set_index("case_id")
    np.testing.assert_allclose(prob[:, 1], predictions.loc[test["case_id"], "prob"].to_numpy(), rtol=1e-4, atol=1e-5)
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, -1, -1)
    assert served.predict(np.zeros((2, 50, 40), dtype=np.float32)).shape == (2, 2)  # resized to the training size
    # nonsense is refused with MLflow's "invalid parameter" (the scoring server's HTTP 400), not answered
    from mlflow.exceptions import MlflowException

    nan = images.copy()
    nan[1, 3, 3] = np.nan
    with pytest.raises(MlflowException, match=r"image 1 \(of 5\) holds values that are not finite") as raised:
        served.predict(nan)
    assert raised.value.get_http_status_code() == 400
    with pytest.raises(MlflowException, match=r"images of shape \(1, 1\) are smaller than the model can see") as raised:
        served.predict(np.ones((1, 1, 1), dtype=np.float32))
    assert raised.value.get_http_status_code() == 400

    # it predicts where its model_config says (auto: a GPU when there is one); a loader or the serving
    # environment overrides that, as MLflow lets it for the keys a version was logged with
    gpu = torch.cuda.is_available()
    assert served.unwrap_python_model().device.type == ("cuda" if gpu else "cpu")
    on_cpu = mlflow.pyfunc.load_model(f"models:/tiny/{model.version}", model_config={"device": "cpu"})
    assert on_cpu.unwrap_python_model().device.type == "cpu"
    np.testing.assert_allclose(on_cpu.predict(images), prob, rtol=1e-4, atol=1e-3 if gpu else 1e-5)  # cuDNN's TF32
    with pytest.raises(ConfigError, match=r"the model's device \(model_config 'device'\) must be one of auto, cpu, "
                                          r"cuda, not 'gpu'"):
        mlflow.pyfunc.load_model(f"models:/tiny/{model.version}", model_config={"device": "gpu"})
    if not gpu:
        with monkeypatch.context() as env, pytest.raises(ConfigError, match="'cuda' but no CUDA device is available"):
            env.setenv("MLFLOW_PYFUNC_INFERENCE_CONFIG", json.dumps({"device": "cuda"}))
            mlflow.pyfunc.load_model(f"models:/tiny/{model.version}")
