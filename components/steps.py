"""The one table of pipeline steps, and the one function that keys them.

Each :class:`Step` names its plain function (``module:function``, imported only
when the step runs, so this table stays light), the inputs that function takes
besides the config, the config sections it reads, whether it is cached and
whether it retries transient I/O failures. The Prefect tasks
(:mod:`components.tasks`), the per-step deployment flows (:mod:`flows.steps`),
the names ``placement`` accepts and the deployments ``infra/prefect.yaml`` must
hold all follow from this table.

A step's key (:func:`step_key`) is a hash of what the step reads: its config
sections, the identities of its keyed inputs (a data version, an upstream run
id, a report's content), the hash of medflow's own source (:func:`source_hash`,
so README, test and benchmark changes key nothing) and the tracking store. The
task cache, the training checkpoint and the "nothing changed" fast path all use
it, and it is tagged on the MLflow run (``medflow.key.<step>``). So a new
promotion rule re-runs promotion only, and a new bootstrap count re-runs
evaluation and what follows it, never training.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from components import paths
from components.errors import ConfigError
from components.machine import arrow_on_c_heap

KEY_SCHEME = "s2"  # bumped whenever the key's recipe changes: earlier caches and checkpoints then never match
SOURCE_PACKAGES = ("components", "flows")

UNKNOWN_STEP = "unknown step {name!r} in {where}; steps are {known}{hint}"


@dataclass(frozen=True)
class Step:
    """One pipeline step.

    Attributes:
        name: the step's name (task name, ``placement`` key, deployment ``medflow-<name>``).
        function: ``module:function`` of its plain function, called with ``inputs`` and ``config``.
        inputs: the function's parameters besides ``config``, in order.
        reads: the config sections (or ``section.key``) the step reads; part of its key.
        keyed: the inputs whose identity is part of the key (default: all of them).
        files: dotted config keys that name a file or folder whose content (sha256) is part of the key
            (a backbone checkpoint: replacing the file at the same path makes another training).
        cached: Prefect caches the task on :func:`step_key`; uncached steps always run.
        retries: transient I/O failures are retried with backoff (only steps that are I/O alone).
        description: one line for the deployment flow.
        flow: the flow that runs it: ``retrain`` (``medflow run``) or ``pretrain`` (``medflow pretrain``, which
            also runs the data steps of ``retrain``).
    """

    name: str
    function: str
    inputs: tuple[str, ...]
    reads: tuple[str, ...]
    cached: bool = False
    retries: bool = False
    keyed: tuple[str, ...] | None = None
    files: tuple[str, ...] = ()
    description: str = ""
    flow: str = "retrain"

    def resolve(self) -> Callable[..., Any]:
        """The step's plain function (imports its stage; Arrow's buffers go to the C heap from then on,
        :func:`components.machine.arrow_on_c_heap`)."""
        arrow_on_c_heap()
        module, _, attribute = self.function.partition(":")
        return getattr(importlib.import_module(module), attribute)

    def key(self, config: Any, inputs: Mapping[str, Any]) -> str:
        """This step's key for ``config`` and these inputs (see :func:`step_key`)."""
        keyed = self.inputs if self.keyed is None else self.keyed
        return step_key(self.name, config, {name: inputs[name] for name in keyed}, reads=self.reads,
                        files=self.files)


STEPS: tuple[Step, ...] = (
    Step("ingest", "components.data.step:prepare_dataset", inputs=(), reads=("data",),
         description="Convert the configured export into data/<name> (incremental, no DVC)."),
    Step("version", "components.data.step:version_prepared", inputs=("prepared",), reads=("data",), retries=True,
         description="dvc add, commit and push a prepared dataset (retried when the remote fails for a moment)."),
    Step("validate", "components.validation.step:validate_dataset", inputs=("dataset",), reads=("data", "validation"),
         description="Run the expectation suites on a data version."),
    Step("train", "components.training.step:train_dataset", inputs=("dataset", "validation_report"),
         reads=("data.name", "data.task", "data.num_classes", "data.image_size", "train", "registry.experiment", "study"),
         keyed=("dataset",), cached=True, files=("train.backbone.source",),
         description="Train on a data version (cached and checkpointed on what it reads)."),
    Step("evaluate", "components.inference.evaluate:evaluate_model", inputs=("run_id", "dataset"),
         reads=("data.name", "data.task", "data.num_classes", "data.ordinal", "data.attributes", "evaluate",
                "registry.experiment", "study"),
         cached=True,
         description="Evaluate a training run on the test split."),
    Step("register", "components.registry.step:register_challenger", inputs=("evaluation", "dataset"),
         reads=("data.name", "registry"), cached=True, retries=True,
         description="Register an evaluated model as the challenger."),
    Step("promote", "components.registry.step:promote_challenger", inputs=("model", "evaluation", "dataset"),
         reads=("data.attributes", "evaluate", "promotion", "registry"), cached=True,
         description="Apply the promotion policy to a challenger."),
    Step("pretrain", "components.pretraining.step:pretrain_dataset", inputs=("dataset", "validation_report"),
         reads=("data.name", "data.image_size", "pretrain", "train.device", "train.amp", "train.resume",
                "train.checkpoint_interval_s", "train.num_workers", "train.cache", "train.cache_max_gb",
                "train.nproc_per_node"),
         keyed=("dataset",), cached=True, flow="pretrain", files=("pretrain.source",),
         description="Pretrain an encoder self-supervised on a data version's images (cached and checkpointed)."),
    Step("register_encoder", "components.registry.encoder:register_encoder", inputs=("pretrained", "dataset"),
         reads=("data.name", "pretrain"), cached=True, retries=True, flow="pretrain",
         description="Register a pretrained encoder as <name>-encoder with alias latest."),
)
STEP_NAMES = tuple(s.name for s in STEPS)


def get_step(name: str, *, where: str = "the step table") -> Step:
    """The step called ``name``.

    Raises:
        ConfigError: no such step, with the closest name.
    """
    for step in STEPS:
        if step.name == name:
            return step
    hint = difflib.get_close_matches(name, STEP_NAMES, n=1)
    raise ConfigError(UNKNOWN_STEP.format(name=name, where=where, known=", ".join(STEP_NAMES),
                                          hint=f"; did you mean {hint[0]!r}?" if hint else ""))


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 (16 hex digits) of medflow's own Python source: every ``.py`` file of the installed
    ``components`` and ``flows`` packages, by path and content. Docs, tests and benchmarks are not in it."""
    return hash_source({package: Path(importlib.import_module(package).__file__).resolve().parent
                        for package in SOURCE_PACKAGES})


def hash_source(roots: Mapping[str, Path]) -> str:
    """sha256 (16 hex digits) of the ``.py`` files under each package folder, by relative path and content."""
    digest = hashlib.sha256()
    for package, root in sorted(roots.items()):
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()[:16]


def identity(value: Any) -> str:
    """What identifies an input in a key: a result's ``identity`` (a data version, a run id, a report's
    content hash), a path as text, a string or number as itself."""
    if hasattr(value, "identity"):
        return str(value.identity)
    if isinstance(value, (str, int, float, Path)) or value is None:
        return str(value)
    raise TypeError(f"no identity for a step input of type {type(value).__name__}")


def _section(dump: Mapping[str, Any], dotted: str) -> Any:
    node: Any = dump
    for part in dotted.split("."):
        if node is None:  # an optional section that is not set
            return None
        node = node[part]
    return node


@lru_cache(maxsize=256)
def _file_sha256(path: Path, size: int, mtime_ns: int) -> str:  # noqa: ARG001 (size and mtime key the cache)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, computed once per size and modification time in a process."""
    stat = path.stat()
    return _file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


def content_digest(location: str | Path) -> str:
    """sha256 of what a path holds: a file's bytes, or a folder's files by relative path and content
    (hidden files skipped); a registered model (``models:/NAME/VERSION``: versions never change; an alias is
    pinned to its version before a run) or a path that does not exist, as its text."""
    path = Path(location)
    if str(location).startswith("models:/"):
        return f"reference:{location}"
    if not path.exists():
        return f"missing:{location}"
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = item.relative_to(path).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        digest.update(f"{relative}\0{file_sha256(item)}\0".encode())
    return digest.hexdigest()


def step_key(name: str, config: Any, inputs: Mapping[str, Any], *, reads: Sequence[str],
             files: Sequence[str] = ()) -> str:
    """``<name>-s2-<sha256>`` of the sections ``reads`` of ``config``, the content of the files named by the
    config keys ``files``, the inputs' identities, medflow's source hash and the tracking store: equal for
    equal inputs, different when any of them changes.

    Args:
        name: the step (or ``pipeline``).
        config: the run config (a pydantic model).
        inputs: keyed input name -> value (see :func:`identity`).
        reads: dotted config sections the step reads.
        files: dotted config keys naming files (see :func:`content_digest`); unset ones are skipped.
    """
    dump = config.model_dump(mode="json")
    named = {key: _section(dump, key) for key in sorted(files)}
    material = {
        "step": name,
        "config": {section: _section(dump, section) for section in sorted(reads)},
        **({"files": {key: content_digest(value) for key, value in named.items() if value is not None}}
           if any(value is not None for value in named.values()) else {}),
        "inputs": {key: identity(value) for key, value in sorted(inputs.items())},
        "code": source_hash(),
        "tracking": paths.tracking_uri(),
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{KEY_SCHEME}-{digest[:24]}"


def pipeline_key(config: Any, data_version: str) -> str:
    """The key of a whole retraining run: its steps' sections on one data version (placement excluded:
    where a step runs does not change what it makes; pretraining's steps are another flow's)."""
    retraining = [step for step in STEPS if step.flow == "retrain"]
    reads = sorted({section for step in retraining for section in step.reads})
    files = sorted({key for step in retraining for key in step.files})
    return step_key("pipeline", config, {"dataset": data_version}, reads=reads, files=files)


def is_current_key(file_name: str) -> bool:
    """Whether a cache or checkpoint file name carries a key of the current scheme."""
    return f"-{KEY_SCHEME}-" in file_name


_legacy_reported: set[tuple[Path, str]] = set()


def report_legacy_keys(folder: Path, pattern: str, *, what: str, then: str = "") -> None:
    """Log once per folder and pattern how many files there carry a key of an earlier scheme: they are never
    looked up (a key of the current scheme cannot match them), so what they held is made again."""
    if (folder, pattern) in _legacy_reported or not folder.is_dir():
        return
    legacy = [p for p in folder.glob(pattern) if not is_current_key(p.name)]
    if legacy:
        _legacy_reported.add((folder, pattern))
        logging.getLogger("medflow.steps").warning(
            "ignoring %d %s in %s written under an earlier key scheme%s", len(legacy), what, folder,
            f"; {then}" if then else "")
