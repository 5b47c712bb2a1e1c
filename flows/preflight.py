"""The checks a run passes before any work: the data's first (no torch), then the model's (torch and MONAI, for the
network names), so that the CLI can start Prefect's embedded server between the two."""

from __future__ import annotations

from components import paths
from components.config import RunConfig, with_candidate
from components.data.step import check_source
from components.errors import ConfigError
from components.data.versioning import check_workspace


def check_run(config: RunConfig) -> RunConfig:
    """Refuse, before ingestion, a run that a later step would refuse (:func:`check_data`, then
    :func:`check_model`). Returns the config the run uses: a registered backbone's alias pinned to its version.

    Raises:
        ConfigError: naming what to change.
    """
    check_data(config)
    return check_model(config)


def check_data(config: RunConfig) -> None:
    """Refuse, before ingestion, a source folder or labels file that is not there, or a folder where DVC could
    not record a data version.

    Raises:
        ConfigError: naming what to change.
    """
    check_source(config)
    check_workspace(paths.workspace_root(), config.data.name)


def check_model(config: RunConfig) -> RunConfig:
    """Refuse, before ingestion, a network, loss, backbone or policy that does not fit the task (nor a nested
    study's candidate's, nor its selection metric), or a non-inferiority metric that is not declared
    (``placement`` names are checked when the config is loaded). Returns the config the run uses: a registered
    backbone's alias pinned to its version (:func:`components.training.backbones.pin_backbone`).

    Raises:
        ConfigError: naming what to change.
    """
    from components.registry.noninferiority import check_noninferiority  # noqa: PLC0415 (torch, via the metrics)
    from components.training.backbones import pin_backbone  # noqa: PLC0415 (torch and MONAI)
    from components.training.train import check_trainable  # noqa: PLC0415

    config = pin_backbone(config)
    check_trainable(config)
    check_noninferiority(config.promotion.non_inferiority)
    _check_candidates(config)
    return config


def _check_candidates(config: RunConfig) -> None:
    """A nested study's selection metric is a summary metric and each candidate is a trainable run, refused
    naming the candidate."""
    if not config.study.candidates:
        return
    from components.evaluation.declarations import METRICS  # noqa: PLC0415
    from components.evaluation.study import check_select_by  # noqa: PLC0415
    from components.training.train import check_trainable  # noqa: PLC0415

    check_select_by(config.study.select_by, [m.name for m in METRICS if m.summary])
    for c, candidate in enumerate(config.study.candidates):
        where = f"study.candidates[{c}]"
        arm = with_candidate(config, candidate, where=where)  # its own errors name the candidate
        try:
            check_trainable(arm)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def check_pretrain(config: RunConfig) -> RunConfig:
    """Refuse, before ingestion, a pretraining that a later step would refuse: a source folder that is not there,
    a folder where DVC could not record a data version, a method, network or starting checkpoint that does not
    fit (:func:`check_data`, then :func:`check_pretrain_model`). Returns the config the run uses: a registered
    starting encoder's alias pinned to its version (:func:`components.pretraining.pretrain.pin_source`).

    Raises:
        ConfigError: naming what to change.
    """
    check_data(config)
    return check_pretrain_model(config)


def check_pretrain_model(config: RunConfig) -> RunConfig:
    """Refuse a pretraining's method, network or starting checkpoint that does not fit (torch and MONAI, for the
    network names). Returns the config with a registered starting encoder's alias pinned to its version.

    Raises:
        ConfigError: naming what to change.
    """
    from components.pretraining.pretrain import check_pretrainable, pin_source  # noqa: PLC0415 (torch and MONAI)

    config = pin_source(config)
    check_pretrainable(config)
    return config
