"""The torchvision/PIL fallback: a DataLoader that yields the same uint8 canvases as the FFCV path.

Used where ffcv is not installed and as the baseline the benchmarks compare against. It reads the
registry's images (PIL decode), makes the same fixed canvas, and takes its sample order from
``sharding.shard_indices`` so that, with the same seed, both paths visit the same images.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainers.data.beton import square_resize
from trainers.data.datasets import DatasetSplit
from trainers.data.sharding import check_rank, shard_indices
from trainers.errors import ConfigError, DataError


class CanvasDataset(Dataset):
    """(uint8 [H, W, 3] canvas, label) per index; images not of the canvas size are square-resized."""

    def __init__(self, split: DatasetSplit, canvas_size: int | None = None):
        self.split = split
        if canvas_size is None:
            sizes = split.image_sizes()
            if len(sizes) != 1:
                raise DataError(f"{split.source} holds images of mixed sizes and a fixed canvas is needed: "
                                "pass canvas_size (--canvas-size N)")
            self.canvas = next(iter(sizes))
        else:
            self.canvas = (canvas_size, canvas_size)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        image = self.split.images[index]
        if image.shape[:2] != self.canvas:
            image = square_resize(image, self.canvas[0])
        if not image.flags.writeable:  # PIL hands out read-only buffers; torch wants to own one
            image = image.copy()
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.split.labels[index])


class ShardSampler(Sampler):
    def __init__(self, num_samples, seed, rank, world_size, shuffle, subset=None):
        self.args = [num_samples, 0, seed, rank, world_size, shuffle, subset]

    def set_epoch(self, epoch: int) -> None:
        self.args[1] = epoch

    def __iter__(self):
        return iter(shard_indices(*self.args).tolist())

    def __len__(self) -> int:
        return len(shard_indices(*self.args))


class TorchCanvasLoader:
    """Yields (uint8 [B, H, W, 3], int64 [B]) on ``device``, like ``FfcvCanvasLoader``."""

    def __init__(self, split: DatasetSplit, batch_size: int, device="cpu", canvas_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, drop_last: bool = True, indices=None, prefetch_factor: int = 4):
        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be positive")
        check_rank(rank, world_size)
        self.dataset = CanvasDataset(split, canvas_size)
        self.canvas = self.dataset.canvas
        self.device = torch.device(device)
        self.sampler = ShardSampler(len(split), seed, rank, world_size, shuffle, indices)
        workers = (os.cpu_count() or 1) if num_workers is None else num_workers
        self.loader = self._data_loader(batch_size, drop_last, dict(
            num_workers=workers, persistent_workers=workers > 0, worker_init_fn=_quiet_side_threads,
            prefetch_factor=prefetch_factor if workers > 0 else None))
        self.batch_size = batch_size
        self._epoch = 0

    def _data_loader(self, batch_size: int, drop_last: bool, workers: dict) -> DataLoader:
        """One canvas per DataLoader item, decoded with PIL in the workers (``workers``: their settings)."""
        return DataLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last,
                          pin_memory=self.device.type == "cuda", **workers)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        self.sampler.set_epoch(self._epoch)
        self._epoch += 1  # as ffcv: each pass is the next epoch unless set_epoch says otherwise
        for batch in self.loader:
            yield self._to_device(batch)

    def _to_device(self, batch):
        images, labels = batch
        return images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


def _quiet_side_threads(worker_id: int) -> None:
    """In a loader worker: a side thread's broken connection is the main process going away (SIGTERM,
    Ctrl-C), not an error to print. Without this, multiprocessing's fd-sharing thread (resource_sharer)
    prints a ConnectionResetError traceback into the user's terminal after the run's own last line. That
    thread reports through ``sys.excepthook`` (multiprocessing/resource_sharer.py ``_serve``), other side
    threads through ``threading.excepthook``: both are filtered."""
    import sys
    import threading

    previous_thread, previous_sys = threading.excepthook, sys.excepthook

    def thread_hook(args) -> None:
        if issubclass(args.exc_type, (ConnectionError, EOFError)):
            return
        previous_thread(args)

    def sys_hook(kind, value, traceback) -> None:
        if threading.current_thread() is not threading.main_thread() and issubclass(kind, (ConnectionError, EOFError)):
            return
        previous_sys(kind, value, traceback)

    threading.excepthook, sys.excepthook = thread_hook, sys_hook
