"""Multi-crop batches: a canvas loader (FFCV, batched JPEG or PIL) feeding the batched augmentation module."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainers.config import LOADERS
from trainers.data.augment import MultiCropAugment, method_crop_groups, normalization_for
from trainers.data.beton import FfcvCanvasLoader, PrepareSettings, prepare_split
from trainers.data.datasets import check_dataset_name, load_split
from trainers.data.sharding import check_rank
from trainers.errors import ConfigError
from trainers.paths import state_dir


def ffcv_available() -> bool:
    return importlib.util.find_spec("ffcv") is not None


def jpeg_decoder_available() -> bool:
    """torchvision built with its image codecs (decode_jpeg); wheels from PyPI are."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def auto_loader() -> str:
    """What ``loader='auto'`` means here: the fastest loader this machine has.

    Decided by the decode-only rows of ``python bench/loader.py --paths ffcv,jpeg,torch,decode,decode-jpeg,
    decode-torch`` on 2 CPU cores (2026-12-07, BENCHMARKS.md "The jpeg loader on the CPU"): ffcv decodes
    256 px JPEGs 1.7-2.5x faster than the jpeg loader, which decodes 1.5-7x faster than the PIL (torch)
    loader (1.6-4.2x per core with --workers 0). The three feed the same augmentation, so the fastest
    decoder is the fastest loader. The GPU comparison (nvjpeg) awaits a GPU session."""
    if ffcv_available():
        return "ffcv"
    return "jpeg" if jpeg_decoder_available() else "torch"


def default_cache_dir() -> Path:
    return state_dir() / "data"


@dataclass
class MultiCropBatch:
    views: list[torch.Tensor]  # one [B, 3, s, s] tensor per crop (or per group when stacked)
    labels: torch.Tensor  # [B] int64


class MultiCropLoader:
    """Iterates ``MultiCropBatch`` objects: canvases decoded once, every view made on the device."""

    def __init__(self, canvases, augment: MultiCropAugment, kind: str):
        self.canvases, self.augment, self.kind = canvases, augment, kind

    def __len__(self) -> int:
        return len(self.canvases)

    def set_epoch(self, epoch: int) -> None:
        self.canvases.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return self.canvases.num_samples

    @property
    def classes(self) -> list[str] | None:
        """Class names: from the .beton sidecar (ffcv) or the registry split (jpeg, torch)."""
        meta = getattr(self.canvases, "info", {}).get("meta")
        if meta:
            return meta.get("classes")
        dataset = getattr(self.canvases, "dataset", None)
        return dataset.split.classes if dataset is not None else None

    def __iter__(self):
        return self.iterate()

    def iterate(self, skip: int = 0):
        """Batches of the current epoch; the first ``skip`` are read but not augmented (resuming
        mid-epoch: the augmentation's random stream continues from the checkpoint)."""
        for index, (images, labels) in enumerate(self.canvases):
            if index < skip:
                continue
            yield MultiCropBatch(self.augment(images), labels)


def build_canvas_loader(dataset: str, split: str, batch_size: int, device="cpu", loader: str = "auto",
                        data_root=None, cache_dir=None, seed: int = 0, rank: int = 0, world_size: int = 1,
                        shuffle: bool = True, num_workers: int | None = None, canvas_size: int | None = None,
                        drop_last: bool = True, prepare_settings: PrepareSettings = PrepareSettings(),
                        log=print, subset: int | None = None, block: tuple[int, int] | None = None, indices=None):
    """The uint8-canvas loader of one split; ``loader='ffcv'`` prepares (or reuses) the .beton first.

    ``subset``: read only a fixed random subset of that many images (drawn from ``seed``). ``block`` (i, n):
    only the i-th of n contiguous, near-equal blocks of those images, every image in exactly one block (an
    evaluation sharded over n workers; unlike the training ranks, no tail is dropped). ``indices``: read only
    these images (e.g. a stratified label subset), instead of ``subset``."""
    check_dataset_name(dataset)
    if canvas_size is not None and canvas_size < 1:
        raise ConfigError(f"canvas size {canvas_size} must be a positive number of pixels (--canvas-size, "
                          "data.canvas_size), or unset to keep the images' own size")
    if loader not in LOADERS:
        raise ConfigError(f"unknown loader '{loader}': use one of {', '.join(LOADERS)}")
    if loader == "auto":
        loader = auto_loader()
    common = dict(batch_size=batch_size, device=device, canvas_size=canvas_size, shuffle=shuffle, seed=seed,
                  rank=rank, world_size=world_size, num_workers=num_workers, drop_last=drop_last)
    if loader == "ffcv":
        cores = os.cpu_count() or 1
        if num_workers is not None and num_workers > cores:
            raise ConfigError(f"{num_workers} loader workers are more than this machine's {cores} cores (ffcv runs one "
                              f"thread per worker): use data.num_workers (data preview: --loader-workers) <= {cores}, or null for one per core")
        if not ffcv_available():
            raise ConfigError("loader 'ffcv' needs the ffcv package: run `make setup` (Linux), or use --loader jpeg")
        path = prepare_split(dataset, split, cache_dir or default_cache_dir(), data_root, prepare_settings,
                             progress=False, log=log)
        from trainers.data.beton import inspect_beton

        count = inspect_beton(path)["count"]
        indices = block_indices(count, _chosen(count, subset, seed, indices), block)
        return FfcvCanvasLoader(path, indices=indices, **common), "ffcv"
    data = load_split(dataset, split, data_root)
    indices = block_indices(len(data), _chosen(len(data), subset, seed, indices), block)
    if loader == "jpeg":
        from trainers.data.jpeg_loader import JpegCanvasLoader

        return JpegCanvasLoader(data, indices=indices, **common), "jpeg"
    from trainers.data.torch_loader import TorchCanvasLoader

    return TorchCanvasLoader(data, indices=indices, **common), "torch"


def block_indices(num_samples: int, indices, block: tuple[int, int] | None):
    """The ``block`` (i, n)-th contiguous block of ``indices`` (None: all ``num_samples``); None when no block."""
    if block is None:
        return indices
    rank, blocks = block
    check_rank(rank, blocks)
    return np.array_split(np.arange(num_samples) if indices is None else np.asarray(indices), blocks)[rank]


def _chosen(num_samples: int, subset: int | None, seed: int, indices):
    if indices is None:
        return subset_indices(num_samples, subset, seed)
    if subset is not None:
        raise ConfigError("give a loader either subset (a count) or indices, not both")
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= num_samples):
        raise ConfigError(f"sample indices must lie in [0, {num_samples}) for this split of {num_samples:,} images")
    return indices


def subset_indices(num_samples: int, subset: int | None, seed: int):
    """Sorted indices of a fixed random subset (None: all samples)."""
    if subset is None or subset >= num_samples:
        return None
    if subset <= 0:
        raise ConfigError(f"a subset of {subset} images is empty: give a positive number or null")
    return np.sort(np.random.default_rng([int(seed), 7]).choice(num_samples, subset, replace=False))


def build_multicrop_loader(dataset: str, split: str, crops: str, method: str, batch_size: int, device="cpu",
                           loader: str = "auto", seed: int = 0, dtype=torch.float32, channels_last: bool = False,
                           stack_groups: bool = False, crop_overrides: dict | None = None,
                           compile_augment: bool = False, **canvas_kwargs):
    """Canvas loader + ``MultiCropAugment`` with ``method``'s paper defaults for the ``crops`` spec
    (``compile_augment``: its pixel operations through torch.compile)."""
    groups = method_crop_groups(method, crops, **(crop_overrides or {}))
    canvases, kind = build_canvas_loader(dataset, split, batch_size, device, loader, seed=seed, **canvas_kwargs)
    mean, std = normalization_for(dataset)
    augment = MultiCropAugment(groups, mean, std, seed=seed, dtype=dtype, channels_last=channels_last,
                               stack_groups=stack_groups, compile_ops=compile_augment).to(device)
    return MultiCropLoader(canvases, augment, kind)
