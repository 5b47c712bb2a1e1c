"""The training state kept after every epoch, so that a killed run resumes where it stopped.

A checkpoint holds the model, optimizer, scheduler and AMP scaler states, the
epoch, the best epoch so far (its weights and score), every random generator
(torch, numpy, Python, the DataLoader's and MONAI's transforms'), and the MLflow
run it logs to. It is written to a temporary file and renamed into place, so a
kill while writing leaves the previous one intact. Its file name is the training
step's key (:func:`components.steps.step_key`: the data version, the config
sections training reads, medflow's source hash), so only the same training picks
it up; one written under an earlier key scheme is never loaded.
PyTorch has ``torch.save``; the resume bookkeeping around it is what this adds.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components import paths, steps
from components.config import RunConfig


@dataclass
class TrainingState:
    """Everything an epoch boundary needs to continue."""

    epoch: int
    run_id: str
    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None
    best_state: dict | None  # None when the best epoch is this one: the model's own state
    best_score: tuple | None
    best_metric: float | None
    best_epoch: int
    stale_epochs: int
    rng: dict


def training_key(config: RunConfig, data_version: str) -> str:
    """The training step's key for this data version: its task-cache key and its checkpoint's name."""
    return steps.get_step("train").key(config, {"dataset": data_version})


def checkpoint_path(key: str) -> Path:
    """``.medflow/checkpoints/<key>.pt``; says once per folder when checkpoints of an earlier key scheme
    lie there (they are ignored: training with them would resume from another configuration's state)."""
    folder = paths.medflow_home() / "checkpoints"
    steps.report_legacy_keys(folder, "*.pt", what="training checkpoint(s)", then="training starts afresh")
    return folder / f"{key}.pt"


def capture_rng(*, generator: torch.Generator, transforms: Any) -> dict:
    """Every random generator training draws from."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "loader": generator.get_state(),
        "transforms": [state.get_state() for state in _random_states(transforms)],
    }


def _random_states(transforms: Any) -> list[np.random.RandomState]:
    """The random state of every random transform of a Compose, and of the array transforms a dictionary
    transform draws from (MONAI's RandGaussianNoised draws from its inner RandGaussianNoise's state), in order."""
    from monai.transforms import Randomizable  # noqa: PLC0415

    states: list[np.random.RandomState] = []

    def visit(transform: Any, depth: int) -> None:
        if isinstance(getattr(transform, "R", None), np.random.RandomState):
            states.append(transform.R)
        if depth < 2:
            for value in vars(transform).values():
                if isinstance(value, Randomizable) and value is not transform:
                    visit(value, depth + 1)

    for transform in getattr(transforms, "transforms", ()):
        visit(transform, 0)
    return states


def restore_rng(rng: dict, *, generator: torch.Generator, transforms: Any) -> None:
    """Put back the generators :func:`capture_rng` saw."""
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    generator.set_state(rng["loader"])
    for random_state, state in zip(_random_states(transforms), rng["transforms"]):
        random_state.set_state(state)


def save_checkpoint(path: Path, state: TrainingState) -> None:
    """Write ``state`` atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        torch.save(state.__dict__, tmp)
    except BaseException:  # an error or an interrupt while writing: the previous checkpoint stays, no half file
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)


def load_checkpoint(path: Path) -> TrainingState | None:
    """The saved state, or None when there is none (or it cannot be read: training then starts afresh)."""
    if not path.exists():
        return None
    try:
        return TrainingState(**torch.load(path, weights_only=False))
    except (OSError, RuntimeError, EOFError, TypeError, KeyError):
        return None
