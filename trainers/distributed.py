"""torch.distributed helpers that are no-ops in a single process.

Everything computed over "the batch" (Sinkhorn sums, the DINO center, contrastive negatives) goes
through these, so one code path serves 1 process and N ranks alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (no gradient); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


class _GatherCat(torch.autograd.Function):
    """Forward: every rank's tensor concatenated along dim 0. Backward: each rank's gradient of the
    global tensor is summed over ranks (every rank's loss depends on every slice), and a rank keeps
    the part for its own slice."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0 (rank order; equal shapes on every rank).
    Gradients flow back to each rank's own slice, so a loss over the global batch trains the local
    features."""
    if not is_distributed():
        return tensor
    return _GatherCat.apply(tensor)


def all_gather_cat_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def flip_partner_rows(tensor: torch.Tensor) -> torch.Tensor:
    """For each local row, the row of its flip partner in the *global* batch (global index G - 1 - i;
    equal shards per rank). The partner may live on another rank; no gradient flows back."""
    with torch.no_grad():
        everyone = all_gather_cat_no_grad(tensor.detach())
        rows = tensor.shape[0]
        start = rank() * rows
        return everyone.flip(0)[start:start + rows]
