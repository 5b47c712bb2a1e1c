"""Load a trained model: from a checkpoint folder, from a training run's ``checkpoint/`` artifacts,
or (as the served pyfunc) from a registered version.

A checkpoint folder holds ``model.pt`` (the state_dict) and ``model.json`` (the
description: task, network name and kwargs, dimensions, classes, preprocessing,
and once registered the fitted temperature; for a pretrained backbone, the encoder's
architecture and its head). The network is rebuilt by name from
the description, so nothing is unpickled but tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import torch

from components.training.backbones import build_described
from components.training.loop import CHECKPOINT_DIR
from components.training.models import memory_format
from components.training.preprocess import PreprocessSpec, SegmentationSpec


def load_checkpoint(folder: Path) -> tuple[torch.nn.Module, PreprocessSpec | SegmentationSpec, dict]:
    """Network (eval mode, CPU), preprocessing and description from ``model.pt`` + ``model.json``.

    The network is in the memory layout ``train.memory_format: auto`` picks for it (channels_last for a
    classifier or encoder of 2D convolutions: the demo's DenseNet predicts 1.5x as fast on a CPU in it,
    BENCHMARKS.md), whatever layout it trained in: the layout changes how fast it computes, and its float
    rounding, not what it computes.
    """
    description = json.loads((folder / "model.json").read_text())
    segmentation = description.get("task") == "segmentation"
    spec = (SegmentationSpec if segmentation else PreprocessSpec).from_dict(description["preprocess"])
    model = build_described(description)
    model.load_state_dict(torch.load(folder / "model.pt", map_location="cpu", weights_only=True))
    model.to(memory_format=memory_format("auto", model, dense=segmentation))
    model.eval()
    return model, spec, description


def download_checkpoint(run_id: str, *, dst: Path | None = None) -> Path:
    """The ``checkpoint/`` artifacts of a training run, downloaded (into ``dst`` when given)."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_DIR,
                                                    dst_path=str(dst) if dst else None))


def load_run_model(run_id: str) -> tuple[torch.nn.Module, PreprocessSpec | SegmentationSpec, dict]:
    """A training run's best network, its preprocessing and description (see :func:`load_checkpoint`)."""
    return load_checkpoint(download_checkpoint(run_id))
