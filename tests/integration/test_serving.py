"""The whole registry path against a tracking server on PostgreSQL, then the champion
served by MLflow's own ``mlflow models serve``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import sqlalchemy
from mlflow.tracking import MlflowClient

from components.config import load_config
from components.data import ingest
from components.inference.evaluate import evaluate_run
from components.registry.card import card_columns
from components.registry.register import register_model
from components.registry.step import promote_version
from components.training.classification import train_classifier

from .conftest import MLFLOW, MlflowServer, free_port, wait_for

TINY = ["train.epochs=1", "data.image_size=32", "evaluate.n_bootstrap=50", "registry.model_name=tiny",
        "evaluate.min_group_size=2", "promotion.rules=[]", "registry.experiment=serving"]


def test_register_promote_and_serve_the_champion(workspace, small_dataset, postgres_url, monkeypatch, tmp_path):
    database = f"mlflow_{free_port()}"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {database}"))
    engine.dispose()
    server = MlflowServer(f"{postgres_url.rsplit('/', 1)[0]}/{database}", tmp_path / "artifacts").start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        config = load_config(overrides=TINY, environ={})
        trained = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
        evaluation = evaluate_run(run_id=trained.run_id, manifest_path=small_dataset, config=config,
                                  out_dir=workspace / "eval")
        model = register_model(run_id=trained.run_id, data_version="v1", temperature=evaluation.temperature,
                               report_path=evaluation.report, config=config)
        read = []  # the manifest's columns the promotion reads: the model card's alone, no image or hash columns

        def load_manifest(path, columns=None):
            read.append(columns)
            return ingest.load_manifest(path, columns=columns)

        monkeypatch.setattr("components.registry.step.load_manifest", load_manifest)
        decision = promote_version(model_name="tiny", version=model.version, config=config,
                                   evaluation_dir=evaluation.report.parent, manifest=small_dataset)
        assert decision.promoted
        assert read == [card_columns(config.data.attributes)]
        client = MlflowClient(server.url)
        described = client.get_model_version("tiny", model.version).description
        assert described.startswith("Binary model trained by medflow on demo (data version ")
        assert "Test split, " in described and " AUC " in described and "Promoted to champion on " in described
        assert f"model_card/model_card.md of run {trained.run_id}" in described
        card = client.list_artifacts(trained.run_id, "model_card")
        assert sorted(a.path for a in card) == ["model_card/model_card.html", "model_card/model_card.md"]

        manifest = pd.read_parquet(small_dataset)
        test = manifest[manifest["split"] == "test"].head(3)
        images = np.stack([nib.load(small_dataset.parent / p).get_fdata(dtype=np.float32) for p in test["image"]])
        expected = mlflow.pyfunc.load_model("models:/tiny@champion").predict(images)

        port = free_port()
        # mlflow runs `uvicorn` from PATH, as in an activated virtual environment
        env = {**os.environ, "MLFLOW_TRACKING_URI": server.url,
               "PATH": f"{os.path.dirname(MLFLOW)}:{os.environ.get('PATH', '')}"}
        serving = subprocess.Popen(
            [MLFLOW, "models", "serve", "-m", "models:/tiny@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=open(tmp_path / "serve.log", "wb"), stderr=subprocess.STDOUT,
        )
        try:
            wait_for(f"http://127.0.0.1:{port}/ping", timeout=120, process=serving)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations",
                data=json.dumps({"inputs": images.tolist()}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                served = np.asarray(json.loads(response.read())["predictions"])
            # a NaN image is refused with 400 and the reason, not answered with NaN (which is not JSON)
            nan = images[:1].copy()
            nan[0, 0, 0] = np.nan
            bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": nan.tolist()}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                urllib.request.urlopen(bad, timeout=60)
                raise AssertionError("a NaN image was answered")
            except urllib.error.HTTPError as refused:
                assert refused.code == 400
                assert "holds values that are not finite" in refused.read().decode()
        finally:
            serving.terminate()
            serving.wait(timeout=30)
        np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-6)
        assert served.shape == (3, 2)
        # medflow predict on the same images as files: the served model's probabilities, row for row
        from components.monitoring.predict import predict_source  # noqa: PLC0415

        new = tmp_path / "new"
        new.mkdir()
        for i, image in enumerate(test["image"]):
            shutil.copy(small_dataset.parent / image, new / f"{i}.nii.gz")
        predict_source("tiny@champion", new, "nifti", tmp_path / "predicted")
        table = pd.read_csv(tmp_path / "predicted" / "predictions.csv").sort_values("path")
        np.testing.assert_allclose(table[["prob_0", "prob_1"]].to_numpy(), served, rtol=1e-5, atol=1e-6)
    finally:
        server.stop()
