"""DINO (Caron et al., 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Student and EMA teacher (momentum 0.996 -> 1, cosine per step), 3-layer head (hidden 2048,
bottleneck 256, weight-normalised last layer of 65536), last layer frozen in epoch 0, center EMA
0.9 over the all-reduced teacher outputs, teacher temperature 0.04 with optional linear warm-up,
only the global crops through the teacher. Defaults from facebookresearch/dino. The loss itself
is ``trainers.losses.dino_loss``; the optimizer recipe (AdamW, weight decay 0.04 -> 0.4, clip 3.0
per parameter) lives in the configs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.distributed import all_reduce_sum, world_size
from trainers.heads import DINOHead
from trainers.losses import dino_loss
from trainers.methods.base import MethodContext, MomentumMethod, encode_views, require


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: Sequence[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher's mean output over the *global* batch (all ranks, all global crops):
    center <- momentum * center + (1 - momentum) * mean(teacher logits). Updates in place; returns it."""
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"center momentum must lie in [0, 1], got {momentum}")
    if isinstance(teacher, torch.Tensor):  # [G, B, D]: no copy
        rows, total = teacher.shape[0] * teacher.shape[1], teacher.detach().float().sum(dim=(0, 1))
    else:
        stacked = torch.cat([t.detach().float() for t in teacher])
        rows, total = stacked.shape[0], stacked.sum(dim=0)
    total = all_reduce_sum(total)
    mean = total / (rows * world_size())
    center.mul_(momentum).add_(mean.to(center.dtype), alpha=1.0 - momentum)
    return center


@dataclass
class DINOConfig:
    out_dim: int = 65536  # prototypes of the last layer
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False  # BN in the head's hidden layers (DINO's --use_bn_in_head)
    norm_last_layer: bool = True  # weight-normalised last layer with its norm fixed at 1
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04  # after warm-up
    warmup_teacher_temperature: float = 0.04  # start of the linear warm-up (e.g. 0.04 -> 0.07)
    warmup_teacher_temperature_epochs: int = 0
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996  # EMA momentum, raised to 1 along a cosine over all steps
    freeze_last_layer_epochs: int = 1  # last-layer gradients dropped during these first epochs


def check_dino_options(o: DINOConfig, ctx: MethodContext, prefix: str = "method.") -> None:
    require(o.student_temperature > 0 and o.teacher_temperature > 0 and o.warmup_teacher_temperature > 0,
            f"{prefix}student/teacher temperatures must be > 0 (DINO: student 0.1, teacher 0.04-0.07)")
    require(0 <= o.center_momentum < 1, f"{prefix}center_momentum must lie in [0, 1), got {o.center_momentum}")
    require(0 <= o.teacher_momentum <= 1, f"{prefix}teacher_momentum must lie in [0, 1], got {o.teacher_momentum}")
    require(o.warmup_teacher_temperature_epochs >= 0, f"{prefix}warmup_teacher_temperature_epochs must be >= 0")
    require(o.warmup_teacher_temperature_epochs <= ctx.epochs,
            f"{prefix}warmup_teacher_temperature_epochs ({o.warmup_teacher_temperature_epochs}) exceeds "
            f"train.epochs ({ctx.epochs}): shorten the warm-up")
    require(o.freeze_last_layer_epochs >= 0, f"{prefix}freeze_last_layer_epochs must be >= 0")


def teacher_temperature_schedule(o: DINOConfig, epochs: int) -> np.ndarray:
    """Per epoch: linear from the warm-up value to the final one, then constant (DINO's schedule).

    As facebookresearch/dino's DINOLoss (main_dino.py, ``np.linspace(warmup_teacher_temp, teacher_temp,
    warmup_teacher_temp_epochs)``: end point included, so the last warm-up epoch already uses the final
    value) and lightly's DINOLoss."""
    warm = o.warmup_teacher_temperature_epochs
    return np.concatenate([np.linspace(o.warmup_teacher_temperature, o.teacher_temperature, warm),
                           np.full(max(epochs - warm, 0), o.teacher_temperature)])


class DINONet(nn.Module):
    def __init__(self, backbone: nn.Module, feature_dim: int, o: DINOConfig, forward_views: str = "by_size"):
        super().__init__()
        self.backbone, self.forward_views = backbone, forward_views
        self.head = DINOHead(feature_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers,
                             o.norm_last_layer, o.head_batch_norm)

    def forward(self, views):
        return encode_views(self.backbone, views, self.forward_views, self.head)


class DINOCriterion(nn.Module):
    """DINO's targets and loss, shared by DINO and SDMP on DINO: the teacher's logits centred (``center``,
    an EMA of their global-batch mean) and sharpened at the epoch's teacher temperature (linear warm-up,
    then constant), the student's at its own temperature; ``trainers.losses.dino_loss`` between them."""

    def __init__(self, o: DINOConfig, epochs: int):
        super().__init__()
        self.student_temperature, self.center_momentum = o.student_temperature, o.center_momentum
        self.register_buffer("center", torch.zeros(o.out_dim))
        self.teacher_temperatures = teacher_temperature_schedule(o, epochs)

    def teacher_temperature(self, epoch: int) -> float:
        return float(self.teacher_temperatures[min(epoch, len(self.teacher_temperatures) - 1)])

    def loss(self, student, teacher, epoch: int, teacher_temperature: float | None = None) -> torch.Tensor:
        """Every student view against every teacher view of another crop (``dino_loss``); the teacher
        temperature is the epoch's unless given."""
        if teacher_temperature is None:
            teacher_temperature = self.teacher_temperature(epoch)
        return dino_loss(student, teacher, self.center, self.student_temperature, teacher_temperature)

    @torch.no_grad()
    def targets(self, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        """The teacher's centred, sharpened distribution [B, K] (float32)."""
        return F.softmax((teacher_logits.float() - self.center) / self.teacher_temperature(epoch), dim=-1)

    def update_center(self, teacher) -> None:
        update_center(self.center, teacher, self.center_momentum)


class DINO(MomentumMethod):
    name = "dino"
    config_class = DINOConfig
    crop_preset = "dino"
    min_global_crops = 2
    legacy_keys = {"center": "criterion.center"}  # the center moved into the criterion

    @classmethod
    def check(cls, o: DINOConfig, ctx: MethodContext) -> None:
        super().check(o, ctx)
        check_dino_options(o, ctx)

    def __init__(self, options: DINOConfig, ctx: MethodContext, backbone: nn.Module):
        super().__init__(options, ctx)
        self.check(options, ctx)
        self.student = DINONet(backbone, ctx.feature_dim, options, ctx.forward_views)
        self.init_teacher(self.student, options.teacher_momentum)
        self.criterion = DINOCriterion(options, ctx.epochs)

    @property
    def center(self) -> torch.Tensor:
        return self.criterion.center

    def teacher_temperature(self, step: int) -> float:
        return self.criterion.teacher_temperature(self.epoch_of(step))

    def teacher_outputs(self, views):
        """Teacher logits of the global crops [G, B, D] (no gradient)."""
        with torch.no_grad():
            return self.teacher(views[: self.ctx.num_global]).view(self.ctx.num_global, views[0].shape[0], -1)

    def training_step(self, views, labels, step):
        teacher = self.teacher_outputs(views)
        student = self.run_student(views).view(len(views), views[0].shape[0], -1)  # [V, B, D]
        loss = self.criterion.loss(student, teacher, None, self.value("teacher_temperature", step))
        self.criterion.update_center(teacher)
        return loss, {}

    def step_values(self, step: int) -> dict:
        return {**super().step_values(step), "teacher_temperature": self.teacher_temperature(step),
                "freeze_last_layer": self.epoch_of(step) < self.options.freeze_last_layer_epochs}

    def before_optimizer_step(self, step: int) -> None:
        if self.value("freeze_last_layer", step):
            for param in self.student.head.last_layer_parameters():
                param.grad = None

    def eval_backbone(self) -> nn.Module:
        return self.teacher.backbone  # DINO evaluates the teacher

    def describe(self) -> str:
        o = self.options
        return (f"DINO: out_dim {o.out_dim}, teacher T {o.warmup_teacher_temperature}->{o.teacher_temperature}, "
                f"EMA {o.teacher_momentum}->1")
