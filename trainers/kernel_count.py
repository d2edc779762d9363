"""Count the device kernels a piece of PyTorch code launches, on any device (a CPU run counts the same ops).

At 32 px a batch's augmentation is launch-bound on a GPU: the host needs ~5-10 us per kernel launch and
the kernels themselves are shorter than that, so the number of kernels per call is what to keep small.
``count_kernels(fn, *args)`` runs ``fn`` once under a dispatch mode that records every ATen operator
that does work (views, reshapes without a copy and allocations are not kernels and are skipped), and
the host syncs (`.item()`, `bool()`, `float()` of a tensor; not `.tolist()`/`.cpu()`, which a CPU run cannot tell
apart from plain reads).
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# operators that only create metadata (views) or allocate, i.e. launch no kernel
NO_KERNEL = {
    "view", "_unsafe_view", "unbind", "select", "slice", "expand", "as_strided", "unsqueeze", "squeeze", "permute",
    "t", "transpose", "empty", "empty_like", "empty_strided", "detach", "alias", "split", "split_with_sizes", "chunk",
    "narrow", "view_as", "expand_as", "unflatten", "lift_fresh", "_reshape_alias", "set_", "is_same_size",
    "scalar_tensor",
}
# a device-to-host read of a value (.item(), bool(), float()): the host waits for the device
HOST_SYNC = "_local_scalar_dense"


class _KernelCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.operators: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.operators[name] += 1  # a host sync is recorded too, under HOST_SYNC, but is not a kernel
        return func(*args, **(kwargs or {}))


def count_kernels(fn, *args, **kwargs) -> tuple[int, Counter]:
    """(number of kernel-launching operators, their names with counts) of one call of ``fn``; host syncs
    are in the counter under ``HOST_SYNC`` and not in the number."""
    with _KernelCounter() as counter:
        fn(*args, **kwargs)
    return sum(counter.operators.values()) - counter.operators.get(HOST_SYNC, 0), counter.operators
