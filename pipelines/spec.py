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
      knn: {backbone: pretrain}
      linear: {backbone: pretrain, epochs: 30}
      semi: {backbone: pretrain, fractions: [0.01, 0.1]}
      transfer: {backbone: pretrain, datasets: [digits, {name: cifar10, optional: true}]}
      report: {}

Paths in a pipeline file are relative to that file. Inputs name earlier stages: ``backbone``
(knn, linear, semi, transfer; default: the pretrain stage), ``from_sweep`` (pretrain: train the
best config of a sweep stage), ``inputs`` (report; default: every earlier stage).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trainers.errors import ConfigError

KINDS = ("prepare", "sweep", "pretrain", "knn", "linear", "semi", "transfer", "report")
EVAL_KINDS = ("knn", "linear", "semi", "transfer")
COMMON = {"kind", "resources"}
SETTINGS = {
    "prepare": {"datasets"},
    "sweep": {"config", "set"},
    "pretrain": {"config", "set", "workers", "cpus_per_worker", "gpus_per_worker", "max_failures", "from_sweep"},
    "knn": {"backbone", "dataset", "batch_size"},
    "linear": {"backbone", "dataset", "epochs", "lr", "weight_decay", "batch_size"},
    "semi": {"backbone", "dataset", "fractions", "epochs", "lr", "weight_decay", "batch_size", "min_steps"},
    "transfer": {"backbone", "datasets", "epochs", "lr", "weight_decay", "batch_size"},
    "report": {"inputs"},
}
DEFAULTS = {
    "knn": {"batch_size": 512},
    "linear": {"epochs": 100, "lr": 0.1, "weight_decay": 0.0, "batch_size": 256},
    "semi": {"fractions": [0.01, 0.1], "epochs": 30, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 256,
             "min_steps": 200},
    "transfer": {"epochs": 100, "lr": 0.1, "weight_decay": 0.0, "batch_size": 256},
    "pretrain": {"set": [], "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": None, "max_failures": 2},
    "sweep": {"set": []},
}
INPUT_KEYS = {"backbone": ("pretrain",), "from_sweep": ("sweep",)}


@dataclass
class StageSpec:
    name: str
    kind: str
    settings: dict
    inputs: dict = field(default_factory=dict)  # role -> earlier stage name (report: "inputs" -> list)
    resources: dict = field(default_factory=dict)  # cpu, gpu for a Ray task


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
        """Identity of the pipeline: everything that changes what it computes."""
        body = {"name": self.name, "seed": self.seed, "stages": [asdict(s) for s in self.stages]}
        return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, sorted(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    """``stages.linear.epochs=5`` or ``seed=1`` (values parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}' must look like stages.<stage>.<key>=value or <key>=value")
    key, text = item.split("=", 1)
    value = yaml.safe_load(text) if text.strip() else None
    parts = key.strip().split(".")
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
            raise ConfigError(f"unknown pipeline key '{key}'{_suggest(key, known)}: the keys are {', '.join(sorted(known))}")
    if not raw.get("name") or not isinstance(raw.get("name"), str):
        raise ConfigError("the pipeline needs a 'name' (letters, digits, '-', '_')")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, dict) or not stages_raw:
        raise ConfigError("the pipeline needs 'stages': a mapping of stage name -> settings, in run order")
    stages: list[StageSpec] = []
    for name, settings in stages_raw.items():
        stages.append(_parse_stage(str(name), settings or {}, stages, base))
    spec = PipelineSpec(name=raw["name"], stages=stages, experiment=raw.get("experiment") or "sslab-pipelines",
                        seed=int(raw.get("seed", 0)), data_root=raw.get("data_root"),
                        ray=dict(raw.get("ray") or {"address": "local"}), output_dir=raw.get("output_dir"), path=path)
    if spec.data_root is not None and base is not None and not Path(spec.data_root).expanduser().is_absolute():
        spec.data_root = str((base / spec.data_root).resolve())
    return spec


def _parse_stage(name: str, settings: dict, earlier: list[StageSpec], base: Path | None) -> StageSpec:
    if not isinstance(settings, dict):
        raise ConfigError(f"stage '{name}': settings must be a mapping, got {type(settings).__name__}")
    if any(s.name == name for s in earlier):
        raise ConfigError(f"stage '{name}' is declared twice")
    kind = settings.get("kind", name)
    if kind not in KINDS:
        raise ConfigError(f"stage '{name}': unknown kind '{kind}'{_suggest(kind, KINDS)}: use one of {', '.join(KINDS)}")
    for key in settings:
        if key not in SETTINGS[kind] | COMMON:
            raise ConfigError(f"stage '{name}' ({kind}): unknown setting '{key}'{_suggest(key, SETTINGS[kind])}; "
                              f"it takes {', '.join(sorted(SETTINGS[kind]))}")
    values = {**DEFAULTS.get(kind, {}), **{k: v for k, v in settings.items() if k not in COMMON}}
    resources = dict(settings.get("resources") or {})
    for key in resources:
        if key not in ("cpu", "gpu"):
            raise ConfigError(f"stage '{name}': resources take cpu and gpu, not '{key}'")
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
        if wanted not in earlier_kinds:
            raise ConfigError(f"stage '{name}': {role} '{wanted}' is not an earlier stage"
                              f"{_suggest(wanted, earlier_kinds)}; stages run in file order")
        if earlier_kinds[wanted] not in kinds:
            raise ConfigError(f"stage '{name}': {role} '{wanted}' is a {earlier_kinds[wanted]} stage, "
                              f"expected {' or '.join(kinds)}")
        inputs[role] = wanted
    if kind == "report":
        listed = values.pop("inputs", None)
        listed = list(earlier_kinds) if listed is None else list(listed)
        for item in listed:
            if item not in earlier_kinds:
                raise ConfigError(f"stage '{name}': input '{item}' is not an earlier stage{_suggest(item, earlier_kinds)}")
        inputs["inputs"] = listed
    if kind in ("pretrain", "sweep"):
        if not values.get("config") and not (kind == "pretrain" and "from_sweep" in inputs):
            raise ConfigError(f"stage '{name}' needs config: <path to a {kind} YAML>")
        if values.get("config"):
            values["config"] = _resolve_path(values["config"], base, f"stage '{name}' config")
        if not isinstance(values.get("set", []), list):
            raise ConfigError(f"stage '{name}': set must be a list of section.key=value strings")
    if kind == "prepare":
        datasets = values.get("datasets")
        if not datasets:
            raise ConfigError(f"stage '{name}' needs datasets: [name, ...]")
        values["datasets"] = [dataset_entry(d, name) for d in datasets]
    if kind == "transfer":
        datasets = values.get("datasets")
        if not datasets:
            raise ConfigError(f"stage '{name}' needs datasets: [name or {{name: ..., optional: true}}, ...]")
        values["datasets"] = [dataset_entry(d, name) for d in datasets]
    if kind == "semi":
        fractions = values["fractions"]
        if not isinstance(fractions, list) or not fractions or not all(isinstance(f, (int, float)) and 0 < f <= 1
                                                                        for f in fractions):
            raise ConfigError(f"stage '{name}': fractions must be a list of label fractions in (0, 1], e.g. [0.01, 0.1]")
    for key in ("epochs", "batch_size", "min_steps", "workers"):
        if key in values and values[key] is not None and (not isinstance(values[key], int) or values[key] < (0 if key == "min_steps" else 1)):
            raise ConfigError(f"stage '{name}': {key} must be a positive integer, got {values[key]!r}")
    for key in ("lr",):
        if key in values and not (isinstance(values[key], (int, float)) and values[key] > 0):
            raise ConfigError(f"stage '{name}': lr must be > 0, got {values[key]!r}")
    return StageSpec(name, kind, values, inputs, resources)


def dataset_entry(entry, stage: str) -> dict:
    from trainers.data.datasets import check_dataset_name

    if isinstance(entry, str):
        entry = {"name": entry}
    if not isinstance(entry, dict) or "name" not in entry or set(entry) - {"name", "optional"}:
        raise ConfigError(f"stage '{stage}': a data set entry is a name or {{name: ..., optional: true}}, got {entry!r}")
    check_dataset_name(entry["name"])
    return {"name": entry["name"], "optional": bool(entry.get("optional", False))}
