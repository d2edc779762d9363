"""The training loop: method-agnostic, plain PyTorch, one process or one rank of many.

``Trainer(config).fit()`` builds the multi-crop loader, the backbone and the method, then runs
``epochs`` of: schedules -> method step under autocast -> backward -> (clip) -> optimizer step ->
method's post-step hook (EMA) -> online linear probe step (trainers/probe.py, on detached features).
It writes atomic checkpoints that resume exactly (model, teacher, optimizer, scaler, queue, center,
probe, step, all random-number states), runs online kNN and evaluates the probe on a held-out split,
and keeps ``metrics.jsonl`` in the run folder. Orchestrators (Ray Train) pass callbacks to
see metrics and checkpoints; nothing here imports Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from trainers.backbones import build_backbone, check_backbone
from trainers.checkpoint import load_checkpoint, remove_checkpoint, save_checkpoint, storage_error
from trainers.config import Config
from trainers.errors import ConfigError, DataError, UserError
from trainers.events import TrainerEvents  # noqa: F401 (re-exported: trainers.loop.TrainerEvents)
from trainers.knn import extract_features, knn_accuracy, knn_metric
from trainers.methods import method_class
from trainers.methods.base import MethodContext
from trainers.optim import (build_optimizer, clip_gradients, cosine_schedule, fold_weight_decay, parameter_groups,
                            set_hyperparameters, tensor_hyperparameters)
from trainers.paths import state_dir, write_text_atomic

CHECKPOINT_FORMAT = 1
RUN_LOCK = ".sslab-run.lock"  # in the run folder: held (POSIX lock) by the run writing there

# What usually fixes a diverging run, per method (shown with the non-finite-loss error).
REMEDIES = {
    "swav": "lower method.epsilon (0.03) or raise method.freeze_prototypes_steps",
    "dino": "raise method.warmup_teacher_temperature_epochs, lower method.teacher_temperature to 0.04, "
            "keep optim.clip_grad=3.0",
    "sdmp": "lower method.mix_weight or the learning rate",
    "supcon": "raise method.temperature",
    "simclr": "raise method.temperature",
}


class NonFiniteLossError(UserError):
    exit_code = 5


class StopRequested(Exception):
    """Training ended early on request (``Trainer(stop=...)``: a SIGTERM, a preemption notice) after a
    checkpoint at ``step``, the step in flight included. Not a ``UserError``: a restart resumes there."""

    def __init__(self, step: int, checkpoint: Path | None, reason: str = "stop requested"):
        super().__init__(f"{reason}: stopped at step {step} with a checkpoint ({checkpoint})")
        self.step, self.checkpoint, self.reason = step, checkpoint, reason

    def __reduce__(self):  # crosses processes (Ray sends a worker's error to its controller)
        return (type(self), (self.step, self.checkpoint, self.reason))


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epochs_completed: int
    metrics: dict = field(default_factory=dict)  # last logged values (loss, knn_top1_k20, ...)
    checkpoint: Path | None = None
    backbone: Path | None = None
    history: list = field(default_factory=list)


# --------------------------------------------------------------------------- config checks
def check_config(config: Config, world_size: int = 1) -> None:
    """Everything that can be checked without data: fail before any expensive work. Each section checks
    its own values (``DataConfig.check``, ``OptimConfig.check``, ... in trainers/config.py); the method
    checks its options against the run (``Method.check``)."""
    from trainers.data.datasets import check_dataset_name

    check_run_name(config.name)
    check_dataset_name(config.data.dataset)
    check_backbone(config.model.backbone)
    groups = config.data.check(world_size, method_class(config.method_name).crop_preset, config.model)
    config.train.check()
    config.optim.check(config.data.batch_size, config.train.epochs)
    config.knn.check()
    config.probe.check()
    if config.train.compile_step is not False:
        check_compile_step(config, world_size)
    cls = method_class(config.method_name, config.method)
    ctx = MethodContext(config.model.backbone, 1, tuple(groups), config.data.batch_size, world_size,
                        config.train.epochs, 1)
    cls.check(config.method_options(), ctx)


COMPILE_STEP_METHODS = ("swav", "dino", "supcon", "simclr")  # methods whose whole step compiles (tests/test_whole_step.py)


def check_compile_step(config: Config, world_size: int) -> None:
    """train.compile_step: one process, and a method whose step has no per-step Python draws."""
    if world_size > 1:
        raise ConfigError(f"train.compile_step compiles the step of one process, this run has {world_size} workers: "
                          "use train.compile=true (the backbone) under DDP")
    if config.train.precision == "fp16":
        raise ConfigError("train.compile_step does not take train.precision=fp16 (its GradScaler checks the gradients "
                          "on the host every step): use bf16 (the default on a GPU)")
    if config.method_name not in COMPILE_STEP_METHODS:
        raise ConfigError(f"train.compile_step does not support {config.method_name} (its step draws a mix mode in "
                          f"Python every step): use train.compile=true; whole-step methods: "
                          f"{', '.join(COMPILE_STEP_METHODS)}")


def check_run_name(name) -> str:
    """A run name becomes a folder name: letters, digits, '.', '_', '-', not starting with '.'."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise ConfigError(f"run name {name!r} may only hold letters, digits, '.', '_' and '-' (and not start with "
                          "'.'): it names the run folder; pass another --name (or name: in the config)")
    return name


def resolve_device_type(name: str) -> str:
    """'cuda' or 'cpu' for a device name, without touching the GPU beyond asking whether one exists."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name.split(":")[0]


def check_device_name(name: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (the devices this trainer runs on)."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise ConfigError(f"device '{name}' is not one this trainer runs on: use auto, cpu, cuda or cuda:N")
    return name


def resolve_device(name: str) -> torch.device:
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device '{name}' asked for CUDA but no GPU is visible: use train.device=cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device '{name}': this machine has {torch.cuda.device_count()} GPU(s), "
                          f"numbered 0..{torch.cuda.device_count() - 1}")
    return device


def default_out_dir(name: str) -> Path:
    return state_dir() / "runs" / name


# --------------------------------------------------------------------------- the trainer
class Trainer:
    def __init__(self, config: Config, rank: int = 0, world_size: int = 1, device: str | torch.device | None = None,
                 log: Callable[[str], None] = print, progress: bool = True, events: TrainerEvents | None = None,
                 out_dir: str | Path | None = None, stop: Callable[[], str | None] | None = None):
        check_config(config, world_size)
        self.config, self.rank, self.world_size = config, rank, world_size
        self.is_main = rank == 0
        self.log = log if self.is_main else (lambda *_: None)
        self.progress = progress and self.is_main
        self.events = events or TrainerEvents()
        # asked after every step: a reason (str) to stop now, else None. Under DDP the ranks agree (any one
        # asking stops all at the same step); the run then checkpoints and raises StopRequested
        self.stop = stop
        self.device = torch.device(device) if device is not None else resolve_device(config.train.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.out_dir = Path(out_dir or config.train.out_dir or default_out_dir(config.name)).expanduser().resolve()
        self.history: list[dict] = []
        self._held = contextlib.ExitStack()  # the run folder's lock, from setup() to the end of fit()

    def _lock_run_folder(self) -> None:
        """One run per folder: a second run into the same folder would mix configs and checkpoints."""
        from trainers.locks import hold

        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._held.enter_context(hold(
                self.out_dir / RUN_LOCK, wait=False, what=f"run folder {self.out_dir}",
                busy_hint="another run is writing there; wait for it, or pass another --out "
                          "(train.out_dir) or --name"))
        except OSError as exc:
            raise storage_error(self.out_dir, exc, "run folder",
                                hint="choose a writable --out (train.out_dir) or $SSLAB_HOME") from None

    def close(self) -> None:
        """Release the run folder (fit() does this when it ends)."""
        self._held.close()

    # ------------------------------------------------------------------ setup
    def _precision(self):
        p = self.config.train.precision
        if p == "auto":
            p = "bf16" if self.device.type == "cuda" else "fp32"
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def setup(self) -> None:
        c = self.config
        t = c.train
        self._stop_group = None  # the default group, unless it is NCCL (see _stop_reason)
        if self.stop is not None and self.world_size > 1:
            import torch.distributed as dist

            if dist.get_backend() != "gloo":
                self._stop_group = dist.new_group(backend="gloo")
        if self.is_main:
            self._lock_run_folder()
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast_dtype = self._precision()
        self.channels_last = t.channels_last
        cls = method_class(c.method_name, c.method)
        options = c.method_options()
        from trainers.data.multicrop import build_multicrop_loader

        per_rank = c.data.batch_size // self.world_size
        crop_overrides = {k: v for k, v in (("global_scale", c.data.global_scale),
                                              ("local_scale", c.data.local_scale)) if v is not None}
        crop_overrides.update(global_augment=c.data.global_augment, local_augment=c.data.local_augment)
        view_dtype = self.autocast_dtype if self.autocast_dtype is not None and self.device.type == "cuda" else torch.float32
        self.loader = build_multicrop_loader(
            c.data.dataset, "train", c.data.crops, cls.crop_preset, per_rank, device=self.device,
            loader=c.data.loader, seed=t.seed, dtype=view_dtype, channels_last=self.channels_last,
            crop_overrides=crop_overrides, data_root=c.data.data_root, cache_dir=c.data.cache_dir,
            rank=self.rank, world_size=self.world_size, num_workers=c.data.num_workers,
            canvas_size=c.data.canvas_size, subset=c.data.train_subset, log=self.log,
            compile_augment=c.data.compile_augment)
        # every rank's views differ; the shard order is shared (and split) through the seed above
        self.loader.augment.reseed(t.seed * 1000 + self.rank)
        if c.data.train_subset is not None and c.data.train_subset > self.loader.num_samples:
            raise ConfigError(f"data.train_subset {c.data.train_subset:,} is larger than the training set of "
                              f"{c.data.dataset} ({self.loader.num_samples:,} images): use at most "
                              f"{self.loader.num_samples:,}, or null for all of them")
        self.steps_per_epoch = len(self.loader)
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{c.data.dataset} has {self.loader.num_samples} training images, fewer than one batch "
                              f"of {c.data.batch_size}: lower data.batch_size")
        self.total_steps = self.steps_per_epoch * t.epochs
        groups = tuple((g.count, g.size) for g in self.loader.augment.groups)
        self.global_size = groups[0][1]
        classes = self.loader.classes
        torch.manual_seed(t.seed)  # identical initial weights on every rank
        backbone, feature_dim = build_backbone(c.model.backbone, self.global_size, c.model.cifar_stem,
                                               c.model.patch_size)
        self.ctx = MethodContext(c.model.backbone, feature_dim, groups, c.data.batch_size, self.world_size, t.epochs,
                                 self.steps_per_epoch, len(classes) if classes else None, t.seed,
                                 c.model.forward_views)
        self.method = cls(options, self.ctx, backbone).to(self.device)
        if self.channels_last:
            self.method.to(memory_format=torch.channels_last)
        sync_bn = c.model.sync_batchnorm if c.model.sync_batchnorm is not None else self.world_size > 1
        if sync_bn and self.world_size > 1:  # every BatchNorm of the method: student, teacher, heads
            from trainers.distributed import convert_sync_batchnorm

            self.method, layers = convert_sync_batchnorm(self.method, self.device.type)
            self.log(f"model.sync_batchnorm: {layers} BatchNorm layers use the statistics of the global batch")
        if t.compile:
            self.method.student.backbone.compile()
            if hasattr(self.method, "teacher"):
                self.method.teacher.backbone.compile()
        self._compiled_step = None
        if t.compile_step is not False:  # see step_gradients()
            mode = None if t.compile_step in (True, "default") else t.compile_step
            # a run compiles its own graphs: those of earlier runs in this process (a test session, a sweep's
            # reused worker) count against dynamo's recompile limit on the code they share (torch.optim's step),
            # past which torch runs those frames eagerly, where a capturable AdamW refuses CPU tensors
            torch._dynamo.reset()
            self._compiled_step = torch.compile(step_gradients, mode=mode)
            self._compiled_update = torch.compile(apply_update, mode=mode)
            self._rates = {"lr": torch.zeros((), device=self.device), "wd": torch.zeros((), device=self.device)}
        torch.manual_seed(t.seed * 1000 + self.rank + 1)  # training randomness differs per rank
        if self.device.type == "cuda":
            torch.cuda.manual_seed(t.seed * 1000 + self.rank + 1)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.method.set_student_runner(DistributedDataParallel(self.method.student, device_ids=ids))
        o = c.optim
        scale = c.data.batch_size / 256 if o.lr_scaling == "linear" else 1.0
        self.peak_lr = o.lr * scale
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self.lr_schedule = cosine_schedule(self.peak_lr, o.min_lr, self.total_steps, warmup)
        self.wd_schedule = cosine_schedule(o.weight_decay, o.weight_decay if o.weight_decay_end is None
                                           else o.weight_decay_end, self.total_steps)
        self.optimizer = build_optimizer(o.name, parameter_groups(self.method.student, o.exclude_bias_norm),
                                         self.peak_lr, o.weight_decay, o.momentum, o.betas, o.lars_eta,
                                         lars_clip_lr=o.lars_clip_lr, lars_trust=o.lars_trust)
        self.trained_parameters = [p for p in self.method.student.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        self.probe = self._build_probe(scale)
        self.step = 0
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.last_checkpoint: Path | None = None
        self._resume()
        if c.knn.every_epochs or self.probe is not None:  # a bad split or bank fails now, not after an epoch;
            # training draws stay as they were
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                try:
                    self._knn_loaders = self._build_knn_loaders(bank=bool(c.knn.every_epochs))
                except DataError as exc:
                    if c.knn.every_epochs:
                        raise
                    self.probe = None  # on by default: a data set without a held-out split trains without it
                    self.log(f"no online linear probe: its held-out split knn.split={c.knn.split} cannot be read "
                             f"({str(exc).splitlines()[0]})")
        if self.is_main:
            try:
                c.dump(self.out_dir / "config.yaml")
            except OSError as exc:
                raise storage_error(self.out_dir / "config.yaml", exc, "run config") from None
        self.log(f"{self.method.describe()} | {c.model.backbone} ({sum(p.numel() for p in backbone.parameters()) / 1e6:.1f} M "
                 f"params) | {c.data.dataset}: {self.loader.num_samples:,} images, crops {c.data.crops}, batch "
                 f"{c.data.batch_size} ({self.loader.kind} loader) | {t.epochs} epochs x {self.steps_per_epoch} steps | "
                 f"{o.name} lr {self.peak_lr:.3g} | {self.device}, "
                 f"{'fp32' if self.autocast_dtype is None else str(self.autocast_dtype).split('.')[-1]}")
        if self.probe is not None:
            self.log(f"online linear probe: {self.ctx.num_classes} classes, SGD lr {self.probe_peak_lr:.3g} "
                     f"(momentum {c.probe.momentum}), on knn.split={c.knn.split} every {c.probe.every_epochs} "
                     f"epoch(s)")

    def _build_probe(self, scale: float):
        """The online linear probe (trainers/probe.py), or None when it is off or the data has no labels."""
        p = self.config.probe
        if not p.online_linear:
            return None
        if not self.ctx.num_classes:
            self.log("probe.online_linear: the training set has no class labels, so no online linear probe")
            return None
        from trainers.probe import OnlineLinearProbe

        self.probe_peak_lr = p.lr * scale  # solo-learn scales classifier_lr by the batch like the backbone's lr
        return OnlineLinearProbe(self.ctx.feature_dim, self.ctx.num_classes, self.probe_peak_lr, p.momentum,
                                 p.weight_decay, seed=self.config.train.seed, device=self.device)

    # ------------------------------------------------------------------ checkpoints
    def rng_state(self) -> dict:
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.zeros(0, dtype=torch.uint8)
        return {"torch": torch.get_rng_state(), "cuda": cuda_rng, "augment": self.loader.augment.rng_state(self.device)}

    def gather_rng_states(self) -> list[dict]:
        """Every rank's random-number states (collective under DDP: all ranks call it), so that a
        resumed multi-worker run draws the same views on every rank as the uninterrupted one."""
        own = self.rng_state()
        if self.world_size == 1:
            return [own]
        import torch.distributed as dist

        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, own)
        return gathered

    def state(self, rng_ranks: list[dict] | None = None) -> dict:
        rng_ranks = rng_ranks or [self.rng_state()]
        return {"format": CHECKPOINT_FORMAT, "method": self.config.method_name, "backbone": self.config.model.backbone,
                "step": self.step, "epoch": self.step // self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "probe": self.probe.checkpoint_state() if self.probe is not None else {},
                "rng": rng_ranks[0], "rng_ranks": rng_ranks, "config": json.dumps(self.config.to_dict())}

    def save(self, epoch_end: bool) -> Path | None:
        """Rank 0 writes ``last.pt`` (and ``epoch-N.pt`` at epoch ends); returns its path."""
        rng_ranks = self.gather_rng_states()
        if not self.is_main:
            return None
        state = self.state(rng_ranks)
        path = save_checkpoint(state, self.checkpoint_dir / "last.pt")
        if epoch_end:
            epoch = self.step // self.steps_per_epoch
            save_checkpoint(state, self.checkpoint_dir / f"epoch-{epoch:04d}.pt")
            kept = sorted(self.checkpoint_dir.glob("epoch-*.pt"))
            for old in kept[: max(len(kept) - self.config.train.keep_checkpoints, 0)]:
                remove_checkpoint(old)
        self.last_checkpoint = path
        return path

    def _resume(self) -> None:
        resume = self.config.train.resume
        if resume is None or resume in ("none", "null", ""):
            return
        path = self.checkpoint_dir / "last.pt" if resume == "auto" else Path(resume).expanduser()
        if resume == "auto" and not path.is_file():
            return
        if path.is_dir():  # a run folder: its last checkpoint
            found = next((p for p in (path / "checkpoints" / "last.pt", path / "last.pt") if p.is_file()), None)
            if found is None:
                raise ConfigError(f"train.resume {path} is a folder without checkpoints/last.pt: pass a run folder "
                                  "that has one, or the checkpoint file itself")
            path = found
        self.load_state(load_checkpoint(path, map_location="cpu", method=self.config.method_name,
                                        backbone=self.config.model.backbone), path)
        self.last_checkpoint = path  # the resume point until this run writes its own
        self.log(f"resumed from {path} at step {self.step} (epoch {self.step // self.steps_per_epoch})")

    def load_state(self, state: dict, path: Path | str = "the checkpoint") -> None:
        new_run = "start a new run (train.resume=null or another --out)"
        if "state_dict" in state and "model" not in state:
            raise ConfigError(f"{path} is a backbone file (the evaluation weights), not a training checkpoint: resume "
                              "from <run folder>/checkpoints/last.pt, or pass the run folder")
        if state.get("steps_per_epoch") != self.steps_per_epoch:
            raise ConfigError(f"the checkpoint has {state.get('steps_per_epoch')} steps per epoch, this run "
                              f"{self.steps_per_epoch}: resume with the same data set, subset and batch size")
        try:
            saved = json.loads(state.get("config") or "{}")
        except (TypeError, ValueError):
            saved = {}
        changed = _changed_settings(saved, self.config.to_dict())
        if changed:
            key, (before, after) = next(iter(changed.items()))
            raise ConfigError(f"checkpoint {path} was written with {key}={before}, this run uses {after}"
                              f"{f' (and {len(changed) - 1} more setting(s))' if len(changed) > 1 else ''}: a resumed "
                              f"run keeps its data, model and method settings; resume with {key}={before}, or "
                              f"{new_run}")
        saved_optim = (saved.get("optim") or {}).get("name") if isinstance(saved, dict) else None
        if saved_optim is not None and saved_optim != self.config.optim.name:
            raise ConfigError(f"checkpoint {path} was written with optim.name={saved_optim}, this run uses "
                              f"{self.config.optim.name}: resume with optim.name={saved_optim}, or {new_run}")
        try:
            self.method.load_state_dict(state["model"])
        except (RuntimeError, KeyError, TypeError) as exc:
            raise ConfigError(f"checkpoint weights do not fit this model ({str(exc).splitlines()[0]}): resume with "
                              f"the same method options and backbone, or {new_run}") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ConfigError(f"the optimizer state in {path} does not fit this run's optimizer "
                              f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): resume "
                              f"with the same optim settings, or {new_run}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.probe is not None:
            try:
                self.probe.load_checkpoint_state(state["probe"])
            except (KeyError, ValueError, RuntimeError, TypeError):  # written without it (or another one)
                self.log(f"{path} holds no online linear probe for this run: the probe starts afresh at step "
                         f"{state['step']}")
        self.step = int(state["step"])
        ranks = state.get("rng_ranks") or []
        if len(ranks) == self.world_size:
            rng = ranks[self.rank]
        elif self.rank == 0:
            rng = state["rng"]
        else:  # saved with another number of workers: fresh, distinct streams for the other ranks
            rng = None
            seed = self.config.train.seed * 1000 + self.rank + 1 + self.step * 7919
            torch.manual_seed(seed)
            self.loader.augment.reseed(seed)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            if self.device.type == "cuda" and rng["cuda"].numel():
                torch.cuda.set_rng_state(rng["cuda"], self.device)
            self.loader.augment.load_rng_state(rng["augment"], self.device)
        self.history = [row for row in self._read_history() if row.get("step", 0) <= self.step]

    def _read_history(self) -> list[dict]:
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash
        return rows

    def _write_history(self) -> None:
        if not self.is_main:
            return
        path = self.out_dir / "metrics.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        try:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise storage_error(path, exc, "metrics") from None

    # ------------------------------------------------------------------ kNN
    def _build_knn_loaders(self, bank: bool = True):
        """(memory bank or None, held-out queries): the kNN's loaders; the online probe uses the queries."""
        from trainers.data.multicrop import build_canvas_loader

        c, k = self.config, self.config.knn
        common = dict(device=self.device, loader=c.data.loader, data_root=c.data.data_root, cache_dir=c.data.cache_dir,
                      seed=c.train.seed, shuffle=False, drop_last=False, num_workers=c.data.num_workers,
                      canvas_size=c.data.canvas_size, log=self.log)
        queries, _ = build_canvas_loader(c.data.dataset, k.split, k.batch_size, subset=k.max_test, **common)
        if not bank:
            return None, queries
        bank, _ = build_canvas_loader(c.data.dataset, "train", k.batch_size, subset=k.max_train, **common)
        bank_size = _loader_size(bank)
        too_large = [kk for kk in k.k if kk > bank_size]
        if too_large:
            raise ConfigError(f"knn.k {too_large} is larger than the kNN memory bank ({bank_size:,} training images"
                              f"{', knn.max_train' if k.max_train else ''}): use k <= {bank_size:,}"
                              f"{' or raise knn.max_train' if k.max_train and bank_size < self.loader.num_samples else ''}")
        return bank, queries

    def knn(self) -> dict:
        return self.evaluate_online(knn=True, probe=False)

    def evaluate_online(self, knn: bool = True, probe: bool = True) -> dict:
        """kNN accuracy (``knn_top1_k20``, ...) and/or the online probe's (``online_linear_top1``, ...) on the
        held-out split, from one pass over it; the training's random draws are left as they were."""
        from trainers.data.augment import normalization_for

        c, k = self.config, self.config.knn
        probe = probe and self.probe is not None
        if not hasattr(self, "_knn_loaders") or (knn and self._knn_loaders[0] is None):
            self._knn_loaders = self._build_knn_loaders()
        bank, queries = self._knn_loaders
        mean, std = normalization_for(c.data.dataset)
        backbone = self.method.eval_backbone()
        extract = dict(size=self.global_size, mean=mean, std=std, device=self.device,
                       autocast_dtype=self.autocast_dtype if self.device.type == "cuda" else None,
                       channels_last=self.channels_last)
        results = {}
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            test_features, test_labels = extract_features(backbone, queries, normalize=False, **extract)
            if knn:
                train_features, train_labels = extract_features(backbone, bank, **extract)
                results.update(knn_accuracy(train_features, train_labels,
                                            torch.nn.functional.normalize(test_features, dim=1), test_labels, k.k,
                                            k.temperature, self.ctx.num_classes))
            if probe:
                results.update(self.probe.evaluate(test_features, test_labels))
        return results

    # ------------------------------------------------------------------ training
    def _non_finite(self, step: int, value: float) -> NonFiniteLossError:
        name = self.config.method_name
        lr = float(self.lr_schedule[min(step, len(self.lr_schedule) - 1)])
        where = self.events.resume_hint or (
            f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else
            "no checkpoint was written yet")
        return NonFiniteLossError(
            f"loss became {value} at step {step} (epoch {step // self.steps_per_epoch}) of {name} with lr {lr:.4g}: "
            f"lower optim.lr or lengthen optim.warmup_epochs, set optim.clip_grad (e.g. 3.0), use "
            f"train.precision=bf16 or fp32 instead of fp16, {REMEDIES.get(name, '')}; {where}")

    def _flush(self, pending: list, epoch: int, started: float, images: int, bar) -> dict:
        """One host sync for the losses of the last steps: check them, log their mean."""
        if not pending:
            return {}
        steps = [s for s, _, _ in pending]
        losses = torch.stack([loss.float() for _, loss, _ in pending]).cpu()
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = int(bad[0])
            raise self._non_finite(steps[first], float(losses[first]))
        extras = {}
        for key in pending[-1][2]:
            extras[key] = float(torch.stack([logs[key].float() for _, _, logs in pending]).mean())
        elapsed = max(time.perf_counter() - started, 1e-9)
        row = {"step": steps[-1] + 1, "epoch": epoch, "loss": float(losses.mean()),
               "lr": float(self.lr_schedule[steps[-1]]), "weight_decay": float(self.wd_schedule[steps[-1]]),
               "img_per_s": images * self.world_size / elapsed, **extras}
        if self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.history.append(row)
        if bar is not None:
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.3g}", img_s=f"{row['img_per_s']:.0f}")
        if self.is_main:
            self.events.on_log(row["step"], row)
        pending.clear()
        return row

    def train_step(self, views, labels, step: int):
        lr, wd = float(self.lr_schedule[step]), float(self.wd_schedule[step])
        if getattr(self, "_compiled_step", None) is not None:
            return self._train_step_compiled(views, labels, step, lr)
        set_hyperparameters(self.optimizer, lr, wd)
        self.method.before_step(step)
        with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, logs = self.method.training_step(views, labels, step)
        if self.device.type == "cpu" and not torch.isfinite(loss):
            raise self._non_finite(step, float(loss.detach()))  # free on the CPU: stop before the weights change
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.method.before_optimizer_step(step)
        if self.config.optim.clip_grad is not None:
            clip_gradients(self.trained_parameters, self.config.optim.clip_grad, self.config.optim.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.method.after_optimizer_step(step)
        logs = {k: v.detach() for k, v in logs.items()}
        if self.probe is not None:  # on the updated evaluation backbone, detached: its weights stay as they are
            features = self.probe.features(self.method.eval_backbone(), views[: self.ctx.num_global],
                                           self.autocast_dtype)
            probe_lr = self.probe_peak_lr * lr / self.peak_lr  # the backbone's warm-up + cosine shape
            logs["online_linear_loss"] = self.probe.train_step(features, labels, probe_lr)
        return loss.detach(), logs

    def _train_step_compiled(self, views, labels, step: int, lr: float):
        self.method.prepare_step(step)
        # before the call: every .grad None when the graph starts (zeroed inside, a frozen layer's None .grad of
        # the last step made torch 2.14's graph put gradients on the wrong parameters)
        self.optimizer.zero_grad(set_to_none=True)
        # trace_autograd_ops: backward traced into the forward's graph (else a graph break at loss.backward())
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            loss, logs = self._compiled_step(self, views, labels, step)
        # the second graph: weight decay, the optimizer step and the EMA teacher, rates as 0-d tensors
        self._rates["lr"].fill_(lr)
        self._rates["wd"].fill_(float(self.wd_schedule[step]))
        tensor_hyperparameters(self.optimizer, self.config.optim.name, self._rates["lr"], self._rates["wd"])
        self._compiled_update(self, step)
        if self.probe is not None:  # eager, as in train_step
            features = self.probe.features(self.method.eval_backbone(), views[: self.ctx.num_global],
                                           self.autocast_dtype)
            logs = {**logs, "online_linear_loss": self.probe.train_step(features, labels,
                                                                        self.probe_peak_lr * lr / self.peak_lr)}
        return loss, logs

    # ------------------------------------------------------------------ stop requests
    def _stop_reason(self) -> str | None:
        """This rank's stop request, agreed over all ranks (one tiny all-reduce per step, on a gloo group
        so that an NCCL run does not wait on its stream); the reason of the rank that asked."""
        own = self.stop() if self.stop is not None else None
        if self.world_size == 1:
            return own
        import torch.distributed as dist

        flag = torch.tensor([1 if own else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        if not int(flag):
            return None
        return own or "another worker was asked to stop"

    def _checkpoint_mid_epoch(self, last: dict) -> Path | None:
        """``last.pt`` and metrics.jsonl at this step, handed to ``events.on_checkpoint`` (every rank)."""
        path = self.save(epoch_end=False)
        self._write_history()
        self.events.on_checkpoint(self.step, dict(last), path)
        return path

    def _stop_now(self, reason: str, pending: list, epoch: int, started: float, images: int, bar,
                  last: dict, checkpoint: Path | None = None) -> None:
        """Checkpoint at this step (unless the epoch end just wrote one) and raise StopRequested."""
        last = self._flush(pending, epoch, started, images, bar) or last
        if checkpoint is None:
            checkpoint = self._checkpoint_mid_epoch(last)
        if bar is not None:
            bar.close()
        self.log(f"{reason}: stopped at step {self.step} with a checkpoint")
        raise StopRequested(self.step, checkpoint, reason)

    def fit(self) -> TrainResult:
        try:
            if not hasattr(self, "method"):
                self.setup()
            return self._fit()
        finally:
            self.close()

    def _fit(self) -> TrainResult:
        c, t = self.config, self.config.train
        from tqdm import tqdm

        self.method.train()
        max_steps = min(self.total_steps, t.max_steps) if t.max_steps is not None else self.total_steps
        wall_start = time.perf_counter()
        last = {}
        while self.step < max_steps:
            epoch = self.step // self.steps_per_epoch
            skip = self.step - epoch * self.steps_per_epoch
            self.loader.set_epoch(epoch)
            bar = tqdm(total=self.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step",
                       dynamic_ncols=True, leave=False) if self.progress else None
            pending, started, images = [], time.perf_counter(), 0
            for batch in self.loader.iterate(skip):
                loss, logs = self.train_step(batch.views, batch.labels, self.step)
                pending.append((self.step, loss, logs))
                images += batch.labels.shape[0]
                self.step += 1
                if bar is not None:
                    bar.update(1)
                epoch_done = self.step % self.steps_per_epoch == 0
                if self.step % t.log_every == 0 or epoch_done or self.step >= max_steps:
                    last = self._flush(pending, epoch, started, images, bar) or last
                    started, images = time.perf_counter(), 0
                if self.stop is not None and not epoch_done and self.step < max_steps:
                    reason = self._stop_reason()  # every rank asks at every step, so they stay in step
                    if reason:
                        self._stop_now(reason, pending, epoch, started, images, bar, last)
                if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0 and not epoch_done:
                    last = self._flush(pending, epoch, started, images, bar) or last
                    started, images = time.perf_counter(), 0
                    self._checkpoint_mid_epoch(last)
                if self.step >= max_steps:
                    break
            if bar is not None:
                bar.close()
            epoch_done = self.step % self.steps_per_epoch == 0
            completed = self.step // self.steps_per_epoch
            metrics = dict(last)
            final = self.step >= max_steps
            knn_due = bool(c.knn.every_epochs) and ((epoch_done and completed % c.knn.every_epochs == 0) or final)
            probe_due = self.probe is not None and (
                (epoch_done and completed % c.probe.every_epochs == 0) or final)
            if knn_due or probe_due:
                found = self.evaluate_online(knn=knn_due, probe=probe_due)
                metrics.update(found)
                self.history.append({"step": self.step, "epoch": self.step / self.steps_per_epoch, **found})
                parts = ["kNN top-1 " + ", ".join(f"k={kk} {found[knn_metric(kk, c.knn.temperature)]:.2%}"
                                                  for kk in c.knn.k)
                         ] if knn_due else []
                if probe_due:
                    parts.append(f"online linear top-1 {found['online_linear_top1']:.2%}")
                self.log(f"epoch {completed}: " + "; ".join(parts))
            elif epoch_done:
                self.log(f"epoch {completed}: loss {metrics.get('loss', float('nan')):.4f}")
            checkpoint = None
            if epoch_done and (completed % t.checkpoint_every_epochs == 0 or final):
                checkpoint = self.save(epoch_end=True)
            elif final:
                checkpoint = self.save(epoch_end=False)
            self._write_history()
            if epoch_done or final:
                self.events.on_epoch_end(self.step, completed, metrics, checkpoint, final)
            if self.stop is not None and not final:  # asked during the epoch's last step or its evaluation
                reason = self._stop_reason()
                if reason:
                    self._stop_now(reason, [], epoch, time.perf_counter(), 0, None, last, checkpoint)
        backbone_path = None
        if self.is_main:
            backbone_path = save_checkpoint({"format": CHECKPOINT_FORMAT, "method": c.method_name,
                                             "backbone": c.model.backbone, "image_size": self.global_size,
                                             "feature_dim": self.ctx.feature_dim,
                                             "cifar_stem": c.model.cifar_stem, "patch_size": c.model.patch_size,
                                             "state_dict": _plain_state_dict(self.method.eval_backbone())},
                                            self.out_dir / "backbone.pt", what="backbone")
        final_metrics = {}
        for row in self.history:
            final_metrics.update({k: v for k, v in row.items() if k not in ("step", "epoch")})
        final_metrics["wall_s"] = time.perf_counter() - wall_start
        if self.is_main:
            try:
                write_text_atomic(self.out_dir / "summary.json", json.dumps(  # "this run finished": written last
                    {"steps": self.step, "epochs_completed": self.step // self.steps_per_epoch, **final_metrics},
                    indent=1))
            except OSError as exc:
                raise storage_error(self.out_dir / "summary.json", exc, "run summary") from None
        return TrainResult(self.out_dir, self.step, self.step // self.steps_per_epoch, final_metrics,
                           self.last_checkpoint, backbone_path, list(self.history))


def step_gradients(trainer: "Trainer", views, labels, step: int):
    """train.compile_step: the part of a training step that torch.compile captures as one graph: the method's
    before-step hook (SwAV's prototype normalisation), the forward of every view (student and EMA teacher;
    DINO's center update) and the loss under autocast, the backward (traced into the same graph with
    torch._dynamo's trace_autograd_ops; the gradients were set to None before), the method's gradient hooks (frozen layers) and gradient clipping.
    Returns the detached loss and logs. ``step`` is not read in here (the method's step values come from
    ``prepare_step``, outside), so it is no guard. A module-level function with no ``self``: torch 2.14's
    dynamo lost its caller's frame (``self`` missing) when it resumed after a graph break in a method.

    The second graph, ``apply_update``, takes the optimizer step and the EMA teacher. Outside, eager
    (``Trainer._train_step_compiled``): the schedules' look-ups, the online probe, and the non-finite check
    (at the next log flush, as on a GPU)."""
    trainer.method.before_step(step)
    with torch.autocast(device_type=trainer.device.type, dtype=trainer.autocast_dtype or torch.float32,
                        enabled=trainer.autocast_dtype is not None):
        loss, logs = trainer.method.training_step(views, labels, step)
    value, logs = loss.detach(), {k: v.detach() for k, v in logs.items()}
    loss.backward()
    del loss
    trainer.method.before_optimizer_step(step)
    if trainer.config.optim.clip_grad is not None:
        clip_gradients(trainer.trained_parameters, trainer.config.optim.clip_grad, trainer.config.optim.clip_mode)
    return value, logs


@torch.no_grad()
def apply_update(trainer: "Trainer", step: int) -> None:
    """train.compile_step's second graph: the parameter update after ``step_gradients``: the weight decay
    folded out of SGD / AdamW (``fold_weight_decay``), the optimizer's step and the method's after-step hook
    (the EMA teacher). Learning rate, weight decay and EMA momentum are 0-d tensors filled before the call
    (``tensor_hyperparameters``, ``MomentumMethod.prepare_step``): graph inputs, so a new value each step
    recompiles nothing (one recompilation after the first step, when the optimizer's state appears). Not one
    graph with ``step_gradients``: traced after the backward, torch 2.14's dynamo breaks the graph on the
    optimizer's "pending mutation on parameter"."""
    fold_weight_decay(trainer.optimizer, trainer.config.optim.name)
    trainer.optimizer.step()
    trainer.method.after_optimizer_step(step)


def _plain_state_dict(module: torch.nn.Module) -> dict:
    """State dict without torch.compile's ``_orig_mod.`` prefixes, every tensor contiguous (channels_last
    training leaves NHWC conv weights; safetensors and other loaders want plain row-major tensors)."""
    return {k.replace("_orig_mod.", ""): v.contiguous() for k, v in module.state_dict().items()}


def load_backbone(path: str | Path, device="cpu"):
    """(backbone module, feature_dim, info) from a ``backbone.pt`` written at the end of training."""
    state = load_checkpoint(path, map_location=device)
    if "state_dict" not in state:
        raise UserError(f"{path} is a training checkpoint, not a backbone file: use <run>/backbone.pt")
    module, dim = build_backbone(state["backbone"], state["image_size"], state.get("cifar_stem"),
                                 state.get("patch_size"))
    module.load_state_dict(state["state_dict"])
    return module.to(device), dim, state


def train(config: Config, **kwargs) -> TrainResult:
    return Trainer(config, **kwargs).fit()



# what a checkpoint's weights and schedules were made with: a resume cannot change these
RESUME_FIXED = {"data": ("dataset", "crops", "global_scale", "local_scale", "global_augment", "local_augment",
                         "canvas_size", "train_subset"),
                "model": None, "method": None}  # None: every key of the section


def _changed_settings(saved: dict, current: dict) -> dict:
    """``{"data.crops": (saved, current), ...}`` over RESUME_FIXED, for keys both configs have."""
    changed = {}
    if not isinstance(saved, dict):
        return changed
    for section, keys in RESUME_FIXED.items():
        old, new = saved.get(section), current.get(section)
        if not isinstance(old, dict) or not isinstance(new, dict):
            continue
        for key in keys or sorted(set(old) & set(new)):
            if key in old and key in new and old[key] != new[key]:
                changed[f"{section}.{key}"] = (old[key], new[key])
    return changed


def _loader_size(loader) -> int:
    """Images one pass of a (single-rank, no drop-last) canvas loader yields: its subset, else all."""
    total = int(loader.num_samples)
    subset = getattr(getattr(loader, "loader", None), "indices", None)  # ffcv
    if subset is None:
        subset = getattr(getattr(loader, "sampler", None), "args", [None] * 7)[6]  # torch loader
    return min(total, len(subset)) if subset is not None else total
