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


# --------------------------------------------------------------------------- synchronised batch norm
class _AllReduceSumGrad(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients (every rank's loss depends
    on the total)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class CpuSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """A synchronised BatchNorm (any number of dimensions) for CPU tensors and gloo, where torch's
    refuses to run (torch 2.14: ``SyncBatchNorm`` raises "expected input tensor to be on GPU" in
    training mode, and DDP "SyncBatchNorm layers only work with GPU modules"). In training mode under
    a process group the batch statistics are those of every rank's batch together -- two
    differentiable all-reduces per layer (the sums and counts, then the squared deviations from the
    global mean) -- so forward, backward and the running statistics equal one BatchNorm over the
    concatenated batch. Otherwise (eval mode, one process) it is a plain BatchNorm. Same parameters,
    buffers and state-dict keys as ``nn.BatchNorm*d``."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float32, device=x.device)
        sums = _AllReduceSumGrad.apply(torch.cat([x.sum(dims), count]))
        n = sums[-1].detach()
        mean = sums[:-1] / n
        centered = x - mean.view(shape)
        var = _AllReduceSumGrad.apply(centered.pow(2).sum(dims)) / n  # biased, as BatchNorm normalises
        out = centered * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out.to(input.dtype)


def convert_sync_batchnorm(module: torch.nn.Module, device_type: str) -> tuple[torch.nn.Module, int]:
    """(``module`` with every BatchNorm layer synchronised over the process group, how many layers):
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on GPUs, ``CpuSyncBatchNorm`` layers on the CPU;
    either way the layers keep their parameters and buffers (the same tensors) and state-dict keys."""
    if device_type != "cpu":
        converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return converted, sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules())
    converted = _to_cpu_sync(module)
    return converted, sum(isinstance(m, CpuSyncBatchNorm) for m in converted.modules())


def _to_cpu_sync(module: torch.nn.Module) -> torch.nn.Module:
    output = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        output = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats)
        if module.affine:
            output.weight, output.bias = module.weight, module.bias
        output.running_mean, output.running_var = module.running_mean, module.running_var
        output.num_batches_tracked = module.num_batches_tracked
        output.train(module.training)
    for name, child in module.named_children():
        output.add_module(name, _to_cpu_sync(child))
    return output
