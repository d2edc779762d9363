"""Checkpoints: a dict of state_dicts and plain values, written atomically, read with weights_only.

Atomic: the bytes go to a temporary file in the same folder, are flushed to disk, then renamed over
the target, so a crash or a full disk mid-write leaves the previous checkpoint intact.
``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so a
checkpoint cannot run code when loaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainers.errors import ConfigError, DataError, UserError


class StorageError(UserError):
    """A checkpoint or artifact could not be written (disk full, no permission)."""

    exit_code = 4


def storage_error(path: str | Path, exc: OSError, what: str = "checkpoint") -> StorageError:
    """One line naming the path, the reason and the free space where it was going."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    free = f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free on that file system" if folder else "folder missing"
    return StorageError(f"cannot write {what} {path}: {exc.strerror or exc} ({free}); the previous checkpoint is "
                        f"unchanged: free space or choose another location, then rerun to resume")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise StorageError(f"cannot write checkpoint {path}: {exc.strerror or exc}; choose a writable "
                           "train.out_dir") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | Path, map_location="cpu", method: str | None = None,
                    backbone: str | None = None) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; with ``method``/``backbone`` also check that
    it was written by the same method and backbone."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found: check the path (train.resume) or start a new run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many classes
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise DataError(f"refusing to load {path}: it holds pickled Python objects, not only tensors "
                            "(only load checkpoints you trust, re-saved as state_dicts)") from None
        raise DataError(f"checkpoint {path} is unreadable ({text}): it may be truncated; use an earlier "
                        "checkpoint or start a new run") from None
    if not isinstance(state, dict) or "format" not in state:
        raise DataError(f"{path} is not an sslab checkpoint (no 'format' entry)")
    for key, expected in (("method", method), ("backbone", backbone)):
        if expected is not None and state.get(key) != expected:
            raise ConfigError(f"checkpoint {path} was written by {key} '{state.get(key)}', this run uses "
                              f"'{expected}': resume with the same {key}, or start a new run (train.resume=null)")
    return state
