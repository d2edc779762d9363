"""Weighted k-nearest-neighbour evaluation on frozen features (Wu et al., 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination"; the protocol DINO and lightly report: cosine
similarity, each of the k neighbours votes for its class with weight exp(similarity / T)).

The one kNN and the one feature extractor of the project: the online kNN during pretraining
(trainers/loop.py) and the offline protocol (trainers/evaluate.py, the pipeline's knn stage) both use
``extract_features`` and ``knn_hits``, and name their metrics with ``knn_metric``:
``knn_top1_k20`` is top-1 with k=20 at T=0.07 wherever it appears (MLflow, ``--json``, README's tables);
another temperature is part of the name (``knn_top1_k200_t0.1``, lightly's setting).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def prepare_eval_images(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
                        dtype=torch.float32, channels_last: bool = False) -> torch.Tensor:
    """uint8 canvases [B, H, W, 3] -> normalized float [B, 3, size, size] (resized when needed)."""
    x = images.permute(0, 3, 1, 2) if images.shape[-1] == 3 and images.shape[1] != 3 else images
    x = x.float().div_(255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    x = x.to(dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


DEFAULT_TEMPERATURE = 0.07  # DINO's eval_knn.py (k=20)


def knn_metric(k: int, temperature: float = DEFAULT_TEMPERATURE, top: int = 1) -> str:
    """The metric name of weighted-kNN top-``top`` accuracy with ``k`` neighbours at ``temperature``."""
    name = f"knn_top{top}_k{k}"
    return name if temperature == DEFAULT_TEMPERATURE else f"{name}_t{temperature:g}"


def knn_label(name: str) -> str | None:
    """'kNN top-1 (k=20, T=0.07)' for a ``knn_metric`` name; None for any other name."""
    match = re.fullmatch(r"knn_top([15])_k(\d+)(?:_t([0-9.]+))?", name)
    if match is None:
        return None
    top, k, temperature = match.groups()
    return f"kNN top-{top} (k={k}, T={temperature or f'{DEFAULT_TEMPERATURE:g}'})"


def center_crop(images: torch.Tensor, fraction: float) -> torch.Tensor:
    """The central square of ``fraction`` of the shorter side of uint8 canvases [B, H, W, 3];
    ``fraction`` 1: the canvases unchanged (the whole image). 0.875 is DINO's and SwAV's test view,
    Resize(256) + CenterCrop(224)."""
    if fraction >= 1:
        return images
    height, width = images.shape[1:3]
    side = max(1, int(round(fraction * min(height, width))))
    top, left = (height - side) // 2, (width - side) // 2
    return images[:, top:top + side, left:left + side]


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, batches: Iterable, size: int, mean, std, device,
                     autocast_dtype=None, channels_last: bool = False, limit: int | None = None,
                     normalize: bool = True, crop: float = 1.0, output_device=None):
    """L2-normalised (``normalize=False``: raw) features [N, D] (float32) and labels [N] of every (uint8
    images, labels) batch, from the test view: the central ``crop`` of each image, resized to ``size`` and
    normalised (no randomness); the backbone in eval mode. They stay on ``device`` unless
    ``output_device`` says where to collect them (e.g. "cpu": each batch moves there, so a large data set
    never holds all its features in GPU memory)."""
    was_training = backbone.training
    backbone.eval()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    features, labels, seen = [], [], 0
    try:
        for images, batch_labels in batches:
            images = images.to(device, non_blocking=True)
            x = prepare_eval_images(center_crop(images, crop), size, mean, std, channels_last=channels_last)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = backbone(x)
            out = F.normalize(out.float(), dim=1) if normalize else out.float()
            features.append(out if output_device is None else out.to(output_device))
            labels.append(batch_labels.to(output_device or device).long().view(-1))
            seen += len(images)
            if limit is not None and seen >= limit:
                break
    finally:
        backbone.train(was_training)
    features, labels = torch.cat(features), torch.cat(labels)
    if limit is not None:
        features, labels = features[:limit], labels[:limit]
    return features, labels


@torch.no_grad()
def knn_hits(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, settings: Sequence[tuple[int, float]], num_classes: int,
             chunk: int = 1024) -> dict[tuple[int, float], tuple[int, int]]:
    """Per (k, T) in ``settings``: (top-1 hits, top-5 hits) over the test samples, from L2-normalised
    features. One similarity pass and one top-k serve every setting: each of the k most similar training
    samples votes for its class with weight exp(similarity / T)."""
    for k, temperature in settings:
        if k < 1 or temperature <= 0:
            raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
    largest = min(max(k for k, _ in settings), train_features.shape[0])
    hits = {setting: [0, 0] for setting in settings}
    for start in range(0, test_features.shape[0], chunk):
        top_sim, top_idx = (test_features[start:start + chunk] @ train_features.t()).topk(largest, dim=1)  # sorted
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start:start + chunk].view(-1, 1)
        for setting in hits:
            k, temperature = min(setting[0], largest), setting[1]  # a bank smaller than k: every sample votes
            votes = torch.zeros(len(truth), num_classes, device=top_sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], (top_sim[:, :k] / temperature).exp())
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            hits[setting][0] += int((ranked[:, :1] == truth).sum())
            hits[setting][1] += int((ranked == truth).any(1).sum())
    return {setting: tuple(value) for setting, value in hits.items()}


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, ks: Sequence[int] = (20, 200),
                 temperature: float = DEFAULT_TEMPERATURE, num_classes: int | None = None) -> dict[str, float]:
    """``{"knn_top1_k20": ..., "knn_top5_k20": ..., ...}`` (names by ``knn_metric``) as fractions in [0, 1],
    from L2-normalised features."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    settings = [(k, temperature) for k in ks]
    hits = knn_hits(train_features, train_labels, test_features, test_labels, settings, num_classes)
    n = len(test_labels)
    results = {}
    for k in ks:
        top1, top5 = hits[(k, temperature)]
        results[knn_metric(k, temperature, 1)] = top1 / n
        results[knn_metric(k, temperature, 5)] = top5 / n
    return results
