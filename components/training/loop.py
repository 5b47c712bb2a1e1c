"""The training loop every task shares: epochs, MLflow logging, checkpoints and resume,
early stopping, mixed precision and DistributedDataParallel.

A task (:mod:`components.training.classification`,
:mod:`components.training.segmentation`, picked by :mod:`components.training.train`) brings a :class:`Recipe`: its network,
datasets, loss and validation; :func:`fit` does the rest. The best epoch (by the
task's validation score) is kept; its state_dict and the model description
(network, preprocessing) are logged as the run's ``checkpoint/`` artifacts,
which the evaluation and registry steps read.

Under ``torchrun`` (see :mod:`components.training.distributed`) the same function
runs on every rank: a DistributedSampler shards the training split, the model is
wrapped in DistributedDataParallel, the training loss is reduced across ranks,
every rank scores the (small) validation split alike, and only rank 0 logs to
MLflow and saves the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import pandas as pd
import torch
import torch.distributed as dist
from mlflow.entities import Metric
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from monai.data import Dataset
from monai.transforms import Compose
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from components import lineage, paths
from components.config import DEVICES, RunConfig
from components.progress import interactive
from components.errors import ConfigError, Interrupted
from components.training.datasets import check_workers, train_loader
from components.training.checkpoint import (
    TrainingState, capture_rng, checkpoint_path, load_checkpoint, restore_rng, save_checkpoint, training_key,
)
from components.training.forward import network_input
from components.training.heap import kept_heap
from components.training.models import memory_format
from components.tracking import use_experiment

CHECKPOINT_DIR = "checkpoint"
now = time.monotonic  # the clock train.checkpoint_interval_s is measured on


@dataclass(frozen=True)
class TrainResult:
    """A finished training run; ``best_metric`` is the best validation score (``metric`` names it)."""

    run_id: str
    best_epoch: int
    best_metric: float | None
    epochs: int
    metric: str = "val_auc"
    resumed_from_epoch: int = 0

    @property
    def identity(self) -> str:
        """What identifies this training in a step key: its MLflow run."""
        return self.run_id


@dataclass
class Recipe:
    """What a task brings to :func:`fit`.

    Attributes:
        network: the model, on the training device.
        train_data: training samples; each batch is a dict with ``image`` and ``label`` tensors.
        augment: the training transforms (their random state is checkpointed).
        loss: ``loss(output, label)`` of one batch, on the device.
        validate: scores the (unwrapped) network on the validation split: ``val_loss`` and ``metric``
            (absent when undefined, e.g. an AUC of one class).
        metric: the validation score that selects the best epoch (higher is better).
        description: what the evaluation and the served model need to rebuild the network.
        params: extra MLflow params (split sizes and the like).
        tags: extra MLflow tags of the run (a backbone's lineage).
        param_groups: the optimizer's parameter groups (layer-wise learning rates); default: every
            parameter that requires a gradient, at ``train.lr``. A network with none (k-NN) is
            validated once instead of trained.
        export: turns the best epoch's state_dict into the checkpoint's (a probe's head joined to its
            frozen encoder, LoRA adapters merged); default: as it is.
        records: JSON artifacts of the run, path -> content (a backbone's load report).
        step: the step this fit is (``train``, ``pretrain``): the run's name and key tag.
        key: the step's key (the checkpoint's name, tagged on the run); default the training step's.
        higher_is_better: whether a larger ``metric`` is a better epoch (a loss is not).
        dense: the network's output is a map (segmentation), which ``train.memory_format: auto`` keeps contiguous.
    """

    network: torch.nn.Module
    train_data: Dataset
    augment: Compose
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    validate: Callable[[torch.nn.Module], dict[str, float]]
    metric: str
    description: dict
    params: dict
    tags: dict[str, str] = field(default_factory=dict)
    param_groups: list[dict] | None = None
    export: Callable[[dict], dict] | None = None
    records: dict[str, dict] = field(default_factory=dict)
    step: str = "train"
    key: str | None = None
    higher_is_better: bool = True
    dense: bool = False


def select_device(choice: str, *, setting: str = "train.device") -> torch.device:
    """``auto`` takes CUDA when present; under torchrun, each rank its own GPU (``LOCAL_RANK``).

    Raises:
        ConfigError: naming ``setting``, for a choice other than :data:`DEVICES` or ``cuda`` without a GPU.
    """
    if choice not in DEVICES:
        raise ConfigError(f"{setting} must be one of {', '.join(DEVICES)}, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def world() -> tuple[int, int]:
    """(rank, world size) of the process group, or (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def splits(manifest: pd.DataFrame, manifest_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The train and val rows; both must hold cases."""
    train_df, val_df = manifest[manifest["split"] == "train"], manifest[manifest["split"] == "val"]
    if train_df.empty or val_df.empty:
        raise ConfigError(f"{manifest_path}: training needs train and val cases, got {len(train_df)} and {len(val_df)}")
    return train_df, val_df


def run_name(config: RunConfig, data_version: str, *, step: str = "train") -> str:
    """What a training run is: ``train <network> on <dataset>@<data version> <UTC time>`` (MLflow's own names
    are random words, the same sequence in every workspace)."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    return f"{step} {config.train.model} on {config.data.name}@{data_version[:8]} {when}"


def dataset_input(manifest_path: Path, config: RunConfig, data_version: str):
    """The data version as an MLflow dataset (the runs table's Dataset column, the run's inputs): the manifest's
    schema and row count, the DVC directory hash as digest, the DVC remote as source."""
    from mlflow.exceptions import MlflowException  # noqa: PLC0415

    manifest = pd.read_parquet(manifest_path)
    remote = config.data.remote or str(paths.dvc_remote_default())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "can be interpreted in multiple ways": a local path is one
        try:
            return mlflow.data.from_pandas(manifest, source=remote, name=config.data.name, digest=data_version,
                                           targets="label")
        except MlflowException:  # a remote MLflow has no source type for (ssh://, azure://, ...): the .dvc file
            dvc_file = manifest_path.parent.with_name(f"{manifest_path.parent.name}.dvc")
            return mlflow.data.from_pandas(manifest, source=str(dvc_file), name=config.data.name,
                                           digest=data_version, targets="label")


@contextlib.contextmanager
def discarded_interrupts():
    """Yields a function that re-raises the Ctrl-C or SIGTERM Python discarded in the meantime.

    A signal's handler runs between the main thread's bytecodes, wherever they are. When they are a destructor's
    that the garbage collector runs (a dulwich object store's, in a Prefect flow run), the KeyboardInterrupt or
    Prefect's TerminationSignal it raises goes to ``sys.unraisablehook`` and is dropped: the training went on, the
    runner killed the process after its grace period, and the MLflow run stayed RUNNING. Neither Python nor
    Prefect keeps such a signal for later, so this hook does, and the loop re-raises it at its next batch.
    """
    kept: list[BaseException] = []
    previous = sys.unraisablehook

    def keep(unraisable) -> None:
        if isinstance(unraisable.exc_value, BaseException) and not isinstance(unraisable.exc_value,
                                                                              (Exception, GeneratorExit)):
            kept.append(unraisable.exc_value)  # an interrupt, not an error: raised again, not reported
        else:
            previous(unraisable)

    def reraise() -> None:
        if kept:
            raise kept.pop(0)

    sys.unraisablehook = keep
    try:
        yield reraise
    finally:
        sys.unraisablehook = previous


def interrupted(saved_epoch: int, *, epoch: int, resumable: bool, lead: bool) -> Interrupted:
    """The interruption in ``epoch`` of a training whose checkpoint holds ``saved_epoch``: the MLflow run ends
    KILLED (not FAILED: nothing went wrong) and the message says what the next ``medflow run`` does."""
    if lead:
        mlflow.end_run("KILLED")
    if not resumable:
        return Interrupted(f"interrupted in epoch {epoch}; train.resume is off, so `medflow run` trains again from "
                           "the start")
    if not saved_epoch:
        return Interrupted(f"interrupted in epoch {epoch}, before the first checkpoint; `medflow run` trains again "
                           "from the start")
    if saved_epoch == epoch - 1:
        return Interrupted(f"interrupted after epoch {saved_epoch}, which is checkpointed; `medflow run` resumes "
                           "from there")
    return Interrupted(f"interrupted in epoch {epoch}; the last checkpoint holds epoch {saved_epoch} "
                       "(train.checkpoint_interval_s), and `medflow run` resumes from there")


def logged_epochs(run_id: str) -> int:
    """The last epoch a run's history holds (0: none): a resumed training logs only the epochs after it, so
    that the epochs it trains again since its checkpoint appear once."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "val_loss")
    return max((metric.step for metric in history), default=0)


def log_epochs(run_id: str, ended: list[tuple[int, dict[str, float], int]]) -> None:
    """Log the metrics of the epochs in ``ended`` (epoch, metrics, the time it ended in ms), each at its step
    and time, in one MLflow call (``log_batch``, which splits past MLflow's batch limits); empties ``ended``."""
    if ended:
        mlflow.MlflowClient().log_batch(run_id, metrics=[
            Metric(name, float(value), timestamp, epoch) for epoch, values, timestamp in ended
            for name, value in values.items()])
        ended.clear()


def log_epochs_on_the_way_out(run_id: str, ended: list) -> None:
    """:func:`log_epochs` for a training that stops on an error or an interrupt: its last epochs are in its
    history, but a tracking server that fails now does not hide why the training stopped."""
    try:
        log_epochs(run_id, ended)
    except Exception as exc:  # noqa: BLE001 (the error or interrupt being raised is the one to show)
        logging.getLogger(__name__).warning("the metrics of epoch(s) %s could not be logged: %s",
                                            ", ".join(str(epoch) for epoch, _, _ in ended), exc)


def fit(recipe: Recipe, *, config: RunConfig, data_version: str, device: torch.device,
        params_out: Path | None = None, manifest_path: Path | None = None) -> TrainResult:
    """Train ``recipe`` for ``train.epochs`` (or until early stopping), checkpointing as it goes.

    At the end of the first epoch that ends ``train.checkpoint_interval_s`` after the last checkpoint (every
    epoch with 0), and of the last epoch, the whole training state is checkpointed under
    ``.medflow/checkpoints/``, after the metrics of the epochs since the last one are logged (in one MLflow
    call). Started again with the same data, config and code (after a crash or a kill), training resumes from
    the last checkpoint and logs into the same MLflow run; an epoch trained again appears once in its history.

    Args:
        recipe: the task's network, data, loss and validation.
        config: the run config (``train`` and ``registry``).
        data_version: the DVC hash of the dataset, tagged on the run.
        device: where the network lives.
        params_out: when given, save this rank's final parameters there as ``rank<r>.pt`` (for checks).
        manifest_path: the dataset's manifest: logged as the run's MLflow dataset input (context ``training``).

    Returns:
        The MLflow run id and the best epoch (the run id is empty on ranks other than 0).
    """
    cfg = config.train
    rank, size = world()
    network, augment = recipe.network, recipe.augment
    layout = memory_format(cfg.memory_format, network, dense=recipe.dense)
    # in place, so the recipe's parameter groups keep their parameters; the first convolution takes the images
    # as they come (one channel: the same bytes in either layout)
    network.to(memory_format=layout)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = (DistributedSampler(recipe.train_data, num_replicas=size, rank=rank, shuffle=True, seed=cfg.seed)
               if size > 1 else None)
    check_workers(cfg.num_workers)
    loader = train_loader(recipe.train_data, cfg, sampler=sampler, generator=generator, device=device)
    groups = recipe.param_groups or [{"params": [p for p in network.parameters() if p.requires_grad]}]
    trainable = any(group["params"] for group in groups)
    epochs = cfg.epochs if trainable else 1  # nothing to train (k-NN): one validation
    model = network
    if size > 1 and trainable:
        model = DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    # a network with nothing to train still gets an optimizer (over no parameters) so that checkpoints keep one form
    optimizer = torch.optim.AdamW(groups if trainable else [torch.zeros(0, requires_grad=True)], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    amp = cfg.amp and device.type == "cuda"  # autocast + GradScaler on CUDA; CPU trains in float32
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    lead = rank == 0  # only rank 0 talks to MLflow, shows progress and writes checkpoints
    key = recipe.key or training_key(config, data_version)
    saved_at = checkpoint_path(key)
    resumed = load_checkpoint(saved_at) if cfg.resume else None
    best_state, best_score, best_metric, best_epoch, stale, first_epoch = None, None, None, 0, 0, 1
    if resumed is not None:
        network.load_state_dict(resumed.model)
        optimizer.load_state_dict(resumed.optimizer)
        scheduler.load_state_dict(resumed.scheduler)
        if resumed.scaler:
            scaler.load_state_dict(resumed.scaler)
        restore_rng(resumed.rng, generator=generator, transforms=augment)
        best_state = resumed.best_state if resumed.best_state is not None else copy.deepcopy(resumed.model)
        best_score, best_metric = resumed.best_score, resumed.best_metric
        best_epoch, stale, first_epoch = resumed.best_epoch, resumed.stale_epochs, resumed.epoch + 1
    experiment_id = use_experiment(config.registry.experiment) if lead else None
    tags = {
        **lineage.run_tags(config, data_version),
        lineage.step_tag(recipe.step): key,
        **recipe.tags,
    }
    if not lead:
        run_context = contextlib.nullcontext()
    elif resumed is not None:
        run_context = mlflow.start_run(run_id=resumed.run_id)
    else:
        run_context = mlflow.start_run(experiment_id=experiment_id, tags=tags, run_name=run_name(config, data_version, step=recipe.step))
    last_epoch = first_epoch - 1
    with run_context as run:
        if lead and resumed is None:
            mlflow.log_params(lineage.flatten(config.model_dump(mode="json")))
            # "trained_on", not "device": registering the version logs its model_config ({"device": "auto"},
            # where it predicts) into this run's params, and MLflow refuses to change a param's value
            mlflow.log_params({**recipe.params, "trained_on": str(device), "world_size": size,
                               "memory_format": str(layout).removeprefix("torch.")})
            mlflow.log_dict(config.model_dump(mode="json"), "config.json")
            for artifact, content in recipe.records.items():
                mlflow.log_dict(content, artifact)
            if manifest_path is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # MLflow's schema hints about integer columns
                    _log_input(dataset_input(manifest_path, config, data_version))
        elif lead:
            mlflow.set_tag("medflow.resumed_from_epoch", str(resumed.epoch))
        saved_epoch = first_epoch - 1  # the epoch the checkpoint on disk holds
        saved_when = now()
        logged = logged_epochs(run.info.run_id) if lead and resumed is not None else 0
        ended: list[tuple[int, dict[str, float], int]] = []  # epochs whose metrics wait for the next checkpoint
        epoch = first_epoch
        try:
            columns = [TextColumn("[bold]Training"), BarColumn(), TextColumn("{task.completed}/{task.total} epochs"),
                       TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
            with Progress(*columns, transient=True, disable=not lead or not interactive()) as progress, \
                    discarded_interrupts() as reraise, kept_heap():
                task = progress.add_task("train", total=epochs, completed=first_epoch - 1, status="")
                for epoch in range(first_epoch, epochs + 1):
                    reraise()
                    if sampler is not None:
                        sampler.set_epoch(epoch)
                    model.train()
                    # the loss is summed on the device: a .item() per step would make the host wait for the GPU
                    total, seen = torch.zeros((), dtype=torch.float64, device=device), 0
                    for batch in loader if trainable else ():
                        reraise()
                        images = network_input(batch["image"], device, non_blocking=True)
                        labels = batch["label"].to(device, non_blocking=True)
                        optimizer.zero_grad(set_to_none=True)
                        with torch.autocast(device_type=device.type, enabled=amp):
                            loss = recipe.loss(model(images), labels)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        total += loss.detach().double() * len(images)
                        seen += len(images)
                    total = float(total)
                    if size > 1:  # the mean training loss over every rank's shard
                        sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
                        dist.all_reduce(sums)
                        total, seen = float(sums[0]), int(sums[1])
                        # DDP keeps parameters equal; BatchNorm statistics follow each rank's shard, so every rank
                        # takes rank 0's (as DDP's own broadcast_buffers does before each forward) before validating
                        for buffer in network.buffers():
                            dist.broadcast(buffer, src=0)
                    lr = scheduler.get_last_lr()[0]
                    if trainable:
                        scheduler.step()
                    scores = recipe.validate(network)
                    reraise()  # before this epoch's metrics and checkpoint, as an interrupt in validation would
                    value = scores.get(recipe.metric)
                    metrics = {**({"train_loss": total / seen, "lr": lr} if seen else {}), **scores}
                    sign = 1.0 if recipe.higher_is_better else -1.0
                    score = (float("-inf") if value is None else sign * value, -scores["val_loss"])
                    if best_score is None or score > best_score:
                        best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                        best_score, best_metric, best_epoch = score, value, epoch
                        stale = 0
                    else:
                        stale += 1
                    last_epoch = epoch
                    stop = bool(cfg.early_stopping_patience and stale >= cfg.early_stopping_patience)
                    if lead and epoch > logged:
                        ended.append((epoch, metrics, int(time.time() * 1000)))
                    due = epoch == epochs or stop or now() - saved_when >= cfg.checkpoint_interval_s
                    if lead and due:  # the epochs' metrics first: a run resumed from this checkpoint has no gap
                        log_epochs(run.info.run_id, ended)
                        save_checkpoint(saved_at, TrainingState(
                            epoch=epoch, run_id=run.info.run_id, model=network.state_dict(),
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict() if amp else None,
                            best_state=None if best_epoch == epoch else best_state,  # None: the model itself
                            best_score=best_score,
                            best_metric=best_metric, best_epoch=best_epoch, stale_epochs=stale,
                            rng=capture_rng(generator=generator, transforms=augment),
                        ))
                        saved_epoch, saved_when = epoch, now()
                    shown = value if value is None else round(value, 3)
                    progress.update(task, advance=1, status=f"{recipe.metric} {shown}")
                    if stop:
                        break
        except Exception:
            if lead:
                log_epochs_on_the_way_out(run.info.run_id, ended)
            raise  # an error: MLflow's context marks the run FAILED
        except BaseException as exc:  # Ctrl-C (KeyboardInterrupt), SIGTERM (Prefect's TerminationSignal), an exit
            if lead:
                log_epochs_on_the_way_out(run.info.run_id, ended)
            # between epochs (``epoch`` just checkpointed) the epoch interrupted is the next one
            stopped = interrupted(saved_epoch, epoch=max(epoch, saved_epoch + 1), resumable=cfg.resume, lead=lead)
            if isinstance(exc, KeyboardInterrupt):
                raise stopped from exc
            # Prefect's own signal keeps its type (Prefect tells a cancellation from a crash by it); it carries
            # the message for the command line
            exc.medflow_interrupted = str(stopped)
            raise
        if params_out is not None:
            params_out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in network.state_dict().items()}, params_out / f"rank{rank}.pt")
        if not lead:
            return TrainResult(run_id="", best_epoch=best_epoch, best_metric=best_metric, epochs=last_epoch,
                               metric=recipe.metric)
        mlflow.log_metrics({"best_epoch": best_epoch, "epochs_run": last_epoch,
                            **({f"best_{recipe.metric}": best_metric} if best_metric is not None else {})})
        with tempfile.TemporaryDirectory() as tmp:
            exported = recipe.export(best_state) if recipe.export else best_state
            torch.save({k: v.detach().cpu().contiguous() for k, v in exported.items()}, Path(tmp) / "model.pt")
            (Path(tmp) / "model.json").write_text(json.dumps(recipe.description, indent=2))
            mlflow.log_artifacts(tmp, CHECKPOINT_DIR)
    saved_at.unlink(missing_ok=True)  # finished: the next training with these inputs starts afresh
    return TrainResult(run_id=run.info.run_id, best_epoch=best_epoch, best_metric=best_metric, epochs=last_epoch,
                       metric=recipe.metric, resumed_from_epoch=resumed.epoch if resumed else 0)


def _log_input(dataset) -> None:
    """Log the training data as the run's input. Arms of a study log the same dataset at once: MLflow's store
    gets or creates it without a lock, so the loser of that race finds it on a second try."""
    try:
        mlflow.log_input(dataset, context="training")
    except mlflow.exceptions.MlflowException as exc:
        if "UNIQUE constraint" not in str(exc) and "Duplicate entry" not in str(exc):
            raise
        mlflow.log_input(dataset, context="training")

