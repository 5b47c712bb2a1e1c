"""The fold ensemble as one network: each fold on its own normalisation and temperature, probabilities averaged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from components.training.ensemble import FoldEnsemble


def _member(seed: int, classes: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).eval()


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_ensemble_is_the_mean_of_each_folds_calibrated_probabilities_on_its_own_normalisation(multilabel):
    members = [_member(k) for k in range(3)]
    statistics, temperatures = [(10.0, 2.0), (12.0, 3.0), (9.5, 1.5)], [1.3, 0.8, 2.0]
    raw = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(7)) * 20
    ensemble = FoldEnsemble(members, temperatures=temperatures, statistics=statistics, multilabel=multilabel)
    with torch.no_grad():
        served = ensemble((raw - 10.0) / 2.0)  # the input normalised as the first fold's
        wanted = torch.stack([
            (torch.sigmoid if multilabel else lambda z: torch.softmax(z, dim=1))(
                member((raw - m) / s).double() / t)
            for member, (m, s), t in zip(members, statistics, temperatures)]).mean(0)
    got = torch.sigmoid(served.double()) if multilabel else torch.softmax(served.double(), dim=1)
    torch.testing.assert_close(got, wanted, rtol=1e-5, atol=1e-6)


def test_the_folds_joined_once_are_reused_until_they_or_the_evaluation_change(workspace, small_dataset):
    import mlflow  # noqa: PLC0415

    from components import paths  # noqa: PLC0415
    from components.config import load_config  # noqa: PLC0415
    from components.inference.ensemble import TAG_FOLDS, evaluate_fold_ensemble  # noqa: PLC0415
    from components.training.classification import train_classifier  # noqa: PLC0415

    tiny = ["train.epochs=1", "train.batch_size=16", "data.image_size=32", "registry.experiment=test-ensemble",
            "evaluate.n_bootstrap=20", "evaluate.min_group_size=2"]
    runs = [train_classifier(manifest_path=small_dataset, data_version="v1",
                             config=load_config(overrides=[*tiny, f"train.seed={seed}"], environ={})).run_id
            for seed in (0, 1)]
    config = load_config(overrides=tiny, environ={})
    join = lambda cfg: evaluate_fold_ensemble(fold_runs=runs, temperatures=[1.2, 0.9],  # noqa: E731
                                              manifest_path=small_dataset, config=cfg, data_version="v1")
    first = join(config)
    assert join(config).run_id == first.run_id  # nothing changed: the same run, no second model to register
    again = join(load_config(overrides=[*tiny, "evaluate.n_bootstrap=30"], environ={}))
    assert again.run_id != first.run_id
    run = mlflow.MlflowClient(paths.tracking_uri()).get_run(first.run_id)
    assert run.data.tags[TAG_FOLDS] == ",".join(runs) and first.temperature == 1.0
    report = json.loads(first.report.read_text())  # the manifest's attribute columns read with the rest
    assert set(report["groups"]) == set(config.data.attributes)
