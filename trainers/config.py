"""Pretraining configuration: dataclasses, YAML files, ``--set section.key=value`` overrides.

A config has the sections ``data``, ``model``, ``method``, ``optim``, ``train``, ``knn`` and
``probe``. The ``method`` section holds ``name`` plus that method's own options (each method module
declares them as a dataclass), so ``method.temperature`` means SwAV's temperature in a SwAV config
and SupCon's in a SupCon config. Every key is checked: an unknown key fails with the closest known
one suggested, a value of the wrong type fails with the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainers.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # train.compile_step
LOADERS = ("auto", "ffcv", "jpeg", "torch")  # the one list (trainers/data/multicrop.py imports it)
KNN_SPLITS = ("train", "test")


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10, tiny-imagenet, fashion-mnist, digits, imagefolder:<path>
    data_root: str | None = None  # None: $SSLAB_DATA_ROOT or ../shared/data
    loader: str = "auto"  # auto (ffcv when installed, else jpeg), ffcv, jpeg (batched decode_jpeg), torch (PIL)
    crops: str = "2x32"  # COUNTxSIZE groups joined by '+'; the first group are the global crops
    batch_size: int = 512  # global batch (all ranks together)
    global_scale: list[float] | None = None  # crop scale range of the global crops; None: method default
    local_scale: list[float] | None = None  # same for the local crops
    # any augmentation setting of the global crops (first group) / of every local group, over the method's
    # preset: scale, ratio, flip_p, jitter [b, c, s, h], jitter_p, grayscale_p, blur_p, blur_sigma, solarize_p,
    # solarize_threshold, jitter_order (batch or image); a *_p may be a list with one probability per view, e.g.
    # {blur_p: [1.0, 0.1]}
    global_augment: dict | None = None
    local_augment: dict | None = None
    canvas_size: int | None = None  # decode every image to this square first (needed for mixed sizes)
    num_workers: int | None = None  # loader threads/processes per rank; None: one per core
    cache_dir: str | None = None  # where .beton files live; None: <state dir>/data
    train_subset: int | None = None  # train on a fixed random subset of this many images (quick runs)
    compile_augment: bool = False  # torch.compile the augmentation's pixel ops (fused kernels; ~15 s per crop size first)

    def check(self, world_size: int, crop_preset: str, model: "ModelConfig") -> list[tuple[int, int]]:
        """The crop groups (count, size) of ``crops``, every augmentation setting and the loader's numbers
        checked (``model``: the backbone the crops must suit); returns the groups."""
        from trainers.data.augment import method_crop_groups, parse_crop_spec

        groups = parse_crop_spec(self.crops)
        model.check([size for count, size in groups if count])
        global_size = groups[0][1]
        for count, size in groups[1:]:
            if count and size > global_size:
                raise ConfigError(f"data.crops '{self.crops}': local crops of {size} px are larger than the "
                                  f"global crops ({global_size} px); list the global (largest) group first")
        for key in ("global_scale", "local_scale"):
            scale = getattr(self, key)
            if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
                raise ConfigError(f"data.{key} {list(scale)} must be [min, max] with 0 < min <= max <= 1 (fractions "
                                  f"of the image area), e.g. [0.14, 1.0] for global and [0.05, 0.14] for local crops")
        method_crop_groups(crop_preset, self.crops,  # every augmentation setting checked now
                           global_augment=self.global_augment, local_augment=self.local_augment)
        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.loader not in LOADERS:
            raise ConfigError(f"data.loader '{self.loader}' must be one of {', '.join(LOADERS)}")
        if self.canvas_size is not None and self.canvas_size < 1:
            raise ConfigError(f"data.canvas_size must be a positive number of pixels or null (the images' own size), "
                              f"got {self.canvas_size}; e.g. data.canvas_size={max(global_size, 32)}")
        for key in ("num_workers", "train_subset"):
            value = getattr(self, key)
            if value is not None and value < (0 if key == "num_workers" else 1):
                raise ConfigError(f"data.{key} must be {'>= 0' if key == 'num_workers' else '>= 1'} or null, "
                                  f"got {value}")
        if self.batch_size % world_size:
            raise ConfigError(f"data.batch_size {self.batch_size} is not divisible by the {world_size} workers: "
                              f"use a multiple of {world_size}")
        return groups


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # resnet_mini, resnet18, resnet50, vit_tiny, vit_small
    cifar_stem: bool | None = None  # None: automatic for global crops <= 64 px
    patch_size: int | None = None  # ViT patch size; None: 4 for small images, 16 otherwise
    # BatchNorm statistics over the global batch under DDP (torch.nn.SyncBatchNorm for the student, the
    # teacher and the heads, as DINO, MoCo v3 and solo-learn do); None: on with more than one worker
    sync_batchnorm: bool | None = None
    # which views share a forward call, so a BatchNorm batch: "by_size" (consecutive views of one size in one
    # backbone call, the head over all views: facebookresearch/swav and dino) or "each" (backbone and head
    # once per view: solo-learn, lightly, MoCo v3)
    forward_views: str = "by_size"

    def check(self, crop_sizes: list[int]) -> None:
        """Which views share a call, the patch size, and a ViT's fit to the crops."""
        from trainers.backbones import check_vit_crops
        from trainers.methods.base import FORWARD_VIEWS

        if self.forward_views not in FORWARD_VIEWS:
            raise ConfigError(f"model.forward_views must be one of {', '.join(FORWARD_VIEWS)}, got "
                              f"{self.forward_views!r} (by_size: views of one size in one backbone call; "
                              "each: backbone and head once per view)")
        check_vit_crops(self.backbone, crop_sizes, self.patch_size)
        if self.patch_size is not None and self.patch_size < 1:
            raise ConfigError(f"model.patch_size must be >= 1 or null, got {self.patch_size}")


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd, lars, adamw
    lr: float = 0.3  # base learning rate; with lr_scaling 'linear' it is per 256 images
    lr_scaling: str = "linear"  # linear (lr * batch / 256) or none
    min_lr: float = 0.0  # final learning rate of the cosine schedule (absolute)
    warmup_epochs: float = 10.0  # linear warm-up from 0 to the peak learning rate
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None  # cosine weight-decay schedule (DINO: 0.04 -> 0.4); None: constant
    momentum: float = 0.9  # SGD / LARS momentum
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    lars_eta: float = 0.001  # LARS trust coefficient
    lars_clip_lr: bool = False  # LARS trust ratio clipped to min(ratio / lr, 1) (apex LARC, solo-learn's clip_lr)
    lars_trust: str = "update"  # LARS ratio's denominator: update (||g + wd w||) or paper (||g|| + wd ||w||, solo-learn)
    clip_grad: float | None = None  # gradient clipping threshold; None: off
    clip_mode: str = "global"  # global (one norm over all parameters) or per_parameter (DINO's)
    exclude_bias_norm: bool = True  # no weight decay (nor LARS scaling) on biases and norm layers (solo-learn's
    # LARS exclude_bias_n_norm); false: weight decay on every parameter (solo-learn's SGD default)

    def check(self, batch_size: int, epochs: int) -> None:
        """Optimizer, learning rates (the schedule's end within [0, peak]), momenta, LARS, warm-up (at most
        ``epochs``), weight decay and clipping."""
        from trainers.optim import OPTIMIZERS

        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name '{self.name}' must be one of {', '.join(OPTIMIZERS)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"optim.lr must be a positive number, got {self.lr}")
        peak = self.lr * (batch_size / 256 if self.lr_scaling == "linear" else 1.0)
        if not (0 <= self.min_lr <= peak):
            raise ConfigError(f"optim.min_lr must lie in [0, the peak learning rate {peak:.4g}] (the cosine "
                              f"schedule's end), got {self.min_lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"optim.momentum must lie in [0, 1) (0.9 is usual), got {self.momentum}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (AdamW's [0.9, 0.999]), got {self.betas}")
        if not (self.lars_eta > 0 and math.isfinite(self.lars_eta)):
            raise ConfigError(f"optim.lars_eta must be a positive number (LARS uses 0.001; solo-learn 0.02), got "
                              f"{self.lars_eta}")
        if self.lr_scaling not in ("linear", "none"):
            raise ConfigError(f"optim.lr_scaling '{self.lr_scaling}' must be linear or none")
        if self.lars_trust not in ("update", "paper"):
            raise ConfigError(f"optim.lars_trust '{self.lars_trust}' must be update (||g + wd w||) or paper "
                              "(||g|| + wd ||w||)")
        if not 0 <= self.warmup_epochs <= epochs:
            raise ConfigError(f"optim.warmup_epochs {self.warmup_epochs} must lie in [0, train.epochs={epochs}]")
        for key in ("weight_decay", "weight_decay_end"):
            value = getattr(self, key)
            if value is not None and not (0 <= value < math.inf):
                raise ConfigError(f"optim.{key} must be a number >= 0, got {value}")
        if self.clip_grad is not None and not (0 < self.clip_grad < math.inf):
            raise ConfigError(f"optim.clip_grad must be a positive number or null (off), got {self.clip_grad}")
        if self.clip_mode not in ("global", "per_parameter"):
            raise ConfigError(f"optim.clip_mode '{self.clip_mode}' must be global or per_parameter")


@dataclass
class TrainConfig:
    epochs: int = 200
    seed: int = 0
    device: str = "auto"  # auto (cuda when available), cuda, cuda:N, cpu
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), bf16, fp16, fp32
    channels_last: bool = True  # NHWC weights and views (CUDA and CPU; BENCHMARKS.md: resnet_mini fwd+bwd 20-28% faster on a CPU)
    compile: bool = False  # torch.compile the backbone
    # torch.compile the whole training step instead (forward of every view, loss, backward, clipping, optimizer,
    # EMA teacher): true (torch's default mode) or a mode, e.g. reduce-overhead (CUDA graphs on a GPU)
    compile_step: bool | str = False
    deterministic: bool = False  # torch deterministic algorithms (slower; exact reruns on GPU)
    log_every: int = 20  # steps between progress updates (each is one host sync)
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int | None = None  # also checkpoint within an epoch
    keep_checkpoints: int = 2  # epoch checkpoints kept besides the last one
    max_steps: int | None = None  # stop after this many steps in total (debugging, tests)
    out_dir: str | None = None  # run folder; None: <state dir>/runs/<name>
    resume: str | None = "auto"  # auto (last checkpoint in out_dir if any), a checkpoint path, or None

    def check(self) -> None:
        """Epochs and steps, seed, device and precision, checkpoint and log intervals."""
        from trainers.checks import SEED_LIMIT
        from trainers.loop import check_device_name, resolve_device_type

        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null (train every epoch), got {self.max_steps}: "
                              "a run of 0 steps would leave an untrained backbone")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"train.seed must be an integer in [0, {SEED_LIMIT}), got {self.seed}")
        check_device_name(self.device)
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ConfigError(f"train.checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps}")
        if self.keep_checkpoints < 0:
            raise ConfigError(f"train.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision '{self.precision}' must be one of {', '.join(PRECISIONS)}")
        if self.precision == "fp16" and resolve_device_type(self.device) == "cpu":
            raise ConfigError("train.precision=fp16 needs a GPU (its loss scaler runs on CUDA only): use fp32 or bf16 "
                              "on the CPU, or auto")
        if self.log_every < 1 or self.checkpoint_every_epochs < 1:
            raise ConfigError("train.log_every and train.checkpoint_every_epochs must be >= 1")
        if isinstance(self.compile_step, str) and self.compile_step not in COMPILE_MODES:
            raise ConfigError(f"train.compile_step '{self.compile_step}' must be true, false or a torch.compile mode: "
                              f"{', '.join(COMPILE_MODES)}")
        if self.compile_step is not False and self.compile:
            raise ConfigError("train.compile and train.compile_step are both on: the compiled whole step already "
                              "compiles the backbone; set train.compile=false")


@dataclass
class KnnConfig:
    every_epochs: int = 10  # online kNN every N epochs and after the last one; 0: off
    k: list[int] = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07
    split: str = "test"  # held-out split whose images are classified
    max_train: int | None = None  # use at most this many training images as the memory bank
    max_test: int | None = None  # classify at most this many held-out images
    batch_size: int = 512

    def check(self) -> None:
        if self.every_epochs < 0 or any(v < 1 for v in self.k) or not 0 < self.temperature < math.inf:
            raise ConfigError(f"knn: every_epochs >= 0, every k >= 1 and temperature > 0 needed, got "
                              f"{self.every_epochs}, {self.k}, {self.temperature}")
        if self.every_epochs and not self.k:
            raise ConfigError("knn.k is empty: list at least one k (e.g. [20, 200]) or set knn.every_epochs=0")
        if self.split not in KNN_SPLITS:
            raise ConfigError(f"knn.split '{self.split}' must be one of {', '.join(KNN_SPLITS)} (the held-out split "
                              "is 'test')")
        for key in ("max_train", "max_test"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"knn.{key} must be >= 1 or null (all images), got {value}")
        if self.batch_size < 1:
            raise ConfigError(f"knn.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class ProbeConfig:
    # online linear probe (solo-learn's online classifier): a linear layer on the detached features of the
    # evaluation backbone (the one the kNN uses), trained on the global crops of every batch with the labels;
    # its own SGD, never the backbone's optimizer. Reported as online_linear_top1 / _top5 on knn.split
    # (at most knn.max_test images). Skipped, with a log line, when the data set has no labels or (with the
    # kNN off) no readable knn.split, e.g. an image folder that is one <class>/* tree.
    online_linear: bool = True
    lr: float = 0.1  # solo-learn's classifier_lr: per 256 images (optim.lr_scaling), backbone's warm-up + cosine shape
    momentum: float = 0.9  # SGD momentum (solo-learn's default)
    weight_decay: float = 0.0  # solo-learn: none on the classifier
    every_epochs: int = 1  # evaluate every N epochs and after the last one

    def check(self) -> None:
        if not (0 < self.lr < math.inf and 0 <= self.momentum < 1 and 0 <= self.weight_decay < math.inf
                and self.every_epochs >= 1):
            raise ConfigError(f"probe: lr > 0, momentum in [0, 1), weight_decay >= 0 and every_epochs >= 1 needed, "
                              f"got {self.lr}, {self.momentum}, {self.weight_decay}, {self.every_epochs} (solo-learn: "
                              "0.1, 0.9, 0, 1; probe.online_linear=false turns the probe off)")


@dataclass
class Config:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: dict = field(default_factory=lambda: {"name": "swav"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)

    # ------------------------------------------------------------------ views
    @property
    def method_name(self) -> str:
        return self.method["name"]

    def method_options(self):
        """The method section as the method's own dataclass (validated)."""
        from trainers.methods import method_config_class

        options = {k: v for k, v in self.method.items() if k != "name"}
        return _build(method_config_class(self.method_name, options), options, "method")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = {"name": self.method_name, **dataclasses.asdict(self.method_options())}
        return out

    def flat(self) -> dict[str, Any]:
        """``section.key -> value`` for every resolved setting (MLflow params, sweep spaces)."""
        flat = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                for key, value in values.items():
                    flat[f"{section}.{key}"] = value
            else:
                flat[section] = values
        return flat

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "knn": KnnConfig,
            "probe": ProbeConfig}
TOP_LEVEL = ("name", *SECTIONS, "method")


# --------------------------------------------------------------------------- type checking
def _suggest(key: str, known) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"did you mean '{close[0]}'? " if close else ""


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(value, annotation, where: str):
    """``value`` checked against ``annotation`` (int, float, bool, str, list[...], X | None)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where} = {value!r} has the wrong type: expected {' or '.join(_type_name(o) for o in options)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r} must be a list, e.g. [{value!r}]")
        (item,) = typing.get_args(annotation) or (Any,)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
            return float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
    elif annotation is str:
        if isinstance(value, str):
            return value
    elif annotation is dict:
        if isinstance(value, dict):
            return value
    raise ConfigError(f"{where} = {value!r} has the wrong type: expected {_type_name(annotation)}")


def _build(cls, values: dict | None, where: str):
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"section '{where}' must be a mapping of keys to values, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown key '{where}.{key}': {_suggest(str(key), names)}"
                              f"known keys of '{where}': {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


# --------------------------------------------------------------------------- loading
def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("a config file must be a YAML mapping with the sections "
                          f"{', '.join(TOP_LEVEL)}")
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"unknown config section '{key}': {_suggest(str(key), TOP_LEVEL)}"
                              f"use {', '.join(TOP_LEVEL)}")
    method = raw.get("method") or {"name": "swav"}
    if isinstance(method, str):
        method = {"name": method}
    if not isinstance(method, dict):
        raise ConfigError("section 'method' must be a mapping with a 'name' (swav, dino, sdmp, supcon, simclr)")
    method = {"name": "swav", **method}  # the default method when a config names none
    from trainers.methods import check_method

    method = dict(method)
    method["name"] = check_method(str(method["name"]))
    name = raw.get("name", "run")
    if not isinstance(name, (str, int)) or isinstance(name, bool) or str(name).strip() == "":
        raise ConfigError(f"name must be a non-empty string (it names the run folder), got {name!r}")
    config = Config(name=str(name), method=method,
                    **{name: _build(cls, raw.get(name), name) for name, cls in SECTIONS.items()})
    config.method_options()  # validates the method's keys and types now
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A config from a YAML file (or the defaults) with ``section.key=value`` overrides applied."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder: pass a YAML file, e.g. configs/pretrain/swav_cifar10.yaml")
        if not path.is_file():
            hint = ""
            folder = path.parent if path.parent.is_dir() else None
            if folder is not None:
                close = difflib.get_close_matches(path.name, [p.name for p in folder.glob("*.yaml")], n=1)
                hint = f" (did you mean {folder / close[0]}?)" if close else ""
            raise ConfigError(f"config file {path} not found{hint}: see configs/pretrain/ for the shipped ones")
        raw = read_yaml_mapping(path, "a config file", f"the sections {', '.join(TOP_LEVEL)}")
    raw = apply_overrides(raw, overrides or [])
    return from_dict(raw)


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict:
    """A YAML file that must hold a mapping: one clear line for text that is not YAML, binary files,
    unreadable files, and a top level that is a list or a scalar."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not {what}: pass the YAML file inside it")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text file (not UTF-8): {what} must be YAML text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror or exc}): check the path and its permissions") from None
    if "\x00" in text:
        raise ConfigError(f"{path} is a binary file: {what} must be YAML text")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} holds a YAML {type(raw).__name__}, but {what} must be a mapping of {expected}")
    return raw


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """``["optim.lr=0.5", "method.name=dino"]`` applied to a raw config mapping (values parsed as YAML)."""
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"a config must be a YAML mapping with the sections {', '.join(TOP_LEVEL)}, "
                          f"got a {type(raw).__name__}")
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set '{item}' must look like section.key=value, e.g. optim.lr=0.5")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        if len(parts) == 1 and parts[0] == "name":
            raw["name"] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"--set '{item}': the key must be section.key (e.g. optim.lr), got '{key}'")
        section, name = parts
        if section not in TOP_LEVEL or section == "name":
            raise ConfigError(f"--set '{item}': unknown section '{section}': {_suggest(section, TOP_LEVEL)}"
                              f"use one of {', '.join(s for s in TOP_LEVEL if s != 'name')}")
        target = raw.get(section)
        if section == "method" and isinstance(target, str):
            target = {"name": target}
        if target is not None and not isinstance(target, dict):
            raise ConfigError(f"section '{section}' must be a mapping of keys to values, got {target!r}: write it "
                              f"as {section}: {{key: value}}")
        target = dict(target or {})
        if section == "method" and name == "name" and target.get("name") != value:
            target = {}  # another method: the old method's options do not apply
        target[name] = value
        raw[section] = target
    return raw
