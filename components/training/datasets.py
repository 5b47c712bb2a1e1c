"""What training reads its samples through: the cache ``train.cache`` chooses, the datasets and the training
DataLoader (MONAI's CacheDataset, PersistentDataset and DataLoader), shared by every task's recipe and by
pretraining; :mod:`components.training.loop` runs the epochs over them."""

from __future__ import annotations

import gc
import hashlib
import logging
import multiprocessing
import sys
from dataclasses import dataclass

import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.data.utils import worker_init_fn
from monai.transforms import Compose
from torch.utils.data import DistributedSampler

from components import paths
from components.errors import ConfigError
from components.machine import usable_cores
from components.training import heap

CACHE_SHARE = 0.25  # train.cache auto: of the memory available when training starts, unless cache_max_gb says


@dataclass(frozen=True)
class CachePlan:
    """Where the preprocessed samples of training and validation are kept, and why."""

    mode: str  # memory, disk or none
    reason: str


def plan_cache(cfg, *, n_samples: int, sample_bytes: int) -> CachePlan:
    """``train.cache`` resolved: ``auto`` keeps the samples in memory while all of them (training and validation)
    fit the budget (``train.cache_max_gb``, default a quarter of the available memory), on disk beyond it.

    Raises:
        ConfigError: a budget that holds less than one batch.
    """
    import psutil  # noqa: PLC0415

    if cfg.cache != "auto":
        return CachePlan(cfg.cache, f"train.cache is {cfg.cache}")
    gib = 2**30
    budget = cfg.cache_max_gb * gib if cfg.cache_max_gb is not None else CACHE_SHARE * psutil.virtual_memory().available
    batch = cfg.batch_size * sample_bytes
    if budget < batch:
        raise ConfigError(f"train.cache_max_gb={budget / gib:g} holds less than one batch of {cfg.batch_size} samples "
                          f"({batch / gib:.3g} GB): raise it, lower train.batch_size, or set train.cache: disk")
    need = n_samples * sample_bytes
    where = f"{need / gib:.2f} GB of {n_samples} preprocessed samples"
    source = "train.cache_max_gb" if cfg.cache_max_gb is not None else f"a quarter of the {budget / CACHE_SHARE / gib:.1f} GB available"
    if need <= budget:
        return CachePlan("memory", f"{where} fit the cache budget of {budget / gib:.2f} GB ({source})")
    return CachePlan("disk", f"{where} exceed the cache budget of {budget / gib:.2f} GB ({source}): kept on disk "
                             "under .medflow/cache/ instead")


def check_workers(num_workers: int) -> None:
    """Refuse more DataLoader workers than this process may use cores.

    Raises:
        ConfigError: naming the cores there are.
    """
    cores = usable_cores()
    if num_workers > cores:
        raise ConfigError(f"train.num_workers={num_workers}, but this machine lets medflow use {cores} core(s): "
                          f"set train.num_workers to at most {cores} (0 prepares batches in the training process)")


def train_loader(dataset: Dataset, cfg, *, sampler: DistributedSampler | None, generator: torch.Generator,
                 device: torch.device) -> DataLoader:
    """The training DataLoader: ``train.num_workers`` worker processes, pinned memory on CUDA.

    MONAI's DataLoader seeds each worker's random transforms from ``generator``,
    so a run is reproducible for a seed and a worker count, and a resumed epoch
    draws the same seeds. Workers are started per epoch (not persistent):
    persistent ones would carry their random state across epochs, past a
    resume. On Linux they are forked whatever the process's default: a process
    that was itself spawned (a study's Dask worker) defaults to spawn, whose
    workers import torch again and are sent a pickled copy of the whole cached
    dataset every epoch (seconds an epoch); forked ones share it.
    """
    return DataLoader(dataset, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=generator if sampler is None else None, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda", multiprocessing_context=worker_context(cfg.num_workers),
                      worker_init_fn=start_worker)


def worker_context(num_workers: int):
    """How DataLoader workers start: forked on Linux (see :func:`train_loader`), the default elsewhere or
    without workers. Training's and the forward passes' loaders (:mod:`components.training.forward`) share it."""
    return multiprocessing.get_context("fork") if num_workers and sys.platform.startswith("linux") else None


def start_worker(worker_id: int) -> None:
    """A DataLoader worker's start: MONAI's seeding of its random transforms, after freezing the objects it was
    forked with. A forked worker shares the training process's pages until it writes to one, and Python's full
    garbage collection writes into the header of every object it inherited: without the freeze, the two workers of
    a 50,000-image training each copied 190 MB of their parent at once, 7 minutes into the epoch.

    A training's workers are forked while the epoch loop keeps glibc from trimming its heap
    (:func:`components.training.heap.kept_heap`); a worker lets glibc trim its own again, or the peak of its
    transforms stays resident (two workers: the training step's peak at 1,006 images of 256x256 1.07 and 1.10 GB
    above imports against 1.15 and 1.16, in the same time)."""
    gc.freeze()  # moves every object to the permanent generation in O(1); the worker's own objects are collected
    heap.trim_past_threshold()
    worker_init_fn(worker_id)


def make_dataset(records: list[dict], transform: Compose, *, cache: str, key: str) -> Dataset:
    """MONAI's CacheDataset (memory), PersistentDataset (disk, under ``.medflow/cache/``) or plain Dataset.

    Both caches keep every sample as it is before the first random transform, so
    epochs after the first do not read and preprocess the files again. The memory cache hands its samples to
    the random transforms without a copy (MONAI's ``copy_cache=False``): medflow's random transforms return
    new tensors and never write into their input (tests/components/training/test_preprocess.py checks every
    pipeline), and a deepcopy per draw costs 20 µs of a cached 2D sample's 150 µs.
    """
    if cache == "memory":
        return CacheDataset(records, transform, progress=False, copy_cache=False)
    if cache == "disk":
        folder = paths.medflow_home() / "cache" / hashlib.sha256(key.encode()).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(records, transform, cache_dir=folder)
    return Dataset(records, transform)


def cached_datasets(cfg, train_records: list[dict], val_records: list[dict], *, augment: Compose, plain: Compose,
                    key: str, sample_bytes: int) -> tuple[Dataset, Dataset, CachePlan]:
    """The training and validation datasets, cached as :func:`plan_cache` decides (said in the log)."""
    plan = plan_cache(cfg, n_samples=len(train_records) + len(val_records), sample_bytes=sample_bytes)
    logging.getLogger("medflow.training").info("cache: %s: %s", plan.mode, plan.reason)
    return (make_dataset(train_records, augment, cache=plan.mode, key=f"train-{key}"),
            make_dataset(val_records, plain, cache=plan.mode, key=f"val-{key}"), plan)
