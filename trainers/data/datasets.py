"""Data set registry: a name becomes (images, labels, classes) for a split.

Names: ``cifar10``, ``tiny-imagenet``, ``fashion-mnist``, ``digits`` and ``imagefolder:<path>``.
Splits: ``train`` and ``test`` (Tiny-ImageNet's labelled ``val`` split serves as its test split).
Images come back as HxWx3 uint8 RGB arrays whatever the file's mode (``to_rgb``: 16-bit gray is
scaled, alpha is composited over white, CMYK and YCbCr are converted); grayscale sets are expanded
to 3 channels.
"""

from __future__ import annotations

import difflib
import functools
import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from trainers.errors import ConfigError, DataError, DataNotFoundError
from trainers.paths import default_data_root

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
DOWNLOAD_ENV = "SSLAB_DOWNLOAD"  # "0" forbids downloading official copies


# --------------------------------------------------------------------------- image sources
class ImageSource(Sequence):
    """Indexable images, each an HxWx3 uint8 RGB array."""

    fixed_size: tuple[int, int] | None = None  # (height, width) when known to be shared by all

    def size_of(self, index: int) -> tuple[int, int]:
        """(height, width) of one image, without decoding pixels where the format allows."""
        return tuple(self[index].shape[:2])


class ArrayImages(ImageSource):
    """Images held decoded in one array [N, H, W] (grayscale) or [N, H, W, 3]."""

    def __init__(self, array: np.ndarray):
        if array.dtype != np.uint8 or array.ndim not in (3, 4):
            raise DataError(f"expected uint8 images [N,H,W] or [N,H,W,3], got {array.dtype} {array.shape}")
        self.array = array
        self.fixed_size = tuple(array.shape[1:3])

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        image = self.array[index]
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        return np.ascontiguousarray(image)

    def size_of(self, index: int) -> tuple[int, int]:
        return self.fixed_size


# How files of every PIL mode become HxWx3 uint8 RGB (``to_rgb``). Transparent pixels are
# composited over ALPHA_BACKGROUND (white, as a viewer on a white page shows them); dropping the
# alpha instead would show whatever colour the transparent pixels happen to hold.
ALPHA_BACKGROUND = 255


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))


def _over_background(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``rgb * a + background * (1 - a)`` with 8-bit alpha, rounded to the nearest integer."""
    a = alpha.astype(np.uint32)[:, :, None]
    return ((rgb.astype(np.uint32) * a + ALPHA_BACKGROUND * (255 - a) + 127) // 255).astype(np.uint8)


def _from_16_bit(values: np.ndarray, name: str, mode: str) -> np.ndarray:
    """0..65535 -> 0..255 (v * 255 / 65535, rounded); ``convert("RGB")`` would clip them at 255."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(f"cannot read image {name}: mode {mode} pixels range over {values.min()}..{values.max()}, "
                        "outside the 16-bit range 0..65535 that integer images are read in; save it as an 8- or "
                        "16-bit image")
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: Image.Image, name: str) -> np.ndarray:
    """An opened image of any supported PIL mode as an HxWx3 uint8 RGB array.

    16-bit gray (I;16*, and I holding 0..65535) is scaled to 8 bits; 32-bit float (F) is read as
    intensity 0..1 (values outside are refused rather than guessed); CMYK uses
    R = (255 - C)(255 - K) / 255 (no ICC profile); alpha and palette or colour-key transparency are
    composited over ALPHA_BACKGROUND.
    """
    mode = image.mode
    if "transparency" in image.info and mode in ("L", "RGB", "P"):
        mode = "RGBA"  # a colour key or palette alpha (PNG tRNS, GIF): PIL turns it into an alpha channel
        image = image.convert("RGBA")
    if mode == "RGB":
        return np.asarray(image)
    if mode == "L":
        return _gray3(np.asarray(image))
    if mode == "1":
        return _gray3(np.asarray(image.convert("L")))
    if mode == "P":
        return np.asarray(image.convert("RGB"))
    if mode in ("PA", "RGBa"):
        image, mode = image.convert("RGBA"), "RGBA"
    if mode == "RGBA":
        pixels = np.asarray(image)
        return _over_background(pixels[:, :, :3], pixels[:, :, 3])
    if mode == "LA":
        pixels = np.asarray(image)
        return _over_background(_gray3(pixels[:, :, 0]), pixels[:, :, 1])
    if mode == "RGBX":
        return np.ascontiguousarray(np.asarray(image)[:, :, :3])
    if mode.startswith("I;16") or mode == "I":
        return _gray3(_from_16_bit(np.asarray(image), name, mode))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
            raise DataError(f"cannot read image {name}: 32-bit float pixels range over "
                            f"{np.nanmin(values):g}..{np.nanmax(values):g}, outside 0..1 (float images are read "
                            "as intensity 0..1); rescale it to 0..1 or save it as an 8-bit image")
        return _gray3(np.rint(values * 255.0).astype(np.uint8))
    if mode == "CMYK":
        cmyk = np.asarray(image).astype(np.uint32)
        return (((255 - cmyk[:, :, :3]) * (255 - cmyk[:, :, 3:]) + 127) // 255).astype(np.uint8)
    if mode in ("YCbCr", "HSV"):
        return np.asarray(image.convert("RGB"))  # PIL's JFIF (BT.601 full range) and HSV formulas
    raise DataError(f"cannot read image {name}: PIL mode {mode} is not supported (use RGB, RGBA, L, LA, P, "
                    "1, CMYK, YCbCr, 16-bit gray or 0..1 float); convert that file to RGB and run again")


def _decode(data: bytes | Path, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return to_rgb(image, name)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {name}: {exc.__class__.__name__}: {exc}; "
                        "replace or delete that file and run again") from None


def _peek_size(data: bytes | Path, name: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            width, height = image.size
            return height, width
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read image {name}: {exc.__class__.__name__}: {exc}; "
                        "replace or delete that file and run again") from None


class EncodedImages(ImageSource):
    """Encoded image files held in memory (read from an archive), decoded on access."""

    def __init__(self, blobs: list[bytes], names: list[str], fixed_size=None):
        self.blobs, self.names, self.fixed_size = blobs, names, fixed_size

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, index: int) -> np.ndarray:
        return _decode(self.blobs[index], self.names[index])

    def size_of(self, index: int) -> tuple[int, int]:
        return _peek_size(self.blobs[index], self.names[index])


class FileImages(ImageSource):
    """Image files on disk, decoded on access."""

    def __init__(self, paths: list[Path], fixed_size=None):
        self.paths, self.fixed_size = paths, fixed_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return _decode(self.paths[index], str(self.paths[index]))

    def size_of(self, index: int) -> tuple[int, int]:
        return _peek_size(self.paths[index], str(self.paths[index]))


@dataclass
class DatasetSplit:
    """One split of a data set: ``images[i]`` has label ``labels[i]``, a class index into ``classes``."""

    dataset: str
    split: str
    images: ImageSource
    labels: np.ndarray
    classes: list[str]
    source: str  # where it was read from, for messages
    fingerprint: str  # changes whenever the source changes (cache key for prepared files)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def image_sizes(self) -> set[tuple[int, int]]:
        """The distinct (height, width) sizes in this split."""
        if self.images.fixed_size is not None:
            return {tuple(self.images.fixed_size)}
        return {self.images.size_of(i) for i in range(len(self.images))}


# --------------------------------------------------------------------------- helpers
def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def _dir_fingerprint(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _read_archive(path: str, fingerprint: str) -> dict[str, bytes]:
    """All image members of a .tar(.gz) archive, name -> bytes (cached per process)."""
    del fingerprint  # part of the cache key only: a changed file is read again
    members: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                name = member.name.lstrip("./")
                handle = archive.extractfile(member)
                if handle is not None:
                    members[name] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"archive {path} is corrupt or truncated ({exc.__class__.__name__}: {exc}); "
                        "fetch it again (see SHA256SUMS beside it)") from None
    return members


def _archive(path: Path) -> dict[str, bytes]:
    return _read_archive(str(path.resolve()), _file_fingerprint(path))


def _downloads_allowed() -> bool:
    return os.environ.get(DOWNLOAD_ENV, "1") != "0"


def _require_root(data_root: Path | None, what: str) -> Path:
    if data_root is None:
        raise DataNotFoundError(f"no data root for {what}: pass --data-root DIR or set SSLAB_DATA_ROOT")
    if not data_root.is_dir():
        raise DataNotFoundError(f"data root {data_root} does not exist: pass --data-root DIR pointing at "
                        f"the folder that holds {what}")
    return data_root


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    return split


# --------------------------------------------------------------------------- CIFAR-10
def _cifar_from_class_tree(files: dict[str, bytes] | dict[str, Path], split: str, source: str,
                           fingerprint: str) -> DatasetSplit:
    prefix = f"{split}/"
    entries = sorted(name for name in files if name.startswith(prefix)
                     and name.lower().endswith(IMAGE_EXTENSIONS) and name.count("/") == 2)
    if not entries:
        raise DataError(f"{source} has no {split}/<class>/*.jpg images: expected the CIFAR-10 "
                        "JPEG layout train/<class>/NNNN.jpg and test/<class>/NNNN.jpg")
    classes = sorted({name.split("/")[1] for name in entries})
    if len(classes) != 10:
        raise DataError(f"{source}: found {len(classes)} class folders under {split}/, CIFAR-10 has 10")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[name.split("/")[1]] for name in entries], dtype=np.int64)
    values = [files[name] for name in entries]
    if values and isinstance(values[0], bytes):
        images: ImageSource = EncodedImages(values, [f"{source}:{n}" for n in entries], fixed_size=(32, 32))
    else:
        images = FileImages(values, fixed_size=(32, 32))
    return DatasetSplit("cifar10", split, images, labels, classes, source, fingerprint)


def _cifar_from_batches(folder: Path, split: str) -> DatasetSplit:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    arrays, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 batch {path} is missing: expected the official "
                            "cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta)")
        try:
            with open(path, "rb") as handle:
                batch = pickle.load(handle, encoding="bytes")
            arrays.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(batch[b"labels"])
        except Exception as exc:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
            raise DataError(f"CIFAR-10 batch {path} is unreadable ({exc.__class__.__name__}): "
                            "fetch the official cifar-10-python.tar.gz again") from None
    meta_path = folder / "batches.meta"
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    if meta_path.is_file():
        with open(meta_path, "rb") as handle:
            classes = [c.decode() for c in pickle.load(handle, encoding="bytes")[b"label_names"]]
    images = np.concatenate(arrays).transpose(0, 2, 3, 1).copy()
    fingerprint = _dir_fingerprint([folder / n for n in names])
    return DatasetSplit("cifar10", split, ArrayImages(images), np.asarray(labels, dtype=np.int64),
                        classes, str(folder), fingerprint)


def load_cifar10(split: str, data_root: Path | None) -> DatasetSplit:
    looked = []
    if data_root is not None:
        archive = data_root / "cifar10-jpg.tar.gz"
        looked.append(str(archive))
        if archive.is_file():
            return _cifar_from_class_tree(_archive(archive), split, str(archive), _file_fingerprint(archive))
        for folder_name in ("cifar10-jpg", "cifar10"):
            folder = data_root / folder_name
            looked.append(f"{folder}/")
            if (folder / split).is_dir():
                files = {str(p.relative_to(folder)): p for p in sorted((folder / split).glob("*/*"))}
                return _cifar_from_class_tree(files, split, str(folder), _dir_fingerprint(sorted(files.values())))
        batches = data_root / "cifar-10-batches-py"
        looked.append(f"{batches}/")
        if batches.is_dir():
            return _cifar_from_batches(batches, split)
        if _downloads_allowed() and os.access(data_root, os.W_OK):
            try:
                import torchvision

                torchvision.datasets.CIFAR10(str(data_root), train=True, download=True)
                return _cifar_from_batches(batches, split)
            except Exception:  # noqa: BLE001 - offline: fall through to the error below
                pass
    raise DataNotFoundError("CIFAR-10 not found; looked for " + ", ".join(looked or ["a data root"]) +
                    ": pass --data-root DIR holding cifar10-jpg.tar.gz (or the official "
                    "cifar-10-batches-py folder), or run once with internet to download it")


# --------------------------------------------------------------------------- Tiny-ImageNet
def load_tiny_imagenet(split: str, data_root: Path | None) -> DatasetSplit:
    root = _require_root(data_root, "Tiny-ImageNet (tin200-*.tar.gz or tiny-imagenet-200/)")
    extracted = root / "tiny-imagenet-200"
    if extracted.is_dir():
        files: dict = {}
        for path in sorted(extracted.rglob("*")):
            if path.is_file():
                files[str(path.relative_to(extracted))] = path
        source, fingerprint = str(extracted), _dir_fingerprint(sorted(files.values()))
    else:
        name = "tin200-train-100perclass.tar.gz" if split == "train" else "tin200-val.tar.gz"
        archive = root / name
        if not archive.is_file():
            raise DataNotFoundError(f"Tiny-ImageNet {split} archive {archive} not found: pass --data-root DIR "
                            f"holding {name} (or an extracted tiny-imagenet-200/ folder)")
        files = _archive(archive)
        source, fingerprint = str(archive), _file_fingerprint(archive)

    def read_text(name: str) -> str | None:
        value = files.get(name)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else Path(value).read_text()

    if split == "train":
        entries = sorted((n for n in files if n.startswith("train/") and n.endswith(".JPEG")),
                         key=_natural_key)
        wnids = [n.split("/")[1] for n in entries]
    else:
        annotations = read_text("val/val_annotations.txt")
        if annotations is None:
            raise DataError(f"{source} has no val/val_annotations.txt: expected the official "
                            "Tiny-ImageNet val split (val/images/*.JPEG + val/val_annotations.txt)")
        by_file = dict(line.split("\t")[:2] for line in annotations.splitlines() if line.strip())
        entries = sorted((n for n in files if n.startswith("val/images/") and n.endswith(".JPEG")),
                         key=_natural_key)
        missing = [n for n in entries if n.rsplit("/", 1)[1] not in by_file]
        if missing:
            raise DataError(f"{source}: {len(missing)} val images have no line in val_annotations.txt "
                            f"(first: {missing[0]})")
        wnids = [by_file[n.rsplit("/", 1)[1]] for n in entries]
    if not entries:
        raise DataError(f"{source} holds no Tiny-ImageNet {split} images")
    wnids_text = read_text("wnids.txt")
    classes = sorted(set(wnids_text.split()) if wnids_text else set(wnids))
    index = {wnid: i for i, wnid in enumerate(classes)}
    labels = np.array([index[w] for w in wnids], dtype=np.int64)
    values = [files[n] for n in entries]
    if isinstance(values[0], bytes):
        images: ImageSource = EncodedImages(values, [f"{source}:{n}" for n in entries], fixed_size=(64, 64))
    else:
        images = FileImages(values, fixed_size=(64, 64))
    words = read_text("words.txt")
    extra = {}
    if words:
        names = dict(line.split("\t", 1) for line in words.splitlines() if "\t" in line)
        extra["class_names"] = [names.get(w, w) for w in classes]
    return DatasetSplit("tiny-imagenet", split, images, labels, classes, source, fingerprint, extra)


def _natural_key(name: str):


    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------- Fashion-MNIST
def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
        zero, dtype_code, dims = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
            raise ValueError(f"header says dtype 0x{dtype_code:02x} with {dims} dims")
        shape = struct.unpack(f">{dims}I", raw[4:4 + 4 * dims])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
        if data.size != int(np.prod(shape)):
            raise ValueError(f"{data.size} bytes of data for shape {shape}")
        return data.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error, zlib.error) as exc:
        raise DataError(f"{path} is not a valid IDX file ({exc}): fetch the official "
                        "Fashion-MNIST files again (apt-get install dataset-fashion-mnist)") from None


def load_fashion_mnist(split: str, data_root: Path | None) -> DatasetSplit:
    prefix = "train" if split == "train" else "t10k"
    candidates = []
    if data_root is not None:
        candidates += [data_root / "fashion-mnist", data_root / "FashionMNIST" / "raw"]
    candidates.append(FASHION_MNIST_SYSTEM_DIR)
    for folder in candidates:
        for suffix in (".gz", ""):
            images_path = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            labels_path = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images_path.is_file() and labels_path.is_file():
                images = _read_idx(images_path, 3)
                labels = _read_idx(labels_path, 1).astype(np.int64)
                if len(images) != len(labels):
                    raise DataError(f"{images_path} has {len(images)} images but {labels_path} "
                                    f"has {len(labels)} labels: the files do not belong together")
                return DatasetSplit("fashion-mnist", split, ArrayImages(np.ascontiguousarray(images)), labels,
                                    list(FASHION_MNIST_CLASSES), str(folder),
                                    _dir_fingerprint([images_path, labels_path]))
    raise DataNotFoundError("Fashion-MNIST not found in " + ", ".join(map(str, candidates)) +
                    ": run `apt-get install dataset-fashion-mnist` (or put the four IDX files in "
                    "<data-root>/fashion-mnist/)")


# --------------------------------------------------------------------------- digits
def load_digits(split: str, data_root: Path | None) -> DatasetSplit:
    del data_root  # bundled with scikit-learn
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    indices = np.arange(len(labels))
    train_idx, test_idx = train_test_split(indices, test_size=DIGITS_TEST_FRACTION, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    import sklearn

    return DatasetSplit("digits", split, ArrayImages(np.ascontiguousarray(images[chosen])), labels[chosen],
                        [str(d) for d in range(10)], "sklearn.datasets.load_digits",
                        f"sklearn-digits:{sklearn.__version__}:{DIGITS_TEST_FRACTION}:{DIGITS_SPLIT_SEED}")


# --------------------------------------------------------------------------- image folders
def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


HOLDOUT_FRACTION = 0.2  # the test split of a folder without one: this fraction of each class ...
HOLDOUT_SEED = 0  # ... drawn with this seed (both overridable: imagefolder:<path>?holdout=0.1,seed=3)


@dataclass(frozen=True)
class ImageFolderName:
    """``imagefolder:<path>[?holdout=F,seed=S]`` read apart: the options only matter for a folder without a
    test split, whose test split is then a stratified hold-out of its train images."""

    path: str
    holdout: float = HOLDOUT_FRACTION
    seed: int = HOLDOUT_SEED

    @classmethod
    def parse(cls, name: str) -> "ImageFolderName":
        body = name.split(":", 1)[1]
        path, _, query = body.partition("?")
        if not path.strip():  # an empty path would resolve to the current folder
            raise ConfigError(f"data set '{name}': imagefolder: needs a path: write imagefolder:<path>, "
                              "e.g. imagefolder:/data/pets")
        options = {}
        for item in filter(None, query.split(",")):
            key, _, value = item.partition("=")
            if key not in ("holdout", "seed") or not value:
                raise ConfigError(f"data set '{name}': unknown option '{item}': write "
                                  f"imagefolder:{path}?holdout=0.2,seed=0 (both optional)")
            try:
                options[key] = float(value) if key == "holdout" else int(value)
            except ValueError:
                raise ConfigError(f"data set '{name}': {key}={value} is not a number: write e.g. "
                                  f"imagefolder:{path}?holdout=0.2,seed=0") from None
        folder = cls(path, **options)
        if not 0 <= folder.seed < 2**32:
            raise ConfigError(f"data set '{name}': seed={folder.seed} must be a whole number in [0, 2**32), e.g. seed=0")
        if not 0 < folder.holdout < 1:
            raise ConfigError(f"data set '{name}': holdout={folder.holdout} must lie strictly between 0 and 1 "
                              "(the fraction of each class held out as the test split), e.g. holdout=0.2")
        return folder

    def canonical(self) -> str:
        """The name with its options in one spelling (none when they are the defaults): what names its files."""
        if (self.holdout, self.seed) == (HOLDOUT_FRACTION, HOLDOUT_SEED):
            return f"imagefolder:{self.path}"
        return f"imagefolder:{self.path}?holdout={self.holdout:g},seed={self.seed}"


def holdout_indices(count: int, fraction: float, seed: int, class_name: str) -> np.ndarray:
    """Which of a class's ``count`` images (in sorted path order) are held out: round(fraction * count),
    at least one and never all when the class has two or more; drawn from (seed, the class's name), so
    a class keeps its hold-out when other classes come or go."""
    if count < 2:
        return np.zeros(0, dtype=np.int64)
    held = min(max(int(round(fraction * count)), 1), count - 1)
    rng = np.random.default_rng([int(seed), zlib.crc32(class_name.encode())])
    return np.sort(rng.permutation(count)[:held])


def load_image_folder(path: str, split: str, holdout: float = HOLDOUT_FRACTION,
                      seed: int = HOLDOUT_SEED) -> DatasetSplit:
    """``<path>/train/<class>/*`` and ``<path>/test/<class>/*`` (or ``val/``), or one class tree ``<path>/<class>/*``.

    Both splits number their classes from ONE list: the sorted names of the class folders that hold
    at least one image in either split. So a class keeps its label when a folder is empty, missing
    from one split, or present in only one; an empty folder is no class.

    A folder without a test split (a plain class tree, or ``train/`` alone) gets one: a deterministic
    stratified hold-out of ``holdout`` of each class's images (``holdout_indices``); the train split is
    then the rest, and both record the hold-out in ``extra['holdout']``.
    """
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist: expected <path>/<class>/*.jpg "
                        "or <path>/train/<class>/*.jpg and <path>/test/<class>/*.jpg")
    if (root / "train").is_dir():
        test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
        folders = {"train": root / "train", "test": test}
    else:  # one class tree: it is the train split (a class may be called "test")
        folders = {"train": root, "test": None}
    if folders["test"] is None:
        return _held_out_split(root, folders["train"], split, holdout, seed)
    folder = folders[split]
    files = _class_files(folder)
    names = {name for name, found in files.items() if found}
    for other in (f for s, f in folders.items() if s != split and f is not None):
        # the other split only has to show one image per class folder
        names |= {p.name for p in _class_folders(other) if any(_is_image(f) for f in p.rglob("*"))}
    return _folder_split(root, folder, split, files, sorted(names))


def _class_files(folder: Path) -> dict[str, list[Path]]:
    if not _class_folders(folder):
        raise DataError(f"image folder {folder} has no class sub-folders: expected {folder}/<class>/<image>")
    return {p.name: sorted(f for f in p.rglob("*") if _is_image(f)) for p in _class_folders(folder)}


def _folder_split(root: Path, folder: Path, split: str, files: dict[str, list[Path]], classes: list[str],
                  extra: dict | None = None) -> DatasetSplit:
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for name in sorted(n for n in files if files[n]):
        paths += files[name]
        labels += [index[name]] * len(files[name])
    if not paths:
        raise DataError(f"image folder {folder} has class folders but no images "
                        f"({', '.join(IMAGE_EXTENSIONS)})")
    # the labels depend on the other split's classes too, so they are part of the fingerprint
    described = f"{_dir_fingerprint(paths)}\n{classes}" + (f"\n{sorted(extra['holdout'].items())}" if extra else "")
    fingerprint = hashlib.sha256(described.encode()).hexdigest()
    return DatasetSplit(f"imagefolder:{root}", split, FileImages(paths), np.asarray(labels, dtype=np.int64),
                        classes, str(folder), fingerprint, dict(extra or {}))


def _held_out_split(root: Path, folder: Path, split: str, holdout: float, seed: int) -> DatasetSplit:
    files = _class_files(folder)
    chosen = {}
    for name, found in files.items():
        held = set(holdout_indices(len(found), holdout, seed, name).tolist())
        chosen[name] = [f for i, f in enumerate(found) if (i in held) == (split == "test")]
    classes = sorted(name for name, found in files.items() if found)
    if split == "test" and not any(chosen.values()):
        raise DataError(f"image folder {folder} has no class with 2 or more images, so no test split can be held "
                        f"out: add images, or add {root}/test/<class>/ beside {root}/train/<class>/")
    extra = {"holdout": {"fraction": holdout, "seed": seed, "of": str(folder)}}
    return _folder_split(root, folder, split, chosen, classes, extra)


# --------------------------------------------------------------------------- registry
REGISTRY: dict[str, Callable[[str, Path | None], DatasetSplit]] = {
    "cifar10": load_cifar10,
    "tiny-imagenet": load_tiny_imagenet,
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits,
}


def dataset_names() -> list[str]:
    return list(REGISTRY) + ["imagefolder:<path>"]


def check_dataset_name(name: str) -> str:
    if name.startswith("imagefolder:"):
        ImageFolderName.parse(name)
        return name
    if name in REGISTRY:
        return name
    close = difflib.get_close_matches(name, list(REGISTRY), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"unknown data set '{name}': {hint}use one of {', '.join(dataset_names())}")


def load_split(name: str, split: str, data_root: str | Path | None = None) -> DatasetSplit:
    """Read one split of a registered data set. ``data_root`` defaults to ``default_data_root()``."""
    check_dataset_name(name)
    _check_split(split)
    root = Path(data_root).expanduser().resolve() if data_root is not None else default_data_root()
    if name.startswith("imagefolder:"):
        folder = ImageFolderName.parse(name)
        return load_image_folder(folder.path, split, folder.holdout, folder.seed)
    return REGISTRY[name](split, root)
