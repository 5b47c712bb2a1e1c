"""The step table: one declaration per step, and keys built from what each step reads."""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path

import pytest

from components import steps
from components.config import load_config
from components.data.step import DatasetVersion
from components.errors import ConfigError
from components.steps import STEP_NAMES, STEPS, Step, get_step, hash_source, pipeline_key

REPO = Path(__file__).resolve().parents[2]


class _Result:
    """Stands for an upstream step's result."""

    def __init__(self, identity: str) -> None:
        self.identity = identity


def _inputs() -> dict:
    return {"dataset": DatasetVersion(name="demo", manifest=Path("m"), version="v1", n_cases=1, n_patients=1),
            "validation_report": Path("report.json"), "run_id": "run1", "prepared": _Result("p"),
            "evaluation": _Result("run1:abc"), "model": _Result("m/1"),
            "pretrained": _Result("pre1")}


def _keys(*overrides: str) -> dict[str, str]:
    config = load_config(overrides=list(overrides), environ={})
    return {s.name: s.key(config, _inputs()) for s in STEPS if s.cached}


@pytest.mark.parametrize(
    ("override", "rekeyed"),
    [
        ('promotion.rules=[{metric: overall.auc, op: ">=", value: 0.99}]', {"promote"}),
        ("evaluate.n_bootstrap=10", {"evaluate", "promote"}),
        ("registry.model_name=other", {"register", "promote"}),
        ("train.epochs=2", {"train"}),
        ("registry.experiment=other", {"train", "evaluate", "register", "promote"}),
        ("validation.min_group_size=1", set()),
        ("placement.train=pool", set()),
        ("study.external_sites=[site-c]", {"train", "evaluate"}),
        ("data.ordinal=true", {"evaluate"}),
        ("pretrain.epochs=3", {"pretrain", "register_encoder"}),
        ("train.device=cpu", {"train", "pretrain"}),
    ],
)
def test_a_step_is_rekeyed_only_by_the_config_sections_it_reads(workspace, override, rekeyed):
    before, after = _keys(), _keys(override)
    assert {name for name in before if before[name] != after[name]} == rekeyed


def test_an_upstream_result_that_changes_rekeys_the_steps_after_it(workspace):
    config = load_config(environ={})
    promote = get_step("promote")
    inputs = _inputs()
    assert promote.key(config, inputs) != promote.key(config, {**inputs, "evaluation": _Result("run1:def")})
    train = get_step("train")  # the validation report is attached to the run, not an input of the computation
    assert train.key(config, inputs) == train.key(config, {**inputs, "validation_report": Path("other.json")})


def test_the_pipeline_key_covers_every_section_a_step_reads_but_not_placement(workspace):
    config = load_config(environ={})
    key = pipeline_key(config, "v1")
    assert key.startswith("pipeline-s2-") and key == pipeline_key(config, "v1") != pipeline_key(config, "v2")
    for override in ("promotion.rules=[]", "evaluate.seed=3", "validation.drift_prevalence=0.5", "data.workers=2"):
        assert pipeline_key(load_config(overrides=[override], environ={}), "v1") != key, override
    assert pipeline_key(load_config(overrides=["placement.train=pool"], environ={}), "v1") == key
    # pretraining is another flow: its settings do not make `medflow run` retrain
    assert pipeline_key(load_config(overrides=["pretrain.epochs=3"], environ={}), "v1") == key


def test_the_source_hash_follows_python_source_only(tmp_path):
    roots = {}
    for package in ("components", "flows"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
        roots[package] = tmp_path / package
    before = hash_source(roots)
    (tmp_path / "components" / "NOTES.md").write_text("docs change nothing\n")
    (tmp_path / "components" / "configs" / "demo-classification.yaml").write_text("# a comment\n", encoding="utf-8")
    assert hash_source(roots) == before
    steps_py = tmp_path / "components" / "steps.py"
    steps_py.write_text(steps_py.read_text() + "\n# a code change\n")
    assert hash_source(roots) != before
    assert steps.source_hash() == hash_source({p: REPO / p for p in ("components", "flows")})


def test_every_step_function_takes_the_inputs_the_table_names():
    for step in STEPS:
        assert tuple(inspect.signature(step.resolve()).parameters) == (*step.inputs, "config"), step.name
        assert set(step.keyed or step.inputs) <= set(step.inputs)


def test_a_task_is_made_from_the_table_and_refuses_a_function_that_disagrees():
    from components.tasks import TASKS, make_task

    assert tuple(TASKS) == STEP_NAMES
    assert [t.name for t in TASKS.values()] == list(STEP_NAMES)
    wrong = Step("train", "components.training.step:train_dataset", inputs=("dataset",), reads=("train",))
    with pytest.raises(TypeError, match=r"step train: components.training.step:train_dataset takes "
                                        r"\('dataset', 'validation_report', 'config'\), the table says"):
        make_task(wrong)


def test_each_step_is_a_deployment_flow_with_the_step_functions_parameters():
    from prefect import Flow

    import flows.steps

    for step in STEPS:
        flow = getattr(flows.steps, f"{step.name}_step")
        assert isinstance(flow, Flow) and flow.name == f"medflow-{step.name}"
        expected = ["workspace", *step.inputs, "config", *(["force"] if step.cached else [])]
        assert list(flow.parameters.properties) == expected


def test_an_unknown_step_in_placement_names_the_closest():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["placement.trian=medflow-k8s"], environ={})
    assert str(info.value) == ("unknown step 'trian' in placement; steps are ingest, version, validate, train, "
                               "evaluate, register, promote, pretrain, register_encoder; did you mean 'train'?")


def test_a_checkpoint_of_the_earlier_key_scheme_is_ignored_and_said_once(workspace, caplog):
    from components import paths
    from components.training.checkpoint import checkpoint_path, load_checkpoint, training_key

    folder = paths.medflow_home() / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "train-0123456789abcdef.pt").write_bytes(b"an earlier scheme's checkpoint")
    config = load_config(environ={})
    with caplog.at_level(logging.WARNING, logger="medflow.steps"):
        path = checkpoint_path(training_key(config, "v1"))
        checkpoint_path(training_key(config, "v1"))
    assert path.name.startswith("train-s2-") and load_checkpoint(path) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"ignoring 1 training checkpoint(s) in {folder} written under an earlier key scheme; training starts afresh"]
