"""Evaluating a pretrained backbone: kNN, linear probe, semi-supervised fine-tuning, transfer.

Protocols (all numbers are fractions in [0, 1] on the full held-out split):

- kNN: weighted k-nearest neighbours on L2-normalised frozen features (Wu et al., 2018), k=20 with
  T=0.07 (DINO's protocol) and k=200 with T=0.1 (lightly's benchmark tables); a k-sweep for plots.
- Linear probe: features extracted once (frozen backbone, centre view), standardised with the
  training split's mean and std, one linear layer trained with SGD + momentum and a cosine
  schedule on the feature tensors (fast: no image is decoded twice).
- Semi-supervised: a stratified subset of the training labels (1% or 10%, exact counts, fixed seed)
  fine-tunes the whole network plus a linear head (SimCLR's protocol, random-resized-crop + flip
  made on the device in one batched op), top-1 on the full test split.
- Transfer: the linear probe on another data set's features, the backbone frozen.

Everything here is plain PyTorch: the pipeline (``pipelines/``) adds Ray and MLflow around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainers.errors import ConfigError
from trainers.knn import prepare_eval_images

KNN_SWEEP = (1, 5, 10, 20, 50, 100, 200)


# --------------------------------------------------------------------------- data
@dataclass
class ImageSet:
    """One split in memory: uint8 images [N, H, W, 3] (CPU), int64 labels [N], class names."""

    dataset: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_images(dataset: str, split: str, data_root=None, cache_dir=None, loader: str = "auto",
                subset: int | None = None, seed: int = 0, canvas_size: int | None = None,
                log: Callable[[str], None] = lambda msg: None) -> ImageSet:
    """Decode a whole split (or a fixed random subset) once, in order."""
    from trainers.data.multicrop import build_canvas_loader

    canvases, _ = build_canvas_loader(dataset, split, 1024, device="cpu", loader=loader, data_root=data_root,
                                      cache_dir=cache_dir, seed=seed, shuffle=False, drop_last=False,
                                      canvas_size=canvas_size, subset=subset, log=log)
    images, labels = [], []
    for batch, batch_labels in canvases:
        images.append(batch.clone())
        labels.append(batch_labels.clone())
    meta = getattr(canvases, "info", {}).get("meta") or {}
    classes = meta.get("classes")
    if classes is None and hasattr(canvases, "dataset"):
        classes = canvases.dataset.split.classes
    labels = torch.cat(labels).long()
    classes = list(classes) if classes else [str(i) for i in range(int(labels.max()) + 1)]
    return ImageSet(dataset, split, torch.cat(images), labels, classes)


# --------------------------------------------------------------------------- features
@dataclass
class BackboneSpec:
    """What it takes to run a backbone on new images: its input size and the normalisation."""

    image_size: int
    mean: tuple
    std: tuple
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 512


@torch.no_grad()
def extract(backbone: torch.nn.Module, images: ImageSet, spec: BackboneSpec) -> torch.Tensor:
    """Raw (not normalised) features [N, D], float32 on the CPU, from the centre (whole) view."""
    was_training = backbone.training
    backbone.eval()
    mean = torch.as_tensor(spec.mean, dtype=torch.float32, device=spec.device)
    std = torch.as_tensor(spec.std, dtype=torch.float32, device=spec.device)
    out = []
    try:
        for start in range(0, len(images.labels), spec.batch_size):
            batch = images.images[start:start + spec.batch_size].to(spec.device, non_blocking=True)
            out.append(backbone(prepare_eval_images(batch, spec.image_size, mean, std)).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def knn_suite(train_features, train_labels, test_features, test_labels, num_classes: int, chunk: int = 1024) -> dict:
    """k=20/T=0.07 (``knn_top1``, ``knn_top5``), k=200/T=0.1 (``knn_top1_k200``, ``knn_top5_k200``) and
    top-1 for every k in ``KNN_SWEEP`` at T=0.07 (``knn_sweep``). One similarity pass serves them all."""
    train_n, test_n = F.normalize(train_features, dim=1), F.normalize(test_features, dim=1)
    settings = {("main", 20, 0.07), ("wide", 200, 0.1)} | {(f"k{k}", k, 0.07) for k in KNN_SWEEP}
    largest = min(max(k for _, k, _ in settings), len(train_labels))
    top1 = {name: 0 for name, _, _ in settings}
    top5 = {name: 0 for name, _, _ in settings}
    for start in range(0, len(test_labels), chunk):
        top_sim, top_idx = (test_n[start:start + chunk] @ train_n.t()).topk(largest, dim=1)  # sorted
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start:start + chunk].view(-1, 1)
        for name, k, temperature in settings:
            k = min(k, largest)
            votes = torch.zeros(len(truth), num_classes, device=top_sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], (top_sim[:, :k] / temperature).exp())
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            top1[name] += (ranked[:, :1] == truth).sum().item()
            top5[name] += (ranked == truth).any(1).sum().item()
    n = len(test_labels)
    return {"knn_top1": top1["main"] / n, "knn_top5": top5["main"] / n,
            "knn_top1_k200": top1["wide"] / n, "knn_top5_k200": top5["wide"] / n,
            "knn_sweep": {k: top1[f"k{k}"] / n for k in KNN_SWEEP}}


def _cosine_sgd_step(optimizer, base_lrs, step: int, total: int, loss: torch.Tensor) -> None:
    """One update at the cosine-decayed learning rate of ``step`` (of ``total``)."""
    scale = 0.5 * (1 + math.cos(math.pi * step / total))
    for group, lr in zip(optimizer.param_groups, base_lrs):
        group["lr"] = lr * scale
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# --------------------------------------------------------------------------- hyperparameter checks
SEED_LIMIT = 2**31  # as trainers.loop.SEED_LIMIT


def _check_hyperparameters(what: str, settings) -> None:
    """Integers that are integers (not booleans) in range, floats that are finite: a NaN or infinite
    learning rate would train to chance accuracy and report it as a result."""
    limits = {"epochs": 1, "batch_size": 1, "min_steps": 0}
    for key, low in limits.items():
        if hasattr(settings, key):
            value = getattr(settings, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{what} {key} is {value!r}: give an integer >= {low}")
    seed = settings.seed
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{what} seed is {seed!r}: give an integer in [0, {SEED_LIMIT})")
    for key, positive in (("lr", True), ("weight_decay", False)):
        value = getattr(settings, key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ConfigError(f"{what} {key} is {value!r}: give a finite number {'> 0' if positive else '>= 0'}")


# --------------------------------------------------------------------------- linear probe
@dataclass
class LinearSettings:
    epochs: int = 100
    lr: float = 0.1  # for standardised features and batch 256
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0

    def validate(self) -> "LinearSettings":
        _check_hyperparameters("linear probe", self)
        return self


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str) -> dict:
    top = logits.topk(min(5, num_classes), dim=1).indices
    hits = top == labels.view(-1, 1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(hits[mask, 0].float().mean().item() if mask.any() else float("nan"))
    return {f"{prefix}_top1": hits[:, 0].float().mean().item(), f"{prefix}_top5": hits.any(1).float().mean().item(),
            "per_class": per_class}


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int,
                 settings: LinearSettings = LinearSettings(), prefix: str = "linear", device="cpu",
                 progress: Callable[[int, float], None] | None = None) -> dict:
    """Train one linear layer on frozen features; top-1/top-5 and per-class accuracy on the test features."""
    settings.validate()
    device = torch.device(device)
    mean = train_features.mean(0, keepdim=True)
    std = train_features.std(0, keepdim=True).clamp_min(1e-6)
    x_train = ((train_features - mean) / std).to(device)
    x_test = ((test_features - mean) / std).to(device)
    y_train = train_labels.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    layer = torch.nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    layer = layer.to(device)
    optimizer = torch.optim.SGD(layer.parameters(), lr=settings.lr, momentum=0.9, weight_decay=settings.weight_decay,
                                nesterov=True)
    steps_per_epoch = math.ceil(len(y_train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y_train), generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            loss = F.cross_entropy(layer(x_train[index]), y_train[index])
            _cosine_sgd_step(optimizer, [settings.lr], step, total, loss)
            loss_sum += loss.detach()
            step += 1
        if progress is not None:
            progress(epoch + 1, (loss_sum / steps_per_epoch).item())
    with torch.no_grad():
        logits = layer(x_test).cpu()
    return accuracy_report(logits, test_labels, num_classes, prefix)


# --------------------------------------------------------------------------- semi-supervised
def stratified_subset(labels: np.ndarray | torch.Tensor, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of exactly ``round(fraction * N)`` samples, each class represented in proportion
    (per-class counts by largest remainder, at least one per class), drawn with a fixed seed."""
    labels = np.asarray(labels)
    if not 0 < fraction <= 1:
        raise ConfigError(f"label fraction {fraction} must lie in (0, 1]: e.g. 0.01 for 1% of the labels")
    total = int(round(fraction * len(labels)))
    classes, counts = np.unique(labels, return_counts=True)
    if total < len(classes):
        raise ConfigError(f"{fraction:.2%} of {len(labels)} labels is {total} images, fewer than the {len(classes)} "
                          f"classes: use a larger fraction")
    exact = counts * total / len(labels)
    take = np.maximum(np.floor(exact).astype(int), 1)
    remainder = exact - np.floor(exact)
    for index in np.argsort(-remainder, kind="stable"):
        if take.sum() >= total:
            break
        if take[index] < counts[index]:
            take[index] += 1
    while take.sum() > total:  # the at-least-one rule overshot: trim the largest classes
        take[np.argmax(take - exact)] -= 1
    rng = np.random.default_rng([int(seed), 11])
    chosen = [rng.choice(np.flatnonzero(labels == c), n, replace=False) for c, n in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


@dataclass
class FinetuneSettings:
    epochs: int = 30
    lr: float = 0.01  # backbone; the new head learns at 10x (batch 256, SGD, cosine)
    weight_decay: float = 5e-4
    batch_size: int = 256
    min_steps: int = 200  # tiny subsets (1%) still get enough updates
    crop_scale: tuple = (0.5, 1.0)
    seed: int = 0

    def validate(self) -> "FinetuneSettings":
        _check_hyperparameters("fine-tuning", self)
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(f"crop_scale {list(self.crop_scale)} must satisfy 0 < low <= high <= 1")
        return self


def random_resized_flip(x: torch.Tensor, scale: tuple, generator: torch.Generator) -> torch.Tensor:
    """One batched affine resample: a random square crop of area in ``scale`` anywhere in the image,
    mirrored with probability 1/2, resized back to the input size."""
    n = x.shape[0]
    rand = torch.rand(n, 4, generator=generator).to(x.device)
    side = (scale[0] + (scale[1] - scale[0]) * rand[:, 0]).sqrt()  # fraction of the width
    flip = torch.where(rand[:, 1] < 0.5, -1.0, 1.0).to(x.device)
    tx = (1 - side) * (2 * rand[:, 2] - 1)
    ty = (1 - side) * (2 * rand[:, 3] - 1)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = side * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = side, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def finetune(backbone: torch.nn.Module, feature_dim: int, train: ImageSet, indices: np.ndarray, test: ImageSet,
             spec: BackboneSpec, settings: FinetuneSettings = FinetuneSettings(), prefix: str = "semi",
             progress: Callable[[int, float], None] | None = None) -> dict:
    """Fine-tune ``backbone`` + a new linear head on ``train[indices]``; accuracy on all of ``test``."""
    settings.validate()
    device = spec.device
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    head = torch.nn.Linear(feature_dim, train.num_classes).to(device)
    model = torch.nn.Sequential(backbone, head).to(device).train()
    mean = torch.as_tensor(spec.mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(spec.std, dtype=torch.float32, device=device)
    optimizer = torch.optim.SGD([{"params": backbone.parameters(), "lr": settings.lr},
                                 {"params": head.parameters(), "lr": settings.lr * 10}],
                                momentum=0.9, weight_decay=settings.weight_decay, nesterov=True)
    base = [g["lr"] for g in optimizer.param_groups]
    images, labels = train.images[torch.as_tensor(indices)], train.labels[torch.as_tensor(indices)]
    batch = min(settings.batch_size, len(labels))
    steps_per_epoch = max(1, len(labels) // batch)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        loss_sum = torch.zeros((), device=device)
        for i in range(steps_per_epoch):
            index = order[i * batch:(i + 1) * batch]
            x = prepare_eval_images(images[index].to(device), spec.image_size, mean, std)
            x = random_resized_flip(x, settings.crop_scale, generator)
            loss = F.cross_entropy(model(x), labels[index].to(device))
            _cosine_sgd_step(optimizer, base, step, total, loss)
            loss_sum += loss.detach()
            step += 1
        if progress is not None:
            progress(epoch + 1, (loss_sum / steps_per_epoch).item())
    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(test.labels), spec.batch_size):
            x = prepare_eval_images(test.images[start:start + spec.batch_size].to(device), spec.image_size, mean, std)
            logits.append(model(x).float().cpu())
    return accuracy_report(torch.cat(logits), test.labels, test.num_classes, prefix)
