"""Evaluation in bounded memory (issue 19): kNN with the bank and the queries in chunks, a running top-k
merge, shards that merge exactly, a half-precision bank; features streamed from the loader into a tensor
or a .npy file; the linear probe reading its mini-batches from that file. Each against today's in-memory
code (kept here as the reference) on random features and on CIFAR-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainers.evaluate import (BackboneSpec, LinearSettings, extract, extract_split, feature_stats, knn_suite,
                               linear_probe, load_images)
from trainers.knn import FeatureFile, knn_hits, knn_topk, merge_topk, vote_hits


def todays_knn_hits(train_features, train_labels, test_features, test_labels, settings, num_classes, chunk=1024):
    """trainers/knn.py knn_hits before issue 19: each query chunk against the whole bank at once."""
    largest = min(max(k for k, _ in settings), train_features.shape[0])
    hits = {setting: [0, 0] for setting in settings}
    for start in range(0, test_features.shape[0], chunk):
        top_sim, top_idx = (test_features[start:start + chunk] @ train_features.t()).topk(largest, dim=1)
        neighbour_labels = train_labels[top_idx]
        truth = test_labels[start:start + chunk].view(-1, 1)
        for setting in hits:
            k, temperature = min(setting[0], largest), setting[1]
            votes = torch.zeros(len(truth), num_classes)
            votes.scatter_add_(1, neighbour_labels[:, :k], (top_sim[:, :k] / temperature).exp())
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            hits[setting][0] += int((ranked[:, :1] == truth).sum())
            hits[setting][1] += int((ranked == truth).any(1).sum())
    return {setting: tuple(value) for setting, value in hits.items()}


def _clusters(n, dim=32, classes=10, spread=2.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


SETTINGS = [(1, 0.07), (20, 0.07), (200, 0.1), (500, 0.07)]


def test_chunked_knn_equals_todays_knn_exactly_in_float32():
    bank, bank_y = _clusters(3000)
    queries, query_y = _clusters(700, seed=1)
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    today = todays_knn_hits(bank, bank_y, queries, query_y, SETTINGS, 10)
    assert 0.3 < today[(20, 0.07)][0] / 700 < 0.95  # neither chance nor perfect: the test can tell
    for query_chunk, bank_chunk in ((1024, 65536), (128, 257), (700, 1000), (50, 2999)):
        assert knn_hits(bank, bank_y, queries, query_y, SETTINGS, 10, query_chunk, bank_chunk) == today
    # the same neighbours in the same order as one top-k over the whole bank; the similarities to the last
    # bit when the blocks match today's (other block shapes may round a product's last bit differently)
    whole_sims, whole_idx = (queries @ bank.t()).topk(200, dim=1)
    sims, idx = knn_topk(queries, bank, 200)
    assert torch.equal(idx, whole_idx) and torch.equal(sims, whole_sims)
    sims, idx = knn_topk(queries, bank, 200, query_chunk=128, bank_chunk=333)
    assert torch.equal(idx, whole_idx) and torch.allclose(sims, whole_sims, rtol=0, atol=1e-6)
    # a bank smaller than k: every bank sample votes, as before
    small = todays_knn_hits(bank[:15], bank_y[:15], queries, query_y, SETTINGS, 10)
    assert knn_hits(bank[:15], bank_y[:15], queries, query_y, SETTINGS, 10, 50, 4) == small


def test_shards_merge_to_the_whole_bank_with_ties_to_the_lower_index():
    bank, bank_y = _clusters(1000, classes=4)
    bank = F.normalize(bank, dim=1)
    bank[484:584] = bank[100:200]  # exact duplicates (6 chunks of 64 apart): tied similarities,
    bank_y[534:584] = (bank_y[150:200] + 1) % 4  # half of them with other labels
    queries = F.normalize(_clusters(300, classes=4, seed=1)[0], dim=1)
    queries[:50] = bank[100:150]  # queries on top of a duplicated pair: a tie at the very top
    whole = knn_topk(queries, bank, 50, query_chunk=100, bank_chunk=64)
    # workers scoring shards with the same chunk sizes (shards on chunk boundaries): the same products, the
    # same answer, bit for bit, whatever order the shards report in
    parts = [knn_topk(queries, bank, 50, query_chunk=100, bank_chunk=64, bank_range=r)
             for r in ((0, 256), (256, 640), (640, 1000))]
    for order in ([0, 1, 2], [2, 0, 1]):
        merged = merge_topk([parts[i] for i in order], 50)
        assert torch.equal(merged[0], whole[0]) and torch.equal(merged[1], whole[1])
    assert parts[1][1].min() >= 256 and parts[1][1].max() < 640  # a shard names global bank indices
    # ties: the lower index first, as a stable sort of all similarities
    reference = (queries @ bank.t()).sort(dim=1, descending=True, stable=True)
    assert torch.equal(whole[1], reference.indices[:, :50])
    torch.testing.assert_close(whole[0], reference.values[:, :50], rtol=0, atol=1e-6)
    assert torch.equal(whole[1][:50, :2], torch.stack([torch.arange(100, 150), torch.arange(484, 534)], 1))
    assert torch.equal(whole[0][:50, 0], whole[0][:50, 1])
    # (shards off the chunk boundaries or other chunk sizes run other block shapes, which may round a
    # product's last bit differently: exact duplicates may then swap places)
    hits = vote_hits(*merged, bank_y, bank_y[:300], [(20, 0.07), (50, 0.1)], 4)
    assert hits == vote_hits(*whole, bank_y, bank_y[:300], [(20, 0.07), (50, 0.1)], 4)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_a_half_precision_bank_stays_within_a_measured_difference(dtype, tolerance):
    bank, bank_y = _clusters(4000, dim=64)
    queries, query_y = _clusters(1000, dim=64, seed=1)
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    full = knn_hits(bank, bank_y, queries, query_y, SETTINGS, 10)
    half = knn_hits(bank, bank_y, queries, query_y, SETTINGS, 10, bank_dtype=dtype)
    sims, _ = knn_topk(queries, bank, 20)
    half_sims, _ = knn_topk(queries, bank, 20, bank_dtype=dtype)
    # |error| of a cosine <= |rounding of unit vectors| (fp16: 2^-11 relative, bf16: 2^-8)
    assert (sims - half_sims).abs().max() < tolerance
    for setting in SETTINGS:  # near-ties may flip: at most 1% of the queries
        assert abs(full[setting][0] - half[setting][0]) <= 10, (setting, full[setting], half[setting])
    assert not torch.equal(sims, half_sims)  # the bank really was held in half precision


class _CountingFile(FeatureFile):
    """A FeatureFile that remembers the most rows any one read asked for."""

    most = 0

    def rows(self, start, stop):
        out = super().rows(start, stop)
        _CountingFile.most = max(_CountingFile.most, len(out))
        return out


def test_knn_and_the_probe_read_a_feature_file_in_bounded_chunks(tmp_path):
    train_x, train_y = _clusters(3000, dim=32)
    test_x, test_y = _clusters(800, dim=32, seed=1)
    files = []
    for name, values in (("train", train_x), ("test", test_x)):
        matrix = FeatureFile.create(tmp_path / f"{name}.npy", *values.shape)
        for start in range(0, len(values), 999):
            matrix.write(start, values[start:start + 999])
        files.append(_CountingFile(matrix.path))
    assert torch.equal(files[0].tensor(), train_x)
    _CountingFile.most = 0
    memory = knn_suite(train_x, train_y, test_x, test_y, 10)
    on_disk = knn_suite(files[0], train_y, files[1], test_y, 10, chunk=100, bank_chunk=500)
    assert on_disk == memory and _CountingFile.most == 500
    assert 0.3 < memory["knn_top1_k20"] < 0.95
    mean, std = feature_stats(files[0], chunk=700)
    assert torch.allclose(mean, train_x.mean(0, keepdim=True), atol=1e-6)
    assert torch.allclose(std, train_x.std(0, keepdim=True), rtol=1e-5)
    settings = LinearSettings(epochs=3, seed=0)
    probe_memory = linear_probe(train_x, train_y, test_x, test_y, 10, settings)
    probe_disk = linear_probe(files[0], train_y, files[1], test_y, 10, settings, chunk=700)
    assert 0.3 < probe_memory["linear_top1"] < 0.99
    # the same updates in the same order; the statistics agree to ~1e-7 (float64 chunk sums against
    # torch's float32 reduction): the accuracies may differ by a near-tie
    assert abs(probe_disk["linear_top1"] - probe_memory["linear_top1"]) <= 2 / 800
    assert _CountingFile.most == 700


@pytest.fixture(scope="module")
def mini_backbone():
    from trainers.backbones import build_backbone

    torch.manual_seed(0)
    module, _ = build_backbone("resnet_mini", 16)
    return module


@pytest.mark.slow  # ~60 s on 2 busy cores: each split extracted three times
def test_streamed_extraction_equals_todays_path_on_cifar10(mini_backbone, data_root, tmp_path):
    """CIFAR-10 (a fixed 2,000-image train subset, 1,000 test images): features streamed batch by batch into a
    tensor or a .npy file equal today's (the whole split decoded into memory, then extracted); so do the kNN
    accuracy and the linear probe on them."""
    from trainers.data.augment import normalization_for

    mean, std = normalization_for("cifar10")
    spec = BackboneSpec(16, mean, std, torch.device("cpu"), 256)
    out = {}
    for split, subset in (("train", 2000), ("test", 1000)):
        images = load_images("cifar10", split, data_root=data_root, loader="jpeg", subset=subset)
        today = extract(mini_backbone, images, spec)
        streamed, labels, classes = extract_split(mini_backbone, "cifar10", split, spec, data_root=data_root,
                                                  loader="jpeg", subset=subset)
        on_disk, disk_labels, _ = extract_split(mini_backbone, "cifar10", split, spec, path=tmp_path / f"{split}.npy",
                                                data_root=data_root, loader="jpeg", subset=subset)
        assert streamed.shape == today.shape == (subset, today.shape[1]) and isinstance(on_disk, FeatureFile)
        assert torch.equal(labels, images.labels) and torch.equal(disk_labels, labels) and classes == images.classes
        torch.testing.assert_close(streamed, today, rtol=1e-5, atol=1e-5)
        assert torch.equal(on_disk.tensor(), streamed)
        out[split] = (today, streamed, on_disk, labels)
    (train_today, train_new, train_file, train_y), (test_today, test_new, test_file, test_y) = out["train"], out["test"]
    today = knn_suite(train_today, train_y, test_today, test_y, 10)
    assert today["knn_top1_k20"] > 0.2  # random conv features on CIFAR-10: above chance (0.1)
    assert knn_suite(train_new, train_y, test_new, test_y, 10) == today
    assert knn_suite(train_file, train_y, test_file, test_y, 10, chunk=300, bank_chunk=512) == today
    settings = LinearSettings(epochs=5, seed=0)
    probe_today = linear_probe(train_today, train_y, test_today, test_y, 10, settings)
    probe_file = linear_probe(train_file, train_y, test_file, test_y, 10, settings, chunk=512)
    assert abs(probe_file["linear_top1"] - probe_today["linear_top1"]) <= 2 / 1000


def test_blocks_of_a_split_gathered_in_order_are_the_whole_split(tmp_path, data_root):
    """The sharded knn stage's extraction: n workers' contiguous blocks, concatenated, give the one-worker features."""
    from pipelines import stages
    from trainers.backbones import build_backbone
    from trainers.data.multicrop import block_indices

    assert [block_indices(10, None, (i, 3)).tolist() for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert block_indices(10, np.array([1, 4, 6, 9]), (1, 2)).tolist() == [6, 9]
    assert block_indices(10, None, None) is None
    from trainers.checkpoint import save_checkpoint
    from trainers.loop import CHECKPOINT_FORMAT

    torch.manual_seed(0)
    module, dim = build_backbone("resnet_mini", 8)
    path = save_checkpoint({"format": CHECKPOINT_FORMAT, "method": "none", "backbone": "resnet_mini", "image_size": 8,
                            "feature_dim": dim, "cifar_stem": None, "patch_size": None,
                            "state_dict": module.state_dict()}, tmp_path / "backbone.pt")
    whole = stages.features(str(path), "digits", "test", data_root, torch.device("cpu"), 64, log=lambda *_: None)
    blocks = [stages.feature_block(str(path), "digits", "test", (i, 3), data_root, torch.device("cpu"), 64,
                                   log=lambda *_: None) for i in range(3)]
    assert [len(b[1]) for b in blocks] == [150, 150, 150]
    gathered = stages.gather_blocks(blocks)
    assert torch.equal(gathered[1], whole[1]) and gathered[2] == whole[2]
    assert torch.allclose(gathered[0], whole[0].tensor() if hasattr(whole[0], "tensor") else whole[0], atol=1e-5)


def test_more_workers_than_images_leave_empty_blocks_out():
    from pipelines.stages import gather_blocks

    blocks = [(torch.ones(2, 3), torch.tensor([0, 1]), ["a", "b"]), (None, torch.empty(0, dtype=torch.long), [])]
    features, labels, classes = gather_blocks(blocks)
    assert features.shape == (2, 3) and labels.tolist() == [0, 1] and classes == ["a", "b"]


def test_the_knn_suite_from_bank_shards_is_the_suite_on_the_whole_bank():
    """The sharded knn stage: each worker keeps its block of the training features and returns only the top-k
    lists of every query within it (indices into its block); merged, they give knn_suite's numbers."""
    from trainers.evaluate import KNN_LARGEST, knn_suite_from_shards

    bank, bank_y = _clusters(1000, classes=4)
    queries, query_y = _clusters(300, classes=4, seed=1)
    whole = knn_suite(bank, bank_y, queries, query_y, 4)
    blocks = np.array_split(np.arange(1000), 3)  # uneven: 334, 333, 333
    parts = [(*knn_topk(queries, bank[b], KNN_LARGEST, normalize=True), bank_y[b]) for b in blocks]
    assert KNN_LARGEST == 200 and all(p[1].max() < len(b) for p, b in zip(parts, blocks))  # local indices
    assert knn_suite_from_shards(parts, query_y, 4) == whole
    assert 0.3 < whole["knn_top1_k20"] < 1.0  # not a trivial answer: the clusters overlap
    # a worker with an empty block (more workers than images) adds nothing
    empty = (torch.zeros(300, 0), torch.zeros(300, 0, dtype=torch.long), bank_y[:0])
    assert knn_suite_from_shards([parts[0], empty, parts[1], parts[2]], query_y, 4) == whole
