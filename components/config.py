"""The typed run config: YAML file, then environment, then ``--set`` overrides.

A config is loaded late (by the CLI or a flow), never at import. Overrides use
dotted keys (``train.epochs=3``); values are parsed as YAML scalars. The
environment overrides with ``MEDFLOW__SECTION__KEY=value``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.errors import ConfigError
from components.overrides import apply_override, check_keys, read_yaml
from components.steps import get_step

ENV_PREFIX = "MEDFLOW__"
DEFAULT_CONFIG = "demo-classification.yaml"
REGISTRY_PREFIX = "models:/"  # a backbone or starting encoder registered in MLflow: models:/NAME@alias or /VERSION
DEVICES = ("auto", "cpu", "cuda")  # train.device, medflow predict --device, the registered model's model_config


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class SourceFormat(str, Enum):
    """Where a dataset comes from."""

    SYNTHETIC = "synthetic"
    DICOM = "dicom"
    NIFTI = "nifti"
    PNG = "png"


class Task(str, Enum):
    """What the labels are: one class per image, a set of classes per image (``0|2``), mask paths, or none
    (images for self-supervised pretraining, ``medflow pretrain``)."""

    CLASSIFICATION = "classification"
    MULTILABEL = "multilabel"
    SEGMENTATION = "segmentation"
    UNLABELLED = "unlabelled"


class SplitConfig(_Section):
    """Patient-level split fractions; the rest is the training split."""

    val: float = Field(0.2, ge=0.0, lt=1.0)
    test: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _leave_training_data(self) -> SplitConfig:
        if self.val + self.test >= 1.0:
            raise ValueError(f"val + test must be < 1, got {self.val} + {self.test}")
        return self


class DataConfig(_Section):
    """The dataset: its source, its synthetic knobs and its declared subgroups."""

    name: str = Field("demo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    format: SourceFormat = SourceFormat.SYNTHETIC
    task: Task = Task.CLASSIFICATION
    source: Path | None = None
    labels: Path | None = None
    skip_bad: bool = False
    workers: int = Field(0, ge=0, description="conversion processes; 0 = one per core (at most 8)")
    num_classes: int = Field(2, ge=2)
    ordinal: bool = Field(False, description="the classes are ordered grades (0 < 1 < ...): reports quadratic "
                                             "weighted kappa")
    n_patients: int = Field(160, ge=10)
    image_size: int = Field(64, ge=16)
    depth: int = Field(16, ge=0, description="synthetic segmentation volumes: slices each (0 makes 2D images)")
    bias: float = Field(0.0, ge=0.0, le=1.0)
    seed: int = 7
    attributes: tuple[str, ...] = ("sex", "age_group", "race", "site")
    age_bins: tuple[int, ...] = (40, 60)
    splits: SplitConfig = SplitConfig()
    remote: str | None = None

    @model_validator(mode="after")
    def _source_for_format(self) -> DataConfig:
        if self.format is not SourceFormat.SYNTHETIC and self.source is None:
            raise ValueError(f"data.source is required when data.format is '{self.format.value}'")
        if self.format is SourceFormat.SYNTHETIC and self.source is not None:  # it ingested the demo instead
            raise ValueError(f"data.source is {self.source}, but data.format is 'synthetic' (the demo generator, "
                             "which reads no source): set data.format (--format) to dicom, nifti or png")
        if self.format is SourceFormat.SYNTHETIC and self.num_classes != 2:
            raise ValueError("the synthetic generator makes binary labels: data.num_classes must be 2")
        if self.ordinal and self.task is not Task.CLASSIFICATION:
            raise ValueError(f"data.ordinal grades one class per image; a {self.task.value} task has none to grade")
        if self.format is SourceFormat.SYNTHETIC and self.task is Task.MULTILABEL:
            raise ValueError("the synthetic generator makes one label per image: a multi-label run needs "
                             "data.format dicom, nifti or png and a labels CSV")
        return self


class ValidationConfig(_Section):
    """Thresholds of the dataset expectation suites.

    ``intensity_ranges`` gives the plausible voxel values per modality after the
    modality LUT, as ``[min, max]`` (null for no bound). Drift against the previous
    data version is a warning, never a failure.
    """

    min_group_size: int = Field(5, ge=1)
    consistent_geometry: bool = True
    intensity_ranges: dict[str, tuple[float | None, float | None]] = Field(
        default_factory=lambda: {"CT": (-3100.0, 40000.0), "MR": (0.0, None), "PT": (0.0, None)}
    )
    drift_prevalence: float = Field(0.05, gt=0.0, le=1.0)
    drift_intensity_sd: float = Field(0.5, gt=0.0)


class BackboneConfig(_Section):
    """A pretrained network to start from, read from a local file (nothing is downloaded), and how to train on it.

    ``source`` is a Hugging Face folder (``config.json`` + ``model.safetensors``) or a state_dict file
    (``.pt``/``.pth``/``.bin``/``.safetensors``) of the MONAI network named in ``train.model``.
    Regimes: ``finetune`` (every weight), ``linear_probe`` (frozen features, a linear head),
    ``knn`` (k nearest neighbours of the frozen features), ``lora`` (low-rank adapters on the
    attention projections, through peft).
    """

    source: str = Field(min_length=1)
    regime: Literal["finetune", "linear_probe", "knn", "lora"] = "linear_probe"
    image_size: int | None = Field(
        None, ge=16, description="input side; default: the checkpoint's own (data.image_size for a MONAI state_dict)")
    layer_decay: float | None = Field(
        None, gt=0.0, le=1.0, description="finetune: each transformer layer's lr is this times the next one's")
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0.0)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    lora_targets: tuple[str, ...] | None = Field(
        None, description="lora: module names to adapt; default: the attention projections the network has")
    knn_k: int = Field(20, ge=1, description="knn: neighbours that vote")

    @property
    def registered(self) -> bool:
        """Whether ``source`` names a model in MLflow's registry (``models:/NAME@alias``), not a file."""
        return self.source.startswith(REGISTRY_PREFIX)


class TrainConfig(_Section):
    """Training of a MONAI classifier or segmentation network, or of a pretrained backbone."""

    model: str = "densenet"
    backbone: BackboneConfig | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(6, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    device: Literal[DEVICES] = "auto"
    loss: Literal["cross_entropy", "focal", "dice", "dice_ce", "dice_focal"] = "cross_entropy"
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    early_stopping_patience: int | None = Field(None, ge=1, description="stop after this many epochs without a better val score")
    cache: Literal["auto", "memory", "disk", "none"] = Field(
        "auto", description="keep preprocessed samples: MONAI CacheDataset (memory), PersistentDataset (disk); auto: "
                            "memory while they fit train.cache_max_gb, else disk")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes feeding training (0: the training "
                                                  "process prepares the batches itself)")
    cache_max_gb: float | None = Field(None, gt=0, description="auto cache: the memory budget of the cached samples; "
                                                               "default a quarter of the memory available at start")
    patch_size: tuple[int, ...] | None = Field(
        None, description="segmentation: training patch and sliding-window size, one side per image axis")
    samples_per_volume: int = Field(4, ge=1, description="segmentation: patches cropped from each image per epoch")
    amp: bool = Field(True, description="mixed precision (autocast + GradScaler) on CUDA; CPU trains in float32")
    memory_format: Literal["auto", "channels_last", "contiguous"] = Field(
        "auto", description="the layout the network trains in; auto: channels_last for a classifier or encoder whose "
                            "weights are mostly 2D convolutions (DenseNet, ResNet, EfficientNet), contiguous for a "
                            "ViT, 3D networks and segmentation networks")
    resume: bool = Field(True, description="resume from the last epoch checkpoint of the same data, config and code")
    checkpoint_interval_s: float = Field(
        60.0, ge=0, description="checkpoint at the end of the first epoch that ends this many seconds after the last "
                                "checkpoint (and after the last epoch); 0: after every epoch")
    nproc_per_node: int = Field(1, ge=1, description="ranks per node; > 1 runs the training step under torchrun")
    nnodes: int = Field(1, ge=1, description="nodes of a multi-node torchrun (each runs the same step)")
    rdzv_endpoint: str | None = Field(None, description="host:port of torchrun's c10d rendezvous, for nnodes > 1")


class EvaluateConfig(_Section):
    """Evaluation: decision threshold, bootstrap, subgroup sizes, the specificity sensitivity is read at and
    the training cases the shortcut probe is fitted on."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    n_bootstrap: int = Field(1000, ge=0)
    seed: int = 0
    min_group_size: int = Field(10, ge=1)
    target_specificity: float = Field(0.9, gt=0.0, lt=1.0, description="where overall.sensitivity_at_specificity "
                                                                        "is read")
    shortcut_train_cases: int | None = Field(
        20_000, ge=2, description="the shortcut probe is fitted on at most this many training cases, drawn with "
                                  "evaluate.seed (null: every one); only their images are read again")


class Operator(str, Enum):
    """Comparison of a gate rule."""

    GE = ">="
    GT = ">"
    LE = "<="
    LT = "<"


class GateRule(_Section):
    """An absolute promotion rule over a report.json path, e.g. ``overall.auc >= 0.8``."""

    metric: str
    op: Operator
    value: float


class NonInferiorityRule(_Section):
    """The challenger may lose at most ``margin`` of ``metric`` against the champion, at ``level``.

    ``metric`` is a declared metric with a weighted form (checked before a run starts:
    :func:`components.registry.noninferiority.check_noninferiority`)."""

    metric: str
    margin: float = Field(ge=0.0)
    level: float = Field(0.95, gt=0.5, lt=1.0)


class PromotionConfig(_Section):
    """The promotion policy: every rule must pass for the challenger to become champion."""

    rules: tuple[GateRule, ...] = ()
    non_inferiority: tuple[NonInferiorityRule, ...] = ()


class RegistryConfig(_Section):
    """MLflow names."""

    experiment: str = "medflow"
    model_name: str = "medflow-classifier"


class StudyConfig(_Section):
    """A study design over the data version. ``external_sites``: patients of these sites are never trained or
    tuned on; the evaluation reports them apart (``external``, ``external_delta``). ``train_fraction``: train on
    that share of the training patients (a nested, label-stratified subset; val and test unchanged).
    ``label_fractions``: one arm per fraction, each an ordinary training with that ``train_fraction``, run at
    once on Dask workers (a local cluster of ``parallel`` processes, 0: one per core; or the cluster at
    ``dask_address``), reported as the metric against the fraction; the largest fraction's model is registered.
    ``leave_one_site_out``: one arm per site, trained on the others and tested on it as an external site, beside
    the plain run on every site (the one registered); reported as the site-by-metric table. ``folds``: k-fold
    cross-validation over the train and val patients, one arm per fold (``fold``: the arm's held-out fold),
    beside the plain run (the one registered); the test split is untouched. ``candidates``: nested
    cross-validation choosing among configs (each a mapping of ``key.path: value`` overrides, as ``--set`` takes
    them): for each outer fold, every candidate is cross-validated on the other folds (``outer_fold``: set by the
    study on those inner arms, whose patients of that fold are unused) and the best by ``select_by`` is judged on
    the outer fold; the candidate best over the outer folds is the one whose folds are registered."""

    external_sites: tuple[str, ...] = ()
    train_fraction: float = Field(1.0, gt=0.0, le=1.0)
    label_fractions: tuple[float, ...] = ()
    parallel: int = Field(0, ge=0)
    dask_address: str | None = Field(None, description="a Dask scheduler (tcp://host:8786) to run the arms on")
    leave_one_site_out: bool = False
    folds: int = Field(0, ge=0, description="k-fold cross-validation over train + val patients (0: off)")
    fold: int | None = Field(None, ge=0, description="set by the study on each arm: the fold it validates on")
    candidates: tuple[dict[str, Any], ...] = Field((), description="nested CV: configs (key.path: value overrides) "
                                                                   "to choose among")
    select_by: str = Field("auc", description="nested CV: the summary metric that chooses a candidate")
    outer_fold: int | None = Field(None, ge=0, description="set by a nested study on each inner arm: the outer "
                                                           "fold it never sees")

    @model_validator(mode="after")
    def _fractions(self) -> StudyConfig:
        bad = [f for f in self.label_fractions if not 0 < f <= 1]
        if bad:
            raise ValueError(f"label_fractions must each be in (0, 1], got {bad[0]:g}")
        if len(set(self.label_fractions)) != len(self.label_fractions):
            raise ValueError(f"label_fractions lists a fraction twice: {list(self.label_fractions)}")
        if self.label_fractions and self.train_fraction != 1.0:
            raise ValueError("set either label_fractions (one arm per fraction) or train_fraction (one run), not both")
        if self.folds == 1:
            raise ValueError("folds must be 0 (off) or at least 2")
        if self.fold is not None and not self.fold < self.folds:
            raise ValueError(f"fold {self.fold} is not one of folds 0..{self.folds - 1}")
        if self.folds and (self.label_fractions or self.leave_one_site_out or self.train_fraction != 1.0):
            raise ValueError("folds is a study of its own: it takes no label_fractions, leave_one_site_out or "
                             "train_fraction (external_sites may stay out of every fold)")
        if self.candidates and self.folds < 3:
            raise ValueError("candidates (nested cross-validation) need folds of at least 3: each outer fold's "
                             "candidates are cross-validated on the other folds")
        if len(self.candidates) == 1:
            raise ValueError("candidates lists one config: nested cross-validation chooses among two or more")
        if self.outer_fold is not None and (self.fold is None or self.outer_fold == self.fold
                                            or not self.outer_fold < self.folds):
            raise ValueError(f"outer_fold {self.outer_fold} must be one of folds 0..{self.folds - 1} other than the "
                             f"arm's fold")
        if self.leave_one_site_out and (self.label_fractions or self.external_sites or self.train_fraction != 1.0):
            raise ValueError("leave_one_site_out is a study of its own: it holds out each site in turn, so it takes "
                             "no label_fractions, external_sites or train_fraction")
        return self


class PretrainConfig(_Section):
    """Self-supervised pretraining of an encoder on a dataset's images, labels unused (``medflow pretrain``).

    ``method``: ``simclr`` (two augmented views of each image pulled together by MONAI's ``ContrastiveLoss``, the
    NT-Xent loss, on any classifier network of ``model`` without its head, or on the encoder of ``source``: a
    backbone source as ``train.backbone.source`` takes it, for domain-adaptive continued pretraining) or ``mae`` (MONAI's
    ``MaskedAutoEncoderViT``: ``mask_ratio`` of the patches hidden and their pixels predicted; ``model: vit``
    only). Training settings (device, AMP, resume, workers, cache, ranks) are ``train``'s. The encoder is
    registered as a new version of ``name`` (default ``<data.name>-encoder``), and loads as
    ``train.backbone.source: models:/<name>@latest`` (the newest version)."""

    method: Literal["simclr", "mae"] = "simclr"
    model: str = "densenet"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    source: str | None = Field(None, min_length=1, description="continue pretraining this backbone (a Hugging Face "
                                                                "folder, a MONAI state_dict of model, models:/NAME@alias)"
                                                                " instead of starting model from random weights")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    seed: int = 0
    temperature: float = Field(0.5, gt=0, description="simclr: the contrastive loss's temperature")
    projection_dim: int = Field(64, ge=2, description="simclr: width of the projection head's output")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="mae: share of each image's patches hidden")
    crop_scale: float = Field(0.5, gt=0, le=1, description="smallest random crop, as a share of each side")
    intensity: float = Field(0.1, ge=0, description="random intensity scale and shift, as a share (no colour jitter: "
                                                    "grey-level images)")
    noise_std: float = Field(0.05, ge=0, description="Gaussian noise added to a view, in normalised units")
    use_val: bool = Field(True, description="pretrain on the val images too (never on test)")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="registered model name (default <data.name>-encoder)")
    experiment: str = "medflow-pretrain"
    knn_k: int = Field(20, ge=1, description="the k-NN check of the encoder on a labelled dataset")

    def model_name(self, dataset: str) -> str:
        """The registered encoder's name."""
        return self.name or f"{dataset}-encoder"


class RunConfig(_Section):
    """A whole pipeline run.

    ``placement`` sends steps to Prefect work pools (``{train: medflow-k8s}``): the
    pipeline then runs that step's deployment ``medflow-<step>/<pool>`` and waits
    for it. Unplaced steps run in the pipeline's own process.
    """

    data: DataConfig = DataConfig()
    validation: ValidationConfig = ValidationConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    promotion: PromotionConfig = PromotionConfig()
    registry: RegistryConfig = RegistryConfig()
    study: StudyConfig = StudyConfig()
    pretrain: PretrainConfig = PretrainConfig()
    placement: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_steps(self) -> RunConfig:
        for step in self.placement:
            get_step(step, where="placement")  # the step table's names, with "did you mean"
        if (self.study.external_sites or self.study.leave_one_site_out) and self.data.task is Task.SEGMENTATION:
            raise ValueError("study.external_sites and leave_one_site_out are for classifiers: a segmentation run "
                             "cannot report external sites yet")
        if self.study.candidates and self.data.task is Task.SEGMENTATION:
            raise ValueError("study.candidates (nested cross-validation) is for classifiers: it chooses by a "
                             "classifier's summary metric")
        return self

    def config_hash(self) -> str:
        """Short sha256 of the config's canonical JSON: equal configs, equal hashes."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


CANDIDATE_SECTIONS = ("train", "evaluate", "validation")  # what a nested CV candidate may change: not the data


def with_candidate(config: RunConfig, candidate: Mapping[str, Any], *, where: str) -> RunConfig:
    """``config`` with one ``study.candidates`` entry's ``key.path: value`` overrides applied, its study cleared
    of the candidates (an arm's config).

    Raises:
        ConfigError: a key the schema does not know (with the closest), a key outside the sections a candidate
            may change (the data, the study, the registry are the study's own), or a value the schema refuses;
            each naming ``where``.
    """
    raw = config.model_dump(mode="json")
    raw["study"].update(candidates=[], select_by="auc")
    for key, value in candidate.items():
        section = str(key).split(".")[0]
        try:
            apply_override(raw, f"{key}={json.dumps(value)}", model=RunConfig)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        if section not in CANDIDATE_SECTIONS:
            raise ConfigError(f"{where}: {key} is not a setting a candidate may change; candidates change "
                              f"{', '.join(s + '.*' for s in CANDIDATE_SECTIONS)}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise ConfigError(f"{where}: {'.'.join(map(str, error['loc']))}: {error['msg']}") from exc


def default_config_path() -> Path:
    """The demo config shipped inside the installed package."""
    return Path(str(resources.files("components") / "configs" / DEFAULT_CONFIG))


def load_config(
    path: Path | None = None,
    *,
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> RunConfig:
    """Load a run config.

    Args:
        path: YAML file; the packaged demo config when None.
        overrides: ``key.path=value`` strings, applied last.
        environ: environment to read ``MEDFLOW__A__B=value`` overrides from
            (``os.environ`` when None).

    Raises:
        ConfigError: the file is missing or malformed, a key is unknown, or a value invalid.
    """
    path = path or default_config_path()
    raw = read_yaml(path)
    check_keys(raw, where=str(path), model=RunConfig)
    environ = os.environ if environ is None else environ
    origins: dict[tuple[str, ...], str] = {}  # which override set a key, to blame it for a bad value
    for key, value in sorted(environ.items()):
        if key.startswith(ENV_PREFIX):
            item = f"{key[len(ENV_PREFIX):].lower().replace('__', '.')}={value}"
            origins[apply_override(raw, item, model=RunConfig)] = f"{key}={value}"
    for item in overrides:
        origins[apply_override(raw, item, model=RunConfig)] = f"override {item!r}"
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = tuple(str(p) for p in first["loc"])
        where = ".".join(loc) or "(top level)"
        blamed = [origins[k] for k in sorted(origins, key=len, reverse=True) if loc[:len(k)] == k]
        raise ConfigError(f"{blamed[0] if blamed else path}: {where}: {first['msg']}") from exc
