"""The pipeline YAML: stages in order, each with its settings, its inputs and its resources.

::

    name: demo
    experiment: sslab-pipelines      # MLflow experiment of the parent run and its stage runs
    seed: 0
    data_root: null                  # default: $SSLAB_DATA_ROOT or ../shared/data
    ray: {address: local}            # local (embedded), auto, ray://head:10001
    stages:                          # run in this order; a stage's kind defaults to its name
      prepare: {datasets: [fashion-mnist, digits]}
      pretrain: {config: ../pretrain/swav_fashion-mnist.yaml, set: [train.epochs=2], workers: 1}
      knn: {backbone: pretrain, workers: 2, cpus_per_worker: 2}   # Ray tasks: workers x cpus/gpus_per_worker
      linear: {backbone: pretrain, protocol: frozen_features, epochs: 30}   # or protocol: augmented
      semi: {backbone: pretrain, protocol: swav, fractions: [0.01, 0.1], workers: 2}   # 2 Ray Train workers (DDP)
      transfer: {backbone: pretrain, datasets: [digits, {name: cifar10, optional: true}]}
      report: {}

Any stage may declare the band its metrics are expected in, measured on a run you trust::

      knn: {backbone: pretrain, expect: {knn_top1_k20: [0.83, 0.86]}}

The report and MLflow mark each such metric in or out of its band, ``--json`` carries the verdict,
and ``sslab pipeline run`` exits 7 when one is out (a scheduled run fails visibly). Bands are not
part of a stage's cache key: ``--force STAGE`` reruns a stage (and the stages that read it) to
certify it again.

Paths in a pipeline file are relative to that file. Inputs name earlier stages: ``backbone``
(knn, linear, semi, transfer; default: the pretrain stage), ``from_sweep`` (pretrain: train the
best config of a sweep stage), ``inputs`` (report; default: every earlier stage).

Evaluation protocols (trainers/evaluate.py): ``linear`` takes ``protocol: frozen_features`` (the
default: a fast probe on cached features) or ``augmented`` (random-resized-crop + flip each epoch,
solo-learn's settings on 32-px data, DINO's on larger images); ``semi`` follows SwAV (``protocol:
swav``). Their ``epochs``, ``lr`` (``head_lr``), ``weight_decay``, ``batch_size`` (``min_steps``)
default to the protocol's; the stage's MLflow params and result hold the protocol's every setting.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trainers.checks import (NAME_PATTERN, SEED_LIMIT, as_list, check_bool, check_gpus, check_name,  # noqa: F401
                             check_number, check_text, overrides_list)
from trainers.errors import ConfigError

KINDS = ("prepare", "sweep", "pretrain", "knn", "linear", "semi", "transfer", "report")
EVAL_KINDS = ("knn", "linear", "semi", "transfer")
COMMON = {"kind", "expect"}
TASK_KINDS = ("prepare",) + EVAL_KINDS  # stages that run as one Ray task: cpus_per_worker, gpus_per_worker
RESOURCE_KEYS = {"cpus_per_worker": "cpu", "gpus_per_worker": "gpu", "workers": "workers"}
SETTINGS = {
    "prepare": {"datasets"},
    "sweep": {"config", "set"},
    "pretrain": {"config", "set", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "from_sweep"},
    "knn": {"backbone", "dataset", "batch_size"},
    "linear": {"backbone", "dataset", "protocol", "epochs", "lr", "weight_decay", "batch_size"},
    "semi": {"backbone", "dataset", "protocol", "fractions", "epochs", "lr", "head_lr", "weight_decay", "batch_size",
             "min_steps"},
    "transfer": {"backbone", "datasets", "epochs", "lr", "weight_decay", "batch_size"},
    "report": {"inputs"},
}
# Evaluation settings left None take their protocol's value for the stage's data set
# (trainers.evaluate.linear_protocol / semi_protocol; semi's lr and head_lr: per label fraction).
DEFAULTS = {
    "knn": {"batch_size": 512},
    "linear": {"protocol": "frozen_features", "epochs": None, "lr": None, "weight_decay": None, "batch_size": None},
    "semi": {"protocol": "swav", "fractions": [0.01, 0.1], "epochs": None, "lr": None, "head_lr": None,
             "weight_decay": None, "batch_size": None, "min_steps": None},
    "transfer": {"epochs": None, "lr": None, "weight_decay": None, "batch_size": None},
    "pretrain": {"set": [], "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": None, "max_failures": 2},
    "sweep": {"set": []},
}
INPUT_KEYS = {"backbone": ("pretrain",), "from_sweep": ("sweep",)}
EXAMPLES = {"epochs": 100, "batch_size": 256, "min_steps": 200, "lr": 0.1, "head_lr": 0.2, "weight_decay": 0.0,
            "workers": 1}  # for messages, where a default is "the protocol's"


def example_value(kind: str, key: str):
    value = DEFAULTS.get(kind, {}).get(key)
    return EXAMPLES.get(key, 1) if value is None else value


@dataclass
class StageSpec:
    name: str
    kind: str
    settings: dict
    inputs: dict = field(default_factory=dict)  # role -> earlier stage name (report: "inputs" -> list)
    resources: dict = field(default_factory=dict)  # cpu, gpu of a Ray-task stage (its cpus/gpus_per_worker)
    expect: dict = field(default_factory=dict)  # metric -> [low, high]: the band a good run lands in


@dataclass
class PipelineSpec:
    name: str
    stages: list[StageSpec]
    experiment: str = "sslab-pipelines"
    seed: int = 0
    data_root: str | None = None
    ray: dict = field(default_factory=lambda: {"address": "local"})
    output_dir: str | None = None
    path: str | None = None

    def stage(self, name: str) -> StageSpec:
        return next(s for s in self.stages if s.name == name)

    def digest(self) -> str:
        """Identity of the pipeline: everything that changes what it computes (not the expected bands)."""
        stages = [{k: v for k, v in asdict(s).items() if k != "expect"} for s in self.stages]
        body = {"name": self.name, "seed": self.seed, "stages": stages}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


# --------------------------------------------------------------------------- value checks
# (trainers/checks.py, shared with orchestrator/sweep.py and the command line: every key of a pipeline file is
# type-checked before Ray starts, so that a typo fails in one line instead of after earlier stages ran)
RAY_KEYS = {"address": "local, auto or ray://head:10001", "num_cpus": "CPUs of the embedded Ray",
            "storage": "a shared folder or s3://... for the pretraining runs"}


def _resolve_path(value: str, base: Path | None, what: str) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute() and base is not None:
        candidate = (base / path).resolve()
        path = candidate if candidate.exists() or not path.resolve().exists() else path.resolve()
    if not path.is_file():
        raise ConfigError(f"{what}: {path} not found: give a path relative to the pipeline file or absolute")
    return str(path.resolve())


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineSpec:
    path = Path(path)
    if not path.is_file():
        close = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*.yaml")], n=1) \
            if path.parent.is_dir() else []
        hint = f" (did you mean {path.parent / close[0]}?)" if close else ""
        raise ConfigError(f"pipeline file {path} not found{hint}: see configs/pipelines/ for the shipped ones")
    from trainers.config import read_yaml_mapping

    raw = read_yaml_mapping(path, "a pipeline file", "pipeline keys (name, stages, ...)")
    for item in overrides or []:
        apply_override(raw, item)
    return parse_pipeline(raw, base=path.parent.resolve(), path=str(path.resolve()))


def apply_override(raw: dict, item: str) -> None:
    """``stages.linear.epochs=5`` or ``seed=1`` (values parsed as YAML; text that is not YAML stays a string,
    as in trainers.config.apply_overrides)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like stages.<stage>.<key>=value or <key>=value")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set '{item}': the key '{key.strip()}' has an empty part: write e.g. "
                          f"stages.linear.epochs=5 or seed=1")
    target = raw
    for part in parts[:-1]:
        if not isinstance(target.get(part), dict):
            if part not in target and target is raw.get("stages"):
                raise ConfigError(f"--set '{item}': no stage '{part}'{_suggest(part, target)}")
            target[part] = {} if target.get(part) is None else target[part]
            if not isinstance(target[part], dict):
                raise ConfigError(f"--set '{item}': '{part}' is not a mapping")
        target = target[part]
    target[parts[-1]] = value


def parse_pipeline(raw: dict, base: Path | None = None, path: str | None = None) -> PipelineSpec:
    if not isinstance(raw, dict):
        raise ConfigError("a pipeline file must be a mapping with 'name' and 'stages'")
    known = {"name", "experiment", "seed", "data_root", "ray", "output_dir", "stages"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"unknown pipeline key '{key}'{_suggest(str(key), known)}: the keys are "
                              f"{', '.join(sorted(known))}")
    if not raw.get("name"):
        raise ConfigError("the pipeline needs a 'name' (letters, digits, '-', '_')")
    check_name(raw["name"], "pipeline name")
    experiment = raw.get("experiment")
    if experiment is not None:
        check_text(experiment, "experiment", "sslab-pipelines")
    seed = raw.get("seed", 0)
    check_number(seed, "seed", integer=True, minimum=0, below=SEED_LIMIT, example="seed: 0")
    for key, example in (("data_root", "../shared/data"), ("output_dir", "/scratch/pipelines/demo")):
        if raw.get(key) is not None:
            check_text(raw[key], key, example)
    ray = _check_ray(raw.get("ray"))
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError("the pipeline needs 'stages': a mapping of stage name -> settings, in run order")
    stages: list[StageSpec] = []
    loaded: dict = {}  # stage name -> its checked pretraining config or sweep (for later stages' checks)
    for name, settings in stages_raw.items():
        check_name(name, "stage name", example="pretrain")
        stages.append(_parse_stage(str(name), {} if settings is None else settings, stages, base, loaded))
    spec = PipelineSpec(name=raw["name"], stages=stages, experiment=experiment or "sslab-pipelines",
                        seed=seed, data_root=raw.get("data_root"), ray=ray, output_dir=raw.get("output_dir"),
                        path=path)
    if spec.data_root is not None and base is not None and not Path(spec.data_root).expanduser().is_absolute():
        spec.data_root = str((base / spec.data_root).resolve())
    return spec


def _check_ray(value) -> dict:
    if value is None:
        return {"address": "local"}
    if not isinstance(value, dict):
        raise ConfigError(f"ray is {value!r}: give a mapping, e.g. ray: {{address: local}} (keys: "
                          f"{', '.join(RAY_KEYS)})")
    for key, item in value.items():
        if key not in RAY_KEYS:
            raise ConfigError(f"unknown key ray.{key}{_suggest(str(key), RAY_KEYS)}: the keys are "
                              + ", ".join(f"{k} ({v})" for k, v in RAY_KEYS.items()))
        if item is None:
            continue
        if key == "num_cpus":
            check_number(item, "ray.num_cpus", integer=True, minimum=1, example="ray: {num_cpus: 4}")
        else:
            check_text(item, f"ray.{key}", RAY_KEYS[key].split(",")[0])
    return dict(value) or {"address": "local"}


def _parse_stage(name: str, settings: dict, earlier: list[StageSpec], base: Path | None,
                 loaded: dict | None = None) -> StageSpec:
    """One stage's settings checked: its kind and keys, resources and inputs (common to every kind), then
    what its kind needs (``KIND_CHECKS``), numbers, and the evaluation protocol."""
    loaded = {} if loaded is None else loaded
    if not isinstance(settings, dict):
        raise ConfigError(f"stage '{name}': settings must be a mapping, got {type(settings).__name__}")
    if any(s.name == name for s in earlier):
        raise ConfigError(f"stage '{name}' is declared twice")
    kind = settings.get("kind", name)
    if not isinstance(kind, str) or kind not in KINDS:
        raise ConfigError(f"stage '{name}': unknown kind {kind!r}{_suggest(str(kind), KINDS)}: use one of "
                          f"{', '.join(KINDS)}")
    if "resources" in settings:
        raise ConfigError(f"stage '{name}': 'resources' is now cpus_per_worker and gpus_per_worker, the names pretrain "
                          f"and sweeps use: write e.g. cpus_per_worker: 2, gpus_per_worker: 1")
    allowed = SETTINGS[kind] | (set(RESOURCE_KEYS) if kind in TASK_KINDS else set()) | \
        ({"expect"} if kind not in ("prepare", "report") else set())  # those two have no metrics to expect
    for key in settings:
        if key not in allowed | {"kind"}:
            raise ConfigError(f"stage '{name}' ({kind}): unknown setting '{key}'{_suggest(str(key), allowed)}; "
                              f"it takes {', '.join(sorted(allowed))}")
    values = {**DEFAULTS.get(kind, {}),
              **{k: v for k, v in settings.items() if k not in COMMON and not (kind in TASK_KINDS and k in RESOURCE_KEYS)}}
    resources = _stage_resources(name, settings) if kind in TASK_KINDS else {}
    expect = _stage_expect(name, settings.get("expect"))
    inputs = _stage_inputs(name, kind, values, earlier)
    for check in KIND_CHECKS.get(kind, ()):
        check(name, kind, values, inputs, base, loaded, earlier)
    _check_numbers(name, kind, values)
    _check_expected_names(name, kind, values, expect)
    if kind in ("linear", "semi"):
        from trainers.evaluate import LINEAR_PROTOCOLS, SEMI_PROTOCOLS, check_protocol

        values["protocol"] = check_protocol(values["protocol"], LINEAR_PROTOCOLS if kind == "linear"
                                            else SEMI_PROTOCOLS, f"stage '{name}': protocol")
        _check_worker_batch(name, kind, values, resources.get("workers", 1))
    return StageSpec(name, kind, values, inputs, resources, expect)


def _check_worker_batch(name: str, kind: str, values: dict, workers: int) -> None:
    """Data-parallel training splits every batch equally over the workers: the batch must divide."""
    from pipelines.stages import resolve_settings, trains_on_images

    if workers > 1 and trains_on_images(kind, values):
        batch = resolve_settings(kind, values)["batch_size"]
        if batch % workers:
            raise ConfigError(f"stage '{name}': batch_size {batch} is not a multiple of its {workers} workers (each "
                              f"takes an equal share of every batch): set batch_size to e.g. {max(workers, batch // workers * workers)}")


def _stage_expect(name: str, expect) -> dict:
    """``expect: {metric: [low, high]}``: accuracies as fractions, low <= high."""
    if expect is None:
        return {}
    example = "expect: {knn_top1_k20: [0.83, 0.86]}"
    if not isinstance(expect, dict) or not expect:
        raise ConfigError(f"stage '{name}': expect is {expect!r}: give a mapping of metric -> [low, high], e.g. {example}")
    bands = {}
    for metric, band in expect.items():
        where = f"stage '{name}': expect.{metric}"
        check_text(metric, f"stage '{name}': an expect key (a metric name)", "knn_top1_k20")
        if not isinstance(band, (list, tuple)) or len(band) != 2:
            raise ConfigError(f"{where} is {band!r}: give [low, high], e.g. {example}")
        low, high = (check_number(v, where, example="[0.83, 0.86]") for v in band)
        if low > high:
            raise ConfigError(f"{where} is [{low}, {high}]: low is above high; write [{high}, {low}]")
        bands[str(metric)] = [float(low), float(high)]
    return bands


def _check_expected_names(name: str, kind: str, values: dict, expect: dict) -> None:
    """An evaluation's expected metrics must be ones it reports (checked now, not as 'missing' after every
    stage ran); pretraining's and sweeps' depend on their configs and are checked when the stage ran."""
    known = expected_metric_names(kind, values)
    for metric in expect:
        if known is not None and metric not in known:
            raise ConfigError(f"stage '{name}': expect.{metric} is not a metric of a {kind} stage"
                              f"{_suggest(metric, known)}: it reports {', '.join(sorted(known))}")


def expected_metric_names(kind: str, values: dict) -> set[str] | None:
    """The metrics an evaluation stage reports (None: not known before it runs)."""
    if kind == "knn":
        from trainers.knn import knn_metric

        return {knn_metric(k, t, top) for k, t in ((20, 0.07), (200, 0.1)) for top in (1, 5)}
    if kind == "linear":
        return {"linear_top1", "linear_top5"}
    if kind == "semi":
        from pipelines.stages import fraction_name

        return {f"{fraction_name(f)}_top{top}" for f in values["fractions"] for top in (1, 5)}
    if kind == "transfer":
        from pipelines.stages import metric_key

        return {f"transfer_{metric_key(d['name'])}_top{top}" for d in values["datasets"] for top in (1, 5)}
    return None


def _stage_resources(name: str, settings: dict) -> dict:
    """A Ray-task stage's resources, {cpu: N, gpu: share}, from its cpus_per_worker and gpus_per_worker (the
    words pretrain and sweeps use; kept out of the settings, so they change no cache key)."""
    resources = {}
    for key, short in RESOURCE_KEYS.items():
        if settings.get(key) is None:
            continue
        if short == "workers":
            check_number(settings[key], f"stage '{name}': workers", integer=True, minimum=1, example="2")
            if settings[key] > 1 and settings.get("kind", name) == "prepare":
                raise ConfigError(f"stage '{name}': workers {settings[key]}: a prepare stage runs as one Ray task: "
                                  "use workers: 1 (or leave it out)")
        elif short == "cpu":
            check_number(settings[key], f"stage '{name}': {key}", minimum=0, example="2")
        else:
            check_gpus(settings[key], f"stage '{name}': {key}")
        resources[short] = settings[key]
    return resources


def _stage_inputs(name: str, kind: str, values: dict, earlier: list[StageSpec]) -> dict:
    """The earlier stages this one reads (``INPUT_KEYS``): a backbone defaults to the last pretrain stage."""
    earlier_kinds = {s.name: s.kind for s in earlier}
    inputs: dict = {}
    for role, kinds in INPUT_KEYS.items():
        if role not in SETTINGS[kind]:
            continue
        wanted = values.pop(role, None)
        if wanted is None and role == "backbone":
            wanted = next((s.name for s in reversed(earlier) if s.kind == "pretrain"), None)
            if wanted is None:
                raise ConfigError(f"stage '{name}' needs a backbone: add a pretrain stage before it or "
                                  f"set backbone: <stage>")
        if wanted is None:
            continue
        if not isinstance(wanted, str):
            raise ConfigError(f"stage '{name}': {role} is {wanted!r}: give the name of an earlier "
                              f"{' or '.join(kinds)} stage")
        if wanted not in earlier_kinds:
            raise ConfigError(f"stage '{name}': {role} '{wanted}' is not an earlier stage"
                              f"{_suggest(wanted, earlier_kinds)}; stages run in file order")
        if earlier_kinds[wanted] not in kinds:
            raise ConfigError(f"stage '{name}': {role} '{wanted}' is a {earlier_kinds[wanted]} stage, "
                              f"expected {' or '.join(kinds)}")
        inputs[role] = wanted
    return inputs


def _check_report_inputs(name, kind, values, inputs, base, loaded, earlier) -> None:
    earlier_names = [s.name for s in earlier]
    listed = values.pop("inputs", None)
    listed = list(earlier_names) if listed is None else as_list(listed, f"stage '{name}': inputs", "[knn, linear]")
    for item in listed:
        if not isinstance(item, str) or item not in earlier_names:
            raise ConfigError(f"stage '{name}': input {item!r} is not an earlier stage"
                              f"{_suggest(str(item), earlier_names)}: list stages declared above it "
                              f"({', '.join(earlier_names) or 'none yet'})")
    inputs["inputs"] = listed


def _check_datasets(name, kind, values, inputs, base, loaded, earlier) -> None:
    datasets = values.get("datasets")
    if not datasets:
        example = "[name, ...]" if kind == "prepare" else "[name or {name: ..., optional: true}, ...]"
        raise ConfigError(f"stage '{name}' needs datasets: {example}")
    datasets = as_list(datasets, f"stage '{name}': datasets", "[fashion-mnist, digits]")
    values["datasets"] = [dataset_entry(d, name) for d in datasets]


def _check_eval_dataset(name, kind, values, inputs, base, loaded, earlier) -> None:
    if values.get("dataset") is not None:
        from trainers.data.datasets import check_dataset_name

        check_dataset_name(check_text(values["dataset"], f"stage '{name}': dataset", "digits"))


def _check_fractions(name, kind, values, inputs, base, loaded, earlier) -> None:
    fractions = as_list(values["fractions"], f"stage '{name}': fractions", "[0.01, 0.1]", allow_single=(int, float))
    if not fractions:
        raise ConfigError(f"stage '{name}': fractions must be a list of label fractions in (0, 1], e.g. [0.01, 0.1]")
    for i, fraction in enumerate(fractions):
        check_number(fraction, f"stage '{name}': fractions[{i}] (a label fraction)", above=0, maximum=1,
                     example="0.01 for 1% of the labels")
    values["fractions"] = fractions


def _check_numbers(name: str, kind: str, values: dict) -> None:
    """Epochs, batch sizes, steps, workers, learning rates and weight decay, where a stage sets them (None:
    the evaluation protocol's value)."""
    for key in ("epochs", "batch_size", "min_steps", "workers"):
        if values.get(key) is not None:
            check_number(values[key], f"stage '{name}': {key}", integer=True, minimum=0 if key == "min_steps" else 1,
                         example=example_value(kind, key))
    for key in ("lr", "head_lr"):
        if values.get(key) is not None:
            check_number(values[key], f"stage '{name}': {key}", above=0, example=example_value(kind, key))
    if values.get("weight_decay") is not None:
        check_number(values["weight_decay"], f"stage '{name}': weight_decay", minimum=0,
                     example=example_value(kind, "weight_decay"))


def _check_run(name, kind, values, inputs, base, loaded, earlier) -> None:
    _check_run_settings(name, kind, values, inputs, base, loaded)


# what each kind checks besides the common settings, in this order
KIND_CHECKS = {
    "prepare": (_check_datasets,),
    "sweep": (_check_run,),
    "pretrain": (_check_run,),
    "knn": (_check_eval_dataset,),
    "linear": (_check_eval_dataset,),
    "semi": (_check_eval_dataset, _check_fractions),
    "transfer": (_check_datasets,),
    "report": (_check_report_inputs,),
}


def _check_run_settings(name: str, kind: str, values: dict, inputs: dict, base: Path | None, loaded: dict) -> None:
    """A pretrain or sweep stage: its YAML file, its overrides and its Ray settings, loaded and checked now
    (the runner loads them again after the earlier stages ran: a mistake must not wait for that)."""
    if values.get("config") is not None:
        check_text(values["config"], f"stage '{name}': config", "../pretrain/swav_fashion-mnist.yaml")
    if not values.get("config") and not (kind == "pretrain" and "from_sweep" in inputs):
        raise ConfigError(f"stage '{name}' needs config: <path to a {kind} YAML>")
    if values.get("config"):
        values["config"] = _resolve_path(values["config"], base, f"stage '{name}' config")
    values["set"] = overrides_list(values.get("set"), f"stage '{name}': set")
    where = f"stage '{name}'"
    if kind == "sweep":
        from orchestrator.sweep import load_sweep

        loaded[name] = _prefixed(where, load_sweep, values["config"], values["set"])
        return
    workers = check_number(values["workers"], f"{where}: workers", integer=True, minimum=1, example=1)
    check_number(values["cpus_per_worker"], f"{where}: cpus_per_worker", above=0, example=2)
    if values["gpus_per_worker"] is not None:
        check_gpus(values["gpus_per_worker"], f"{where}: gpus_per_worker")
    check_number(values["max_failures"], f"{where}: max_failures", integer=True, minimum=-1,
                 example="2 (-1: no limit)")
    from trainers.config import apply_overrides, from_dict, load_config
    from trainers.loop import check_config

    if "from_sweep" in inputs:  # the best trial's config: check the overrides on the sweep's first trial
        from orchestrator.sweep import first_trial_config

        sweep = loaded.get(inputs["from_sweep"])
        if sweep is None:
            return
        config = _prefixed(where, lambda: from_dict(apply_overrides(first_trial_config(sweep).to_dict(),
                                                                    values["set"])))
    else:
        config = _prefixed(where, load_config, values["config"], values["set"])
    _prefixed(where, check_config, config, workers)
    _prefixed(where, _check_cluster_settings, values, config)
    loaded[name] = config


def _check_cluster_settings(values: dict, config) -> None:
    """What orchestrator.train.run_pretraining checks first, with the options the runner will pass."""
    import torch

    from orchestrator.train import ClusterOptions, check_cluster_options

    gpus = values["gpus_per_worker"]
    if gpus is None:
        gpus = 1.0 if torch.cuda.is_available() else 0.0
    # train.device auto is resolved on the machine that runs the pipeline: only an explicit cpu conflicts
    if gpus > 0 and config.train.device == "cpu":
        raise ConfigError(f"gpus_per_worker is {gpus:g} but train.device is cpu: set gpus_per_worker: 0 or "
                          f"train.device=cuda")
    check_cluster_options(ClusterOptions(workers=values["workers"], gpus_per_worker=float(gpus),
                                         cpus_per_worker=float(values["cpus_per_worker"]),
                                         max_failures=values["max_failures"]), config)


def _prefixed(where: str, function, *args):
    """``function(*args)``; a ConfigError it raises names the stage it belongs to."""
    try:
        return function(*args)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def dataset_entry(entry, stage: str) -> dict:
    from trainers.data.datasets import check_dataset_name

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "optional"}:
        raise ConfigError(f"stage '{stage}': a data set entry is a name or {{name: ..., optional: true}}, got {entry!r}")
    check_dataset_name(check_text(entry["name"], f"stage '{stage}': data set name", "digits"))
    optional = check_bool(entry.get("optional", False), f"stage '{stage}': optional (of data set {entry['name']})")
    return {"name": entry["name"], "optional": optional}
