"""Evaluations that train on images: the ``augmented`` linear probe and semi-supervised fine-tuning.

Both stream their images (``LoaderImages``: batches from the split's canvas loader, never the whole
split in memory; ``MemoryImages``: an ``ImageSet`` already in memory, for small sets and tests) and
run data-parallel when a ``torch.distributed`` process group is up (Ray Train's workers; DDP):

1. every epoch has one seeded sample order (``sharding.shard_indices``); rank r of W reads the
   positions r, r+W, ... of each global batch of ``batch_size`` (as ``DistributedSampler``: the last
   N mod W images of the order are left out so that every rank has as many);
2. each image's random crop is drawn for its place in the global batch (``MultiCropAugment``'s
   ``rows``), so W ranks crop every image as one process would;
3. gradients are averaged over the ranks (``DistributedDataParallel``) and BatchNorm uses the
   global batch's statistics (synchronised layers), so W ranks take the updates one process takes
   on the concatenated batch (tested: 2 gloo ranks equal 1);
4. the test split is scored in W contiguous blocks and the logits gathered once.

The settings and protocols are in ``trainers/evaluate.py``; the pipeline starts the workers.
"""

from __future__ import annotations

import math
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainers.data.sharding import shard_indices
from trainers.errors import ConfigError
from trainers.evaluate import (BackboneSpec, FinetuneSettings, ImageSet, LinearSettings, _linear_head,
                               _probe_optimizer, _sgd_step, accuracy_report, decay_epochs, eval_view, finetune_plan, loader_classes,
                               lr_scale, train_augment)

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


# --------------------------------------------------------------------------- image sources
class MemoryImages:
    """An ``ImageSet`` in memory, read in the batches a loader would give (the same order, the same splits)."""

    def __init__(self, images: ImageSet):
        self.images = images
        self.labels, self.classes = images.labels, list(images.classes)

    def batches(self, epoch: int, batch_size: int, indices=None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world: int = 1, block: tuple[int, int] | None = None) -> Batches:
        if block is not None:
            pool = np.arange(len(self.labels)) if indices is None else np.asarray(indices)
            order = np.array_split(pool, block[1])[block[0]]
        else:
            order = shard_indices(len(self.labels), epoch, seed, rank, world, shuffle, indices)
        for start in range(0, len(order), batch_size):
            index = torch.as_tensor(order[start:start + batch_size])
            yield self.images.images[index], self.labels[index]


class LoaderImages:
    """One split streamed from its canvas loader (``build_canvas_loader``: ffcv, jpeg or torch). The labels
    and class names come from the split's listing, not from decoding it; a loader is built for a request and
    reused for the next epochs while the requests stay the same."""

    def __init__(self, dataset: str, split: str, data_root=None, cache_dir=None, loader: str = "auto",
                 canvas_size: int | None = None, num_workers: int | None = None, log: Callable[[str], None] = print):
        from trainers.data.datasets import load_split

        self.dataset, self.split = dataset, split
        self.options = dict(data_root=data_root, cache_dir=cache_dir, loader=loader, canvas_size=canvas_size,
                            num_workers=num_workers, log=log)
        listing = load_split(dataset, split, data_root)
        self.labels = torch.as_tensor(np.asarray(listing.labels), dtype=torch.long)
        self.classes = list(listing.classes) if listing.classes else None
        self._loaders: dict = {}

    def batches(self, epoch: int, batch_size: int, indices=None, shuffle: bool = True, seed: int = 0, rank: int = 0,
                world: int = 1, block: tuple[int, int] | None = None) -> Batches:
        from trainers.data.multicrop import build_canvas_loader

        key = (batch_size, None if indices is None else tuple(np.asarray(indices).tolist()), shuffle, seed, rank,
               world, block)
        if key not in self._loaders:
            self._loaders.clear()  # one loader (and its pool of worker processes) alive per source at a time
            canvases, _ = build_canvas_loader(self.dataset, self.split, batch_size, device="cpu", seed=seed,
                                              rank=rank, world_size=world, shuffle=shuffle, drop_last=False,
                                              indices=indices, block=block, **self.options)
            if self.classes is None:
                self.classes = loader_classes(canvases, self.labels)
            self._loaders[key] = canvases
        canvases = self._loaders[key]
        canvases.set_epoch(epoch)
        yield from canvases


def as_source(images):
    return MemoryImages(images) if isinstance(images, ImageSet) else images


def num_classes(source) -> int:
    return len(source.classes) if source.classes else int(source.labels.max()) + 1


# --------------------------------------------------------------------------- data parallel
def data_parallel() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_batch(batch_size: int, world: int, what: str) -> int:
    if batch_size % world:
        raise ConfigError(f"{what}: batch size {batch_size} is not a multiple of the {world} workers: use a "
                          f"batch_size divisible by {world} (each worker takes an equal share of every batch)")
    return batch_size // world


def global_rows(count: int, rank: int, world: int) -> tuple[int, torch.Tensor]:
    """This rank's ``count`` images are the rows rank, rank + W, ... of a global batch of W x count."""
    return world * count, torch.arange(rank, world * count, world)


def _wrap(model: torch.nn.Module, device, world: int, sync_batchnorm: bool) -> torch.nn.Module:
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    from trainers.distributed import convert_sync_batchnorm

    if sync_batchnorm:
        model, _ = convert_sync_batchnorm(model, torch.device(device).type)
    ids = [torch.device(device).index] if torch.device(device).type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _mean_over_ranks(value: torch.Tensor, world: int) -> float:
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


@torch.no_grad()
def scored_test(model, test, spec: BackboneSpec, crop: float, prefix: str) -> dict:
    """Accuracy of ``model`` on the whole test split (its fixed view), each rank scoring one contiguous block
    of it; the blocks' logits are gathered once, in order, so every rank returns the same report."""
    rank, world = data_parallel()
    logits, labels = [], []
    for images, batch_labels in test.batches(0, spec.batch_size, shuffle=False, block=(rank, world)):
        logits.append(model(eval_view(images.to(spec.device, non_blocking=True), spec, crop)).float().cpu())
        labels.append(batch_labels.to("cpu", copy=True))  # a loader may reuse its buffers (ffcv)
    part = (torch.cat(logits) if logits else torch.empty(0, num_classes(test)), torch.cat(labels).long()
            if labels else torch.empty(0, dtype=torch.long))
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, part)
        part = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return accuracy_report(part[0], part[1], num_classes(test), prefix)


@torch.no_grad()
def _feature_moments(backbone, dim: int, train, spec: BackboneSpec, crop: float,
                     indices=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std of the backbone's features on the training split's test view, in float64 sums
    over this rank's block of the split, added up over the ranks."""
    rank, world = data_parallel()
    # on the device: NCCL (Ray Train's GPU workers) reduces device tensors only
    sums = torch.zeros(2 * dim + 1, dtype=torch.float64, device=spec.device)  # sum, sum of squares, count
    for images, _ in train.batches(0, spec.batch_size, indices=indices, shuffle=False, block=(rank, world)):
        out = backbone(eval_view(images.to(spec.device, non_blocking=True), spec, crop)).double()
        sums[:dim] += out.sum(0)
        sums[dim:2 * dim] += out.square().sum(0)
        sums[-1] += len(out)
    if world > 1:
        dist.all_reduce(sums)
    sums = sums.cpu()
    n = sums[-1]
    mean = sums[:dim] / n
    var = (sums[dim:2 * dim] - n * mean.square()) / (n - 1).clamp_min(1)
    return mean.float(), var.clamp_min(0).sqrt().float()


class _Standardize(torch.nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


# --------------------------------------------------------------------------- the augmented linear probe
def augmented_linear_probe(backbone: torch.nn.Module, feature_dim: int, train, test, spec: BackboneSpec,
                           settings: LinearSettings, prefix: str = "linear",
                           progress: Callable[[int, float, tuple], None] | None = None, indices=None) -> dict:
    """The ``augmented`` probe: a linear layer on the frozen backbone (eval mode, no gradient) fed a new
    random-resized crop + flip of every training image each epoch (``train_augment``); the fixed test view
    (``eval_view`` with ``settings.test_crop``) at test. ``train`` / ``test``: ``LoaderImages``,
    ``MemoryImages`` or an ``ImageSet``; ``indices``: train on these images of ``train`` only (None: all).
    Data-parallel over a process group (module docstring). ``progress(epoch, mean loss, (lr,))``."""
    settings.validate()
    if settings.protocol != "augmented":
        raise ConfigError(f"augmented_linear_probe runs the augmented protocol, not {settings.protocol}")
    train, test = as_source(train), as_source(test)
    rank, world = data_parallel()
    batch = local_batch(settings.batch_size, world, "linear probe")
    device = spec.device
    generator = torch.Generator().manual_seed(settings.seed)
    augment = train_augment(spec, settings.crop_scale, settings.seed)
    was_training = backbone.training
    backbone.eval()
    try:
        if settings.standardize:
            mean, std = _feature_moments(backbone, feature_dim, train, spec, settings.test_crop, indices)
            mean, std = mean.to(device), std.clamp_min(1e-6).to(device)
        else:
            mean = torch.zeros(feature_dim, device=device)
            std = torch.ones(feature_dim, device=device)
        layer = _linear_head(feature_dim, num_classes(train), generator, device)
        model = _wrap(layer, device, world, sync_batchnorm=False)
        optimizer = _probe_optimizer(layer, settings)
        if indices is not None:
            indices = np.sort(np.asarray(indices, dtype=np.int64))
        used = (len(train.labels) if indices is None else len(indices)) // world * world
        steps_per_epoch = math.ceil(used / settings.batch_size)
        total = steps_per_epoch * settings.epochs
        decays = decay_epochs(settings.decay_at, settings.epochs)
        step = 0
        for epoch in range(settings.epochs):
            loss_sum = torch.zeros((), device=device)
            for images, labels in train.batches(epoch, batch, indices=indices, seed=settings.seed, rank=rank,
                                                world=world):
                with torch.no_grad():
                    view = augment(images.to(device, non_blocking=True), rows=global_rows(len(images), rank, world))[0]
                    features = (backbone(view).float() - mean) / std
                loss = F.cross_entropy(model(features), labels.to(device))
                lr = settings.lr * lr_scale(settings.schedule, epoch, settings.epochs, step, total, decays,
                                            settings.gamma)
                _sgd_step(optimizer, [lr], loss)
                loss_sum += loss.detach()
                step += 1
            mean_loss = _mean_over_ranks(loss_sum / steps_per_epoch, world)  # a collective: every rank, always
            if progress is not None:
                progress(epoch + 1, mean_loss, (lr,))
        scorer = torch.nn.Sequential(backbone, _Standardize(mean, std), layer).eval()
        return scored_test(scorer, test, spec, settings.test_crop, prefix)
    finally:
        backbone.train(was_training)


# --------------------------------------------------------------------------- semi-supervised fine-tuning
def finetune(backbone: torch.nn.Module, feature_dim: int, train, indices: np.ndarray, test, spec: BackboneSpec,
             settings: FinetuneSettings = FinetuneSettings(), prefix: str = "semi",
             progress: Callable[[int, float, tuple], None] | None = None) -> dict:
    """Fine-tune ``backbone`` + a new linear head on the images ``indices`` of ``train``; accuracy on all of
    ``test``, and the ``plan`` that ran (``finetune_plan``). SGD (momentum, no Nesterov) with the trunk at
    ``lr`` and the head at ``head_lr``, both x gamma at each decay epoch; a random-resized crop + flip per image
    and epoch (``train_augment``); BatchNorm in training mode (over the global batch when data-parallel).
    ``progress(epoch, mean loss, (trunk lr, head lr))``."""
    settings.validate()
    train, test = as_source(train), as_source(test)
    rank, world = data_parallel()
    device = spec.device
    indices = np.sort(np.asarray(indices, dtype=np.int64))
    plan = finetune_plan(settings, len(indices) // world * world)
    batch = local_batch(plan["batch_size"], world, "fine-tuning")
    torch.manual_seed(settings.seed)
    augment = train_augment(spec, settings.crop_scale, settings.seed)
    head = torch.nn.Linear(feature_dim, num_classes(train)).to(device)
    model = torch.nn.Sequential(backbone, head).to(device).train()
    model = _wrap(model, device, world, sync_batchnorm=True)
    optimizer = torch.optim.SGD([{"params": backbone.parameters(), "lr": settings.lr},
                                 {"params": head.parameters(), "lr": settings.head_lr}],
                                momentum=settings.momentum, weight_decay=settings.weight_decay)
    for epoch in range(plan["epochs"]):
        scale = lr_scale("multistep", epoch, plan["epochs"], decays=plan["decay_epochs"], gamma=settings.gamma)
        lrs = (settings.lr * scale, settings.head_lr * scale)
        loss_sum = torch.zeros((), device=device)
        for images, labels in train.batches(epoch, batch, indices=indices, seed=settings.seed, rank=rank,
                                            world=world):
            x = augment(images.to(device, non_blocking=True), rows=global_rows(len(images), rank, world))[0]
            loss = F.cross_entropy(model(x), labels.to(device))
            _sgd_step(optimizer, lrs, loss)
            loss_sum += loss.detach()
        mean_loss = _mean_over_ranks(loss_sum / plan["steps_per_epoch"], world)  # a collective: every rank, always
        if progress is not None:
            progress(epoch + 1, mean_loss, lrs)
    model = getattr(model, "module", model).eval()  # scored without DDP: the ranks' blocks may differ in length
    result = scored_test(model, test, spec, settings.test_crop, prefix)
    result["plan"] = plan
    return result
