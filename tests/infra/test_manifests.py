"""infra/: Kubernetes manifests against the 1.30 schemas (strict), the Prefect deployments file, the Dockerfile."""

from __future__ import annotations

import importlib
import inspect
import json
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "infra" / "k8s"
KUBERNETES = "1.30.0"
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
JOBS = sorted((K8S / "jobs").glob("*.yaml"))


def _documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_every_manifest_is_valid_kubernetes_1_30(path):
    for document in _documents(path):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_a_misspelt_field_is_caught():
    bad = _documents(K8S / "mlflow.yaml")[-1]
    bad["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS if p.parent == K8S]


def _containers(document: dict) -> list[dict]:
    spec = document.get("spec", {})
    return spec.get("template", {}).get("spec", {}).get("containers", [])


@pytest.mark.parametrize("path", MANIFESTS, ids=[str(p.relative_to(K8S)) for p in MANIFESTS])
def test_workloads_run_as_non_root_with_limits_probes_and_secrets_by_reference(path):
    for document in _documents(path):
        if document["kind"] not in ("Deployment", "StatefulSet"):
            assert document["kind"] != "Secret", "secrets are referenced, never stored in the manifests"
            continue
        pod = document["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        for container in _containers(document):
            assert {"requests", "limits"} <= set(container["resources"])
            assert "livenessProbe" in container and "readinessProbe" in container
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            for variable in container.get("env", []):
                if re.search(r"PASSWORD|URI|URL", variable["name"]) and "value" in variable:
                    assert "@" not in variable["value"], f"{variable['name']} holds credentials in plain text"


def test_the_worker_may_create_jobs_and_nothing_cluster_wide():
    documents = _documents(K8S / "prefect-worker.yaml")
    (role,) = [d for d in documents if d["kind"] == "Role"]
    jobs = [r for r in role["rules"] if "jobs" in r["resources"]]
    assert jobs and "create" in jobs[0]["verbs"] and jobs[0]["apiGroups"] == ["batch"]
    assert not [d for d in documents if d["kind"].startswith("Cluster")]


def _render(template: object, values: dict) -> object:
    """Fill a Prefect base job template's ``{{ name }}`` placeholders (whole-value ones keep their type)."""
    if isinstance(template, dict):
        return {k: _render(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_render(v, values) for v in template]
    if isinstance(template, str):
        whole = re.fullmatch(r"\{\{ (\w+) \}\}", template)
        if whole:
            return values[whole.group(1)]
        return re.sub(r"\{\{ (\w+) \}\}", lambda m: str(values[m.group(1)]), template)
    return template


def test_the_gpu_job_of_the_k8s_pool_is_a_valid_job_requesting_gpus():
    template = json.loads((REPO / "infra" / "prefect" / "k8s-base-job-template.json").read_text())
    values = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    values |= {"name": "medflow-train-run", "command": ["prefect", "flow-run", "execute"], "env": [],
               "labels": {"app": "medflow"}, "gpus": 4}
    job = _render(template["job_configuration"]["job_manifest"], values)
    job["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "PREFECT_API_URL", "value": "http://prefect-server:4200/api"}]
    kubernetes_validate.validate(job, KUBERNETES, strict=True)
    resources = job["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 4
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def _prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())


def test_every_deployment_entrypoint_is_a_flow_on_a_known_pool():
    from prefect import Flow

    for deployment in _prefect_yaml()["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow), deployment["entrypoint"]
        assert deployment["work_pool"]["name"] in ("medflow-local", "medflow-k8s")


def test_every_deployments_parameters_are_its_flows_and_fill_what_it_requires():
    """Prefect checks a deployment's parameters against its flow only when a run starts, on the worker: a
    renamed flow argument would break the schedule or the trigger that night, not at deploy time."""
    for deployment in _prefect_yaml()["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        accepted = inspect.signature(flow.fn).parameters
        required = {n for n, p in accepted.items() if p.default is inspect.Parameter.empty}
        given = deployment.get("parameters", {})
        assert set(given) <= set(accepted), (deployment["entrypoint"], set(given) - set(accepted))
        for trigger in deployment.get("triggers", []):
            assert set(trigger.get("parameters", {})) <= set(accepted), deployment["entrypoint"]
            assert required <= set(given) | set(trigger.get("parameters", {})), deployment["entrypoint"]
        if "schedules" in deployment:  # a schedule sends these alone
            assert required <= set(given), (deployment["entrypoint"], required - set(given))


def test_every_step_has_a_local_deployment_and_training_a_gpu_one():
    deployed = {(d["entrypoint"], d["work_pool"]["name"]) for d in _prefect_yaml()["deployments"]}
    from components.steps import STEP_NAMES

    for step in STEP_NAMES:
        assert (f"flows/steps.py:{step}_step", "medflow-local") in deployed
    assert ("flows/steps.py:train_step", "medflow-k8s") in deployed
    named = {entrypoint.split(":")[1].removesuffix("_step") for entrypoint, _ in deployed if "flows/steps.py" in entrypoint}
    assert named == set(STEP_NAMES)  # and no deployment of a step the table does not hold


def test_dockerfile_installs_torch_first_runs_as_non_root_and_copies_what_exists():
    lines = [line.strip() for line in (REPO / "infra" / "docker" / "Dockerfile").read_text().splitlines()]
    installs = [i for i, line in enumerate(lines) if "pip install" in line]
    assert "torch==2.13.0" in lines[installs[0]] and "-c constraints.txt" in lines[installs[-1]]
    for line in lines:
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source
    assert [line for line in lines if line.startswith("USER ")] == ["USER 1000:1000"]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = re.search(r'"\.\[([\w,]+)\]"', "\n".join(lines)).group(1).split(",")
    assert set(wanted) <= set(extras)


def test_the_multi_gpu_job_runs_torchrun_ranks_one_per_requested_gpu():
    (job,) = _documents(K8S / "jobs" / "train-multi-gpu.yaml")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    ranks = [a for a in container["args"] if a.startswith("--set=train.nproc_per_node=")]
    assert ranks == [f"--set=train.nproc_per_node={container['resources']['limits']['nvidia.com/gpu']}"]
    assert job["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert any(v["name"] == "dshm" and v["emptyDir"]["medium"] == "Memory" for v in job["spec"]["template"]["spec"]["volumes"])
