"""DataLoader workers: reproducible for a seed and a worker count, and a resumed run continues exactly as an
uninterrupted one, with workers as without."""

from __future__ import annotations

import mlflow
import pytest

from components import paths
from components.config import load_config
from components.errors import ConfigError, Interrupted
from components.training import datasets, loop
from components.training.classification import train_classifier

TINY = ["train.batch_size=16", "data.image_size=32", "registry.experiment=test-workers", "train.device=cpu",
        "train.epochs=3", "train.checkpoint_interval_s=0"]  # a checkpoint every epoch


def _history(run_id: str, metric: str) -> list[float]:
    client = mlflow.MlflowClient(paths.tracking_uri())
    return [m.value for m in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_continues_exactly_as_an_uninterrupted_one(workspace, small_dataset, monkeypatch, workers):
    config = load_config(overrides=[*TINY, f"train.num_workers={workers}"], environ={})
    whole = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    again = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert _history(again.run_id, "train_loss") == pytest.approx(_history(whole.run_id, "train_loss"), rel=1e-6)

    save = loop.save_checkpoint

    def save_then_stop(path, state):  # Ctrl-C right after epoch 2 is checkpointed
        save(path, state)
        if state.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    resumed = train_classifier(manifest_path=small_dataset, data_version="v1", config=config)
    assert resumed.resumed_from_epoch == 2
    assert _history(resumed.run_id, "train_loss") == pytest.approx(_history(whole.run_id, "train_loss"), rel=1e-6)
    assert _history(resumed.run_id, "val_auc") == pytest.approx(_history(whole.run_id, "val_auc"), abs=1e-9)


def test_more_workers_than_cores_is_one_line(workspace, small_dataset, monkeypatch):
    monkeypatch.setattr(loop.os, "sched_getaffinity", lambda pid: {0, 1})
    config = load_config(overrides=[*TINY, "train.num_workers=3"], environ={})
    with pytest.raises(ConfigError, match=r"train.num_workers=3, but this machine lets medflow use 2 core\(s\)"):
        train_classifier(manifest_path=small_dataset, data_version="v1", config=config)


def _loader_start_method(workers: int) -> str | None:
    """In this (spawned) process: how the training loader starts its workers, and that they deliver."""
    import multiprocessing

    import torch

    config = load_config(overrides=[*TINY, f"train.num_workers={workers}"], environ={})
    data = [{"image": torch.full((1, 4, 4), float(i)), "label": i % 2} for i in range(32)]
    loader = datasets.train_loader(data, config.train, sampler=None, generator=torch.Generator().manual_seed(0),
                                   device=torch.device("cpu"))
    assert sorted(int(v) for batch in loader for v in batch["label"]) == sorted(d["label"] for d in data)
    context = loader.multiprocessing_context
    return context.get_start_method() if context is not None else multiprocessing.get_start_method()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="fork is Linux's")
def test_workers_are_forked_even_where_the_process_was_spawned():
    """A study's Dask worker is a spawned process, whose default start method is spawn: its DataLoader workers
    imported torch again and were sent a pickled copy of the cached dataset every epoch."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_loader_start_method, 2).result() == "fork"


class _WorkerProbe:
    """A dataset with one of MONAI's random transforms: each sample says how many objects its worker found frozen,
    the worker's seed and the transform's first draw there."""

    def __init__(self) -> None:
        from monai.transforms import RandFlip

        self.flip = RandFlip(prob=0.5)

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        import gc

        import torch

        info = torch.utils.data.get_worker_info()
        return {"frozen": gc.get_freeze_count(), "seed": info.seed, "draw": int(self.flip.R.randint(2**30)),
                "label": index}


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="fork is Linux's")
@pytest.mark.parametrize("kind", ["training", "inference"])
def test_workers_freeze_what_they_inherit_and_keep_monais_seeds(kind):
    """A forked worker shares its parent's pages until it writes to one, and a full garbage collection writes into
    every object it inherited: each worker freezes them first (the parent keeps collecting its own); a training
    worker's random transforms are then seeded by MONAI from the worker's seed, as without the freeze."""
    import gc

    import numpy as np
    import torch

    from components.training.forward import inference_loader

    before = gc.get_freeze_count()
    if kind == "training":
        config = load_config(overrides=[*TINY, "train.num_workers=2", "train.batch_size=1"], environ={})
        loader = datasets.train_loader(_WorkerProbe(), config.train, sampler=None,
                                       generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    else:
        loader = inference_loader(list(range(4)), _WorkerProbe().__getitem__, batch_size=1, num_workers=2)
    samples = [{key: int(value[0]) for key, value in batch.items()} for batch in loader]
    assert all(sample["frozen"] > 1000 for sample in samples)  # torch, MONAI and this test's modules, frozen
    assert gc.get_freeze_count() == before  # the parent's objects are still collected
    if kind == "inference":
        return  # no random transforms to seed
    first = {}
    for sample in samples:
        first.setdefault(sample["seed"], sample["draw"])
    assert len(first) == 2  # two workers, two seeds
    assert all(draw == np.random.RandomState(seed % 2**32).randint(2**30) for seed, draw in first.items())


def test_a_worker_lets_glibc_trim_its_own_heap_again(monkeypatch):
    """Workers are forked while the epoch loop keeps the heap (heap.kept_heap): each sets glibc's trim
    threshold back before MONAI seeds it, so the peak of its transforms does not stay resident."""
    import gc

    from components.training import heap

    calls = []
    monkeypatch.setattr(heap, "MALLOPT", lambda option, value: calls.append((option, value)))
    monkeypatch.setattr(datasets, "worker_init_fn", lambda worker_id: calls.append(("seeded", worker_id)))
    try:
        datasets.start_worker(1)
    finally:
        gc.unfreeze()
    assert calls == [(heap.M_TRIM_THRESHOLD, 64 * 2**20), ("seeded", 1)]
