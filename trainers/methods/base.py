"""The interface between the training loop and a method.

A method is an ``nn.Module`` that owns everything method-specific (heads, EMA teacher, queue,
center, schedules). The loop calls, per step::

    method.before_step(step)                   # e.g. SwAV re-normalises its prototypes
    loss, logs = method.training_step(views, labels, step)   # under autocast
    loss.backward()
    method.before_optimizer_step(step)         # e.g. drop gradients of frozen layers
    optimizer.step()
    method.after_optimizer_step(step)          # e.g. EMA teacher update

``method.student`` holds every trained parameter (the optimizer's and DDP's module);
``method.eval_backbone()`` is the backbone kNN / linear evaluation should use; ``method.describe()``
is the one line the loop prints at the start. Buffers (queue, center) are registered so
``state_dict()`` carries them into checkpoints. ``MomentumMethod`` adds the EMA teacher that DINO and
SDMP (on MoCo v3 or DINO) share.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from trainers.errors import ConfigError
from trainers.optim import cosine_schedule


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run besides its own options."""

    backbone: str
    feature_dim: int
    crop_groups: tuple[tuple[int, int], ...]  # (count, size) per group, globals first
    global_batch: int
    world_size: int
    epochs: int
    steps_per_epoch: int
    num_classes: int | None = None
    seed: int = 0
    forward_views: str = "by_size"  # model.forward_views: how encode_views batches the views

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def num_global(self) -> int:
        return self.crop_groups[0][0]

    @property
    def num_views(self) -> int:
        return sum(count for count, _ in self.crop_groups)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class Method(nn.Module):
    name = "method"
    config_class: type = object
    crop_preset = "swav"  # whose augmentation defaults (trainers/data/augment.py METHOD_PRESETS)
    min_global_crops = 1

    def __init__(self, options, ctx: MethodContext):
        super().__init__()
        self.options, self.ctx = options, ctx
        self._student_runner = None  # the DDP-wrapped student, when distributed

    # ------------------------------------------------------------------ validation before any work
    @classmethod
    def check(cls, options, ctx: MethodContext) -> None:
        """Raise ConfigError for impossible options (called before data is loaded)."""
        require(ctx.num_global >= cls.min_global_crops,
                f"{cls.name} needs at least {cls.min_global_crops} global crops, the crop spec gives {ctx.num_global}")

    # ------------------------------------------------------------------ DDP
    def set_student_runner(self, runner: nn.Module | None) -> None:
        """The loop passes the DDP-wrapped student here; kept outside the module tree (and state_dict)."""
        object.__setattr__(self, "_student_runner", runner)

    def run_student(self, *args, **kwargs):
        runner = self._student_runner if self._student_runner is not None else self.student
        return runner(*args, **kwargs)

    # ------------------------------------------------------------------ hooks
    def before_step(self, step: int) -> None:
        pass

    def training_step(self, views: Sequence[torch.Tensor], labels: torch.Tensor, step: int):
        raise NotImplementedError

    def before_optimizer_step(self, step: int) -> None:
        pass

    def after_optimizer_step(self, step: int) -> None:
        pass

    # ------------------------------------------------------------------ whole-step capture (train.compile_step)
    def step_values(self, step: int) -> dict:
        """This step's Python-side values by name: schedule look-ups (floats) and phase flags (bools) that
        the hooks above read through ``value``. Base: none."""
        return {}

    def prepare_step(self, step: int) -> None:
        """Works out ``step_values(step)`` before a compiled whole step, outside it: the compiled code then
        reads plain floats (graph inputs: no recompilation) and bools (a recompilation only when one flips)
        instead of indexing numpy schedules with the step."""
        self.__dict__["_prepared_values"] = self.step_values(step)

    def value(self, name: str, step: int):
        """``step_values(step)[name]``: worked out here when eager; the values of ``prepare_step`` when traced
        by torch.compile (where ``step`` is not read, so it is no guard)."""
        if torch.compiler.is_compiling():
            return self.__dict__["_prepared_values"][name]
        return self.step_values(step)[name]

    def eval_backbone(self) -> nn.Module:
        return self.student.backbone

    def describe(self) -> str:
        """One line for the log: the method and its main settings."""
        return self.name

    def epoch_of(self, step: int) -> int:
        return step // self.ctx.steps_per_epoch

    # ------------------------------------------------------------------ checkpoints
    # state_dict keys renamed since checkpoints were first written (old -> new): older checkpoints still load
    legacy_keys: dict[str, str] = {}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if self.legacy_keys:
            state_dict = {self.legacy_keys.get(key, key): value for key, value in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


class MomentumMethod(Method):
    """A student and its EMA teacher (DINO; SDMP on MoCo v3 or on DINO).

    ``init_teacher(source, momentum)`` copies ``source`` (the part of the student the teacher mirrors)
    into a frozen teacher; after every optimizer step the teacher moves towards ``ema_source()`` with a
    momentum raised from ``momentum`` to 1 along a cosine over all steps (BYOL's, DINO's and MoCo v3's
    schedule)."""

    def init_teacher(self, source: nn.Module, momentum: float) -> None:
        self.teacher = make_teacher(source)
        self.teacher_momenta = cosine_schedule(momentum, 1.0, self.ctx.total_steps)

    def ema_source(self) -> nn.Module:
        return self.student

    def teacher_momentum(self, step: int) -> float:
        return float(self.teacher_momenta[min(step, len(self.teacher_momenta) - 1)])

    def step_values(self, step: int) -> dict:
        return {**super().step_values(step), "teacher_momentum": self.teacher_momentum(step)}

    def prepare_step(self, step: int) -> None:
        super().prepare_step(step)
        # the compiled update (train.compile_step) reads the momentum from a 0-d tensor: a graph input
        momentum = self.__dict__.get("_momentum_tensor")
        if momentum is None:
            momentum = self.__dict__["_momentum_tensor"] = torch.zeros((), device=next(self.teacher.parameters()).device)
        momentum.fill_(self.teacher_momentum(step))

    def after_optimizer_step(self, step: int) -> None:
        if torch.compiler.is_compiling():
            ema_update(self.teacher, self.ema_source(), self.__dict__["_momentum_tensor"])
        else:
            ema_update(self.teacher, self.ema_source(), self.value("teacher_momentum", step))


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen copy of ``student`` to be updated as an exponential moving average."""
    teacher = copy.deepcopy(student)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float | torch.Tensor) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, over all parameters in one
    multi-tensor call (buffers such as BN statistics stay the teacher's own). ``momentum`` may be a 0-d
    tensor (the compiled update's graph input)."""
    teacher_params = list(teacher.parameters())
    student_params = [p.detach() for p in student.parameters()]
    if len(teacher_params) != len(student_params):
        raise RuntimeError("teacher and student have different parameter lists")
    torch._foreach_mul_(teacher_params, momentum)
    if isinstance(momentum, torch.Tensor):
        torch._foreach_add_(teacher_params, torch._foreach_mul(student_params, 1.0 - momentum))
    else:
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)


FORWARD_VIEWS = ("by_size", "each")


def encode_views(backbone: nn.Module, views: Sequence[torch.Tensor], mode: str = "by_size",
                 head: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Backbone features of every view, passed through ``head`` if given, concatenated in view order [V*B, D].

    ``mode`` (``model.forward_views``) decides which views share a forward call, and so the batch over
    which BatchNorm takes its statistics: ``by_size``: consecutive views of one size in one backbone call,
    then the head once over all views (the multi-crop wrappers of facebookresearch/swav and dino; SimCLR's
    TF code concatenates its two views too); ``each``: backbone and head once per view (solo-learn's
    BaseMethod.training_step calls its forward per crop, lightly's examples and MoCo v3 per view), so
    the BatchNorm layers of the backbone and of the head see one view's batch."""
    if mode == "each":
        outputs = [head(backbone(view)) if head is not None else backbone(view) for view in views]
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    features = []
    start = 0
    while start < len(views):
        end = start + 1
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        batch = torch.cat(list(views[start:end])) if end - start > 1 else views[start]
        features.append(backbone(batch))
        start = end
    features = torch.cat(features) if len(features) > 1 else features[0]
    return head(features) if head is not None else features
