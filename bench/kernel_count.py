"""Count the device kernels a piece of PyTorch code launches, on any device (a CPU run counts the same ops).

At 32 px a batch's augmentation is launch-bound on a GPU: the host needs ~5-10 us per kernel launch and
the kernels themselves are shorter than that, so the number of kernels per call is what to keep small.
``count_kernels(fn, *args)`` runs ``fn`` once under a dispatch mode that records every ATen operator
that does work (views, reshapes without a copy and allocations are not kernels and are skipped).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operators that only create metadata (views) or allocate, i.e. launch no kernel
NO_KERNEL = {
    "view", "_unsafe_view", "unbind", "select", "slice", "expand", "as_strided", "unsqueeze", "squeeze", "permute",
    "t", "transpose", "empty", "empty_like", "empty_strided", "detach", "alias", "split", "split_with_sizes", "chunk",
    "narrow", "view_as", "expand_as", "unflatten", "lift_fresh", "_reshape_alias", "set_", "is_same_size",
    "_local_scalar_dense", "scalar_tensor",
}


class _KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.operators[name] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(fn, *args, **kwargs) -> tuple[int, Counter]:
    """(number of kernel-launching operators, their names with counts) of one call of ``fn``."""
    with torch.no_grad(), _KernelCounter() as counter:
        fn(*args, **kwargs)
    return sum(counter.operators.values()), counter.operators
