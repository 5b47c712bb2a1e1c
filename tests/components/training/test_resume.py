"""Checkpoint every epoch or every train.checkpoint_interval_s; a run killed with SIGKILL resumes into the same
MLflow run; Ctrl-C and SIGTERM end it KILLED with its checkpoint intact, every finished epoch logged once; early
stopping; losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.utils.class_weight import compute_class_weight

from components import paths
from components.config import load_config
from components.errors import ConfigError, Interrupted
from components.training.checkpoint import checkpoint_path, load_checkpoint, training_key
from components.training.classification import train_classifier
from components.training.losses import build_loss, class_weights

TINY = ["train.batch_size=16", "data.image_size=32", "registry.experiment=test-resume", "train.device=cpu",
        "train.checkpoint_interval_s=0"]  # a checkpoint every epoch


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_into_the_same_mlflow_run(workspace, small_dataset):
    overrides = [*TINY, "train.epochs=12"]
    config = load_config(overrides=overrides, environ={})
    script = (
        "import sys; from pathlib import Path; from components.config import load_config; "
        "from components.training.classification import train_classifier; "
        f"train_classifier(manifest_path=Path({str(small_dataset)!r}), data_version='v1', "
        f"config=load_config(overrides={overrides!r}, environ={{}}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_URI", "MEDFLOW"))}
    child = subprocess.Popen([sys.executable, "-c", script], cwd=workspace, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    saved = checkpoint_path(training_key(config, "v1"))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and child.poll() is None:
        state = load_checkpoint(saved)
        if state is not None and state.epoch >= 3:
            break
        time.sleep(0.2)
    assert child.poll() is None, child.stderr.read().decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.wait()
    killed = load_checkpoint(saved)
    client = MlflowClient(paths.tracking_uri())
    logged_before = max(m.step for m in client.get_metric_history(killed.run_id, "train_loss"))
    assert logged_before - killed.epoch <= 1  # at most the epoch in flight is lost

    result = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert result.run_id == killed.run_id and result.resumed_from_epoch == killed.epoch
    experiment = client.get_experiment_by_name("test-resume")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["medflow.resumed_from_epoch"] == str(killed.epoch)
    steps = [m.step for m in client.get_metric_history(result.run_id, "train_loss")]
    assert sorted(set(steps)) == list(range(1, 13))
    assert not saved.exists()  # finished: the next run starts afresh


class _RaisesWhenCollected:
    def __del__(self):
        raise KeyboardInterrupt  # as a signal's handler does when the signal lands in a destructor


class _RaisesInDestructor:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def __del__(self):
        raise self.exc


@pytest.mark.parametrize(("raised", "kept"), [
    (KeyboardInterrupt(), True),   # Ctrl-C landing in a destructor: kept, raised again at the next batch
    (SystemExit(143), True),       # as Prefect's TerminationSignal (a SystemExit) is
    (GeneratorExit(), False),      # a generator closed while collected: not an interrupt
    (ValueError("a bug"), False),  # an error in a destructor: reported as Python reports it, not raised
])
def test_the_hook_keeps_only_interrupts_and_hands_the_rest_to_the_previous_hook(monkeypatch, raised, kept):
    from components.training.loop import discarded_interrupts  # noqa: PLC0415

    reported = []

    def previous(unraisable):
        reported.append(unraisable.exc_value)

    monkeypatch.setattr(sys, "unraisablehook", previous)
    with discarded_interrupts() as reraise:
        _RaisesInDestructor(raised)  # made and collected at once
        if kept:
            with pytest.raises(type(raised)):
                reraise()
        reraise()  # kept once: nothing left to raise
    assert reported == ([] if kept else [raised])
    assert sys.unraisablehook is previous  # put back on leaving


def test_an_interrupt_that_python_discards_in_a_destructor_still_stops_the_training_killed(workspace, small_dataset,
                                                                                           monkeypatch):
    import components.training.loop as loop  # noqa: PLC0415

    config = load_config(overrides=[*TINY, "train.epochs=12"], environ={})
    saved = checkpoint_path(training_key(config, "v1"))
    real = loop.save_checkpoint

    def save_then_collect(path, state):
        real(path, state)
        if state.epoch == 2:
            _RaisesWhenCollected()  # made and collected at once: Python drops what its __del__ raises

    monkeypatch.setattr(loop, "save_checkpoint", save_then_collect)
    with pytest.raises(Interrupted) as stopped:
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    kept = load_checkpoint(saved)
    assert kept is not None and kept.epoch == 2
    assert str(stopped.value) == ("interrupted after epoch 2, which is checkpointed; `medflow run` resumes from "
                                  "there")
    assert MlflowClient(paths.tracking_uri()).get_run(kept.run_id).info.status == "KILLED"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_ends_the_mlflow_run_killed_and_keeps_the_checkpoint_to_resume_from(workspace, small_dataset,
                                                                                        signum):
    from flows.cli import sigterm_interrupts  # noqa: PLC0415 (SIGTERM becomes an interrupt, as in `medflow`)

    config = load_config(overrides=[*TINY, "train.epochs=12"], environ={})
    saved = checkpoint_path(training_key(config, "v1"))

    def interrupt_after_epoch_2():
        while (state := load_checkpoint(saved)) is None or state.epoch < 2:
            time.sleep(0.02)
        os.kill(os.getpid(), signum)  # to this process: its main thread, which trains, gets it

    threading.Thread(target=interrupt_after_epoch_2, daemon=True).start()
    with pytest.raises(Interrupted) as stopped, sigterm_interrupts():
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    kept = load_checkpoint(saved)
    assert kept is not None and 2 <= kept.epoch < 12
    assert str(stopped.value) == (f"interrupted after epoch {kept.epoch}, which is checkpointed; `medflow run` "
                                  "resumes from there")
    assert not list(saved.parent.glob("*.tmp*"))  # no half-written checkpoint beside it
    client = MlflowClient(paths.tracking_uri())
    assert client.get_run(kept.run_id).info.status == "KILLED"  # stopped, not failed

    resumed = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert resumed.run_id == kept.run_id and resumed.resumed_from_epoch == kept.epoch
    assert client.get_run(kept.run_id).info.status == "FINISHED"


def _val_losses(run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(paths.tracking_uri()).get_metric_history(run_id, "val_loss")
    return sorted((m.step, m.value) for m in history)


def _checkpointed_epochs(monkeypatch) -> list[int]:
    import components.training.loop as loop  # noqa: PLC0415

    epochs, real = [], loop.save_checkpoint

    def save(path, state):
        epochs.append(state.epoch)
        real(path, state)

    monkeypatch.setattr(loop, "save_checkpoint", save)
    return epochs


def test_with_the_default_interval_short_epochs_are_checkpointed_once_and_every_epoch_is_logged(
        workspace, small_dataset, monkeypatch):
    config = load_config(overrides=[*TINY[:-1], "train.epochs=4"], environ={})
    assert config.train.checkpoint_interval_s == 60
    saved = _checkpointed_epochs(monkeypatch)
    result = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert saved == [4]  # epochs of a fraction of a second: only the last one
    history = MlflowClient(paths.tracking_uri()).get_metric_history(result.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    by_step = sorted(history, key=lambda m: m.step)
    times = [m.timestamp for m in by_step]  # each at the time it ended, not the time they were all logged
    assert all(earlier < later for earlier, later in zip(times, times[1:])), times


def test_an_interrupt_between_checkpoints_logs_the_finished_epochs_and_the_resumed_run_logs_each_once(
        workspace, small_dataset, monkeypatch):
    import components.training.loop as loop  # noqa: PLC0415

    config = load_config(overrides=[*TINY[:-1], "train.epochs=7", "train.checkpoint_interval_s=30"], environ={})
    whole = train_classifier(manifest_path=small_dataset, data_version="v1-whole", config=config)

    calls = iter(range(10, 10_000, 10))  # a clock that moves 10 s every time the loop reads it

    def clock():
        t = next(calls)
        if t == 70:  # the 7th reading: epoch 5's check whether a checkpoint is due
            raise KeyboardInterrupt
        return float(t)

    monkeypatch.setattr(loop, "now", clock)
    saved = _checkpointed_epochs(monkeypatch)
    with pytest.raises(Interrupted) as stopped:
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert saved == [3]  # start at 10; epoch 3 ends at 40, 30 s later
    assert str(stopped.value) == ("interrupted in epoch 5; the last checkpoint holds epoch 3 "
                                  "(train.checkpoint_interval_s), and `medflow run` resumes from there")
    kept = load_checkpoint(checkpoint_path(training_key(config, "v1")))
    assert kept.epoch == 3
    assert [step for step, _ in _val_losses(kept.run_id)] == [1, 2, 3, 4, 5]  # epochs 4 and 5 logged on the way out

    monkeypatch.setattr(loop, "now", time.monotonic)
    resumed = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert resumed.run_id == kept.run_id and resumed.resumed_from_epoch == 3
    # epochs 4 and 5 trained again, logged once: and as an uninterrupted run has them
    assert [step for step, _ in _val_losses(resumed.run_id)] == [1, 2, 3, 4, 5, 6, 7]
    assert [v for _, v in _val_losses(resumed.run_id)] == pytest.approx([v for _, v in _val_losses(whole.run_id)],
                                                                        rel=1e-6)


def test_an_error_between_checkpoints_fails_the_run_with_its_finished_epochs_logged(workspace, small_dataset,
                                                                                   monkeypatch):
    import components.training.loop as loop  # noqa: PLC0415

    config = load_config(overrides=[*TINY[:-1], "train.epochs=5"], environ={})
    calls = iter(range(1, 100))

    def clock():
        if next(calls) == 4:  # epoch 3's check whether a checkpoint is due
            raise OSError("the clock broke")
        return 0.0

    monkeypatch.setattr(loop, "now", clock)
    with pytest.raises(OSError, match="the clock broke"):
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    client = MlflowClient(paths.tracking_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("test-resume").experiment_id])
    assert run.info.status == "FAILED"
    assert [step for step, _ in _val_losses(run.info.run_id)] == [1, 2, 3]


def test_early_stopping_ends_training_when_validation_stops_improving(workspace, small_dataset):
    config = load_config(overrides=[*TINY, "train.epochs=6", "train.lr=1e-12", "train.early_stopping_patience=2"],
                         environ={})
    result = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert result.epochs < 6
    history = MlflowClient(paths.tracking_uri()).get_metric_history(result.run_id, "epochs_run")
    assert history[0].value == result.epochs


def test_balanced_class_weights_are_scikit_learns():
    labels = np.array([0, 0, 0, 1, 1, 2])
    expected = compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=labels)
    counts = np.bincount(labels, minlength=3)
    np.testing.assert_allclose(class_weights("balanced", counts, 3).numpy(), expected, rtol=1e-6)
    assert class_weights("none", counts, 3) is None
    with pytest.raises(ConfigError, match=r"class\(es\) \[2\] have no training cases"):
        class_weights("balanced", np.array([1, 1, 0]), 3)
    with pytest.raises(ConfigError, match="train.class_weights has 2 values; data.num_classes is 3"):
        class_weights([1.0, 2.0], counts, 3)


def test_focal_loss_is_the_focal_formula_on_softmax_probabilities():
    logits = torch.tensor([[4.0, -4.0], [0.2, -0.2], [-1.0, 1.5]])
    target = torch.tensor([0, 0, 1])
    p_true = torch.softmax(logits, dim=1)[torch.arange(3), target]
    # Lin et al.: FL = -(1 - p_t)^gamma log p_t, gamma 2; MONAI averages over cases and class channels
    expected = (-(1 - p_true) ** 2 * torch.log(p_true)).mean() / 2
    torch.testing.assert_close(build_loss("focal", None)(logits, target), expected, rtol=1e-5, atol=1e-7)
    ce = build_loss("cross_entropy", None)
    assert build_loss("focal", None)(logits[:1], target[:1]) < 1e-3 * ce(logits[:1], target[:1])  # easy cases fade
