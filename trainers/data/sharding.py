"""One epoch's sample order for one rank, shared by the FFCV and the torchvision loader.

Both loaders take their indices from here, so with the same seed they visit the same images in
the same order, and the ranks of a distributed run split every epoch into disjoint, equal shards
(as torch's DistributedSampler: the tail is dropped so every rank gets as many samples).
"""

from __future__ import annotations

import numpy as np

from trainers.errors import ConfigError


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not (0 <= rank < world_size):
        raise ConfigError(f"rank {rank} / world size {world_size}: need world_size >= 1 and 0 <= rank < world_size")


def shard_indices(num_samples: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  shuffle: bool = True, subset: np.ndarray | None = None) -> np.ndarray:
    """Indices (into the data set) this rank reads in ``epoch``: a seeded permutation per epoch."""
    check_rank(rank, world_size)
    pool = np.arange(num_samples, dtype=np.int64) if subset is None else np.asarray(subset, dtype=np.int64)
    if shuffle:
        pool = pool[np.random.default_rng([int(seed), int(epoch)]).permutation(len(pool))]
    per_rank = len(pool) // world_size
    return pool[: per_rank * world_size][rank::world_size]
