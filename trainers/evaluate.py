"""Evaluating a pretrained backbone: kNN, linear probe, semi-supervised fine-tuning, transfer.

Protocols (all numbers are fractions in [0, 1] on the full held-out split). Each has a name; its
settings are spelled out by ``linear_protocol`` / ``semi_protocol`` and recorded with the result.

- kNN (``weighted_knn``): weighted k-nearest neighbours on L2-normalised frozen features (Wu et
  al., 2018), k=20 with T=0.07 (DINO's protocol) and k=200 with T=0.1 (lightly's benchmark
  tables); a k-sweep for plots.
- Linear probe ``frozen_features`` (fast): features extracted once (frozen backbone, whole image),
  standardised with the training split's mean and std, one linear layer trained with SGD +
  Nesterov momentum and a per-update cosine schedule on the feature tensors (no image is decoded
  or run through the backbone twice).
- Linear probe ``augmented`` (the published one): the frozen backbone (eval mode) sees a new
  random-resized crop + horizontal flip of every training image each epoch, made on the device in
  one batched op (trainers/data/augment.py, colour jitter off); the whole image (small data sets)
  or its centre crop (ImageNet-like ones) at test. Settings per data set family: solo-learn's for
  32-px data, DINO's for ImageNet-like data (see ``linear_protocol``).
- Semi-supervised ``swav``: SwAV's fine-tuning protocol (eval_semisup.py and its README): the
  whole network plus a new linear head on a fixed, seeded, class-stratified 1% / 10% label subset,
  20 epochs, trunk/head learning rates per fraction, x0.2 at epochs 12 and 16; random-resized-crop
  + flip on the device; top-1 on the full test split.
- Transfer: the ``frozen_features`` linear probe on another data set's features.

The two that train on images (the augmented probe, fine-tuning) are in ``trainers/finetune.py``:
streamed from the loaders and data-parallel over a process group. Everything here is plain PyTorch:
the pipeline (``pipelines/``) adds Ray and MLflow around it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from trainers.checks import SEED_LIMIT
from trainers.errors import ConfigError
from trainers.knn import (FeatureFile, center_crop, extract_features, feature_batches, knn_hits, knn_metric,
                          prepare_eval_images, read_rows)

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
    """Decode a whole split (or a fixed random subset) once, in order, into memory: for small sets, tests and
    benchmarks (the pipeline's evaluations stream instead: ``trainers.finetune.LoaderImages``)."""
    from trainers.data.multicrop import build_canvas_loader

    canvases, _ = build_canvas_loader(dataset, split, 1024, device="cpu", loader=loader, data_root=data_root,
                                      cache_dir=cache_dir, seed=seed, shuffle=False, drop_last=False,
                                      canvas_size=canvas_size, subset=subset, log=log)
    images, labels = [], []
    for batch, batch_labels in canvases:
        images.append(batch.clone())
        labels.append(batch_labels.clone())
    labels = torch.cat(labels).long()
    return ImageSet(dataset, split, torch.cat(images), labels, loader_classes(canvases, labels))


def loader_classes(canvases, labels: torch.Tensor) -> list[str]:
    """Class names of a canvas loader's split: the .beton sidecar's (ffcv), the registry split's (jpeg,
    torch), else the label numbers."""
    meta = getattr(canvases, "info", {}).get("meta") or {}
    classes = meta.get("classes")
    if classes is None and hasattr(canvases, "dataset"):
        classes = canvases.dataset.split.classes
    return list(classes) if classes else [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]


# --------------------------------------------------------------------------- features
@dataclass
class BackboneSpec:
    """What it takes to run a backbone on new images: its input size and the normalisation."""

    image_size: int
    mean: tuple
    std: tuple
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 512


def eval_view(images: torch.Tensor, spec: BackboneSpec, crop: float = 1.0) -> torch.Tensor:
    """uint8 canvases on the device -> the normalised float test view [B, 3, s, s] (no randomness)."""
    mean = torch.as_tensor(spec.mean, dtype=torch.float32, device=images.device)
    std = torch.as_tensor(spec.std, dtype=torch.float32, device=images.device)
    return prepare_eval_images(center_crop(images, crop), spec.image_size, mean, std)


def extract(backbone: torch.nn.Module, images: ImageSet, spec: BackboneSpec, crop: float = 1.0) -> torch.Tensor:
    """Raw (not normalised) features [N, D], float32 on the CPU, from the test view (``extract_features``)."""
    batches = ((images.images[start:start + spec.batch_size], images.labels[start:start + spec.batch_size])
               for start in range(0, len(images.labels), spec.batch_size))
    features, _ = extract_features(backbone, batches, spec.image_size, spec.mean, spec.std, spec.device,
                                   normalize=False, crop=crop, output_device="cpu")
    return features


def extract_into(stream, rows: int, path=None, dtype=torch.float32):
    """The (features [B, D], labels [B]) batches of ``stream`` written in order into one preallocated
    [rows, D] matrix: a tensor in memory, or (``path``) a .npy ``FeatureFile`` on disk (a split whose
    features do not fit in memory). Returns (features, labels [rows] int64)."""
    features, labels, seen = None, torch.empty(rows, dtype=torch.long), 0
    for out, batch_labels in stream:
        if seen + len(out) > rows:
            raise ValueError(f"the loader gave more than the {rows:,} images it announced")
        if features is None:
            features = (FeatureFile.create(path, rows, out.shape[1], str(dtype).replace("torch.", "")) if path
                        else torch.empty(rows, out.shape[1], dtype=dtype))
        if isinstance(features, FeatureFile):
            features.write(seen, out)
        else:
            features[seen:seen + len(out)] = out.to("cpu", dtype)
        labels[seen:seen + len(out)] = batch_labels
        seen += len(out)
    if seen != rows:
        raise ValueError(f"the loader gave {seen:,} images, not the {rows:,} it announced")
    return features, labels


def extract_split(backbone: torch.nn.Module, dataset: str, split: str, spec: BackboneSpec, path=None,
                  crop: float = 1.0, data_root=None, cache_dir=None, loader: str = "auto", subset: int | None = None,
                  seed: int = 0, canvas_size: int | None = None, log: Callable[[str], None] = lambda msg: None,
                  block: tuple[int, int] | None = None):
    """Raw features of a split, streamed: batches of ``spec.batch_size`` canvases from the split's loader
    (never the whole split in memory) through the backbone's test view into ``extract_into`` (a tensor,
    or the .npy file ``path``). The same features as ``extract(load_images(...))``. Returns (features,
    labels, class names). ``block`` (i, n): only the i-th of n contiguous blocks of the split (one worker's
    shard; the n blocks concatenated in order are the whole split)."""
    import numpy as np

    from trainers.data.multicrop import build_canvas_loader

    canvases, _ = build_canvas_loader(dataset, split, spec.batch_size, device="cpu", loader=loader,
                                      data_root=data_root, cache_dir=cache_dir, seed=seed, shuffle=False,
                                      drop_last=False, canvas_size=canvas_size, subset=subset, log=log, block=block)
    rows = canvases.num_samples if subset is None else min(subset, canvases.num_samples)
    if block is not None:
        rows = len(np.array_split(np.arange(rows), block[1])[block[0]])
    stream = feature_batches(backbone, canvases, spec.image_size, spec.mean, spec.std, spec.device,
                             normalize=False, crop=crop)
    features, labels = extract_into(stream, rows, path)
    return features, labels, loader_classes(canvases, labels)


KNN_MAIN, KNN_WIDE = (20, 0.07), (200, 0.1)  # DINO's eval_knn.py; lightly's benchmarks


@torch.no_grad()
def knn_suite(train_features, train_labels, test_features, test_labels, num_classes: int, chunk: int = 1024,
              bank_chunk: int = 65536, bank_dtype=None) -> dict:
    """Weighted kNN at k=20/T=0.07 (``knn_top1_k20``, ``knn_top5_k20``) and k=200/T=0.1 (``knn_top1_k200_t0.1``,
    ``knn_top5_k200_t0.1``), and top-1 for every k in ``KNN_SWEEP`` at T=0.07 (``knn_sweep``), from raw
    features (tensors or ``FeatureFile``s, normalised chunk by chunk as read); one pass over the bank
    (``trainers.knn.knn_hits``: queries in chunks of ``chunk``, the bank in chunks of ``bank_chunk``, held
    in ``bank_dtype``) serves them all."""
    hits = knn_hits(train_features, train_labels, test_features, test_labels, KNN_SETTINGS, num_classes, chunk,
                    bank_chunk, bank_dtype, normalize=True)
    return _knn_report(hits, len(test_labels))


KNN_SETTINGS = list(dict.fromkeys([KNN_MAIN, KNN_WIDE, *[(k, KNN_MAIN[1]) for k in KNN_SWEEP]]))
KNN_LARGEST = max(k for k, _ in KNN_SETTINGS)  # how many neighbours a shard's top-k list must keep


def _knn_report(hits: dict, n: int) -> dict:
    out = {knn_metric(k, t, top): hits[(k, t)][top == 5] / n for k, t in (KNN_MAIN, KNN_WIDE) for top in (1, 5)}
    out["knn_sweep"] = {k: hits[(k, KNN_MAIN[1])][0] / n for k in KNN_SWEEP}
    return out


def knn_suite_from_shards(parts: list, test_labels: torch.Tensor, num_classes: int) -> dict:
    """``knn_suite`` from the bank's shards, each scored on its own (by a worker holding one block of the
    training features): ``parts`` in bank order, each (similarities [Q, k], indices into its own block [Q, k],
    its labels), from ``knn_topk(queries, block, KNN_LARGEST, normalize=True)``. The shards' lists merge exactly
    (``merge_topk``) into the whole bank's: the same numbers as ``knn_suite`` on the gathered features."""
    from trainers.knn import merge_topk, vote_hits

    offsets = np.cumsum([0] + [len(p[2]) for p in parts])
    lists = [(sims, idx + int(offset)) for (sims, idx, _), offset in zip(parts, offsets)]
    top_sim, top_idx = merge_topk(lists, KNN_LARGEST)
    bank_labels = torch.cat([p[2] for p in parts])
    return _knn_report(vote_hits(top_sim, top_idx, bank_labels, test_labels, KNN_SETTINGS, num_classes),
                       len(test_labels))


# --------------------------------------------------------------------------- protocols
LINEAR_PROTOCOLS = ("frozen_features", "augmented")
SEMI_PROTOCOLS = ("swav",)
SCHEDULES = ("cosine", "cosine_epoch", "multistep")
# 32-px (and smaller) data sets take solo-learn's CIFAR settings; the others (tiny-imagenet, image
# folders) DINO's / SwAV's ImageNet ones
SMALL_IMAGE_DATASETS = ("cifar10", "fashion-mnist", "digits")
KNN_PROTOCOL = {"protocol": "weighted_knn", "k": [KNN_MAIN[0], KNN_WIDE[0]], "temperature": [KNN_MAIN[1], KNN_WIDE[1]],
                "k_sweep": list(KNN_SWEEP)}
# Where each protocol's settings come from (commits of the copies read).
REFERENCES = {
    "frozen_features": "this project: the fast probe on cached frozen features (SGD + Nesterov, cosine per update)",
    ("augmented", "cifar"): "solo-learn main_linear.py + scripts/linear/imagenet*/*.yaml + "
                            "solo/data/classification_dataloader.py cifar_pipeline @9187ea39",
    ("augmented", "imagenet"): "facebookresearch/dino eval_linear.py @7c446df5",
    "swav": "facebookresearch/swav eval_semisup.py + README.md @06b1b7cb",
    "weighted_knn": "Wu et al. 2018; DINO eval_knn.py (k=20, T=0.07); lightly benchmarks (k=200, T=0.1)",
}


def dataset_family(dataset: str) -> str:
    """``cifar`` (32 px and less) or ``imagenet`` (larger images): which reference's defaults apply."""
    return "cifar" if dataset in SMALL_IMAGE_DATASETS else "imagenet"


def protocol_reference(protocol: str, dataset: str = "") -> str:
    return REFERENCES.get(protocol) or REFERENCES[(protocol, dataset_family(dataset))]


def check_protocol(value, options, what: str) -> str:
    """A protocol name among ``options``; else one line naming them."""
    if not isinstance(value, str) or value not in options:
        import difflib

        close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{what} {value!r} is not one of {', '.join(options)}{hint}: pick one of them")
    return value


def linear_protocol(protocol: str, dataset: str) -> dict:
    """Every setting of a linear-probe protocol (the ``LinearSettings`` fields but the seed) on ``dataset``.

    ``frozen_features``: this project's fast probe: 100 epochs over standardised cached features,
    SGD + Nesterov momentum 0.9, lr 0.1 at batch 256 with a cosine per update, no weight decay.

    ``augmented``, 32-px data (solo-learn, vturrisi/solo-learn @9187ea39): 100 epochs
    (``max_epochs``), SGD momentum 0.9 (solo/args/linear.py), batch 256, lr 0.1 (scaled by batch/256;
    scripts/linear/imagenet/*.yaml and imagenet-100/barlow.yaml: the per-method values there range
    0.1-3.0), no weight decay, MultiStepLR x0.1 at epochs 60 and 80 (solo/methods/linear.py);
    train: RandomResizedCrop(32, scale=(0.08, 1)) + horizontal flip, test: the whole image
    (classification_dataloader.py cifar_pipeline); raw features.

    ``augmented``, ImageNet-like data (DINO eval_linear.py, facebookresearch/dino @7c446df5): 100
    epochs, SGD momentum 0.9, no weight decay, lr 0.001 per 256 images (linear scaling rule) at batch
    256 (its README's evaluation logs use 256 in total), CosineAnnealingLR to 0 stepped per epoch;
    train: RandomResizedCrop(224) (scale 0.08-1) + flip, test: Resize(256) + CenterCrop(224), the
    central 0.875; raw features, linear layer initialised N(0, 0.01), bias 0.
    """
    check_protocol(protocol, LINEAR_PROTOCOLS, "linear probe protocol")
    if protocol == "frozen_features":
        return {"protocol": protocol, "epochs": 100, "lr": 0.1, "weight_decay": 0.0, "batch_size": 256,
                "momentum": 0.9, "nesterov": True, "schedule": "cosine", "decay_at": [], "gamma": 1.0,
                "standardize": True, "crop_scale": None, "test_crop": 1.0}
    common = {"protocol": protocol, "epochs": 100, "weight_decay": 0.0, "batch_size": 256, "momentum": 0.9,
              "nesterov": False, "standardize": False, "crop_scale": [0.08, 1.0]}
    if dataset_family(dataset) == "cifar":
        return {**common, "lr": 0.1, "schedule": "multistep", "decay_at": [0.6, 0.8], "gamma": 0.1, "test_crop": 1.0}
    return {**common, "lr": 0.001, "schedule": "cosine_epoch", "decay_at": [], "gamma": 1.0, "test_crop": 0.875}


# SwAV's learning rates (trunk, head) per label fraction: README.md "Semi-supervised learning on
# ImageNet" (facebookresearch/swav @06b1b7cb): 10%: --lr 0.01 --lr_last_layer 0.2; 1%: --lr 0.02
# --lr_last_layer 5.
SWAV_SEMI_LRS = {0.01: (0.02, 5.0), 0.1: (0.01, 0.2)}


def swav_lrs(fraction: float) -> tuple[float, float]:
    """(trunk lr, head lr) of the SwAV setting nearest to ``fraction`` on a log scale (1% up to ~3.2%)."""
    nearest = min(SWAV_SEMI_LRS, key=lambda f: abs(math.log(fraction / f)))
    return SWAV_SEMI_LRS[nearest]


def semi_protocol(protocol: str, dataset: str, fraction: float) -> dict:
    """Every setting of the semi-supervised protocol for one label fraction (``FinetuneSettings`` but the seed).

    ``swav`` (facebookresearch/swav eval_semisup.py @06b1b7cb): 20 epochs, SGD momentum 0.9 (no
    Nesterov), weight decay 0, batch 32 per GPU x 8 GPUs = 256, trunk / head lr per fraction
    (``SWAV_SEMI_LRS``), MultiStepLR x0.2 (``--gamma``) at epochs 12 and 16 (``--decay_epochs``), kept
    at 60% and 80% of the training when it is longer; train: RandomResizedCrop(224) (scale 0.08-1) +
    flip, test: Resize(256) + CenterCrop(224) (0.875) on ImageNet-like data, the whole image on 32-px
    data (as solo-learn's CIFAR test view). The label subset: SwAV reads SimCLR's fixed ImageNet lists
    (class-balanced, ~12.8 / 128 images per class); here ``stratified_subset`` draws a fixed-seed,
    class-proportional subset (balanced on balanced data sets), saved with the result. Not SwAV's:
    ``min_steps`` (200) stretches the epochs for subsets so small that 20 epochs are fewer updates.
    """
    check_protocol(protocol, SEMI_PROTOCOLS, "semi-supervised protocol")
    trunk, head = swav_lrs(fraction)
    return {"protocol": protocol, "epochs": 20, "lr": trunk, "head_lr": head, "weight_decay": 0.0, "batch_size": 256,
            "min_steps": 200, "momentum": 0.9, "decay_at": [0.6, 0.8], "gamma": 0.2, "crop_scale": [0.08, 1.0],
            "test_crop": 1.0 if dataset_family(dataset) == "cifar" else 0.875}


# --------------------------------------------------------------------------- schedules
def decay_epochs(decay_at, epochs: int) -> list[int]:
    """Epochs at which a ``multistep`` schedule multiplies the lr by gamma; ``decay_at`` are fractions of
    the training (SwAV's epochs 12 and 16 of 20 and solo-learn's 60 and 80 of 100 are 0.6 and 0.8)."""
    return [int(math.floor(f * epochs + 0.5)) for f in decay_at]


def lr_scale(schedule: str, epoch: int, epochs: int, step: int = 0, total: int = 1, decays=(),
             gamma: float = 1.0) -> float:
    """The factor on the base lr during ``epoch`` (0-based) / update ``step`` (of ``total``).

    ``cosine``: 0.5 (1 + cos(pi step / total)), per update; ``cosine_epoch``: 0.5 (1 + cos(pi epoch /
    epochs)), per epoch (torch CosineAnnealingLR(T_max=epochs, eta_min=0) stepped after each epoch, as
    DINO's eval_linear.py); ``multistep``: gamma ** (how many of ``decays`` are <= epoch) (MultiStepLR)."""
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * step / total))
    if schedule == "cosine_epoch":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return gamma ** sum(epoch >= d for d in decays)
    raise ConfigError(f"lr schedule '{schedule}' is not one of {', '.join(SCHEDULES)}")


def _sgd_step(optimizer, lrs, loss: torch.Tensor) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


# --------------------------------------------------------------------------- hyperparameter checks


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
    for key, positive in (("lr", True), ("head_lr", True), ("weight_decay", False)):
        if not hasattr(settings, key):
            continue
        value = getattr(settings, key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise ConfigError(f"{what} {key} is {value!r}: give a finite number {'> 0' if positive else '>= 0'}")


def _check_protocol_settings(what: str, settings) -> None:
    """The settings a protocol fixes (schedule, crops, test view): checked for code that builds its own."""
    schedule = getattr(settings, "schedule", "multistep")
    if schedule not in SCHEDULES:
        raise ConfigError(f"{what} schedule '{schedule}' is not one of {', '.join(SCHEDULES)}")
    decay_at = list(settings.decay_at)
    if any(not 0 < f <= 1 for f in decay_at) or decay_at != sorted(decay_at):
        raise ConfigError(f"{what} decay_at {decay_at} must be increasing fractions of the training in (0, 1]")
    if not 0 < settings.gamma <= 1 or not 0 <= settings.momentum < 1:
        raise ConfigError(f"{what} gamma {settings.gamma} must lie in (0, 1] and momentum {settings.momentum} "
                          f"in [0, 1)")
    scale = settings.crop_scale
    if scale is not None and not (len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
        raise ConfigError(f"{what} crop_scale {list(scale)} must satisfy 0 < low <= high <= 1")
    if not 0 < settings.test_crop <= 1:
        raise ConfigError(f"{what} test_crop {settings.test_crop} must be a fraction of the side in (0, 1]")


def _record(settings) -> dict:
    """A settings dataclass as JSON-able values, without the seed (the pipeline records that)."""
    out = {}
    for name in settings.__dataclass_fields__:
        value = getattr(settings, name)
        if name != "seed":
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


# --------------------------------------------------------------------------- linear probe
@dataclass
class LinearSettings:
    """A linear probe: ``LinearSettings.for_protocol(name, dataset, lr=...)`` fills a protocol's settings."""

    protocol: str = "frozen_features"
    epochs: int = 100
    lr: float = 0.1  # frozen_features: for standardised features and batch 256
    weight_decay: float = 0.0
    batch_size: int = 256
    seed: int = 0
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"  # cosine (per update), cosine_epoch, multistep (see lr_scale)
    decay_at: tuple = ()  # multistep: fractions of the epochs
    gamma: float = 1.0  # multistep: the factor at each decay
    standardize: bool = True  # features standardised with the training split's (whole-image) mean and std
    crop_scale: tuple | None = None  # augmented: random-resized-crop area range (None: no augmentation)
    test_crop: float = 1.0  # test view: central square of this fraction of the side (1: whole image)

    @classmethod
    def for_protocol(cls, protocol: str, dataset: str, **overrides) -> "LinearSettings":
        """``protocol``'s settings on ``dataset``; an override that is None keeps the protocol's value."""
        values = linear_protocol(protocol, dataset)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("decay_at", "crop_scale"):
            values[key] = tuple(values[key]) if values[key] is not None else None
        return cls(**values)

    def validate(self) -> "LinearSettings":
        check_protocol(self.protocol, LINEAR_PROTOCOLS, "linear probe protocol")
        _check_hyperparameters("linear probe", self)
        _check_protocol_settings("linear probe", self)
        if self.protocol == "augmented" and self.crop_scale is None:
            raise ConfigError("linear probe protocol augmented needs a crop_scale (e.g. [0.08, 1.0])")
        return self

    def record(self) -> dict:
        return _record(self)


def accuracy_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, prefix: str) -> dict:
    top = logits.topk(min(5, num_classes), dim=1).indices
    hits = top == labels.view(-1, 1)
    per_class = []
    for c in range(num_classes):
        mask = labels == c
        per_class.append(hits[mask, 0].float().mean().item() if mask.any() else float("nan"))
    return {f"{prefix}_top1": hits[:, 0].float().mean().item(), f"{prefix}_top5": hits.any(1).float().mean().item(),
            "per_class": per_class}


def _linear_head(dim: int, num_classes: int, generator: torch.Generator, device) -> torch.nn.Linear:
    """A linear classifier initialised N(0, 0.01), bias 0 (DINO's LinearClassifier)."""
    layer = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=generator)
        layer.bias.zero_()
    return layer.to(device)


def _probe_optimizer(layer, settings: LinearSettings):
    return torch.optim.SGD(layer.parameters(), lr=settings.lr, momentum=settings.momentum,
                           weight_decay=settings.weight_decay, nesterov=settings.nesterov and settings.momentum > 0)


def feature_stats(features, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation [1, D] (float32) of a tensor, or of a ``FeatureFile`` read
    in chunks of ``chunk`` rows (two passes, sums in float64)."""
    if isinstance(features, torch.Tensor):
        return features.mean(0, keepdim=True), features.std(0, keepdim=True)
    n = len(features)
    total = sum(read_rows(features, i, i + chunk).double().sum(0) for i in range(0, n, chunk))
    mean = total / n
    squares = sum((read_rows(features, i, i + chunk).double() - mean).square().sum(0) for i in range(0, n, chunk))
    return mean.float().view(1, -1), (squares / max(n - 1, 1)).sqrt().float().view(1, -1)


def linear_probe(train_features, train_labels, test_features, test_labels, num_classes: int,
                 settings: LinearSettings = LinearSettings(), prefix: str = "linear", device="cpu",
                 progress: Callable[[int, float, tuple], None] | None = None, chunk: int = 65536) -> dict:
    """The ``frozen_features`` probe: one linear layer on fixed features; top-1/top-5 and per-class
    accuracy on the test features. ``progress(epoch, mean loss, (lr,))`` after each epoch.

    Tensors are standardised whole and moved to ``device`` at once (small sets). ``FeatureFile``s are never
    held whole: the standardisation comes from chunks of ``chunk`` rows (``feature_stats``), each
    mini-batch is read from the file, standardised and moved on its own, the test features go through
    in chunks: memory bounded by ``chunk`` and the batch, the same updates in the same order."""
    settings.validate()
    if settings.protocol != "frozen_features":
        raise ConfigError(f"linear_probe trains on fixed features: protocol {settings.protocol} needs the images "
                          f"(augmented_linear_probe)")
    device = torch.device(device)
    dim = train_features.shape[1]
    if settings.standardize:
        mean, std = feature_stats(train_features, chunk)
        std = std.clamp_min(1e-6)
    else:
        mean, std = torch.zeros(1, dim), torch.ones(1, dim)
    resident = isinstance(train_features, torch.Tensor)
    if resident:
        x_train = ((train_features - mean) / std).to(device)
        batch_of = lambda index: x_train[index.to(device)]  # noqa: E731
    else:
        batch_of = lambda index: ((train_features.gather(index.numpy()) - mean) / std).to(device)  # noqa: E731
    y_train = train_labels.to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    layer = _linear_head(dim, num_classes, generator, device)
    optimizer = _probe_optimizer(layer, settings)
    steps_per_epoch = math.ceil(len(y_train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    decays = decay_epochs(settings.decay_at, settings.epochs)
    step = 0
    for epoch in range(settings.epochs):
        order = torch.randperm(len(y_train), generator=generator)
        loss_sum = torch.zeros((), device=device)
        for start in range(0, len(order), settings.batch_size):
            index = order[start:start + settings.batch_size]
            loss = F.cross_entropy(layer(batch_of(index)), y_train[index.to(device)])
            lr = settings.lr * lr_scale(settings.schedule, epoch, settings.epochs, step, total, decays, settings.gamma)
            _sgd_step(optimizer, [lr], loss)
            loss_sum += loss.detach()
            step += 1
        if progress is not None:
            progress(epoch + 1, (loss_sum / steps_per_epoch).item(), (lr,))
    with torch.no_grad():
        if resident and isinstance(test_features, torch.Tensor):
            logits = layer(((test_features - mean) / std).to(device)).cpu()
        else:
            logits = torch.cat([layer(((read_rows(test_features, i, i + chunk) - mean) / std).to(device)).cpu()
                                for i in range(0, len(test_labels), chunk)])
    return accuracy_report(logits, test_labels, num_classes, prefix)


def train_augment(spec: BackboneSpec, crop_scale, seed: int, record: bool = False):
    """One random-resized crop (area ``crop_scale``, aspect 3/4-4/3) + horizontal flip (p 0.5) per image, at
    the backbone's input size, normalised: torchvision's RandomResizedCrop + RandomHorizontalFlip of the
    references, made in one batched op on the device (MultiCropAugment, colour jitter, grayscale, blur and
    solarization off)."""
    from trainers.data.augment import CropGroup, MultiCropAugment

    group = CropGroup(count=1, size=spec.image_size, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                      jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    return MultiCropAugment([group], mean=spec.mean, std=spec.std, seed=seed, record=record)


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
    """Semi-supervised fine-tuning: ``FinetuneSettings.for_fraction(protocol, dataset, fraction, lr=...)``."""

    protocol: str = "swav"
    epochs: int = 20
    lr: float = 0.01  # the pretrained trunk (SwAV, 10% labels)
    head_lr: float = 0.2  # the new linear head (SwAV, 10% labels)
    weight_decay: float = 0.0
    batch_size: int = 256
    min_steps: int = 200  # tiny subsets still get this many updates (the schedule stretches with them)
    momentum: float = 0.9
    decay_at: tuple = (0.6, 0.8)  # x gamma at epochs 12 and 16 of 20
    gamma: float = 0.2
    crop_scale: tuple = (0.08, 1.0)
    test_crop: float = 1.0
    seed: int = 0

    @classmethod
    def for_fraction(cls, protocol: str, dataset: str, fraction: float, **overrides) -> "FinetuneSettings":
        """The protocol's settings for ``fraction`` of the labels; an override that is None keeps them."""
        values = semi_protocol(protocol, dataset, fraction)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["decay_at"], values["crop_scale"] = tuple(values["decay_at"]), tuple(values["crop_scale"])
        return cls(**values)

    def validate(self) -> "FinetuneSettings":
        check_protocol(self.protocol, SEMI_PROTOCOLS, "semi-supervised protocol")
        _check_hyperparameters("fine-tuning", self)
        _check_protocol_settings("fine-tuning", self)
        return self

    def record(self) -> dict:
        return _record(self)


def finetune_plan(settings: FinetuneSettings, labels: int) -> dict:
    """How long fine-tuning on ``labels`` images runs: batch, updates per epoch (every image once, in full
    batches and a last one with the remainder, as SwAV's eval_semisup.py DataLoader: drop_last off), epochs
    (``settings.epochs``, more when that is under ``min_steps`` updates) and the epochs where the lr decays
    (``decay_at`` of them)."""
    batch = min(settings.batch_size, labels)
    steps_per_epoch = math.ceil(labels / batch)
    epochs = max(settings.epochs, math.ceil(settings.min_steps / steps_per_epoch))
    return {"batch_size": batch, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
            "decay_epochs": decay_epochs(settings.decay_at, epochs)}
