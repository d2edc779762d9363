"""DINO (Caron et al., 2021): method-owned state. The loss itself is ``trainers.losses.dino_loss``."""

from __future__ import annotations

from typing import Sequence

import torch

from trainers.distributed import all_reduce_sum, world_size


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: Sequence[torch.Tensor], momentum: float = 0.9) -> torch.Tensor:
    """EMA of the teacher's mean output over the *global* batch (all ranks, all global crops):
    center <- momentum * center + (1 - momentum) * mean(teacher logits). Updates in place; returns it."""
    if not (0.0 <= momentum <= 1.0):
        raise ValueError(f"center momentum must lie in [0, 1], got {momentum}")
    stacked = torch.cat([t.detach().float() for t in teacher])
    total = all_reduce_sum(stacked.sum(dim=0))
    mean = total / (stacked.shape[0] * world_size())
    center.mul_(momentum).add_(mean.to(center.dtype), alpha=1.0 - momentum)
    return center
