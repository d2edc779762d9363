"""Optimizers (SGD, LARS, AdamW), parameter groups and per-step schedules.

Schedules are plain arrays indexed by the global step (as in DINO's reference code): a restarted
run reads the value of the step it resumes at, nothing else needs saving.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from trainers.errors import ConfigError

OPTIMIZERS = ("sgd", "lars", "adamw")


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then a half cosine
    from ``base`` down (or up) to ``final`` at the last step. Length ``total_steps``."""
    if total_steps <= 0:
        raise ConfigError(f"a schedule needs at least one step, got {total_steps}")
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    rest = total_steps - warmup_steps
    progress = np.arange(rest) / max(rest - 1, 1)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * progress))
    return np.concatenate([warmup, cosine]).astype(np.float64)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017, "Large Batch Training
    of Convolutional Networks"), as SwAV and BYOL use it: per parameter, the update is scaled by
    eta * ||w|| / (||g + wd * w||) when both norms are positive. Groups with ``lars_exclude=True``
    (biases, norm layers) get plain SGD with momentum and no weight decay from the group's setting."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ConfigError(f"LARS: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                              f"{lr}, {momentum}, {weight_decay}, {eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = param.grad
                if not group["lars_exclude"]:
                    if group["weight_decay"]:
                        update = update.add(param, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
                    trust = torch.where((param_norm > 0) & (update_norm > 0),
                                        group["eta"] * param_norm / update_norm, torch.ones_like(param_norm))
                    update = update * trust
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(update).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                param.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, exclude_bias_norm: bool = True) -> list[dict]:
    """Two groups: weights that decay, and biases / norm-layer parameters / 1-d parameters that do not
    (and that LARS leaves unscaled), as the SwAV, DINO and MoCo v3 reference code do. Parameters that
    do not require gradients are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if exclude_bias_norm and (param.ndim <= 1 or name.endswith(".bias")):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "apply_weight_decay": True, "lars_exclude": False}]
    if no_decay:
        groups.append({"params": no_decay, "apply_weight_decay": False, "lars_exclude": True})
    return groups


def build_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float, momentum: float = 0.9,
                    betas=(0.9, 0.999), lars_eta: float = 0.001) -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}': use one of {', '.join(OPTIMIZERS)}")
    for group in groups:
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif name == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return opt


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", True) else 0.0


@torch.no_grad()
def clip_gradients(parameters, max_norm: float, mode: str = "global") -> None:
    """``global``: one norm over all gradients (torch's clip_grad_norm_). ``per_parameter``: every
    parameter's gradient scaled down to norm ``max_norm`` separately (DINO's clip_gradients)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    if mode == "global":
        torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm, foreach=True)
    elif mode == "per_parameter":
        norms = torch._foreach_norm(grads)
        scales = [torch.clamp(max_norm / (n + 1e-6), max=1.0) for n in norms]
        torch._foreach_mul_(grads, scales)
    else:
        raise ConfigError(f"unknown clip_mode '{mode}': use global or per_parameter")
