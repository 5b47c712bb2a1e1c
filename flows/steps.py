"""Each pipeline step as a flow of its own, made from the step table, so that a deployment can run it
on any work pool: ``medflow-<step>`` (e.g. ``flows/steps.py:train_step``).

The retraining flow calls a placed step through ``run_deployment`` and passes only
the workspace path (shared storage), data versions, run ids and the config; the
step's small result comes back through Prefect's persisted results.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

from prefect import Flow, flow

from components import steps, tasks
from components.errors import ConfigError


def enter_workspace(workspace: str) -> None:
    """Work in ``workspace`` (``.medflow/`` and ``data/`` live there), as the CLI does in its folder."""
    folder = Path(workspace).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"workspace {folder} does not exist on this worker (placed steps need shared storage)")
    os.chdir(folder)


def step_flow(step: steps.Step) -> Flow:
    """The deployment flow ``medflow-<step>``: enter the workspace, run the step's task (``force``
    refreshes a cached step's result). Its parameters are the step function's own, typed, after
    ``workspace``, so Prefect validates what ``run_deployment`` sends."""
    task = tasks.TASKS[step.name]
    signature = inspect.signature(step.resolve(), eval_str=True)

    def run(**parameters):
        enter_workspace(parameters.pop("workspace"))
        options = {"refresh_cache": True} if parameters.pop("force", False) else {}
        return task.with_options(**options)(**parameters)

    keyword = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("workspace", keyword, annotation=str),
                  *(p.replace(kind=keyword) for p in signature.parameters.values())]
    if step.cached:
        parameters.append(inspect.Parameter("force", keyword, default=False, annotation=bool))
    run.__signature__ = signature.replace(parameters=parameters)
    run.__name__ = run.__qualname__ = f"{step.name}_step"
    run.__doc__ = step.description
    run.__module__ = __name__
    return flow(run, name=f"medflow-{step.name}", persist_result=True)


STEP_FLOWS: dict[str, Flow] = {step.name: step_flow(step) for step in steps.STEPS}
globals().update({f"{name}_step": f for name, f in STEP_FLOWS.items()})  # deployment entrypoints
