"""The logged model: an MLflow pyfunc that rebuilds the MONAI network from its
description and a state_dict (no torch.export, no pickled code), applies the
training preprocessing and the fitted temperature, and returns calibrated
probabilities for raw image arrays: per class for a classifier (N, K), per
class and voxel for a segmentation network (N, K, *spatial); features (N, D)
for a pretrained encoder. Loading and
predicting are :mod:`components.inference`'s.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from components.errors import EvaluationError
from components.inference.model import load_checkpoint
from components.inference.predict import embed_arrays, predict_arrays, segment_arrays
from components.training.backbones import ENCODER_TASK
from components.training.loop import select_device
from components.training.preprocess import SegmentationSpec


DEVICE_CONFIG = {"device": "auto"}  # the model_config a version is logged with: where it predicts (config.DEVICES)


class MedflowModel(mlflow.pyfunc.PythonModel):
    """pyfunc over the ``checkpoint`` artifact folder (``model.pt`` + ``model.json``), either task.

    It predicts on the device its ``model_config`` names (``auto``: a GPU when the machine has one), which a
    loader overrides with ``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` or, for
    ``mlflow models serve``, the environment ``MLFLOW_PYFUNC_INFERENCE_CONFIG='{"device": "cpu"}'``.
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        folder = Path(context.artifacts["checkpoint"])
        self.model, self.spec, description = load_checkpoint(folder)
        self.temperature = float(description.get("temperature", 1.0))
        self.multilabel = description.get("task") == "multilabel"
        self.num_classes = int(description.get("num_classes", 0))
        self.encoder = description.get("task") == ENCODER_TASK
        # versions logged before the model_config existed have none: they take ``auto``
        self.use_device(str((context.model_config or DEVICE_CONFIG).get("device", "auto")),
                        setting="the model's device (model_config 'device')")

    def use_device(self, choice: str, *, setting: str = "device") -> torch.device:
        """Move the network to ``choice`` (``auto``, ``cpu`` or ``cuda``), where every later prediction runs.

        Raises:
            ConfigError: naming ``setting``, for another choice or ``cuda`` without a GPU.
        """
        self.device = select_device(choice, setting=setting)
        self.model.to(self.device)
        return self.device

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:  # noqa: ARG002 (pyfunc signature)
        """Calibrated probabilities: (N, K) for 2D images (N, H, W) of a classifier (per label for a multi-label
        one); (N, K, *spatial) for images (N, *spatial) of a segmentation network. A pretrained encoder's
        features (N, D) for 2D images (N, H, W)."""
        try:
            if self.encoder:
                return embed_arrays(self.model, self.spec, np.asarray(model_input), device=self.device)
            if isinstance(self.spec, SegmentationSpec):
                return segment_arrays(self.model, self.spec, np.asarray(model_input), temperature=self.temperature,
                                      device=self.device)
            return predict_arrays(self.model, self.spec, np.asarray(model_input), temperature=self.temperature,
                                  multilabel=self.multilabel, device=self.device)
        except EvaluationError as exc:  # MLflow's scoring server answers this kind with HTTP 400 and the message
            raise MlflowException.invalid_parameter_value(str(exc)) from exc
