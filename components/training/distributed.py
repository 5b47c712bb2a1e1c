"""Training under ``torchrun``: several processes on one node (``train.nproc_per_node``) or several nodes.

:func:`launch_training` starts ``torch.distributed.run`` (torchrun) with this module
as the program; each rank runs :func:`components.training.train.train_model`,
which sees the initialised process group: a DistributedSampler shards the training
split, DistributedDataParallel averages the gradients, the training loss is
reduced across ranks, and only rank 0 talks to MLflow. Backend: NCCL on GPUs,
gloo on CPUs. Rank 0 writes the result, which the launching process reads.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from components import errors, lineage, paths
from components.config import RunConfig
from components.errors import ConfigError, DistributedTrainingError, MedflowError


def check_world(config: RunConfig, *, cuda_devices: int) -> None:
    """Refuse, before launching, a layout that cannot run.

    Raises:
        ConfigError: more ranks per node than GPUs on a CUDA run, or several nodes without a rendezvous endpoint.
    """
    cfg = config.train
    uses_cuda = cfg.device == "cuda" or (cfg.device == "auto" and cuda_devices > 0)
    if uses_cuda and cfg.nproc_per_node > cuda_devices:
        raise ConfigError(
            f"train.nproc_per_node is {cfg.nproc_per_node} but this node has {cuda_devices} CUDA device(s); "
            "use at most one rank per GPU, or train.device=cpu for gloo ranks on CPU"
        )
    if cfg.nnodes > 1 and not cfg.rdzv_endpoint:
        raise ConfigError("train.nnodes > 1 needs train.rdzv_endpoint (host:port of the rendezvous, reachable from every node)")


TRAIN_ENTRY = "components.training.train:train_model"


def launch_training(*, manifest_path: Path, data_version: str, config: RunConfig, params_out: Path | None = None,
                    entry: str = TRAIN_ENTRY):
    """Run the training step under torchrun and return rank 0's :class:`TrainResult`.

    Args:
        manifest_path: the dataset's manifest.
        data_version: DVC hash of the dataset.
        config: run config; ``train.nproc_per_node``, ``nnodes`` and ``rdzv_endpoint`` shape the launch.
        params_out: when given, every rank saves its final parameters there (``rank<r>.pt``), for checks.
        entry: ``module:function`` each rank runs (keyword arguments ``manifest_path``, ``data_version``,
            ``config``, ``params_out``; returns a :class:`TrainResult`): training, or pretraining.
    """
    import torch  # noqa: PLC0415

    from components.training.loop import TrainResult  # noqa: PLC0415

    check_world(config, cuda_devices=torch.cuda.device_count())
    cfg = config.train
    with tempfile.TemporaryDirectory() as tmp:
        config_file, result_file = Path(tmp) / "config.json", Path(tmp) / "result.json"
        config_file.write_text(config.model_dump_json())
        layout = (["--standalone"] if cfg.nnodes == 1 else
                  [f"--nnodes={cfg.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={cfg.rdzv_endpoint}"])
        command = [
            sys.executable, "-m", "torch.distributed.run", *layout, f"--nproc-per-node={cfg.nproc_per_node}",
            "-m", "components.training.distributed", "--manifest", str(manifest_path), "--data-version", data_version,
            "--config", str(config_file), "--result", str(result_file), "--entry", entry,
            *(["--params-out", str(params_out)] if params_out else []),
        ]
        env = os.environ | {"MLFLOW_TRACKING_URI": paths.tracking_uri(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                            lineage.ORCHESTRATION_ENV: json.dumps(lineage.orchestration())}
        tail: collections.deque[str] = collections.deque(maxlen=15)
        with subprocess.Popen(command, env=env, cwd=paths.workspace_root(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) as ranks:
            for line in ranks.stdout:  # the ranks' output (rank 0's progress) reaches the console as it comes
                sys.stderr.write(line)
                tail.append(line.rstrip())
        if ranks.returncode != 0 or not result_file.exists():
            said = rank_error(Path(tmp))
            if said is not None and said["medflow"]:  # a rank refused its input (a bad image, a patch too large)
                kind = getattr(errors, said["type"], None)
                if isinstance(kind, type) and issubclass(kind, MedflowError):
                    raise kind(said["message"])  # its own one line, not torchrun's tail of tracebacks
            cause = f" rank {said['rank']}: {said['type']}: {said['message']}" if said else ""
            raise DistributedTrainingError(
                f"distributed training failed (torchrun exit {ranks.returncode}):{cause}\n" + "\n".join(tail)
            )
        return TrainResult(**json.loads(result_file.read_text()))


def rank_error(folder: Path) -> dict | None:
    """What the lowest failed rank said it failed with (:func:`main` writes ``error-rank<r>.json``): its
    ``rank``, the error's ``type`` and ``message``, and whether it is ``medflow``'s; None when no rank said."""
    said = sorted(folder.glob("error-rank*.json"), key=lambda p: int(p.stem.removeprefix("error-rank")))
    return json.loads(said[0].read_text()) if said else None


def main(argv: list[str] | None = None) -> int:
    """One rank: join the process group, train, and (rank 0) write the result."""
    import torch  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    import importlib  # noqa: PLC0415

    parser = argparse.ArgumentParser(description="one torchrun rank of medflow's training step")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--data-version", required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--params-out", type=Path)
    parser.add_argument("--entry", default=TRAIN_ENTRY)
    args = parser.parse_args(argv)
    module, _, function = args.entry.partition(":")
    train_model = getattr(importlib.import_module(module), function)
    config = RunConfig.model_validate_json(args.config.read_text())
    cuda = config.train.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        result = train_model(manifest_path=args.manifest, data_version=args.data_version, config=config,
                             params_out=args.params_out)
        if dist.get_rank() == 0:
            args.result.write_text(json.dumps(result.__dict__))
    except Exception as exc:  # for the launcher to say (see rank_error): torchrun's own summary names no cause
        rank = dist.get_rank()
        lines = [line for line in str(exc).splitlines() if line.strip()]
        medflow = isinstance(exc, MedflowError)
        args.result.with_name(f"error-rank{rank}.json").write_text(json.dumps({
            "rank": rank, "type": type(exc).__name__, "medflow": medflow,
            "message": str(exc) if medflow else (lines[-1] if lines else "")}))
        if not medflow:
            raise  # the traceback, in the output the launcher shows
        print(f"rank {rank}: medflow: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
