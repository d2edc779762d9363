"""Checkpoints: a dict of state_dicts and plain values, written atomically, read with weights_only.

Atomic: the bytes go to a temporary file in the same folder, are flushed to disk, then renamed over
the target, so a crash or a full disk mid-write leaves the previous checkpoint intact.
``torch.load(..., weights_only=True)`` refuses anything but tensors and plain containers, so a
checkpoint cannot run code when loaded.

Verified: the bytes are serialized in memory first (a full disk then fails in a plain ``write``,
reported as a storage error, not deep inside torch's zip writer), and their SHA-256 goes into a
sidecar ``<name>.sha256`` written *before* the rename. The sidecar lists the new digest and the
previous one, so a crash between the two renames never makes a good file look damaged; a loader
refuses a file whose digest is in neither (bytes damaged on disk or in a copy). A checkpoint without
a sidecar (older runs, hand copies) loads unchecked.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import torch

from trainers.errors import ConfigError, DataError, UserError


class StorageError(UserError):
    """A checkpoint or artifact could not be written (disk full, no permission)."""

    exit_code = 4


RESUME_HINT = "the previous checkpoint is unchanged: free space or choose another location, then rerun to resume"


def free_space(path: str | Path) -> str:
    """``N.NN GiB free on that file system`` for the nearest existing folder of ``path``."""
    path = Path(path)
    folder = next((p for p in (path, *path.parents) if p.exists()), None)
    if folder is None:
        return "folder missing"
    try:
        return f"{shutil.disk_usage(folder).free / 2**30:.2f} GiB free on that file system"
    except OSError:
        return "free space unknown"


WRONG_KIND_ERRNOS = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR)  # a file where a folder goes, or the reverse


def wrong_kind_error(path: str | Path, exc: OSError, what: str) -> ConfigError:
    """A path that names a file where a folder is needed (or the reverse): the setting is wrong (exit 2)."""
    where = exc.filename or path
    kind = "a folder" if exc.errno == errno.EISDIR else "a file"
    return ConfigError(f"cannot use {where} for {what}: it is {kind} in the way ({exc.strerror or exc}); pass a path "
                       f"whose parts are folders (or nonexistent)")


def storage_error(path: str | Path, exc: OSError, what: str = "checkpoint", hint: str = RESUME_HINT) -> UserError:
    """One line naming the path, the reason and the free space where it was going (exit 4); a file in
    the way of a folder is a setting to fix instead (exit 2)."""
    if exc.errno in WRONG_KIND_ERRNOS:
        return wrong_kind_error(path, exc, what or "output")
    what = f"{what} " if what else ""
    return StorageError(f"cannot write {what}{path}: {exc.strerror or exc} ({free_space(path)}); {hint}")


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def _recorded_digests(path: Path) -> list[str]:
    try:
        return [line.split()[0] for line in checksum_path(path).read_text().splitlines() if line.strip()]
    except (OSError, IndexError):
        return []


def _write_atomic(data: bytes, path: Path) -> None:
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(state: dict, path: str | Path, what: str = "checkpoint") -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))
    except OSError as exc:
        raise StorageError(f"cannot write {what} {path}: {exc.strerror or exc}; choose a writable "
                           "train.out_dir (--out)") from None
    try:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getbuffer()
        digest = hashlib.sha256(data).hexdigest()
        previous = [d for d in _recorded_digests(path)[:1] if d != digest]
        _write_atomic("".join(f"{d}\n" for d in [digest, *previous]).encode(), checksum_path(path))
        _write_atomic(data, path)
    except OSError as exc:
        raise storage_error(path, exc, what) from None
    return path


def remove_checkpoint(path: str | Path) -> None:
    """A checkpoint and its checksum."""
    Path(path).unlink(missing_ok=True)
    checksum_path(path).unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu", method: str | None = None,
                    backbone: str | None = None) -> dict:
    """Read a checkpoint written by ``save_checkpoint``; with ``method``/``backbone`` also check that
    it was written by the same method and backbone."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} not found: check the path (train.resume) or start a new run")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"checkpoint {path} cannot be read ({exc.strerror or exc}): check its permissions") from None
    digests = _recorded_digests(path)
    if digests and hashlib.sha256(data).hexdigest() not in digests:
        raise DataError(f"checkpoint {path} is damaged: its bytes do not match the SHA-256 written with it "
                        f"({checksum_path(path).name}); use an earlier checkpoint (epoch-*.pt beside it) or start "
                        "a new run")
    if not data.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise DataError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle): "
                        "pass a checkpoint or backbone.pt written by sslab")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors come in many classes
        text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        if "Unsupported global" in str(exc) or "Unsupported operand" in str(exc):
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
