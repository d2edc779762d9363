"""Hyper-parameter sweeps: Ray Tune over any pretraining config keys, each trial a Ray Train run.

Train V2 pattern: a Tune *function* trainable starts a ``TorchTrainer`` whose ``RunConfig`` carries
``TuneReportCallback``, so every ``ray.train.report`` of the trial's rank 0 reaches Tune (and its
scheduler: ASHA on kNN top-1 by default). MLflow: one parent "sweep" run, one nested child run per
trial (same experiment). At the end: a table of trials sorted by the metric, one plot of the metric
against each swept key, the best trial's config (``best_config.yaml``, ready for
``sslab pretrain --config``) and its checkpoint path, saved in the sweep folder and as artifacts.

Sweep YAML::

    name: swav-fashion-mnist-sweep
    base: ../pretrain/swav_fashion-mnist.yaml     # relative to this file
    set: [train.epochs=4]                          # fixed overrides of the base
    space:                                         # config key -> distribution
      method.temperature: {loguniform: [0.05, 0.2]}
      method.epsilon: {choice: [0.03, 0.05]}
      data.crops: {grid: [2x28+2x12, 2x28+6x12]}
    search: random            # random | grid | optuna
    scheduler: asha           # asha | fifo
    metric: knn_top1_k20
    mode: max
    num_samples: 8
    max_concurrent_trials: 2
    workers: 1                # Ray Train workers per trial (as pretrain --workers)
    cpus_per_worker: 1
    gpus_per_worker: 0.25     # fractional GPUs share one device between trials
    asha: {grace_period: 1, reduction_factor: 2}
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from trainers.config import Config, apply_overrides, from_dict, load_config, read_yaml_mapping
from trainers.errors import ConfigError

from orchestrator import tracking
from orchestrator.train import (ClusterOptions, _finish_mlflow_run, _latest_checkpoint, _worker_env, apply_env,
                                check_resources, init_ray, node_default_keys, prepare_or_stage, resolve_storage,
                                run_markers, unique_name, worker_loop)

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid", "randint", "quniform")
SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "fifo")


@dataclass
class SweepSpec:
    name: str
    base: Config
    base_path: str | None
    space: dict[str, dict]
    search: str = "random"
    scheduler: str = "asha"
    metric: str = "knn_top1_k20"
    mode: str = "max"
    num_samples: int = 4
    max_concurrent_trials: int = 2
    workers: int = 1  # Ray Train workers per trial; each gets the CPUs and GPUs below (as pretrain's options)
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    asha: dict = field(default_factory=lambda: {"grace_period": 1, "reduction_factor": 2})
    seed: int = 0


SPEC_KEYS = {"name", "base", "set", "space", "search", "scheduler", "metric", "mode", "num_samples",
             "max_concurrent_trials", "workers", "cpus_per_worker", "gpus_per_worker", "asha", "seed"}
RENAMED_KEYS = {"workers_per_trial": "workers (Ray Train workers per trial)",
                "resources_per_worker": "cpus_per_worker and gpus_per_worker"}  # spelled as pretrain's options
ASHA_KEYS = {"grace_period": "epochs a trial runs before it can be stopped, >= 1",
             "reduction_factor": "keep 1/reduction_factor of the trials at each rung, > 1"}
# what every trial reports to Tune besides kNN (orchestrator/train.py worker_loop: the training log row)
REPORTED = ("loss", "lr", "weight_decay", "img_per_s")
METHOD_REPORTED = {"sdmp": ("loss_base", "loss_source", "loss_mixed")}
MAX_COMBINATIONS = 256  # above this many value combinations, each value is checked with the others' first


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    from trainers.checks import check_name, check_text, overrides_list

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file {path} not found: see configs/sweeps/*.yaml")
    raw = read_yaml_mapping(path, "a sweep file", "sweep keys (name, base, space, ...)")
    for old, new in RENAMED_KEYS.items():
        if old in raw:
            raise ConfigError(f"{path}: '{old}' is now {new}, the names pretrain and pipeline stages use: rename it, "
                              f"e.g. workers: 1, cpus_per_worker: 1, gpus_per_worker: 0.25")
    unknown = [key for key in raw if key not in SPEC_KEYS]
    if unknown:
        key = str(unknown[0])
        from trainers.config import SECTIONS

        if key in SECTIONS or key == "method":
            hint = f" ('{key}' is a section of the base config: set its keys with set: [{key}.<key>=value] or " \
                   f"sweep them under space: {{{key}.<key>: ...}})"
        else:
            hint = _did_you_mean(key, SPEC_KEYS)
        raise ConfigError(f"{path}: unknown sweep key '{key}'{hint}: the sweep keys are {', '.join(sorted(SPEC_KEYS))}")
    where = str(path)
    name = raw.get("name")
    if name is not None:
        check_name(name, f"{where}: name", example="swav-sweep")
    base_path = raw.get("base")
    if base_path is not None:
        check_text(base_path, f"{where}: base", "../pretrain/swav_fashion-mnist.yaml")
        base_path = str((path.parent / base_path).resolve())
    fixed = overrides_list(raw.get("set"), f"{where}: set")
    try:
        base = load_config(base_path, fixed + list(overrides or []))
    except ConfigError as exc:
        raise ConfigError(f"{where}: the base config: {exc}") from None
    space = raw.get("space")
    if space is not None and not isinstance(space, dict):
        raise ConfigError(f"{where}: space is {space!r}: give a mapping of config key -> distribution, e.g. "
                          f"space: {{method.temperature: {{loguniform: [0.05, 0.2]}}}}")
    spec = SweepSpec(name=name or path.stem, base=base, base_path=base_path, space=dict(space or {}),
                     **{k: raw[k] for k in ("search", "scheduler", "metric", "mode", "num_samples",
                                            "max_concurrent_trials", "workers", "cpus_per_worker",
                                            "gpus_per_worker", "asha", "seed") if k in raw})
    check_sweep(spec, where=where)
    return spec


def _log_sweep_inputs(mlflow_client, parent_run_id: str, spec: SweepSpec, log) -> list[dict]:
    """The sweep's data sets (as prepared on the driver) as dataset inputs of its parent run; returned for the
    trials to log too. A failure only warns."""
    try:
        sidecars = tracking.dataset_sidecars([spec.base.data.dataset], spec.base.data.cache_dir)
        tracking.log_dataset_inputs(mlflow_client, parent_run_id, sidecars)
        return sidecars
    except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not the sweep
        log(f"warning: the sweep's data sets were not logged as MLflow inputs ({str(exc).splitlines()[0][:160]})")
        return []


def _did_you_mean(word: str, options) -> str:
    import difflib

    close = [o for o in sorted(options) if word and o.startswith(word)][:1] or \
        difflib.get_close_matches(word, sorted(options), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _choose(value, options, what: str, where: str) -> str:
    if not isinstance(value, str) or value not in options:
        hint = _did_you_mean(value, options) if isinstance(value, str) else ""
        raise ConfigError(f"{where}: {what} {value!r} is not one of {', '.join(options)}{hint}: pick one of them")
    return value


def check_sweep(spec: SweepSpec, where: str = "sweep") -> None:
    """Every key of the sweep, and every trial config it can produce, checked before Ray starts."""
    from trainers.checks import SEED_LIMIT, check_gpus, check_number

    if not spec.space:
        raise ConfigError(f"{where}: 'space' is empty: name at least one config key to sweep, e.g. "
                          f"method.temperature: {{loguniform: [0.05, 0.2]}}")
    _choose(spec.search, SEARCHES, "search", where)
    _choose(spec.scheduler, SCHEDULERS, "scheduler", where)
    _choose(spec.mode, ("max", "min"), "mode", where)
    for key in ("num_samples", "max_concurrent_trials", "workers"):
        check_number(getattr(spec, key), f"{where}: {key}", integer=True, minimum=1, example=f"{key}: 2")
    check_number(spec.seed, f"{where}: seed", integer=True, minimum=0, below=SEED_LIMIT, example="seed: 0")
    check_number(spec.cpus_per_worker, f"{where}: cpus_per_worker", above=0, example="1")
    check_gpus(spec.gpus_per_worker, f"{where}: gpus_per_worker")
    if not isinstance(spec.asha, dict):
        raise ConfigError(f"{where}: asha is {spec.asha!r}: give a mapping, e.g. asha: {{grace_period: 1, "
                          f"reduction_factor: 2}}")
    for key, value in spec.asha.items():
        if key not in ASHA_KEYS:
            raise ConfigError(f"{where}: unknown key asha.{key}{_did_you_mean(str(key), ASHA_KEYS)}: the keys are "
                              + ", ".join(f"{k} ({v})" for k, v in ASHA_KEYS.items()))
    grace = check_number(spec.asha.get("grace_period", 1), f"{where}: asha.grace_period", integer=True, minimum=1,
                         example=1)
    check_number(spec.asha.get("reduction_factor", 2), f"{where}: asha.reduction_factor", above=1, example=2)
    if spec.scheduler == "asha" and grace > spec.base.train.epochs:
        raise ConfigError(f"{where}: asha.grace_period {grace} is longer than the trials' train.epochs "
                          f"({spec.base.train.epochs}): lower it, or raise train.epochs in set:")
    if spec.search == "optuna":
        import importlib.util

        if importlib.util.find_spec("optuna") is None:
            raise ConfigError(f"{where}: search 'optuna' needs the optuna package: pip install optuna, or use "
                              f"search: random")
    candidates = {}
    for key, dist in spec.space.items():
        candidates[key] = _check_distribution(spec, key, dist, where)
    probes = _check_trials(spec, candidates, where)
    _check_metric(spec, probes, where)


def _check_distribution(spec: SweepSpec, key, dist, where: str) -> list:
    """The values of space.<key> that bound what a trial can get: every choice or grid value, both ends of a range."""
    from trainers.checks import check_number

    if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", key):
        raise ConfigError(f"{where}: space key {key!r} must be section.key of the base config, e.g. optim.lr")
    from trainers.config import SECTIONS

    section = key.split(".")[0]
    if section not in SECTIONS and section != "method":
        sections = [*SECTIONS, "method"]
        raise ConfigError(f"{where}: space key '{key}': unknown section '{section}'{_did_you_mean(section, sections)}: "
                          f"use one of {', '.join(sections)}")
    what = f"{where}: space.{key}"
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
        raise ConfigError(f"{what} must be one distribution, e.g. {{choice: [a, b]}}; "
                          f"known: {', '.join(DISTRIBUTIONS)}")
    kind, args = next(iter(dist.items()))
    if spec.search == "grid" and kind != "grid":
        raise ConfigError(f"{where}: search 'grid' needs every space entry to be grid: [...] (space.{key} is {kind})")
    if spec.search == "optuna" and kind == "grid":
        raise ConfigError(f"{what}: Optuna cannot search a grid: use choice: [...] (or search: random)")
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{what}: {kind} needs a non-empty list of values, e.g. {{{kind}: [0.1, 0.2]}}")
        return list(args)
    shape = "[low, high, q]" if kind == "quniform" else "[low, high]"
    if not isinstance(args, list) or len(args) != (3 if kind == "quniform" else 2):
        raise ConfigError(f"{what}: {kind} needs {shape}, got {args!r}")
    integer = kind == "randint"
    low = check_number(args[0], f"{what}: {kind} low", integer=integer)
    high = check_number(args[1], f"{what}: {kind} high", integer=integer)
    if low >= high:
        raise ConfigError(f"{what}: {kind} needs {shape} with low < high, got {args!r}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{what}: loguniform needs low > 0, got {args!r}: use uniform for ranges from 0")
    if kind == "randint":
        return [low, high - 1]  # Tune's randint excludes high
    if kind == "quniform":
        q = check_number(args[2], f"{what}: quniform q (the step)", above=0, example="0.05")
        for bound in (low, high):
            if not math.isclose(bound / q, round(bound / q)):
                raise ConfigError(f"{what}: quniform bound {bound} is not a multiple of q={q}: Tune needs both "
                                  f"bounds on the grid of q")
    return [low, high]


def _check_trials(spec: SweepSpec, candidates: dict[str, list], where: str) -> list[Config]:
    """Every combination of the candidate values (or, when there are too many, each value with the others
    at their first) must give a valid config: trial 7 must not fail an hour in."""
    from trainers.loop import check_config

    keys = list(candidates)
    total = math.prod(len(v) for v in candidates.values())
    if total <= MAX_COMBINATIONS:
        combinations = [dict(zip(keys, values)) for values in itertools.product(*candidates.values())]
    else:
        first = {k: v[0] for k, v in candidates.items()}
        combinations = [first] + [{**first, k: value} for k in keys for value in candidates[k][1:]]
    probes = []
    for params in combinations:
        try:
            config = trial_config(spec.base, params)
            check_config(config, spec.workers)
        except ConfigError as exc:
            if _base_fails_alike(spec, exc):
                raise ConfigError(f"{where}: the base config (with set: and --set) is not valid: {exc}") from None
            values = ", ".join(f"{k}={v}" for k, v in params.items())
            lead = "space value" if len(params) == 1 else "the trial with"
            raise ConfigError(f"{where}: {lead} {values} is not a valid config: {exc}") from None
        probes.append(config)
    return probes


def _base_fails_alike(spec: SweepSpec, error: ConfigError) -> bool:
    """Whether the base config alone fails as a trial did (then the space is not to blame)."""
    from trainers.loop import check_config

    try:
        check_config(spec.base, spec.workers)
    except ConfigError as exc:
        return str(exc) == str(error)
    return False


def _check_metric(spec: SweepSpec, probes: list[Config], where: str) -> None:
    """The metric must be one that every trial reports (else Tune fails after all trials ran)."""
    if not isinstance(spec.metric, str):
        raise ConfigError(f"{where}: metric is {spec.metric!r}: give a metric name, e.g. knn_top1_k20")
    knn_on = all(p.knn.every_epochs for p in probes)
    common = set.intersection(*(set(REPORTED) | set(METHOD_REPORTED.get(p.method_name, ())) for p in probes))
    from trainers.knn import online_knn_metrics

    knn = set.intersection(*(set(online_knn_metrics(p.knn.k, p.knn.temperature) if p.knn.k else []) for p in probes))
    if spec.metric.startswith("knn_") and spec.metric in knn and not knn_on:
        if spec.scheduler == "asha":
            raise ConfigError(f"{where}: ASHA on {spec.metric} needs kNN during training: set knn.every_epochs >= 1")
        raise ConfigError(f"{where}: metric {spec.metric} needs kNN during training: set knn.every_epochs >= 1 "
                          f"in set: (else every trial reports 0)")
    valid = common | (knn if knn_on else set())
    if spec.metric not in valid:
        close = _did_you_mean(spec.metric, valid)
        if spec.metric.startswith("knn_") and not knn_on:
            close += " (the trials run no kNN: set knn.every_epochs >= 1 to report kNN accuracy)"
        raise ConfigError(f"{where}: metric '{spec.metric}' is not reported by the trials{close}: use one of "
                          f"{', '.join(sorted(valid))}")


def first_trial_config(spec: SweepSpec) -> Config:
    """The config of a trial that takes the first value of every space entry."""
    return trial_config(spec.base, {k: _first_value(d) for k, d in spec.space.items()})


def _first_value(dist: dict):
    kind, args = next(iter(dist.items()))
    return args[0]


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    raw = apply_overrides(base.to_dict(), [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                                           for k, v in params.items()])
    return from_dict(raw)


def tune_space(spec: SweepSpec) -> dict:
    from ray import tune

    space = {}
    for key, dist in spec.space.items():
        kind, args = next(iter(dist.items()))
        space[key] = {"uniform": lambda a: tune.uniform(a[0], a[1]),
                      "loguniform": lambda a: tune.loguniform(a[0], a[1]),
                      "choice": lambda a: tune.choice(a),
                      "grid": lambda a: tune.grid_search(a),
                      "randint": lambda a: tune.randint(a[0], a[1]),
                      "quniform": lambda a: tune.quniform(a[0], a[1], a[2] if len(a) > 2 else 1)}[kind](args)
    return space


# --------------------------------------------------------------------------- the trial
def run_trial(trial: dict) -> None:
    """Tune function trainable: one Ray Train run of the base config with this trial's values."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    setup = trial["__sweep__"]
    apply_env(setup["env"], setup.get("env_node_defaults", ()))
    params = {k: v for k, v in trial.items() if k != "__sweep__"}
    config = trial_config(from_dict(setup["base"]), params)
    context = tune.get_context()
    trial_name = f"{setup['sweep_name']}-{context.get_trial_id()}"
    config.name = trial_name
    run_id = None
    uri = setup["tracking_uri"]
    if setup.get("parent_run_id"):
        try:
            recorder = tracking.RunRecorder(uri, experiment_id=setup["experiment_id"])
            run_id, _ = recorder.open(trial_name, "trial", {"method": config.method_name, "dataset": config.data.dataset,
                                                            "sweep": setup["sweep_name"]},
                                      config.flat(), parent=setup["parent_run_id"])
        except Exception as exc:  # noqa: BLE001
            print(f"warning: MLflow child run not created ({str(exc).splitlines()[0][:160]})")
    if run_id is not None:  # the trial's data sets: the sweep's, unless the trial sweeps data.dataset
        try:
            same = config.data.dataset == setup["base"]["data"]["dataset"]
            sidecars = setup.get("sidecars") if same else tracking.dataset_sidecars([config.data.dataset],
                                                                                     config.data.cache_dir)
            tracking.log_dataset_inputs(recorder.client, run_id, sidecars or [])
        except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not the trial
            print(f"warning: the trial's data sets were not logged as MLflow inputs ({str(exc).splitlines()[0][:160]})")
    resources = {"CPU": float(setup["cpus_per_worker"])}
    gpu = float(setup["gpus_per_worker"])
    if gpu:
        resources["GPU"] = gpu
    loop_config = {"config": config.to_dict(), "name": trial_name, "env": setup["env"],
                   "env_node_defaults": setup.get("env_node_defaults", ()), "run_id": run_id,
                   "tracking_uri": uri, "fault": None, "fault_marker": None,
                   "system_metrics_s": setup.get("system_metrics_s"),
                   **run_markers(setup["storage"], trial_name),
                   "staged_data": setup.get("staged_data")}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=setup["workers"], use_gpu=gpu > 0,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if gpu > 0 else "gloo"),
        run_config=ray.train.RunConfig(name=trial_name, storage_path=setup["storage"],
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=1),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)))
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - close the child run, then let Tune record the failure
        error = exc
    finally:
        if run_id is not None:
            folder = _latest_checkpoint(setup["storage"], trial_name)
            history = []
            if folder is not None and (folder / "metrics.jsonl").is_file():
                history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
            _finish_mlflow_run(uri, run_id, folder, config, history, "FAILED" if error else "FINISHED", print)
    if error is not None:
        raise error


# --------------------------------------------------------------------------- the driver
@dataclass
class SweepOutcome:
    name: str
    folder: Path
    table: list[dict]
    best: dict | None
    parent_run_id: str | None


def run_sweep(spec: SweepSpec, options: ClusterOptions, name: str | None = None,
              log: Callable[[str], None] = print) -> SweepOutcome:
    from ray import tune

    name = name or unique_name(spec.name)
    storage = resolve_storage(options.storage)
    folder = Path(storage) / name if "://" not in storage else Path(tracking.state_dir()) / "sweeps" / name
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    parent_run_id, experiment_id = None, None
    if options.require_tracking:  # an API call with this client's login: reach, Host check and login
        tracking.require_reachable(uri, train_later=False)
        problem = None
    else:
        problem = tracking.check_reachable(uri)
    init_ray(options.address, log)
    # one trial must fit on the cluster (the others queue behind it)
    check_resources(replace(options, workers=spec.workers, cpus_per_worker=float(spec.cpus_per_worker),
                            gpus_per_worker=float(spec.gpus_per_worker)), log=log)
    folder.mkdir(parents=True, exist_ok=True)
    if problem:
        log(f"warning: {problem}; the sweep runs without MLflow tracking")
    else:
        recorder = tracking.RunRecorder(uri, options.experiment)
        experiment_id = recorder.experiment_id
        parent_run_id, _ = recorder.open(
            name, "sweep", {"method": spec.base.method_name, "dataset": spec.base.data.dataset, "search": spec.search,
                            "scheduler": spec.scheduler},
            {"search": spec.search, "scheduler": spec.scheduler, "metric": spec.metric, "mode": spec.mode,
             "num_samples": spec.num_samples, "space": spec.space, "base": spec.base_path or "defaults"})
        log(f"MLflow: sweep run {parent_run_id} in experiment '{options.experiment}' ({uri})")
    staged = prepare_or_stage(spec.base, options, storage, log)
    sidecars = _log_sweep_inputs(recorder.client, parent_run_id, spec, log) if parent_run_id else []
    setup = {"base": spec.base.to_dict(), "sweep_name": name, "sidecars": sidecars,
             "env": {**_worker_env(options.address), **options.worker_env},
             "env_node_defaults": node_default_keys(options), "tracking_uri": uri, "staged_data": staged,
             "parent_run_id": parent_run_id, "experiment_id": experiment_id, "storage": str(folder / "trials"),
             "workers": spec.workers, "cpus_per_worker": spec.cpus_per_worker,
             "gpus_per_worker": spec.gpus_per_worker,
             "system_metrics_s": options.system_metrics_s}
    space = tune_space(spec)
    space["__sweep__"] = setup
    search_alg, scheduler = _search_and_scheduler(spec)
    num_samples = 1 if spec.search == "grid" else spec.num_samples
    tuner = tune.Tuner(
        tune.with_resources(run_trial, {"cpu": 0.1}),  # the trial only drives its TorchTrainer
        param_space=space,
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
                                    num_samples=num_samples, max_concurrent_trials=spec.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=str(folder / "tune")))
    log(f"sweep {name}: {spec.search} search, {spec.scheduler} scheduler on {spec.metric} ({spec.mode}), "
        f"{num_samples} sample(s), {spec.max_concurrent_trials} at a time; folder {folder}")
    table = _results_table(tuner.fit(), spec, setup["storage"], name)
    best = next((r for r in table if r[spec.metric] is not None and not r["error"]), None)
    _write_summary(spec, folder, table, best)
    if parent_run_id is not None:
        _finish_sweep_run(uri, experiment_id, parent_run_id, setup["storage"], spec, folder, best, log)
    return SweepOutcome(name, folder, table, best, parent_run_id)


def _search_and_scheduler(spec: SweepSpec):
    """Tune's search algorithm (None: random / grid from the space) and trial scheduler (None: FIFO)."""
    search_alg = None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seed)
    scheduler = None
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        total = spec.base.train.epochs  # one report per epoch
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=max(total, 1),
                                  grace_period=int(spec.asha.get("grace_period", 1)),
                                  reduction_factor=float(spec.asha.get("reduction_factor", 2)))
    return search_alg, scheduler


def _results_table(results, spec: SweepSpec, storage: str, name: str) -> list[dict]:
    """One row per trial (its parameters, the metric, steps, checkpoint, error), best first."""
    table = []
    for result in results:
        params = {k: v for k, v in (result.config or {}).items() if k != "__sweep__"}
        metrics = result.metrics or {}
        row = {"trial": getattr(result, "path", "") and Path(result.path).name, **params,
               spec.metric: metrics.get(spec.metric), "iterations": metrics.get("training_iteration"),
               "steps": metrics.get("step"),
               "checkpoint": result.checkpoint.path if getattr(result, "checkpoint", None) else None,
               "error": str(result.error).splitlines()[0][:200] if result.error else None}
        if metrics.get("trial_id"):
            _complete_from_storage(row, spec.metric, _latest_checkpoint(storage, f"{name}-{metrics['trial_id']}"))
        table.append(row)
    sign = -1 if spec.mode == "max" else 1
    table.sort(key=lambda r: (r[spec.metric] is None, sign * (r[spec.metric] or 0.0)))
    return table


def _finish_sweep_run(uri: str, experiment_id: str, parent_run_id: str, storage: str, spec: SweepSpec, folder: Path,
                      best: dict | None, log) -> None:
    """The sweep's MLflow run: trials Tune stopped closed, the best metric, the summary files, FINISHED."""
    try:
        recorder = tracking.RunRecorder(uri, experiment_id=experiment_id)
        _close_stopped_trials(recorder.client, uri, experiment_id, parent_run_id, storage, spec, log)
        if best is not None:
            recorder.client.log_metric(parent_run_id, f"best_{spec.metric}", float(best[spec.metric]))
        outputs = sorted(folder.glob("summary*")) + sorted(folder.glob("best_config.yaml")) + \
            sorted(folder.glob("metric_vs_*.png"))
        recorder.finish(parent_run_id, "FINISHED", [(path, None) for path in outputs])
    except Exception as exc:  # noqa: BLE001
        log(f"warning: could not finish the MLflow sweep run ({str(exc).splitlines()[0][:160]})")


def _complete_from_storage(row: dict, metric: str, checkpoint: Path | None) -> None:
    """A trial can finish its last epoch while the scheduler is stopping it: Tune then keeps the
    result of an earlier epoch, though the trial's storage holds the finished run. Report what the
    trial actually reached, so the table agrees with its MLflow run and its checkpoint."""
    if checkpoint is None:
        return
    row["checkpoint"] = str(checkpoint)
    if not (checkpoint / "summary.json").is_file():
        return
    summary = json.loads((checkpoint / "summary.json").read_text())
    if summary.get("steps", -1) <= (row.get("steps") or -1):
        return
    row.update(iterations=summary.get("epochs_completed", row["iterations"]), steps=summary["steps"])
    if summary.get(metric) is not None:
        row[metric] = summary[metric]


def _close_stopped_trials(client, uri, experiment_id, parent_run_id, storage, spec, log) -> None:
    """Trials that ASHA stopped were killed mid-run and could not close their MLflow child run: close
    them here as KILLED, with their metrics and last checkpoint from the trial's storage."""
    children = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    for child in children:
        if child.info.status != "RUNNING":
            continue
        name = child.data.tags.get(tracking.RUN_NAME_TAG, "")
        folder = _latest_checkpoint(storage, name)
        history = []
        if folder is not None and (folder / "metrics.jsonl").is_file():
            history = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines() if x]
        config = trial_config(spec.base, {k: _param_value(child.data.params.get(k)) for k in spec.space})
        # a trial that reached its last step may still be stopped by the scheduler before it closed its run
        completed = folder is not None and (folder / "summary.json").is_file()
        if not completed:
            client.set_tag(child.info.run_id, "stopped_by", spec.scheduler)
        _finish_mlflow_run(uri, child.info.run_id, folder, config, history, "FINISHED" if completed else "KILLED",
                           log)


def _param_value(text):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _write_summary(spec: SweepSpec, folder: Path, table: list[dict], best: dict | None) -> None:
    keys = list(spec.space)
    columns = ["trial", *keys, spec.metric, "iterations", "checkpoint"]
    (folder / "summary.json").write_text(json.dumps(table, indent=1, default=str))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    (folder / "summary.md").write_text("\n".join(lines) + "\n")
    if best is not None:
        config = trial_config(spec.base, {k: best[k] for k in keys})
        config.name = f"{spec.name}-best"
        config.dump(folder / "best_config.yaml")
        (folder / "best.json").write_text(json.dumps(best, indent=1, default=str))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key in keys:
        points = [(row[key], row[spec.metric]) for row in table if row.get(spec.metric) is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        xs = [p[0] for p in points]
        numeric = all(isinstance(x, (int, float)) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [p[1] for p in points])
        if numeric and next(iter(spec.space[key])) == "loguniform":
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel=spec.metric, title=f"{spec.metric} vs {key}")
        fig.tight_layout()
        fig.savefig(folder / f"metric_vs_{key.replace('.', '_')}.png", dpi=100)
        plt.close(fig)
