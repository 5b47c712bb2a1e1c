"""Register a trained run's model in the MLflow registry as the ``challenger``."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import monai
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.tracking import MlflowClient

import components
from components import lineage
from components.config import RunConfig
from components.evaluation.declarations import SHORTCUT, report_metrics
from components.inference.model import download_checkpoint
from components.registry.model import DEVICE_CONFIG
from components.tracking import use_experiment

ALIAS_CHALLENGER = "challenger"
MODEL_ARTIFACT = "model"


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model version."""

    name: str
    version: str
    run_id: str

    @property
    def identity(self) -> str:
        """What identifies this version in a step key."""
        return f"{self.name}/{self.version}"

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def model_requirements() -> list[str]:
    """The pip requirements of a logged medflow pyfunc, at the versions installed here."""
    import nibabel  # noqa: PLC0415 (only its version is needed)

    import transformers  # noqa: PLC0415

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"monai=={monai.__version__}",
        f"numpy=={np.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"nibabel=={nibabel.__version__}",
        f"transformers=={transformers.__version__}",  # rebuilds a Hugging Face backbone from its config
        f"safetensors=={metadata.version('safetensors')}",
    ]


def register_model(
    *, run_id: str, data_version: str, temperature: float, report_path: Path, config: RunConfig,
    reuse_existing: bool = True,
) -> RegisteredModel:
    """Log the run's checkpoint as a pyfunc, register it, tag it, alias it ``challenger``.

    Registration is idempotent per training run: when a version of the model already
    comes from ``run_id`` (a retried or repeated call), that version is tagged and
    aliased again instead of registering a duplicate.

    Args:
        run_id: the training run (holds ``checkpoint/``).
        data_version: DVC hash of the training data.
        temperature: fitted on the validation split; applied by the served model.
        report_path: report.json of the evaluation, for the key-metric tags.
        config: the run config (``registry`` section, config hash).
        reuse_existing: reuse a version registered earlier from the same run.
    """
    use_experiment(config.registry.experiment)
    client = MlflowClient()
    report = json.loads(report_path.read_text())
    tagged = [m.name for m in report_metrics(report, kind=None) if m.tagged]
    name = config.registry.model_name
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'") if reuse_existing else []
    if existing:
        version = str(min(int(v.version) for v in existing))
    else:
        version = _log_and_register(client, run_id=run_id, temperature=temperature, config=config)
    run_tags = client.get_run(run_id).data.tags
    tags = {
        **lineage.run_tags(config, data_version),
        **{k: v for k, v in run_tags.items() if k.startswith(lineage.TAG_BACKBONE)},  # the checkpoint it started from
        "medflow.temperature": f"{temperature:.4f}",
        **{f"medflow.test_{m}": str(report["overall"].get(m)) for m in tagged if m in report["overall"]},
        **{f"medflow.{a}_{m}": str(f[m]) for a, f in report["fairness"].items() for m in tagged if m in f},
        **{f"medflow.{a}_{m.name}": str(audit.get(m.field)) for a, audit in (report.get("shortcuts") or {}).items()
           for m in report_metrics(report, kind=(SHORTCUT,)) if m.tagged},
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, ALIAS_CHALLENGER, version)
    return RegisteredModel(name=name, version=version, run_id=run_id)


def _log_and_register(client: MlflowClient, *, run_id: str, temperature: float, config: RunConfig) -> str:
    """Log the run's checkpoint as the pyfunc model and register it; the new version."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = download_checkpoint(run_id, dst=Path(tmp))
        description = json.loads((checkpoint / "model.json").read_text())
        description["temperature"] = temperature
        (checkpoint / "model.json").write_text(json.dumps(description, indent=2))
        signature, example = _signature(description)
        return log_pyfunc(run_id, checkpoint, signature=signature, example=example, name=config.registry.model_name)


def log_pyfunc(run_id: str, checkpoint: Path, *, signature: ModelSignature, example: np.ndarray, name: str) -> str:
    """Log a checkpoint folder into ``run_id`` as medflow's pyfunc (models from code, no pickle) and register it
    as a new version of ``name``; the version."""
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(Path(__file__).with_name("pyfunc_code.py")),
            artifacts={"checkpoint": str(checkpoint)},
            code_paths=[str(Path(components.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=model_requirements(),
            model_config=DEVICE_CONFIG,  # so that a loader or MLFLOW_PYFUNC_INFERENCE_CONFIG may name the device
            registered_model_name=name,
        )
    return str(info.registered_model_version)


def _signature(description: dict) -> tuple[ModelSignature, np.ndarray]:
    """The pyfunc's tensor signature and an input example: images of any size (N, *spatial) in;
    (N, K) class probabilities out, or (N, K, *spatial) for segmentation."""
    k = description["num_classes"]
    if description.get("task") == "segmentation":
        patch = description["preprocess"]["patch_size"]
        free = (-1,) * len(patch)
        return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *free))]),
                              outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k, *free))])), \
            np.zeros((1, *patch), dtype=np.float32)
    height, width = description["preprocess"]["spatial_size"]
    # any image size: the model resizes to (height, width) itself
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, k))])), \
        np.zeros((1, height, width), dtype=np.float32)
