"""Training of the configured task: the checks before any work, and the task's recipe through the
one epoch loop (:func:`components.training.loop.fit`)."""

from __future__ import annotations

from pathlib import Path

from components.config import RunConfig, Task
from components.errors import ConfigError
from components.training.backbones import check_backbone
from components.training.loop import TrainResult
from components.training.models import (
    CLASSIFIERS, SEGMENTERS, build_classifier, check_name, check_segmenter_kwargs, classifier_kwargs,
)

SEGMENTATION_LOSSES = ("dice", "dice_ce", "dice_focal")


def check_trainable(config: RunConfig) -> None:
    """Refuse, before any work, a run the training step cannot do (what the data decides is checked
    when training starts: network dimensions, patch sizes).

    Raises:
        ConfigError: a network, loss or policy that does not fit the task, naming what to change.
    """
    if config.data.task is Task.UNLABELLED:
        raise ConfigError(f"data.task is 'unlabelled': dataset {config.data.name!r} has no labels to train on; "
                          "pretrain an encoder on it (medflow pretrain), then train on a labelled dataset with "
                          "train.backbone.source=models:/<name>@latest")
    segmentation = config.data.task is Task.SEGMENTATION
    if not segmentation and config.train.loss in SEGMENTATION_LOSSES:
        raise ConfigError(f"train.loss is {config.train.loss!r}, a segmentation loss, but data.task is "
                          f"{config.data.task.value!r}; use cross_entropy or focal")
    if segmentation and config.promotion.non_inferiority:
        raise ConfigError("promotion.non_inferiority compares classifiers' probabilities; a segmentation run "
                          "takes absolute rules (e.g. overall.dice >= 0.7): remove promotion.non_inferiority")
    if config.data.task is Task.MULTILABEL and config.promotion.non_inferiority:
        raise ConfigError("promotion.non_inferiority compares binary and multiclass classifiers; a multi-label "
                          "run takes absolute rules (e.g. overall.auc >= 0.8): remove promotion.non_inferiority")
    check_name(config.train.model, SEGMENTERS if segmentation else CLASSIFIERS, task=config.data.task.value)
    if config.train.backbone is not None:
        check_backbone(config)  # loads the weights once: a file that does not fit fails here, not mid-run
    if segmentation:
        check_segmenter_kwargs(config.train.model, config.train.model_kwargs)
    elif config.train.backbone is None:  # a classifier's shape is known before the data: build it once, as training will
        build_classifier(config.train.model, spatial_dims=2, in_channels=1, num_classes=config.data.num_classes,
                         kwargs=classifier_kwargs(config.train.model, image_size=config.data.image_size,
                                                  kwargs=config.train.model_kwargs))


def train_model(*, manifest_path: Path, data_version: str, config: RunConfig,
                params_out: Path | None = None) -> TrainResult:
    """Train the configured task's model on the manifest's ``train`` split (see :func:`components.training.loop.fit`)."""
    if config.data.task is Task.SEGMENTATION:
        from components.training.segmentation import train_segmenter  # noqa: PLC0415 (one task's imports)
        return train_segmenter(manifest_path=manifest_path, data_version=data_version, config=config,
                               params_out=params_out)
    from components.training.classification import train_classifier  # noqa: PLC0415
    return train_classifier(manifest_path=manifest_path, data_version=data_version, config=config,
                            params_out=params_out)
