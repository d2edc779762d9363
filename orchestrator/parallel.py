"""Data-parallel jobs besides pretraining on Ray Train: a function run on N ``TorchTrainer`` workers.

The pipeline's evaluations that train on images (semi-supervised fine-tuning, the augmented linear
probe) go through here: the same Ray Train path as pretraining (a worker group with a gloo or NCCL
process group, resources per worker, restarts), with the training itself in ``trainers/finetune.py``,
which sees only ``torch.distributed``. Every worker calls ``function(*args)``; rank 0's return value
(JSON-serialisable) comes back through a checkpoint in the run's storage.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable

from orchestrator.train import (ClusterOptions, _worker_env, apply_env, check_resources, init_ray,
                                node_default_keys, resolve_storage, unique_name, user_error_in)
from trainers.errors import UserError

RESULT_FILE = "result.json"


def _parallel_worker(config: dict) -> None:
    """Ray Train worker: the node's environment, the function, then rank 0 reports its result."""
    import ray
    import ray.train

    apply_env(config["env"], config["env_node_defaults"])
    args = [ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in config["args"]]
    result = config["function"](*args)
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({})
        return
    with tempfile.TemporaryDirectory(prefix="sslab-parallel-") as folder:
        (Path(folder) / RESULT_FILE).write_text(json.dumps(result))
        ray.train.report({"done": 1}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def run_data_parallel(function: Callable, args: tuple, options: ClusterOptions, name: str,
                      log: Callable[[str], None] = print):
    """``function(*args)`` on ``options.workers`` Ray Train workers (a process group among them); rank 0's
    return value. ``args`` may hold Ray object refs (fetched on each worker). A failure ends in one
    ``UserError`` line (a user error raised on a worker keeps its own message)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # 1. the cluster's resources, before any worker starts
    init_ray(options.address, log)
    check_resources(options, log=log)
    storage = resolve_storage(options.storage)
    name = unique_name(name)
    # 2. the trainer: the function on N workers
    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if use_gpu else {})}
    config = {"function": function, "args": list(args), "env": {**_worker_env(options.address), **options.worker_env},
              "env_node_defaults": node_default_keys(options)}
    trainer = TorchTrainer(
        _parallel_worker, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=options.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage,
                                       failure_config=ray.train.FailureConfig(max_failures=options.max_failures)))
    log(f"Ray Train: {options.workers} worker(s) x ({options.cpus_per_worker:g} CPU"
        f"{f', {options.gpus_per_worker:g} GPU' if use_gpu else ''}), storage {storage}/{name}")
    # 3. fit; rank 0's result from its checkpoint
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - one line for the user
        cause = user_error_in(exc) or getattr(exc, "__cause__", None) or exc
        if isinstance(cause, UserError):
            raise cause from None
        first = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise UserError(f"{name} failed on its Ray Train workers: {first[:300]} (worker logs: Ray's session "
                        "folder)") from exc
    if result.checkpoint is None:
        raise UserError(f"{name}: the workers finished without a result (worker logs: Ray's session folder)")
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / RESULT_FILE).read_text())
