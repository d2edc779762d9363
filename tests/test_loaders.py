import numpy as np
import pytest
import torch

from trainers.data.beton import FfcvCanvasLoader
from trainers.data.datasets import load_split
from trainers.data.multicrop import build_multicrop_loader
from trainers.data.sharding import shard_indices
from trainers.data.torch_loader import TorchCanvasLoader
from trainers.errors import ConfigError


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    shards = [shard_indices(1003, epoch=4, seed=1, rank=r, world_size=4) for r in range(4)]
    assert {len(s) for s in shards} == {250}
    merged = np.concatenate(shards)
    assert len(set(merged.tolist())) == 1000 and merged.max() < 1003
    assert not np.array_equal(shard_indices(1003, 5, 1, 0, 4), shards[0])  # a new order every epoch
    assert np.array_equal(shard_indices(10, 0, 1, 0, 1, shuffle=False), np.arange(10))
    with pytest.raises(ConfigError):
        shard_indices(10, 0, 0, rank=2, world_size=2)


def _batches(loader, count):
    out = []
    for i, (images, labels) in enumerate(loader):
        out.append((images.clone(), labels.clone()))
        if i + 1 == count:
            break
    return out


def test_ffcv_and_torch_paths_give_the_same_canvases(cifar_betons, data_root):
    split = load_split("cifar10", "train", data_root)
    ffcv = FfcvCanvasLoader(cifar_betons["train"], 64, shuffle=True, seed=5, rank=1, world_size=2, num_workers=2)
    torch_path = TorchCanvasLoader(split, 64, shuffle=True, seed=5, rank=1, world_size=2, num_workers=0)
    assert len(ffcv) == len(torch_path) == 25_000 // 64
    for (a, la), (b, lb) in zip(_batches(ffcv, 3), _batches(torch_path, 3)):
        assert a.dtype == b.dtype == torch.uint8 and tuple(a.shape) == (64, 32, 32, 3)
        assert torch.equal(a, b) and torch.equal(la, lb)
    # rank 1's first batch is exactly the images the shared sharding picks
    expected = shard_indices(50_000, 0, 5, 1, 2)[:64]
    assert torch.equal(_batches(FfcvCanvasLoader(cifar_betons["train"], 64, seed=5, rank=1, world_size=2,
                                                 num_workers=2), 1)[0][1], torch.as_tensor(split.labels[expected]))


def test_same_seed_same_batch_and_epochs_reshuffle(cifar_betons):
    def first_labels(seed, epoch=0):
        loader = FfcvCanvasLoader(cifar_betons["test"], 128, seed=seed, num_workers=2)
        loader.set_epoch(epoch)
        return _batches(loader, 1)[0]

    a, b, c = first_labels(3), first_labels(3), first_labels(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])
    assert not torch.equal(a[1], first_labels(3, epoch=1)[1])


@pytest.mark.parametrize("kind", ["ffcv", "torch"])
def test_multicrop_batches_are_reproducible(kind, tmp_path, data_root):
    def views(seed):
        loader = build_multicrop_loader("digits", "train", "2x16+4x8", "swav", 32, loader=kind, seed=seed,
                                        data_root=data_root, cache_dir=tmp_path, num_workers=0 if kind == "torch" else 1,
                                        log=lambda *_: None)
        batch = next(iter(loader))
        return [v.clone() for v in batch.views], batch.labels.clone()

    (first, labels), (second, labels2), (third, _) = views(1), views(1), views(2)
    assert len(first) == 6 and tuple(first[0].shape) == (32, 3, 16, 16) and tuple(first[2].shape) == (32, 3, 8, 8)
    assert all(torch.equal(x, y) for x, y in zip(first, second)) and torch.equal(labels, labels2)
    assert not torch.equal(first[0], third[0])


def test_both_paths_give_equally_distributed_crops(tmp_path, data_root):
    """Different seeds on each path (independent draws): view statistics agree within sampling error."""
    def statistics(kind, seed):
        loader = build_multicrop_loader("cifar10", "test", "2x32+4x16", "dino", 250, loader=kind, seed=seed,
                                        data_root=data_root, cache_dir=tmp_path, num_workers=2,
                                        log=lambda *_: None)
        means, stds = [], []
        for i, batch in enumerate(loader):
            for view in batch.views:
                means.append(view.mean(dim=(1, 2, 3)))
                stds.append(view.std(dim=(1, 2, 3)))
            if i == 7:
                break
        return torch.cat(means), torch.cat(stds)

    ffcv_mean, ffcv_std = statistics("ffcv", 11)
    torch_mean, torch_std = statistics("torch", 12)
    assert len(ffcv_mean) == len(torch_mean) == 12_000
    for a, b in ((ffcv_mean, torch_mean), (ffcv_std, torch_std)):
        error = float(torch.sqrt(a.var() / len(a) + b.var() / len(b)))
        assert abs(float(a.mean() - b.mean())) < 4 * error
        # and the spread matches (two-sample comparison of quantiles)
        qs = torch.tensor([0.1, 0.5, 0.9])
        assert torch.allclose(torch.quantile(a, qs), torch.quantile(b, qs), atol=0.05)
