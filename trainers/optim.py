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
    of Convolutional Networks"). Per parameter the update ``g + wd * w`` is scaled by the trust ratio
    ``eta * ||w|| / D`` when ``||w||`` and the denominator's norm are positive, where ``trust`` picks D:

    - ``"update"``: D = ||g + wd * w|| (the norm of the update; SwAV's and BYOL's LARS);
    - ``"paper"``: D = ||g|| + wd * ||w|| + 1e-8 (You et al., Eq. 6; solo-learn's solo/utils/lars.py).

    ``clip_lr`` (NVIDIA apex LARC's clipping, solo-learn's ``clip_lr``): the ratio becomes
    ``min(ratio / lr, 1)``, so the step ``lr * ratio`` is at most ``lr`` (the scheduled learning rate of
    the group at this step). Groups with ``lars_exclude=True`` (biases, norm layers) get plain SGD with
    momentum and no weight decay from the group's setting (solo-learn's ``exclude_bias_n_norm``)."""

    TRUST = ("update", "paper")

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 clip_lr: bool = False, trust: str = "update"):
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ConfigError(f"LARS: need lr >= 0, 0 <= momentum < 1, weight_decay >= 0, eta > 0; got "
                              f"{lr}, {momentum}, {weight_decay}, {eta}")
        if trust not in self.TRUST:
            raise ConfigError(f"optim.lars_trust '{trust}' must be one of {', '.join(self.TRUST)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False, clip_lr=bool(clip_lr), trust=trust))

    @torch.no_grad()
    def step(self, closure=None):
        # multi-tensor (torch._foreach_*) ops over each group: a handful of launches per group instead
        # of a dozen small kernels per parameter; the trust ratios stay on the device (no host sync)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            # lr and weight_decay may be 0-d tensors (train.compile_step: graph inputs, no recompilation per value)
            lr, decay = group["lr"], group["weight_decay"]
            if group["lars_exclude"]:
                updates = grads
            else:
                if isinstance(decay, torch.Tensor):
                    updates = torch._foreach_add(grads, torch._foreach_mul(params, decay))
                else:
                    updates = torch._foreach_add(grads, params, alpha=decay) if decay else [g.clone() for g in grads]
                param_norms = torch.stack(torch._foreach_norm(params))
                if group.get("trust", "update") == "paper":
                    grad_norms = torch.stack(torch._foreach_norm(grads))
                    valid = (param_norms > 0) & (grad_norms > 0)
                    denominators = grad_norms + decay * param_norms + 1e-8
                else:
                    denominators = torch.stack(torch._foreach_norm(updates))
                    valid = (param_norms > 0) & (denominators > 0)
                trust = torch.where(valid, group["eta"] * param_norms / denominators, 1.0)
                if group.get("clip_lr", False) and isinstance(lr, torch.Tensor):
                    trust = torch.where(valid & (lr > 0), (trust / lr.clamp_min(1e-30)).clamp_(max=1.0), trust)
                elif group.get("clip_lr", False) and lr > 0:
                    # lr 0 (the first warm-up step): the ratio stays 1, the step is 0 either way
                    trust = torch.where(valid, (trust / lr).clamp_(max=1.0), trust)
                torch._foreach_mul_(updates, list(trust.unbind(0)))
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            if any(b is None for b in buffers):  # first step: the buffer starts as the update itself
                for param, update in zip(params, updates):
                    self.state[param]["momentum_buffer"] = torch.clone(update).detach()
                buffers = [self.state[p]["momentum_buffer"] for p in params]
            else:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, updates)
            if isinstance(lr, torch.Tensor):
                torch._foreach_add_(params, torch._foreach_mul(buffers, -lr))
            else:
                torch._foreach_add_(params, buffers, alpha=-lr)
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
                    betas=(0.9, 0.999), lars_eta: float = 0.001, lars_clip_lr: bool = False,
                    lars_trust: str = "update") -> torch.optim.Optimizer:
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer '{name}': use one of {', '.join(OPTIMIZERS)}")
    for group in groups:
        group["weight_decay"] = weight_decay if group["apply_weight_decay"] else 0.0
    # foreach=True everywhere (torch picks it only on CUDA by default): multi-tensor updates, the same
    # launches on every device, so a CPU run shows the GPU's kernel count
    if name == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)
    elif name == "lars":
        opt = LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=lars_eta, clip_lr=lars_clip_lr,
                   trust=lars_trust)
    else:
        opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True)
    return opt


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """The eager step's rates (floats); undoes ``tensor_hyperparameters`` (a compiled run's checkpoint resumed
    eagerly)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = weight_decay if group.get("apply_weight_decay", True) else 0.0
        group.pop("folded_weight_decay", None)
        if group.get("capturable"):
            group["capturable"] = False


def tensor_hyperparameters(optimizer: torch.optim.Optimizer, name: str, lr: torch.Tensor,
                           weight_decay: torch.Tensor) -> None:
    """train.compile_step: every group reads its learning rate and weight decay from the 0-d tensors ``lr``
    and ``weight_decay`` (filled each step), so the compiled update takes them as graph inputs instead of
    recompiling for every scheduled value. SGD and AdamW get weight decay 0 and a ``folded_weight_decay``
    that ``fold_weight_decay`` applies before their step, exactly as they would (SGD: g + wd * w; AdamW:
    w * (1 - lr * wd)): torch 2.14's SGD breaks the graph on a tensor weight decay. AdamW runs
    ``capturable`` (torch's foreach Adam takes a tensor lr only so). LARS takes both tensors itself.
    Called every step: a restored checkpoint's groups hold their own values."""
    zero = weight_decay.new_zeros(())
    for group in optimizer.param_groups:
        decay = weight_decay if group.get("apply_weight_decay", True) else zero
        group["lr"] = lr
        if name == "lars":
            group["weight_decay"] = decay
        else:
            group["weight_decay"], group["folded_weight_decay"] = 0.0, decay
        if name == "adamw" and not group.get("capturable"):
            group["capturable"] = True
            for param in group["params"]:  # an eager run's checkpoint keeps Adam's step counts on the CPU
                state = optimizer.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor) and state["step"].device != param.device:
                    state["step"] = state["step"].to(param.device)


@torch.no_grad()
def fold_weight_decay(optimizer: torch.optim.Optimizer, name: str) -> None:
    """The weight decay ``tensor_hyperparameters`` took out of SGD / AdamW, applied as they apply it."""
    for group in optimizer.param_groups:
        decay = group.get("folded_weight_decay")
        if decay is None:
            continue
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if name == "adamw":
            torch._foreach_mul_(params, 1 - group["lr"] * decay)
        else:
            torch._foreach_add_([p.grad for p in params], torch._foreach_mul(params, decay))


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
        # the scales are computed as one vector (3 kernels, not 3 per parameter), kept on the device
        norms = torch.stack(torch._foreach_norm(grads))
        scales = (max_norm / (norms + 1e-6)).clamp_(max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind(0)))
    else:
        raise ConfigError(f"unknown clip_mode '{mode}': use global or per_parameter")
