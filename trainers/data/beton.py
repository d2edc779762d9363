"""FFCV ``.beton`` files: writing them from the registry, checking them, reading canvases back.

A file holds an RGB ``image`` field and an int ``label`` field. Small images (max side <= 64 px by
default) are stored as raw pixels, larger ones as JPEG. Files are written under a temporary name
and renamed when complete; a JSON sidecar (``<file>.json``) records the source fingerprint and the
settings, so an up-to-date file is never written twice.

Each output file has its own hidden lock file (``.<file>.lock``, see trainers/locks.py): one
process writes it while the others wait, the lock dies with its holder (SIGKILL included) and the
writer processes die with their parent, so a killed run leaves only temporary files, which the next
writer removes. A full disk or a read-only folder is a StorageError (exit 4) that names the path and
the free space; nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import hashlib
import json
import os
import queue
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainers.data.datasets import DatasetSplit, ImageFolderName, check_dataset_name, load_split
from trainers.data.ffcv_import import import_ffcv
from trainers.data.sharding import check_rank, shard_indices
from trainers.checkpoint import StorageError
from trainers.checkpoint import WRONG_KIND_ERRNOS, wrong_kind_error
from trainers.errors import ConfigError, DataError, DataNotFoundError
from trainers.locks import die_with_parent, hold

FORMAT_VERSION = 2  # bump when the written content changes for the same settings (2: to_rgb for all PIL modes)
FORMATS = ("auto", "raw", "jpeg")


@dataclass(frozen=True)
class PrepareSettings:
    format: str = "auto"  # raw pixels, JPEG, or auto: raw when the largest side <= raw_max_side
    raw_max_side: int = 64
    max_side: int = 512  # larger images are scaled down to this side
    jpeg_quality: int = 90
    resize: int | None = None  # square-resize every image (shorter side, then centre crop) first

    def validate(self) -> "PrepareSettings":
        if self.format not in FORMATS:
            raise ConfigError(f"unknown image format '{self.format}': use one of {', '.join(FORMATS)}")
        if self.max_side <= 0 or self.raw_max_side <= 0:
            raise ConfigError("max side and raw max side must be positive numbers of pixels")
        if not (1 <= self.jpeg_quality <= 100):
            raise ConfigError(f"JPEG quality {self.jpeg_quality} must lie in 1..100")
        if self.resize is not None and self.resize <= 0:
            raise ConfigError(f"resize {self.resize} must be a positive number of pixels")
        return self


def beton_path(out_dir: str | Path, dataset: str, split: str, settings: PrepareSettings) -> Path:
    """``<out>/<dataset>-<split>[-r<resize>].beton``; an image folder is named by its folder and a hash."""
    name = dataset
    if dataset.startswith("imagefolder:"):
        folder = ImageFolderName.parse(dataset)
        body = folder.canonical().split(":", 1)[1]  # the path and its hold-out options (one spelling), if any
        name = f"imagefolder-{Path(folder.path).name}-{hashlib.sha1(body.encode()).hexdigest()[:8]}"
    suffix = f"-r{settings.resize}" if settings.resize else ""
    return Path(out_dir).expanduser().resolve() / f"{name}-{split}{suffix}.beton"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _cache_key(split: DatasetSplit, settings: PrepareSettings) -> str:
    text = json.dumps({"fingerprint": split.fingerprint, "settings": asdict(settings),
                       "version": FORMAT_VERSION, "count": len(split)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def staged_copy_usable(path: Path, settings: PrepareSettings) -> bool:
    """A complete file (size as its sidecar says) written by this format version with these settings."""
    meta = read_meta(path)
    return bool(meta and path.is_file() and path.stat().st_size == meta.get("bytes")
                and meta.get("version", 1) == FORMAT_VERSION and meta.get("settings") == asdict(settings))


def read_meta(path: str | Path) -> dict | None:
    meta = _meta_path(Path(path))
    if not meta.is_file():
        return None
    try:
        return json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None


class _WriterView:
    """What ffcv's writer iterates: (HxWx3 uint8 image, label), resized when asked.

    An unreadable image is written as a black placeholder and its error appended to ``error_log``,
    so that one run counts them all; the caller checks that file afterwards and throws the whole
    output away.
    """

    def __init__(self, split: DatasetSplit, resize: int | None, error_log: Path):
        self.split, self.resize, self.error_log = split, resize, error_log

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        try:
            image = self.split.images[index]
        except Exception as exc:  # noqa: BLE001 - reported by the parent process, see class docstring
            with open(self.error_log, "a") as log:
                log.write(f"{exc}\n".replace("\n", " ").strip() + "\n")
            side = self.resize or 8
            try:
                height, width = self.split.images.size_of(index) if not self.resize else (side, side)
            except Exception:  # noqa: BLE001
                height, width = side, side
            return np.zeros((height, width, 3), np.uint8), int(self.split.labels[index])
        if self.resize is not None and image.shape[:2] != (self.resize, self.resize):
            image = square_resize(image, self.resize)
        return image, int(self.split.labels[index])


def square_resize(image: np.ndarray, side: int) -> np.ndarray:
    """Centre-crop to a square (the shorter side) and resize to ``side`` (bilinear, antialiased)."""
    height, width = image.shape[:2]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    pil = Image.fromarray(image[top:top + short, left:left + short])
    if short != side:
        pil = pil.resize((side, side), Image.BILINEAR)
    return np.asarray(pil)


def _scaled(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    if max(size) <= max_side:
        return size
    scale = max_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _choose_mode(split: DatasetSplit, settings: PrepareSettings):
    """(write mode, the shared (H, W) or None, the smallest stored (H, W)), sizes after ``max_side``."""
    if settings.resize is not None:
        sizes = {(settings.resize, settings.resize)}
    else:
        sizes = split.image_sizes()
    fixed = _scaled(next(iter(sizes)), settings.max_side) if len(sizes) == 1 else None
    smallest = _scaled(min(sizes, key=lambda size: size[0] * size[1]), settings.max_side)
    largest = max(max(s) for s in sizes)
    if settings.format == "raw":
        return "raw", fixed, smallest
    if settings.format == "jpeg":
        return "jpg", fixed, smallest
    return ("raw" if largest <= settings.raw_max_side else "jpg"), fixed, smallest


# --------------------------------------------------------------------------- writing
# what an earlier writer of <file> leaves when it is killed: its temp file and error log, the sidecar's
# temp file, and the temp files of a fetch (orchestrator/staging.py); all end in -<pid>
LEFTOVER_SUFFIXES = (".tmp-", ".errors-", ".json.tmp-", ".fetch-", ".json.fetch-")
_ELSEWHERE = "write elsewhere (--out DIR for `sslab data prepare`, data.cache_dir in a config), then run again"


def lock_path(path: str | Path) -> Path:
    """The hidden lock file of one output file: whoever holds it may write the file (and its sidecar)."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def remove_leftovers(path: str | Path, log=print) -> list[Path]:
    """Remove what a killed writer of ``path`` left; call it only while holding ``lock_path(path)``.

    Only the lock holder writes these files, so while one holds the lock any that exist belong to a
    writer that died."""
    path = Path(path)
    found = sorted({Path(p) for suffix in LEFTOVER_SUFFIXES
                    for p in glob.glob(glob.escape(str(path.parent / f".{path.name}{suffix}")) + "*")})
    removed = []
    for leftover in found:
        try:
            size = leftover.stat().st_size
            leftover.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log(f"warning: cannot remove {leftover}, left by an earlier run that did not finish: {exc.strerror}")
            continue
        removed.append((leftover, size))
    if removed:
        log(f"removed {len(removed)} file(s) left by an earlier run that did not finish: " +
            ", ".join(f"{p.name} ({size / 2**20:.1f} MiB)" for p, size in removed))
    return [p for p, _ in removed]


def _free_space(path: Path) -> str:
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    if folder is None:
        return "folder missing"
    free = shutil.disk_usage(folder).free
    return f"{free / 2**30:.2f} GiB free" if free >= 2**30 else f"{free / 2**20:.1f} MiB free"


def _storage_error(path: Path, reason: str, denied: bool = False) -> StorageError:
    """One line: the file, why it cannot be written, the free space where it was going, what to do."""
    reason = " ".join(str(reason).split())
    fix = "make that folder writable or " if denied else "free space there or "
    return StorageError(f"cannot write .beton file {path}: {reason} ({_free_space(path.parent)} on that file "
                        f"system); {fix}{_ELSEWHERE}")


def _os_storage_error(path: Path, exc: OSError, tmp: Path | None = None):
    if exc.errno in WRONG_KIND_ERRNOS:  # a file where the output folder should be: the option is wrong
        return wrong_kind_error(path.parent, exc, "the .beton folder (--out, data.cache_dir)")
    reason = exc.strerror or str(exc)
    if exc.filename and str(exc.filename) not in (str(tmp), str(path), str(path.parent), str(lock_path(path))):
        reason += f" (on {exc.filename})"
    return _storage_error(path, reason, denied=exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM))


def _estimate_bytes(count: int, mode: str, smallest: tuple[int, int], page_size: int) -> int:
    """A low estimate of the file's size, to refuse a write that cannot fit before it starts.

    Raw pixels take H*W*3 bytes an image (of the smallest image, when sizes differ); JPEG is guessed
    at a twentieth of that, low on purpose: a write that fails anyway is caught as it happens. ffcv
    writes whole pages, after a first one that holds the header and the per-image metadata."""
    height, width = smallest
    per_image = height * width * 3 if mode == "raw" else height * width * 3 // 20
    return page_size + -(-count * per_image // page_size) * page_size + count * 24  # + the allocation table


class _WriterFailed(Exception):
    """A writer process failed; ``error`` is what it raised, rebuilt in the parent."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


def _writer_process(parent_pid: int, failures, work_fn, *args) -> None:
    """Body of one ffcv writer process: dies with its parent; reports an exception instead of hanging it."""
    die_with_parent(parent_pid)  # a killed parent must not leave it writing (and spinning) forever
    try:
        work_fn(*args)
    except BaseException as exc:  # noqa: BLE001 - sent to the parent, which raises it
        error_number = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
        failures.put((exc.__class__.__name__, error_number, getattr(exc, "strerror", None),
                      getattr(exc, "filename", None), str(exc)[:500]))
        raise SystemExit(1) from None


def _writer_class():
    import_ffcv()
    from ffcv.writer import DatasetWriter

    class Writer(DatasetWriter):
        """ffcv 1.0.2's DatasetWriter, whose parent notices a failed or killed writer process.

        ffcv's own parent waits for a sample count that a dead worker never reaches, and the other
        workers spin forever waiting for that worker's page; this one stops them all and raises
        what the worker raised. Same steps as ``DatasetWriter._write_common`` otherwise."""

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            import multiprocessing

            from ffcv.memory_allocator import MemoryAllocator
            from tqdm import tqdm

            self.num_samples = num_samples
            self.metadata_sm = None
            processes, progress, failed = [], None, True
            workqueue, allocations_queue = multiprocessing.Queue(), multiprocessing.Queue()
            failures = multiprocessing.SimpleQueue()
            try:
                self.prepare()
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)
                done_number = multiprocessing.Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                worker_args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                               done_number, allocations_queue, *extra_worker_args)
                processes = [multiprocessing.Process(target=_writer_process,
                                                     args=(os.getpid(), failures, work_fn, *worker_args))
                             for _ in range(self.num_workers)]
                for process in processes:
                    process.start()
                progress = tqdm(total=num_samples)
                previous = 0
                while previous < num_samples:
                    value = done_number.value
                    progress.update(value - previous)
                    previous = value
                    self._check(processes, failures)
                    time.sleep(0.1)
                allocations = []
                for _ in processes:  # the last pages are written after the count is complete
                    while True:
                        try:
                            allocations.extend(allocations_queue.get(timeout=0.1))
                            break
                        except queue.Empty:
                            self._check(processes, failures)
                for process in processes:
                    process.join()
                self._check(processes, failures)
                self.finalize(allocations)
                failed = False
            finally:
                if progress is not None:
                    progress.close()
                for process in processes:
                    if process.pid is not None and process.is_alive():
                        process.terminate()  # the others may be spinning, waiting for a dead one's page
                for process in processes:
                    if process.pid is not None:
                        process.join()
                if failed:  # undelivered work must not keep this process from exiting
                    workqueue.cancel_join_thread()
                    allocations_queue.cancel_join_thread()
                if self.metadata_sm is not None and not isinstance(self.metadata_sm, int):
                    self.metadata_sm.close()
                    self.metadata_sm.unlink()

        @staticmethod
        def _check(processes, failures) -> None:
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if not dead:
                return
            if not failures.empty():
                name, error_number, strerror, filename, text = failures.get()
                if error_number is not None:
                    raise _WriterFailed(OSError(error_number, strerror, filename))
                raise _WriterFailed(RuntimeError(f"{name}: {text}"))
            code = dead[0].exitcode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            raise _WriterFailed(RuntimeError(f"ffcv writer process {dead[0].pid} died ({how})"))

    return Writer


def max_workers() -> int:
    """More writer/loader processes than this is a typo, not a setting (each is a process with its own memory)."""
    return max(64, 4 * (os.cpu_count() or 1))


def check_num_workers(num_workers, what: str = "--writers", default: str = "0 or unset: min(8, cores)") -> int | None:
    """None, 0..max_workers() (0 keeps meaning the default for the writer)."""
    if num_workers is None:
        return None
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"{what} {num_workers} must be a whole number >= 0 ({default})")
    if num_workers > max_workers():
        raise ConfigError(f"{what} {num_workers} is more than the limit of {max_workers()} (64 or 4 per core, "
                          f"whichever is larger; this machine has {os.cpu_count()} cores): pass a smaller number")
    return num_workers


def check_splits_exist(dataset: str, splits) -> None:
    """An image folder's splits are listed (not decoded) before any file is written, so what is wrong
    with any of them (no class folders, no images, nothing to hold out) stops the run first."""
    if not str(dataset).startswith("imagefolder:") or len(tuple(splits)) < 2:
        return
    try:
        for split in splits:
            load_split(dataset, split)
    except DataNotFoundError:
        return  # prepare_split says what is missing, or uses a staged copy


def prepare_split(dataset: str, split: str, out_dir: str | Path, data_root=None,
                  settings: PrepareSettings = PrepareSettings(), num_workers: int | None = None,
                  force: bool = False, progress: bool = True, log=print) -> Path:
    """Write (or find up to date) the ``.beton`` of one split; returns its path."""
    settings.validate()
    check_num_workers(num_workers)
    check_splits_exist(dataset, (split,))
    path = beton_path(out_dir, dataset, split, settings)
    try:
        source = load_split(dataset, split, data_root)
    except DataNotFoundError as missing:
        # a cluster node without the archives gets the file staged by the driver (orchestrator/staging.py)
        if staged_copy_usable(path, settings):
            log(f"using {path} as it is: the source data is not on this machine ({str(missing)[:80]}...)")
            return path
        raise
    # several workers of one node may ask at once: one writes, the others wait and find it up to date
    with contextlib.ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(hold(lock_path(path), wait=True, what=f"the output file {path}", log=log))
        except OSError as exc:  # read-only or not ours: an up-to-date file there is still usable
            if not force and _up_to_date(path, _cache_key(source, settings)):
                log(f"up to date: {path} (its folder is not writable: {exc.strerror or exc})")
                return path
            raise _os_storage_error(path, exc) from None
        remove_leftovers(path, log)
        return _prepare_locked(source, dataset, split, path, settings, num_workers, force, progress, log)


def _up_to_date(path: Path, key: str) -> dict | None:
    meta = read_meta(path)
    if meta and meta.get("key") == key and path.is_file() and path.stat().st_size == meta.get("bytes"):
        return meta
    return None


def _prepare_locked(source, dataset, split, path, settings, num_workers, force, progress, log) -> Path:
    key = _cache_key(source, settings)
    meta = _up_to_date(path, key)
    if not force and meta:
        log(f"up to date: {path} ({meta['count']:,} images)")
        return path
    mode, fixed, smallest = _choose_mode(source, settings)
    import_ffcv()
    from ffcv.fields import IntField, RGBImageField

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    error_log = path.with_name(f".{path.name}.errors-{os.getpid()}")
    meta_tmp = _meta_path(path).with_name(f".{_meta_path(path).name}.tmp-{os.getpid()}")
    workers = num_workers or max(1, min(8, os.cpu_count() or 1, len(source) // 2048))
    # pages must hold the largest sample (raw max_side^2 * 3 bytes); small pages keep small sets small
    largest = (settings.resize or settings.max_side) ** 2 * 3
    page_size = 1 << max(21, (largest + 4096).bit_length())
    need = _estimate_bytes(len(source), mode, smallest, page_size)
    free = shutil.disk_usage(path.parent).free
    if need > free:
        raise _storage_error(path, f"not enough space: {len(source):,} images need about {need / 2**20:.1f} MiB")
    log(f"writing {path} from {source.source}: {len(source):,} images, {mode} pixels")
    started = time.time()
    try:
        fields = {"image": RGBImageField(write_mode=mode, max_resolution=settings.max_side,
                                         jpeg_quality=settings.jpeg_quality),
                  "label": IntField()}
        writer = _writer_class()(str(tmp), fields, num_workers=workers, page_size=page_size)
        with contextlib.ExitStack() as stack:
            if not progress:  # ffcv's writer draws its own tqdm bar on stderr
                stack.enter_context(contextlib.redirect_stderr(stack.enter_context(open(os.devnull, "w"))))
            try:
                writer.from_indexed_dataset(_WriterView(source, settings.resize, error_log), chunksize=256)
            except _WriterFailed as failure:
                raise failure.error from None
        if error_log.exists():
            errors = error_log.read_text().splitlines()
            raise DataError(f"{len(errors)} image(s) could not be read, nothing written; first: {errors[0]}")
        with open(tmp, "rb+") as stream:  # a delayed write error (full disk, I/O) shows here, not later
            os.fsync(stream.fileno())
        _meta_path(path).unlink(missing_ok=True)  # the old sidecar must not vouch for a new file
        os.replace(tmp, path)
        meta = {"key": key, "version": FORMAT_VERSION, "dataset": dataset, "split": split, "count": len(source),
                "classes": source.classes, "num_classes": source.num_classes, "image_size": fixed,
                "mode": mode, "settings": asdict(settings), "source": source.source,
                "holdout": source.extra.get("holdout"),
                "bytes": path.stat().st_size, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.time() - started, 2)}
        try:
            meta_tmp.write_text(json.dumps(meta, indent=1))
            os.replace(meta_tmp, _meta_path(path))
        except BaseException:
            path.unlink(missing_ok=True)  # a file no sidecar vouches for would only be written again
            raise
    except OSError as exc:
        raise _os_storage_error(path, exc, tmp) from None
    finally:
        for leftover in (tmp, error_log, meta_tmp):
            leftover.unlink(missing_ok=True)
    log(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {meta['seconds']:.1f} s")
    return path


def prepare(dataset: str, splits: str, out_dir, data_root=None, settings=PrepareSettings(), **kwargs) -> dict:
    """``splits``: 'train', 'test' or 'all'. Returns {split: path}."""
    if splits not in ("train", "test", "all"):
        raise ConfigError(f"unknown split '{splits}': use train, test or all")
    wanted = {"all": ("train", "test")}.get(splits, (splits,))
    # every argument and every split is checked before the first file is written
    settings.validate()
    check_num_workers(kwargs.get("num_workers"))
    check_dataset_name(dataset)
    check_splits_exist(dataset, wanted)
    return {split: prepare_split(dataset, split, out_dir, data_root, settings, **kwargs) for split in wanted}


# --------------------------------------------------------------------------- reading
def inspect_beton(path: str | Path) -> dict:
    """Header facts of a .beton; a clear DataError if the file is missing, truncated or not a .beton."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f".beton file {path} not found: run `sslab data prepare` to write it")
    size = path.stat().st_size
    meta = read_meta(path)
    if meta is not None and meta.get("bytes") not in (None, size):
        raise DataError(f".beton file {path} is {size:,} bytes but was written as {meta['bytes']:,}: "
                        "it is truncated or was replaced; delete it and run `sslab data prepare` again")
    try:
        import_ffcv()
        from ffcv.reader import Reader

        reader = Reader(str(path))
        table = reader.alloc_table
        if reader.num_samples == 0:
            raise ValueError("it holds no samples")
        if len(table) and int((table["ptr"] + table["size"]).max()) > size:
            raise ValueError("its allocation table points past the end of the file")
        if not {"image", "label"} <= set(reader.handlers):
            raise ValueError(f"it has fields {list(reader.handlers)}, expected image and label")
        columns = {name: f"f{i}" for i, name in enumerate(reader.field_names)}
        image_meta = reader.metadata[columns["image"]]
        widths, heights = image_meta["width"], image_meta["height"]
        labels = np.asarray(reader.metadata[columns["label"]])
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the reader means an unusable file
        raise DataError(f".beton file {path} is corrupt or not a .beton ({exc.__class__.__name__}: {exc}); "
                        "delete it and run `sslab data prepare` again") from None
    fixed = (int(heights[0]), int(widths[0])) if (widths.min() == widths.max() and heights.min() == heights.max()) else None
    return {"count": int(reader.num_samples), "image_size": fixed,
            "max_side": int(max(widths.max(), heights.max())),
            # an image folder's split may lack the last classes: the sidecar knows the shared class list
            "num_classes": max(int(labels.max()) + 1, int((meta or {}).get("num_classes") or 0)), "meta": meta}


class _ShardOrder:
    """ffcv TraversalOrder stand-in: this rank's indices for an epoch (see sharding.py)."""

    def __init__(self, num_samples, seed, rank, world_size, shuffle, subset):
        self.args = (num_samples, seed, rank, world_size, shuffle, subset)

    def sample_order(self, epoch: int):
        num_samples, seed, rank, world_size, shuffle, subset = self.args
        return shard_indices(num_samples, epoch, seed, rank, world_size, shuffle, subset)


class FfcvCanvasLoader:
    """Decodes each image of a .beton once to a fixed canvas; yields (uint8 [B,H,W,3], int64 [B]) on ``device``.

    Distributed-aware without a process group: pass ``rank``/``world_size``. ``shuffle`` draws a new
    seeded order every epoch. Batches live in buffers that ffcv reuses: consume (or clone) each
    before asking for the next.
    """

    def __init__(self, path: str | Path, batch_size: int, device="cpu", canvas_size: int | None = None,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, drop_last: bool = True, batches_ahead: int = 3,
                 indices=None):
        import_ffcv()
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor

        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be positive")
        check_rank(rank, world_size)
        info = inspect_beton(path)
        self.path, self.info = Path(path), info
        self.device = torch.device(device)
        if canvas_size is None:
            if info["image_size"] is None:
                raise DataError(f"{path} holds images of mixed sizes (up to {info['max_side']} px) and a fixed "
                                "canvas is needed: pass --canvas-size N (data.canvas_size in a config), e.g. "
                                f"{min(info['max_side'], 256)}")
            decoder = SimpleRGBImageDecoder()
            self.canvas = info["image_size"]
        elif info["image_size"] == (canvas_size, canvas_size):
            decoder = SimpleRGBImageDecoder()
            self.canvas = (canvas_size, canvas_size)
        else:
            decoder = CenterCropRGBImageDecoder((canvas_size, canvas_size), ratio=1.0)
            self.canvas = (canvas_size, canvas_size)
        to_device = [ToDevice(self.device, non_blocking=True)] if self.device.type == "cuda" else []
        pipelines = {"image": [decoder, ToTensor(), *to_device],
                     "label": [IntDecoder(), ToTensor(), Squeeze(), *to_device]}
        self.seed, self.shuffle = seed, shuffle
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers or (os.cpu_count() or 1),
                             order=OrderOption.SEQUENTIAL, seed=seed, indices=indices, pipelines=pipelines,
                             drop_last=drop_last, batches_ahead=batches_ahead)
        # ffcv 1.0.2 cannot take a custom order through its constructor: install ours afterwards.
        subset = None if indices is None else np.asarray(indices)
        self.loader.traversal_order = _ShardOrder(info["count"], seed, rank, world_size, shuffle, subset)
        self.loader.first_traversal_order = self.loader.traversal_order.sample_order(0)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def num_samples(self) -> int:
        return self.info["count"]

    def __iter__(self):
        for images, labels in self.loader:
            # labels are tiny: copy them out of ffcv's reused buffers so that callers may keep them
            yield images, labels.view(-1).to(torch.long, copy=True)
