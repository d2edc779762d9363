import numpy as np
import pytest
import torch
from PIL import Image

from trainers.data.beton import (FfcvCanvasLoader, PrepareSettings, beton_path, inspect_beton, prepare,
                                 prepare_split, read_meta)
from trainers.data.datasets import load_split
from trainers.errors import ConfigError, DataError

QUIET = dict(progress=False, log=lambda *_: None)


def _read_all(path, batch_size=1000):
    loader = FfcvCanvasLoader(path, batch_size, shuffle=False, drop_last=False, num_workers=2)
    images, labels = [], []
    for x, y in loader:
        images.append(x.clone())
        labels.append(y.clone())
    return torch.cat(images).numpy(), torch.cat(labels).numpy()


def test_cifar10_round_trip_is_exact(cifar_betons, data_root):
    for split, count in (("train", 50_000), ("test", 10_000)):
        info = inspect_beton(cifar_betons[split])
        assert info["count"] == count and info["image_size"] == (32, 32) and info["num_classes"] == 10
        assert info["meta"]["mode"] == "raw"
    images, labels = _read_all(cifar_betons["test"])
    source = load_split("cifar10", "test", data_root)
    assert images.shape == (10_000, 32, 32, 3) and images.dtype == np.uint8
    assert (labels == source.labels).all()
    expected = np.stack([source.images[i] for i in range(len(source))])
    assert np.array_equal(images, expected)  # raw mode keeps every pixel


def test_cifar10_train_round_trip_labels_and_pixels(cifar_betons, data_root):
    images, labels = _read_all(cifar_betons["train"], batch_size=5000)
    source = load_split("cifar10", "train", data_root)
    assert len(labels) == 50_000 and (labels == source.labels).all()
    for index in (0, 1, 12_345, 49_999):
        assert np.array_equal(images[index], source.images[index])


def test_up_to_date_file_is_not_written_again(tmp_path, data_root):
    messages = []
    path = prepare_split("digits", "train", tmp_path, data_root, progress=False, log=messages.append)
    stamp = path.stat().st_mtime_ns
    again = prepare_split("digits", "train", tmp_path, data_root, progress=False, log=messages.append)
    assert again == path and path.stat().st_mtime_ns == stamp
    assert messages[-1].startswith("up to date")
    # other settings -> rewritten; no temporary file left behind
    prepare_split("digits", "train", tmp_path, data_root, PrepareSettings(format="jpeg"), **QUIET)
    assert path.stat().st_mtime_ns != stamp and read_meta(path)["mode"] == "jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".digits-train.beton.lock", "digits-train.beton",
                                                           "digits-train.beton.json"]


def test_failed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    folder = tmp_path / "images"
    for name in ("a", "b"):
        (folder / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), i * 30, np.uint8)).save(folder / "train" / name / f"{i}.png")
    (folder / "train" / "b" / "9.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    with pytest.raises(DataError, match="9.png"):
        prepare_split(f"imagefolder:{folder}", "train", out, num_workers=1, **QUIET)
    beton = beton_path(out, f"imagefolder:{folder}", "train", PrepareSettings())
    assert [p.name for p in out.iterdir()] == [f".{beton.name}.lock"]  # only the lock file stays


def test_grayscale_becomes_rgb_and_jpeg_mode_is_close(tmp_path, data_root):
    paths = prepare("fashion-mnist", "test", tmp_path, data_root, **QUIET)
    images, labels = _read_all(paths["test"])
    source = load_split("fashion-mnist", "test", data_root)
    assert images.shape == (10_000, 28, 28, 3) and (labels == source.labels).all()
    assert np.array_equal(images[:50], np.stack([source.images[i] for i in range(50)]))
    jpeg = prepare("tiny-imagenet", "test", tmp_path, data_root, PrepareSettings(format="jpeg", jpeg_quality=95),
                   **QUIET)["test"]
    assert inspect_beton(jpeg)["meta"]["mode"] == "jpg"
    loader = FfcvCanvasLoader(jpeg, 64, shuffle=False, num_workers=2)
    batch = next(iter(loader))[0].numpy().astype(float)
    tin = load_split("tiny-imagenet", "test", data_root)
    reference = np.stack([tin.images[i] for i in range(64)]).astype(float)
    assert np.abs(batch - reference).mean() < 4.0  # re-encoded, so close rather than equal


def test_resize_makes_imagenet_like_canvases(tmp_path, data_root):
    path = prepare_split("digits", "test", tmp_path, data_root, PrepareSettings(resize=96), **QUIET)
    assert path.name == "digits-test-r96.beton"
    info = inspect_beton(path)
    assert info["image_size"] == (96, 96) and info["meta"]["mode"] == "jpg"


def test_mixed_sizes_need_a_canvas(tmp_path):
    folder = tmp_path / "mixed"
    for name in ["a", "b"]:
        (folder / "train" / name).mkdir(parents=True)
        for i, size in enumerate([(40, 30), (50, 70), (64, 64)]):
            pixels = np.random.default_rng(i).integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "train" / name / f"{i}.png")
    path = prepare_split(f"imagefolder:{folder}", "train", tmp_path / "out", **QUIET)
    assert inspect_beton(path)["image_size"] is None
    with pytest.raises(DataError, match="mixed sizes.*canvas"):
        FfcvCanvasLoader(path, 2)
    loader = FfcvCanvasLoader(path, 2, canvas_size=32, shuffle=False, num_workers=1)
    images, labels = next(iter(loader))
    assert tuple(images.shape) == (2, 32, 32, 3)


def test_corrupt_and_missing_beton(tmp_path, cifar_betons):
    with pytest.raises(DataError, match="not found.*sslab data prepare"):
        inspect_beton(tmp_path / "nope.beton")
    garbage = tmp_path / "garbage.beton"
    garbage.write_bytes(b"\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(DataError, match="corrupt or not a .beton"):
        FfcvCanvasLoader(garbage, 8)
    truncated = tmp_path / "cifar10-test.beton"
    truncated.write_bytes(cifar_betons["test"].read_bytes()[: 5_000_000])
    with pytest.raises(DataError, match="corrupt"):
        inspect_beton(truncated)
    # our own sidecar catches a file changed after it was written
    (tmp_path / "cifar10-test.beton.json").write_text(cifar_betons["test"].with_name("cifar10-test.beton.json").read_text())
    with pytest.raises(DataError, match="truncated or was replaced"):
        inspect_beton(truncated)


def test_bad_settings():
    with pytest.raises(ConfigError, match="format"):
        PrepareSettings(format="png").validate()
    with pytest.raises(ConfigError, match="quality"):
        PrepareSettings(jpeg_quality=0).validate()


def test_beton_names(tmp_path):
    assert beton_path(tmp_path, "cifar10", "train", PrepareSettings()).name == "cifar10-train.beton"
    name = beton_path(tmp_path, "imagefolder:/data/pets", "test", PrepareSettings()).name
    assert name.startswith("imagefolder-pets-") and name.endswith("-test.beton")


def test_image_that_fails_to_decode_inside_the_writer(tmp_path):
    """A truncated JPEG passes the header check and fails in ffcv's writer processes: clear error, no hang."""
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (folder / "train" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "train" / name / f"{i}.jpg")
    victim = folder / "train" / "b" / "3.jpg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # header intact, pixels cut
    out = tmp_path / "out"
    with pytest.raises(DataError, match="could not be read.*3.jpg.*truncated"):
        prepare_split(f"imagefolder:{folder}", "train", out, num_workers=2, **QUIET)
    beton = beton_path(out, f"imagefolder:{folder}", "train", PrepareSettings())
    assert [p.name for p in out.iterdir()] == [f".{beton.name}.lock"]  # no temp file, sidecar or error log


def test_ffcv_is_imported_without_numba_compiling_its_mode_table():
    """``import_ffcv`` gives ffcv 1.0.2 a plain dict for its image-mode table (the typed dict cost 3.8 s of
    numba compilation per process) with the same entries, and puts numba's ``Dict`` back afterwards. The
    JPEG and raw round trips in this file and test_image_modes.py read through that table."""
    import subprocess
    import sys

    probe = ("from trainers.data.ffcv_import import import_ffcv; import_ffcv(); import numba.typed, numba.typed.typeddict;"
             "import ffcv.fields.rgb_image as r; print(type(r.IMAGE_MODES).__name__, sorted(r.IMAGE_MODES.items()),"
             "numba.typed.Dict is numba.typed.typeddict.Dict)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["dict", "[('jpg',", "0),", "('raw',", "1)]", "True"], out
