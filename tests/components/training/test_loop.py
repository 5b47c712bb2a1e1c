from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from components import lineage, paths
from components.config import load_config
from components.errors import ConfigError
from components.inference.model import load_checkpoint
from components.training.classification import train_classifier
from components.training.loop import CHECKPOINT_DIR

TINY = ["train.epochs=2", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-train"]


def test_training_logs_every_epoch_and_the_best_checkpoint(workspace, small_dataset):
    config = load_config(overrides=TINY, environ={})
    result = train_classifier(manifest_path=small_dataset, data_version="abc123", config=config)
    mlflow.set_tracking_uri(paths.tracking_uri())
    client = mlflow.MlflowClient()
    run = client.get_run(result.run_id)
    assert run.data.tags[lineage.TAG_DATA_VERSION] == "abc123"
    assert run.data.tags[lineage.TAG_CONFIG_HASH] == config.config_hash()
    assert run.info.run_name.startswith("train densenet on demo@abc123 20")  # what it is, not random words
    assert run.data.params["train.epochs"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]
    assert len(client.get_metric_history(result.run_id, "val_auc")) == 2
    assert 1 <= result.best_epoch <= 2
    folder = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=CHECKPOINT_DIR))
    model, spec, description = load_checkpoint(folder)
    assert description["network"] == "densenet" and spec.spatial_size == (32, 32)
    # it predicts in the layout train.memory_format auto picks: channels_last for a DenseNet
    inner = next(m.weight for m in model.modules()
                 if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1))
    assert inner.is_contiguous(memory_format=torch.channels_last) and not inner.is_contiguous()
    assert run.data.params["memory_format"] == "channels_last"
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 2)
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="config.json")).read_text())["train"]["epochs"] == 2
    # the data version is the run's MLflow dataset: the runs table's Dataset column shows it
    (used,) = run.inputs.dataset_inputs
    assert used.dataset.name == "demo" and used.dataset.digest == "abc123"
    assert json.loads(used.dataset.source)["uri"] == str(paths.dvc_remote_default())
    assert [t.value for t in used.tags if t.key == "mlflow.data.context"] == ["training"]
    assert json.loads(used.dataset.profile)["num_rows"] == len(__import__("pandas").read_parquet(small_dataset))


def test_training_is_deterministic_for_a_seed(workspace, small_dataset):
    config = load_config(overrides=[*TINY, "train.epochs=1"], environ={})
    a = train_classifier(manifest_path=small_dataset, data_version="v", config=config)
    b = train_classifier(manifest_path=small_dataset, data_version="v", config=config)
    client = mlflow.MlflowClient()
    loss = lambda run_id: client.get_metric_history(run_id, "train_loss")[0].value  # noqa: E731
    assert loss(a.run_id) == pytest.approx(loss(b.run_id), rel=1e-6)


def test_a_manifest_without_validation_cases_is_refused(workspace, small_dataset, tmp_path):
    import pandas as pd

    manifest = pd.read_parquet(small_dataset)
    manifest["split"] = manifest["split"].replace({"val": "train"})
    path = small_dataset.parent / "no-val.parquet"
    manifest.to_parquet(path)
    config = load_config(overrides=TINY, environ={})
    with pytest.raises(ConfigError, match=r"no-val.parquet: training needs train and val cases, got \d+ and 0"):
        train_classifier(manifest_path=path, data_version="v", config=config)


def test_a_vit_trains_and_is_rebuilt_from_its_checkpoint(workspace, small_dataset):
    config = load_config(overrides=[*TINY, "train.epochs=1", "train.model=vit", "train.model_kwargs={num_layers: 1}"],
                         environ={})
    result = train_classifier(manifest_path=small_dataset, data_version="v", config=config)
    mlflow.set_tracking_uri(paths.tracking_uri())
    folder = Path(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=CHECKPOINT_DIR))
    model, _, description = load_checkpoint(folder)
    assert description["network_kwargs"]["img_size"] == 32 and description["network_kwargs"]["num_layers"] == 1
    with torch.no_grad():
        assert model(torch.zeros(3, 1, 32, 32)).shape == (3, 2)


@pytest.mark.parametrize(("free_heap", "growth", "expected"), [
    (0, 300 * 2**20, []),  # the validation grew the process, but glibc holds nothing free to hand back
    (2**40, 300 * 2**20, [0]),  # grew it, with much free: one trim
    (2**40, 0, []),  # much free, but from the training steps before it: the validation did not grow the process
])
def test_training_hands_the_network_plain_tensors_and_trims_the_heap_only_when_validation_grew_it(
        workspace, small_dataset, monkeypatch, free_heap, growth, expected):
    """MONAI's random transforms return MetaTensors, which send every operation of the network through Python
    (an H200 waited on that: BENCHMARKS.md); the loop and the validation hand the network plain tensors. The
    validation trims the heap only once it has grown the process by VALIDATION_FREE_HEAP with as much free in
    the heap: the next training step would fault the pages back in, but a large validation split after a long
    epoch grew the heap by gigabytes. The process not growing after it, the validation trims once."""
    from components.training import heap, models

    trims, reads = [], []

    def resident() -> int:  # 1 GiB as the validation begins, ``growth`` more from its first batch on
        reads.append(1)
        return 2**30 + (growth if len(reads) > 1 else 0)

    monkeypatch.setattr(heap, "MALLOC_TRIM", lambda pad: trims.append(pad))
    monkeypatch.setattr(heap, "free_heap_bytes", lambda: free_heap)
    monkeypatch.setattr(heap, "resident_bytes", resident)
    options = []
    monkeypatch.setattr(heap, "MALLOPT", lambda option, value: options.append((option, value, len(seen))))
    seen = []
    build = models.CLASSIFIERS["densenet"]

    class Recording(torch.nn.Module):
        def __init__(self, network: torch.nn.Module) -> None:
            super().__init__()
            self.network = network

        def forward(self, x):
            seen.append((self.training, type(x)))
            return self.network(x)

    monkeypatch.setitem(models.CLASSIFIERS, "densenet", lambda **kwargs: Recording(build(**kwargs)))
    train_classifier(manifest_path=small_dataset, data_version="v",
                     config=load_config(overrides=[*TINY, "train.epochs=1"], environ={}))
    assert {training for training, _ in seen} == {True, False}  # training steps and validation both seen
    assert {kind for _, kind in seen} == {torch.Tensor}
    assert sum(not training for training, _ in seen) > 1  # batches the trimmer was offered after
    assert trims == [*expected, 0]  # and as the epochs end, the heap kept for the training steps
    # glibc keeps the steps' freed pages from before the first step to after the last validation
    assert options == [(heap.M_MMAP_THRESHOLD, 32 * 2**20, 0), (heap.M_TRIM_THRESHOLD, -1, 0),
                       (heap.M_TRIM_THRESHOLD, 64 * 2**20, len(seen))]


def test_the_logged_training_loss_is_the_mean_over_every_sample_of_the_epoch(workspace):
    """The loop sums each batch's mean loss times its size on the device; batches of 4, 4 and 2 samples must
    give the mean over all 10 (with a learning rate too small to move the weights during the epoch)."""
    from monai.transforms import Compose

    from components.training.loop import Recipe, fit

    torch.manual_seed(0)
    images, labels = torch.randn(10, 3), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    network = torch.nn.Linear(3, 2)
    with torch.no_grad():
        expected = float(torch.nn.functional.cross_entropy(network(images), labels))
    recipe = Recipe(network=network, train_data=[{"image": images[i], "label": labels[i]} for i in range(10)],
                    augment=Compose([]), loss=torch.nn.CrossEntropyLoss(),
                    validate=lambda model: {"val_loss": 0.0, "val_auc": 0.5}, metric="val_auc",
                    description={}, params={})
    config = load_config(overrides=["train.epochs=1", "train.batch_size=4", "train.lr=1e-12",
                                    "train.weight_decay=0", "registry.experiment=test-train"], environ={})
    result = fit(recipe, config=config, data_version="loss", device=torch.device("cpu"))
    (logged,) = mlflow.MlflowClient().get_metric_history(result.run_id, "train_loss")
    assert logged.value == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("choice", "layout", "logged"), [("auto", torch.channels_last, "channels_last"),
                                                          ("contiguous", torch.contiguous_format, "contiguous_format")])
def test_training_keeps_the_network_in_its_memory_format(workspace, choice, layout, logged):
    """train.memory_format: auto puts a network whose weights are mostly 2D convolutions in channels_last
    (faster on CPUs and tensor cores); the run records the layout it trained in."""
    from monai.transforms import Compose

    from components.training.loop import Recipe, fit

    torch.manual_seed(0)
    images, labels = torch.randn(8, 2, 12, 12), torch.tensor([0, 1] * 4)  # two channels: the layouts differ
    network = torch.nn.Sequential(torch.nn.Conv2d(2, 16, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(16, 2))
    recipe = Recipe(network=network, train_data=[{"image": images[i], "label": labels[i]} for i in range(8)],
                    augment=Compose([]), loss=torch.nn.CrossEntropyLoss(),
                    validate=lambda model: {"val_loss": 0.0, "val_auc": 0.5}, metric="val_auc",
                    description={}, params={})
    config = load_config(overrides=["train.epochs=1", "train.batch_size=4", f"train.memory_format={choice}",
                                    "registry.experiment=test-train"], environ={})
    result = fit(recipe, config=config, data_version="layout", device=torch.device("cpu"))
    assert network[0].weight.is_contiguous(memory_format=layout)
    assert network[0].weight.is_contiguous() is (layout is torch.contiguous_format)
    assert mlflow.MlflowClient().get_run(result.run_id).data.params["memory_format"] == logged
