"""Weighted k-nearest-neighbour evaluation on frozen features (Wu et al., 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination"; the protocol DINO and lightly report: cosine
similarity, each of the k neighbours votes for its class with weight exp(similarity / T)).
"""

from __future__ import annotations

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


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, batches: Iterable, size: int, mean, std, device,
                     autocast_dtype=None, channels_last: bool = False, limit: int | None = None,
                     normalize: bool = True):
    """L2-normalised (``normalize=False``: raw) features [N, D] (float32) and labels [N] of every
    (images, labels) batch."""
    was_training = backbone.training
    backbone.eval()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    features, labels, seen = [], [], 0
    try:
        for images, batch_labels in batches:
            images = images.to(device, non_blocking=True)
            x = prepare_eval_images(images, size, mean, std, channels_last=channels_last)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = backbone(x)
            features.append(F.normalize(out.float(), dim=1) if normalize else out.float())
            labels.append(batch_labels.to(device).long().view(-1))
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
def knn_predict_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                       k: int, temperature: float, num_classes: int, chunk: int = 1024) -> torch.Tensor:
    """Class scores [N_test, C]: sum over the k most similar training samples of exp(sim / T)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        similarity = test_features[start:start + chunk] @ train_features.t()
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(top_idx.shape[0], num_classes, device=test_features.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, test_features, test_labels, ks: Sequence[int] = (20, 200),
                 temperature: float = 0.07, num_classes: int | None = None) -> dict[str, float]:
    """``{"knn_top1_k20": ..., "knn_top5_k20": ..., ...}`` as fractions in [0, 1]."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()).item()) + 1
    results = {}
    for k in ks:
        scores = knn_predict_scores(train_features, train_labels, test_features, k, temperature, num_classes)
        top = scores.topk(min(5, num_classes), dim=1).indices
        hits = top == test_labels.view(-1, 1)
        results[f"knn_top1_k{k}"] = hits[:, 0].float().mean().item()
        results[f"knn_top5_k{k}"] = hits.any(dim=1).float().mean().item()
    return results
