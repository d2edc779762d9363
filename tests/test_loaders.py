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


@pytest.mark.parametrize("kind", ["ffcv", "jpeg", "torch"])
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


# --------------------------------------------------------------------------- the jpeg loader (no ffcv)
def _assert_same_batches(a, b, count):
    """Both loaders give exactly the same uint8 canvases and labels for ``count`` batches."""
    batches_a, batches_b = _batches(a, count), _batches(b, count)
    assert len(batches_a) == len(batches_b) == count
    for (x, lx), (y, ly) in zip(batches_a, batches_b):
        assert x.dtype == y.dtype == torch.uint8 and lx.dtype == ly.dtype == torch.int64
        assert x.shape == y.shape and torch.equal(lx, ly)
        # libjpeg through torchvision and through PIL decode bit-identically (measured: max |diff| 0 over
        # 5,000 CIFAR-10 and 2,000 Tiny-ImageNet images, 4:2:0/4:2:2/4:4:4, progressive, gray)
        assert int((x.int() - y.int()).abs().max()) == 0


def test_jpeg_loader_matches_the_pil_path_on_cifar10(data_root):
    from trainers.data.jpeg_loader import JpegCanvasLoader

    split = load_split("cifar10", "train", data_root)
    for rank in (0, 1):
        jpeg = JpegCanvasLoader(split, 64, seed=5, rank=rank, world_size=2, num_workers=1)
        pil = TorchCanvasLoader(split, 64, seed=5, rank=rank, world_size=2, num_workers=0)
        assert len(jpeg) == len(pil) == 25_000 // 64 and jpeg.num_samples == 50_000
        _assert_same_batches(jpeg, pil, 2)
    # the same shared sharding: rank 1's first batch is exactly the images shard_indices picks
    first = _batches(JpegCanvasLoader(split, 64, seed=5, rank=1, world_size=2, num_workers=0), 1)[0]
    assert torch.equal(first[1], torch.as_tensor(split.labels[shard_indices(50_000, 0, 5, 1, 2)[:64]]))


def _jpeg_folder(root, data_root):
    """An image folder of real JPEG files from the shipped archives (32 px CIFAR-10, 64 px Tiny-ImageNet,
    gray ones among them), plus files only PIL reads the registry's way: PNG, gray PNG, CMYK JPEG."""
    import io

    from PIL import Image

    cifar = load_split("cifar10", "test", data_root).images.blobs
    tiny = load_split("tiny-imagenet", "test", data_root)
    gray = [i for i in range(400) if Image.open(io.BytesIO(tiny.images.blobs[i])).mode == "L"]
    assert gray, "Tiny-ImageNet val has gray JPEGs among its first 400"
    blobs = list(cifar[:20]) + list(tiny.images.blobs[:20]) + [tiny.images.blobs[gray[0]]]
    for i, blob in enumerate(blobs):
        target = root / "train" / f"class{i % 3}" / f"{i:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(blob)
    picture = Image.open(io.BytesIO(tiny.images.blobs[0]))
    picture.save(root / "train" / "class0" / "png.png")
    picture.convert("L").save(root / "train" / "class1" / "gray.png")
    picture.convert("CMYK").save(root / "train" / "class2" / "cmyk.jpg", quality=90)
    (root / "test" / "class0").mkdir(parents=True)  # a test split of its own: train/ is read whole
    (root / "test" / "class0" / "0.jpg").write_bytes(cifar[0])
    return f"imagefolder:{root}"


def test_jpeg_loader_matches_the_pil_path_on_an_image_folder(tmp_path, data_root, monkeypatch):
    from trainers.data import jpeg_loader
    from trainers.data.jpeg_loader import JpegCanvasLoader, plain_jpeg
    from trainers.errors import DataError

    name = _jpeg_folder(tmp_path, data_root)
    split = load_split(name, "train")
    sniffed = [plain_jpeg(p.read_bytes()) for p in split.images.paths]
    assert sniffed.count(False) == 3 and len(sniffed) == 44  # PNG, gray PNG and CMYK take the PIL path
    for rank in (0, 1):
        # canvas 48: the 32 px images are scaled up, the 64 px ones down (square_resize, as the torch path)
        jpeg = JpegCanvasLoader(split, 8, canvas_size=48, seed=3, rank=rank, world_size=2, num_workers=1)
        pil = TorchCanvasLoader(split, 8, canvas_size=48, seed=3, rank=rank, world_size=2, num_workers=0)
        assert len(jpeg) == len(pil) == 2
        _assert_same_batches(jpeg, pil, 2)
    # the whole folder once, unshuffled, every file visited: fallbacks included; the 41 JPEGs in one batched call
    calls = []
    decode = jpeg_loader.decode_jpegs
    monkeypatch.setattr(jpeg_loader, "decode_jpegs", lambda encoded, device: calls.append(len(encoded)) or
                        decode(encoded, device))
    everything = JpegCanvasLoader(split, 44, canvas_size=40, shuffle=False, num_workers=0)
    _assert_same_batches(everything, TorchCanvasLoader(split, 44, canvas_size=40, shuffle=False, num_workers=0), 1)
    assert calls == [41]
    with pytest.raises(DataError, match="mixed sizes"):  # the same canvas rule as the torch path
        JpegCanvasLoader(split, 8, num_workers=0)


def test_jpeg_loader_names_a_truncated_file(tmp_path, data_root):
    from trainers.data.jpeg_loader import JpegCanvasLoader
    from trainers.errors import DataError

    blobs = load_split("cifar10", "test", data_root).images.blobs
    for i in range(4):
        (tmp_path / "train" / "a").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / f"{i}.jpg").write_bytes(blobs[i] if i != 2 else blobs[i][: len(blobs[i]) // 2])
    (tmp_path / "test").mkdir()
    split = load_split(f"imagefolder:{tmp_path}", "train")
    loader = JpegCanvasLoader(split, 4, canvas_size=32, shuffle=False, num_workers=0)
    with pytest.raises(DataError, match=r"2\.jpg"):  # torchvision refuses it; PIL names the file
        next(iter(loader))


def test_jpeg_multicrop_views_equal_the_torch_path(tmp_path, data_root):
    def views(kind):
        loader = build_multicrop_loader("cifar10", "test", "2x32+4x16", "dino", 64, loader=kind, seed=9,
                                        data_root=data_root, cache_dir=tmp_path, num_workers=0, subset=256,
                                        rank=1, world_size=2)
        assert loader.kind == kind and loader.classes[0] == "airplane"
        batch = next(iter(loader))
        return batch.views, batch.labels

    (jpeg, jpeg_labels), (pil, pil_labels) = views("jpeg"), views("torch")
    assert len(jpeg) == 6 and torch.equal(jpeg_labels, pil_labels)
    assert all(torch.equal(a, b) for a, b in zip(jpeg, pil))


def test_auto_picks_ffcv_when_installed_else_jpeg(monkeypatch, data_root):
    from trainers.data import multicrop

    monkeypatch.setattr(multicrop, "ffcv_available", lambda: True)
    assert multicrop.auto_loader() == "ffcv"
    monkeypatch.setattr(multicrop, "ffcv_available", lambda: False)
    loader, kind = multicrop.build_canvas_loader("digits", "train", 16, loader="auto", num_workers=0,
                                                 data_root=data_root)
    assert kind == "jpeg" and type(loader).__name__ == "JpegCanvasLoader"
    assert next(iter(loader))[0].shape == (16, 8, 8, 3)
    monkeypatch.setattr(multicrop, "jpeg_decoder_available", lambda: False)
    assert multicrop.auto_loader() == "torch"
    with pytest.raises(ConfigError, match="jpeg"):
        multicrop.build_canvas_loader("digits", "train", 16, loader="png")


def test_a_loader_worker_keeps_a_dead_main_process_connection_error_to_itself():
    """After SIGTERM to the main process alone, a loader worker's fd-sharing thread (resource_sharer, which
    reports through sys.excepthook) fails to reach it: that is no error to print after the run's last line.
    Other errors, and any in the main thread, still print."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import sys, threading
from trainers.data.torch_loader import _quiet_side_threads
_quiet_side_threads(0)
def side(error):
    try:
        raise error
    except BaseException:
        sys.excepthook(*sys.exc_info())
for error in (ConnectionResetError("reset"), EOFError("eof"), ValueError("a real bug")):
    thread = threading.Thread(target=side, args=(error,))
    thread.start()
    thread.join()
side(ConnectionRefusedError("in the main thread"))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "ValueError: a real bug" in done.stderr and "ConnectionRefusedError: in the main thread" in done.stderr
    assert "reset" not in done.stderr and "eof" not in done.stderr
