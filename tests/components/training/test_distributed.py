"""Training under torchrun: two gloo ranks on CPU, one MLflow run, the same parameters on both ranks."""

from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from components import paths
from components.config import load_config
from components.errors import ConfigError
from components.errors import DistributedTrainingError, IngestError
from components.training.distributed import check_world, launch_training

TINY = ["train.epochs=2", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-ddp", "train.device=cpu"]


@pytest.mark.slow
def test_two_gloo_ranks_end_with_the_same_parameters_and_one_mlflow_run(workspace, small_dataset):
    config = load_config(overrides=[*TINY, "train.nproc_per_node=2"], environ={})
    result = launch_training(manifest_path=small_dataset, data_version="v1", config=config, params_out=workspace / "params")
    rank0, rank1 = (torch.load(workspace / "params" / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    client = MlflowClient(paths.tracking_uri())
    experiment = client.get_experiment_by_name("test-ddp")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result.run_id and run.info.status == "FINISHED"
    assert run.data.params["world_size"] == "2"
    assert [m.step for m in client.get_metric_history(result.run_id, "train_loss")] == [1, 2]  # logged once per epoch
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "checkpoint")}
    assert artifacts == {"checkpoint/model.pt", "checkpoint/model.json"}


@pytest.mark.parametrize(
    ("overrides", "devices", "message"),
    [
        (["train.nproc_per_node=4", "train.device=cuda"], 2,
         "train.nproc_per_node is 4 but this node has 2 CUDA device(s); use at most one rank per GPU"),
        (["train.nproc_per_node=2", "train.nnodes=2"], 0, "train.nnodes > 1 needs train.rdzv_endpoint"),
    ],
)
def test_a_layout_that_cannot_run_is_refused_before_launch(overrides, devices, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_world(load_config(overrides=overrides, environ={}), cuda_devices=devices)


def test_a_rank_that_refuses_its_input_is_that_one_line_error(workspace, tmp_path):
    missing = tmp_path / "nowhere" / "manifest.parquet"
    config = load_config(overrides=[*TINY, "train.nproc_per_node=2"], environ={})
    with pytest.raises(IngestError) as refused:  # the ranks' own error, not torchrun's tail of tracebacks
        launch_training(manifest_path=missing, data_version="v1", config=config)
    assert str(refused.value) == f"cannot read manifest {missing}: {missing}"


def test_a_rank_failing_otherwise_is_one_error_with_the_tail_of_its_output(workspace, tmp_path):
    config = load_config(overrides=[*TINY, "train.nproc_per_node=2"], environ={})
    said = r"distributed training failed \(torchrun exit 1\): rank \d: TypeError: loads\(\) missing 1 required "
    with pytest.raises(DistributedTrainingError, match=said + r"positional argument: 's'\n"):
        launch_training(manifest_path=tmp_path / "manifest.parquet", data_version="v1", config=config,
                        entry="json:loads")  # not medflow's error: its last line, then the tail


@pytest.mark.slow
def test_two_gloo_ranks_train_a_segmentation_network_alike(workspace, seg2d_dataset):
    config = load_config(overrides=[
        "data.task=segmentation", "train.model=unet", "train.model_kwargs={}", "train.loss=dice_ce", "train.epochs=1",
        "train.batch_size=2", "train.patch_size=[32, 32]", "train.samples_per_volume=2", "train.device=cpu",
        "registry.experiment=test-ddp-seg", "train.nproc_per_node=2",
    ], environ={})
    result = launch_training(manifest_path=seg2d_dataset, data_version="v1", config=config, params_out=workspace / "params")
    rank0, rank1 = (torch.load(workspace / "params" / f"rank{r}.pt") for r in (0, 1))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
    assert result.metric == "val_dice" and result.run_id
    run = MlflowClient(paths.tracking_uri()).get_run(result.run_id)
    assert run.data.params["world_size"] == "2" and "val_dice" in run.data.metrics
