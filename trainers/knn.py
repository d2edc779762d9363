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


def online_knn_metrics(ks, temperature: float = DEFAULT_TEMPERATURE) -> list[str]:
    """Every metric the loop's online kNN reports for these k (default [20]): top-1 and top-5 per k, in
    order; the first is the one that ranks a run's checkpoints and a sweep's default metric."""
    return [knn_metric(k, temperature, top) for k in (list(ks) or [20]) for top in (1, 5)]


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
def feature_batches(backbone: torch.nn.Module, batches: Iterable, size: int, mean, std, device,
                    autocast_dtype=None, channels_last: bool = False, normalize: bool = True, crop: float = 1.0):
    """(features [B, D] float32 on ``device``, labels [B]) of each (uint8 images, labels) batch, one batch at a
    time: the test view (the central ``crop``, resized to ``size``, normalised), the backbone in eval mode
    (restored when the generator ends or is closed)."""
    was_training = backbone.training
    backbone.eval()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std = torch.as_tensor(std, dtype=torch.float32, device=device)
    try:
        for images, batch_labels in batches:
            images = images.to(device, non_blocking=True)
            x = prepare_eval_images(center_crop(images, crop), size, mean, std, channels_last=channels_last)
            with torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                out = backbone(x)
            yield (F.normalize(out.float(), dim=1) if normalize else out.float()), batch_labels.long().view(-1)
    finally:
        backbone.train(was_training)


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, batches: Iterable, size: int, mean, std, device,
                     autocast_dtype=None, channels_last: bool = False, limit: int | None = None,
                     normalize: bool = True, crop: float = 1.0, output_device=None):
    """L2-normalised (``normalize=False``: raw) features [N, D] (float32) and labels [N] of every (uint8
    images, labels) batch, from the test view (``feature_batches``). They stay on ``device`` unless
    ``output_device`` says where to collect them (e.g. "cpu": each batch moves there, so a large data set
    never holds all its features in GPU memory). trainers/evaluate.py ``extract_into`` writes them into a
    preallocated tensor or a .npy file instead (a split too large for a list of batches)."""
    features, labels, seen = [], [], 0
    stream = feature_batches(backbone, batches, size, mean, std, device, autocast_dtype, channels_last, normalize, crop)
    try:
        for out, batch_labels in stream:
            features.append(out if output_device is None else out.to(output_device))
            labels.append(batch_labels.to(output_device or device))
            seen += len(out)
            if limit is not None and seen >= limit:
                break
    finally:
        stream.close()
    features, labels = torch.cat(features), torch.cat(labels)
    if limit is not None:
        features, labels = features[:limit], labels[:limit]
    return features, labels


# --------------------------------------------------------------------------- kNN in bounded memory
class FeatureFile:
    """A float matrix [N, D] in a .npy file, read and written in row ranges without holding it in memory:
    each access maps the file, copies the rows it needs and unmaps it (so the process never keeps the
    file's pages: its resident memory stays bounded by the rows of one access)."""

    def __init__(self, path):
        import numpy as np

        self.path = str(path)
        self._np = np
        array = np.load(self.path, mmap_mode="r")
        self.shape, self.dtype, self.offset = tuple(array.shape), array.dtype, array.offset
        del array

    @classmethod
    def create(cls, path, rows: int, dim: int, dtype="float32") -> "FeatureFile":
        """An all-zero [rows, dim] .npy file (sparse on disk until written)."""
        import numpy as np

        np.lib.format.open_memmap(str(path), mode="w+", dtype=np.dtype(dtype), shape=(rows, dim)).flush()
        return cls(path)

    def __len__(self) -> int:
        return self.shape[0]

    def _map(self, mode: str = "r"):
        return self._np.memmap(self.path, dtype=self.dtype, mode=mode, offset=self.offset, shape=self.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        mapped = self._map()
        out = torch.from_numpy(self._np.array(mapped[start:stop]))
        del mapped
        return out

    def gather(self, index) -> torch.Tensor:
        """Rows at ``index`` (any order), as one tensor."""
        mapped = self._map()
        out = torch.from_numpy(mapped[self._np.asarray(index)])
        del mapped
        return out

    def write(self, start: int, values: torch.Tensor) -> None:
        mapped = self._map("r+")
        mapped[start:start + len(values)] = values.detach().cpu().numpy().astype(self.dtype, copy=False)
        del mapped  # unmapped: the rows stay in the page cache, written back by the kernel

    def tensor(self) -> torch.Tensor:
        """The whole matrix in memory (small sets)."""
        return self.rows(0, len(self))


def read_rows(source, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a tensor, or of anything with ``rows(start, stop)`` and ``len`` (a
    ``FeatureFile``, a bank generated chunk by chunk)."""
    return source[start:stop] if isinstance(source, torch.Tensor) else source.rows(start, stop)


def _topk_ordered(sims: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, positions) of the ``k`` largest of each row, by value (descending), equal values by position
    (ascending): deterministic, whatever ``topk`` does with ties. Only rows with a tie (inside the k, or
    at the k-th value) are sorted in full; with float features they are rare."""
    k = min(k, sims.shape[1])
    values, index = sims.topk(k, dim=1)
    tied = (values[:, 1:] == values[:, :-1]).any(1) | ((sims >= values[:, -1:]).sum(1) > k)
    if bool(tied.any()):
        rows = tied.nonzero().view(-1)
        order = sims[rows].argsort(dim=1, descending=True, stable=True)[:, :k]
        values[rows], index[rows] = sims[rows].gather(1, order), order
    return values, index


def merge_topk(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of partial top-k lists (similarities [Q, k_i], global bank indices [Q, k_i], each in
    ``knn_topk``'s order) of disjoint index ranges of one bank (its chunks, or the shards that different
    workers scored), given in any order: the top ``k`` of their union, by similarity (descending), equal
    similarities by bank index (ascending), as one ``knn_topk`` over the whole bank gives."""
    parts = sorted((p for p in parts if p[1].numel()), key=lambda p: int(p[1].min()))
    sims = torch.cat([p[0] for p in parts], dim=1)
    idx = torch.cat([p[1].to(sims.device) for p in parts], dim=1)
    values, position = _topk_ordered(sims, k)  # ties: the earlier part, within a part its order
    return values, idx.gather(1, position)


def _similarities(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """queries [Q, D] float32 x bank chunk [n, D] (float32, or float16/bfloat16 stored: multiplied in that
    precision on a GPU, widened to float32 on the CPU, where half-precision matmuls are slow)."""
    if bank.dtype != torch.float32 and bank.device.type == "cuda":
        return (queries.to(bank.dtype) @ bank.t()).float()
    return queries @ bank.float().t()


@torch.no_grad()
def knn_topk(queries, bank, k: int, query_chunk: int = 1024, bank_chunk: int = 65536, bank_dtype=None,
             normalize: bool = False, bank_range: tuple[int, int] | None = None, device=None):
    """The ``k`` most similar bank rows of every query: (similarities [Q, k'], bank indices [Q, k']) on
    ``device``, k' = min(k, bank rows), in ``merge_topk``'s order. Queries and bank (tensors or ``FeatureFile``)
    are read in chunks and a running top-k is merged across bank chunks, so memory is O(query_chunk x
    bank_chunk + Q x k) whatever the bank's size. ``bank_dtype`` (torch.float16 / bfloat16): each bank
    chunk is held in that precision. ``normalize``: L2-normalise rows as they are read (raw features).
    ``bank_range`` (start, stop): score only that shard of the bank (indices stay global), so that N
    workers each take a shard and ``merge_topk`` of their lists is the whole bank's answer. ``device``:
    where the products run (default: the queries' device, the CPU for a file)."""
    start, stop = bank_range or (0, len(bank))
    device = torch.device(device or (queries.device if isinstance(queries, torch.Tensor) else "cpu"))
    found_sims, found_idx = [], []
    for q0 in range(0, len(queries), query_chunk):
        query = read_rows(queries, q0, q0 + query_chunk).to(device).float()
        query = F.normalize(query, dim=1) if normalize else query
        best = None
        for b0 in range(start, stop, bank_chunk):
            chunk = read_rows(bank, b0, min(b0 + bank_chunk, stop)).to(device)
            chunk = F.normalize(chunk.float(), dim=1) if normalize else chunk
            chunk = chunk.to(bank_dtype) if bank_dtype is not None else chunk
            values, position = _topk_ordered(_similarities(query, chunk), k)
            part = (values, position + b0)
            best = part if best is None else merge_topk([best, part], k)
        found_sims.append(best[0])
        found_idx.append(best[1])
    return torch.cat(found_sims), torch.cat(found_idx)


@torch.no_grad()
def vote_hits(top_sim: torch.Tensor, top_idx: torch.Tensor, bank_labels: torch.Tensor, query_labels: torch.Tensor,
              settings: Sequence[tuple[int, float]], num_classes: int,
              chunk: int = 1024) -> dict[tuple[int, float], tuple[int, int]]:
    """Per (k, T): (top-1 hits, top-5 hits) of the weighted vote of each query's neighbours (``knn_topk``'s
    lists): each of the k most similar votes for its class with weight exp(similarity / T)."""
    hits = {setting: [0, 0] for setting in settings}
    largest = top_sim.shape[1]
    bank_labels = bank_labels.to(top_idx.device)
    for start in range(0, len(top_sim), chunk):
        sims = top_sim[start:start + chunk]
        neighbour_labels = bank_labels[top_idx[start:start + chunk]]
        truth = query_labels[start:start + chunk].to(sims.device).view(-1, 1)
        for setting in hits:
            k, temperature = min(setting[0], largest), setting[1]  # a bank smaller than k: every sample votes
            votes = torch.zeros(len(truth), num_classes, device=sims.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], (sims[:, :k] / temperature).exp())
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            hits[setting][0] += int((ranked[:, :1] == truth).sum())
            hits[setting][1] += int((ranked == truth).any(1).sum())
    return {setting: tuple(value) for setting, value in hits.items()}


def check_settings(settings: Sequence[tuple[int, float]]) -> None:
    for k, temperature in settings:
        if k < 1 or temperature <= 0:
            raise ValueError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")


@torch.no_grad()
def knn_hits(train_features, train_labels: torch.Tensor, test_features, test_labels: torch.Tensor,
             settings: Sequence[tuple[int, float]], num_classes: int, chunk: int = 1024, bank_chunk: int = 65536,
             bank_dtype=None, normalize: bool = False) -> dict[tuple[int, float], tuple[int, int]]:
    """Per (k, T) in ``settings``: (top-1 hits, top-5 hits) over the test samples, from L2-normalised
    features (``normalize``: raw ones, normalised as read). One pass over the bank (``knn_topk``, queries
    in chunks of ``chunk``, bank in chunks of ``bank_chunk``) serves every setting: each of the k most
    similar training samples votes for its class with weight exp(similarity / T)."""
    check_settings(settings)
    largest = max(k for k, _ in settings)
    device = test_features.device if isinstance(test_features, torch.Tensor) else None
    top_sim, top_idx = knn_topk(test_features, train_features, largest, chunk, bank_chunk, bank_dtype, normalize,
                                device=device)
    return vote_hits(top_sim, top_idx, train_labels, test_labels, settings, num_classes, chunk)


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
