import gzip
import shutil
from pathlib import Path
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from trainers.data.datasets import load_split
from trainers.errors import ConfigError, DataError


@pytest.mark.parametrize("name,train,test,classes,size", [
    ("cifar10", 50_000, 10_000, 10, (32, 32)),
    ("tiny-imagenet", 20_000, 10_000, 200, (64, 64)),
    ("fashion-mnist", 60_000, 10_000, 10, (28, 28)),
    ("digits", 1_347, 450, 10, (8, 8)),
])
def test_registry_counts_labels_and_shapes(name, train, test, classes, size, data_root):
    for split, count in (("train", train), ("test", test)):
        data = load_split(name, split, data_root)
        assert len(data) == count and len(data.images) == count
        assert data.num_classes == classes
        assert data.labels.min() == 0 and data.labels.max() == classes - 1
        image = data.images[count // 2]
        assert image.shape == (*size, 3) and image.dtype == np.uint8


def test_cifar10_is_balanced_and_alphabetical(data_root):
    data = load_split("cifar10", "train", data_root)
    assert data.classes[:3] == ["airplane", "automobile", "bird"]
    assert set(Counter(data.labels.tolist()).values()) == {5000}
    # channel means of the JPEG copy, as its README states (0.4913 0.4821 0.4465)
    sample = np.stack([data.images[i] for i in range(0, 50_000, 10)]).reshape(-1, 3) / 255.0
    assert np.allclose(sample.mean(0), [0.4913, 0.4821, 0.4465], atol=0.01)


def test_grayscale_sets_become_three_equal_channels(data_root):
    image = load_split("fashion-mnist", "test", data_root).images[0]
    assert image.shape == (28, 28, 3)
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    assert image.max() > 200  # real pixels, not zeros


def test_digits_split_is_stratified_and_fixed():
    first, again = load_split("digits", "test"), load_split("digits", "test")
    assert (first.labels == again.labels).all()
    counts = Counter(first.labels.tolist())
    assert min(counts.values()) >= 43 and max(counts.values()) <= 47  # 25% of ~180 per class
    train = load_split("digits", "train")
    assert train.images[0].max() == 255 or train.images[0].max() > 150


def test_tiny_imagenet_val_labels_follow_annotations(data_root):
    data = load_split("tiny-imagenet", "test", data_root)
    # val_0.JPEG is n03444034 in the official annotations
    assert data.classes[data.labels[0]] == "n03444034"
    assert set(Counter(data.labels.tolist()).values()) == {50}


def test_unknown_dataset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        load_split("cifar", "train")


def test_missing_archive_names_the_path(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "cifar10-jpg.tar.gz")):
        load_split("cifar10", "train", tmp_path)
    with pytest.raises(DataError, match="tin200-val.tar.gz"):
        load_split("tiny-imagenet", "test", tmp_path)


def test_corrupt_archive_is_reported(tmp_path, data_root):
    broken = tmp_path / "cifar10-jpg.tar.gz"
    with open(data_root / "cifar10-jpg.tar.gz", "rb") as src:
        broken.write_bytes(src.read(200_000))  # truncated download
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_split("cifar10", "train", tmp_path)


def test_corrupt_idx_file_is_reported(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(folder / f"{stem}.gz", "wb") as handle:
            handle.write(b"\x00\x00\x08\x03not an idx file")
    with pytest.raises(DataError, match="not a valid IDX file"):
        load_split("fashion-mnist", "test", tmp_path)


def _make_folder(root, sizes=((20, 24),), per_class=3):
    for label, name in enumerate(["cat", "dog"]):
        (root / "train" / name).mkdir(parents=True)
        (root / "test" / name).mkdir(parents=True)
        for i in range(per_class):
            size = sizes[i % len(sizes)]
            pixels = np.full((*size, 3), 40 + 100 * label + i, dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
            Image.fromarray(pixels).save(root / "test" / name / f"{i}.png")


def test_image_folder(tmp_path):
    _make_folder(tmp_path)
    data = load_split(f"imagefolder:{tmp_path}", "train")
    assert data.classes == ["cat", "dog"] and len(data) == 6
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[4][0, 0].tolist() == [141, 141, 141]


def test_image_folder_without_test_split_holds_out_its_train_folder(tmp_path):
    _make_folder(tmp_path)
    shutil.rmtree(tmp_path / "test")
    train, test = load_split(f"imagefolder:{tmp_path}", "train"), load_split(f"imagefolder:{tmp_path}", "test")
    assert len(train) == 4 and len(test) == 2 and test.labels.tolist() == [0, 1]  # round(0.2 * 3) = 1 per class
    assert test.source == str(tmp_path / "train") and test.extra["holdout"]["of"] == str(tmp_path / "train")


def test_unreadable_image_names_the_file(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = load_split(f"imagefolder:{tmp_path}", "train")
    index = [str(p) for p in data.images.paths].index(str(bad))
    with pytest.raises(DataError, match="broken.jpg"):
        data.images[index]


def _cifar_folder(root, data_root, layout, per_class=3):
    """Real CIFAR-10 test images as PNG files: ``layout`` maps split -> {class folder: number of images}."""
    cifar = load_split("cifar10", "test", data_root)
    for split, folders in layout.items():
        for name, count in folders.items():
            (root / split / name).mkdir(parents=True)
            picks = np.flatnonzero(cifar.labels == cifar.classes.index(name))[:count] if count else []
            for i in picks:
                Image.fromarray(cifar.images[int(i)]).save(root / split / name / f"{i}.png")
    return cifar


def test_image_folder_splits_share_one_class_list(tmp_path, data_root):
    """An empty folder (in train only, in test only) and a class missing from one split shift no label."""
    layout = {"train": {"aaa-empty": 0, "airplane": 3, "automobile": 3, "bird": 3, "cat": 3},
              "test": {"airplane": 3, "automobile": 3, "apple-empty": 0, "bird": 3, "deer": 3}}
    _cifar_folder(tmp_path, data_root, layout)
    train = load_split(f"imagefolder:{tmp_path}", "train")
    test = load_split(f"imagefolder:{tmp_path}", "test")
    expected = ["airplane", "automobile", "bird", "cat", "deer"]  # with images somewhere; empty folders left out
    assert train.classes == expected and test.classes == expected
    assert train.num_classes == test.num_classes == 5
    for data, count in ((train, 12), (test, 12)):
        assert len(data) == count
        folders = [p.parent.name for p in data.images.paths]
        assert [data.classes[label] for label in data.labels] == folders  # each label names its own folder
    assert sorted(set(train.labels.tolist())) == [0, 1, 2, 3] and sorted(set(test.labels.tolist())) == [0, 1, 2, 4]
    # the symptom: a 1-nearest-neighbour on pixels finds each test image's identical train copy,
    # so every test image of a class both splits share gets its label back (it got 0% before)
    train_pixels = np.stack([train.images[i] for i in range(len(train))]).reshape(len(train), -1).astype(float)
    shared = [i for i in range(len(test)) if test.classes[test.labels[i]] in layout["train"]]
    for i in shared:
        distance = ((train_pixels - test.images[i].reshape(-1).astype(float)) ** 2).sum(1)
        assert distance.min() == 0 and train.labels[distance.argmin()] == test.labels[i]
    assert len(shared) == 9


def test_image_folder_labels_follow_the_other_split(tmp_path, data_root):
    """A class that appears only in test renumbers train: the train fingerprint changes with it."""
    _cifar_folder(tmp_path, data_root, {"train": {"bird": 2, "cat": 2}, "test": {"bird": 2, "cat": 2}})
    before = load_split(f"imagefolder:{tmp_path}", "train")
    _cifar_folder(tmp_path, data_root, {"test": {"airplane": 1}})
    after = load_split(f"imagefolder:{tmp_path}", "train")
    assert before.classes == ["bird", "cat"] and after.classes == ["airplane", "bird", "cat"]
    assert before.labels.tolist() == [0, 0, 1, 1] and after.labels.tolist() == [1, 1, 2, 2]
    assert before.fingerprint != after.fingerprint  # a prepared .beton of train is written again
    (tmp_path / "test" / "zebra").mkdir()  # an empty folder changes nothing
    assert load_split(f"imagefolder:{tmp_path}", "train").fingerprint == after.fingerprint


# --------------------------------------------------------------------------- a plain class tree gets a test split
def _plain_cifar_tree(root, data_root, per_class=(7, 5, 1, 0)):
    """Real CIFAR-10 test images as JPEG files in a plain <class>/* tree (no train/ or test/)."""
    cifar = load_split("cifar10", "test", data_root)
    names = ["airplane", "bird", "cat", "deer"]
    for name, count in zip(names, per_class):
        (root / name).mkdir(parents=True)
        picks = np.flatnonzero(cifar.labels == cifar.classes.index(name))[:count]
        for i in picks:
            Image.fromarray(cifar.images[int(i)]).save(root / name / f"{i}.jpg", quality=95)
    return root


def test_plain_tree_holds_out_a_stratified_deterministic_test_split(tmp_path, data_root):
    root = _plain_cifar_tree(tmp_path / "pets", data_root)
    name = f"imagefolder:{root}"
    train, test = load_split(name, "train"), load_split(name, "test")
    assert train.classes == test.classes == ["airplane", "bird", "cat"]  # deer is empty: no class
    # round(0.2 * n), at least 1 and never all for n >= 2; a lone image stays in train
    assert np.bincount(test.labels, minlength=3).tolist() == [1, 1, 0]
    assert np.bincount(train.labels, minlength=3).tolist() == [6, 4, 1]
    train_files, test_files = set(map(str, train.images.paths)), set(map(str, test.images.paths))
    assert not train_files & test_files and len(train_files | test_files) == 13
    assert all(Path(p).parent.name == test.classes[label] for p, label in zip(test.images.paths, test.labels))
    assert train.extra["holdout"] == test.extra["holdout"] == {"fraction": 0.2, "seed": 0, "of": str(root)}
    again = load_split(name, "test")  # the same folder gives the same split
    assert list(map(str, again.images.paths)) == list(map(str, test.images.paths))
    assert again.fingerprint == test.fingerprint
    # the fraction and the seed choose it: more held out, other files, other fingerprints
    half = load_split(f"{name}?holdout=0.5", "test")
    assert np.bincount(half.labels, minlength=3).tolist() == [4, 2, 0] and half.fingerprint != test.fingerprint
    draws = {tuple(map(str, load_split(f"{name}?holdout=0.5,seed={seed}", "test").images.paths)) for seed in range(6)}
    assert len(draws) > 1
    # a class keeps its hold-out when another class comes or goes (the draw is seeded by its name)
    (root / "zebra").mkdir()
    Image.new("RGB", (32, 32)).save(root / "zebra" / "z0.jpg")
    Image.new("RGB", (32, 32)).save(root / "zebra" / "z1.jpg")
    grown = load_split(name, "test")
    kept = [str(p) for p in grown.images.paths if Path(p).parent.name != "zebra"]
    assert kept == list(map(str, test.images.paths)) and grown.classes[-1] == "zebra"


def test_holdout_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="holdout=0.0 must lie strictly between 0 and 1"):
        load_split(f"imagefolder:{tmp_path}?holdout=0", "test")
    with pytest.raises(ConfigError, match="seed=x is not a number"):
        load_split(f"imagefolder:{tmp_path}?seed=x", "test")
    with pytest.raises(ConfigError, match="unknown option 'split=3'"):
        load_split(f"imagefolder:{tmp_path}?split=3", "test")
