"""Moving the ``.beton`` files to nodes that do not share a file system with the driver.

The driver writes the run's data files once (from the archives it can see) and copies them, each
with its JSON sidecar, into ``<storage>/_data/`` (any URI Ray Train accepts as storage: a shared
folder, ``file://``, ``s3://``, ``gs://``; pyarrow does the I/O). Each worker, before it builds
its loader, copies them to its node's cache folder unless an identical file (same content key)
is already there, which is what a shared cache folder or an earlier run on the node leaves.
A worker whose node has no archives then reads the staged file (see ``prepare_split``).

Writes are ordered so that a reader never trusts half a file: the sidecar, which records the
file's size and key, is removed first and written last; local copies go through a temp name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from trainers.config import Config
from trainers.errors import DataNotFoundError, UserError

STAGE_FOLDER = "_data"
SPLITS = ("train", "test")


def stage_uri(storage: str) -> str:
    return storage.rstrip("/") + "/" + STAGE_FOLDER


def _filesystem(uri: str):
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception as exc:  # noqa: BLE001 - unknown scheme, missing credentials, bad bucket
        raise UserError(f"cannot open storage {uri} for the data files ({str(exc).splitlines()[0][:160]}): "
                        f"pass --storage as a shared folder or a URI pyarrow can open (s3://, gs://, file://)") from None


def _uses_ffcv(config: Config) -> bool:
    from trainers.data.multicrop import ffcv_available

    return config.data.loader in ("auto", "ffcv") and ffcv_available()  # torch and jpeg read the images themselves


def _file_names(config: Config) -> list[str]:
    from trainers.data.beton import PrepareSettings, beton_path

    return [beton_path("/", config.data.dataset, split, PrepareSettings()).name for split in SPLITS]


def _read_remote_meta(filesystem, path: str) -> dict | None:
    from pyarrow import fs

    if filesystem.get_file_info(path).type != fs.FileType.File:
        return None
    try:
        with filesystem.open_input_stream(path) as stream:
            return json.loads(stream.read().decode())
    except (OSError, ValueError):
        return None


def _remote_size(filesystem, path: str) -> int | None:
    from pyarrow import fs

    info = filesystem.get_file_info(path)
    return info.size if info.type == fs.FileType.File else None


def staged_already(config: Config, uri: str) -> bool:
    """True when ``uri`` holds every split of the run's data set, complete (size as its sidecar says)."""
    filesystem, root = _filesystem(uri)
    for name in _file_names(config):
        meta = _read_remote_meta(filesystem, f"{root}/{name}.json")
        if meta is None or _remote_size(filesystem, f"{root}/{name}") != meta.get("bytes"):
            return False
    return True


def stage_data(config: Config, storage: str, log: Callable[[str], None] = print,
               require_source: bool = False, progress: bool = False) -> str | None:
    """Driver (or ``sslab data stage``): write the run's ``.beton`` files here and copy them to
    ``<storage>/_data/``.

    Returns the staging URI, or None when there is nothing to stage (torch loader, no ffcv, or no
    source data here and nothing staged earlier: each worker then prepares the files from its own
    data root). Without source data here, files staged earlier (``sslab data stage`` from a machine
    that has the archives) are used as they are; ``require_source`` raises instead."""
    from pyarrow import fs

    from trainers.data.beton import PrepareSettings, prepare, read_meta
    from trainers.data.multicrop import default_cache_dir

    if not _uses_ffcv(config):
        return None
    cache = config.data.cache_dir or str(default_cache_dir())
    uri = stage_uri(storage)
    try:
        paths = prepare(config.data.dataset, "all", cache, config.data.data_root, PrepareSettings(),
                        progress=progress, log=log if progress else (lambda msg: None))
    except DataNotFoundError as exc:
        if require_source:
            raise
        if staged_already(config, uri):
            log(f"the data is not on this machine; the workers read the files staged in {uri}")
            return uri
        log(f"note: the data is not on this machine ({str(exc)[:100]}...) and nothing is staged in {uri} "
            f"(sslab data stage puts it there); each worker prepares it from its own data root")
        return None
    filesystem, root = _filesystem(uri)
    filesystem.create_dir(root, recursive=True)
    local_fs = fs.LocalFileSystem()
    for path in paths.values():
        meta = read_meta(path)
        target, target_meta = f"{root}/{path.name}", f"{root}/{path.name}.json"
        remote = _read_remote_meta(filesystem, target_meta)
        if remote and remote.get("key") == meta["key"] and _remote_size(filesystem, target) == meta["bytes"]:
            continue
        log(f"staging {path.name} ({meta['bytes'] / 2**20:.1f} MiB) to {uri}")
        if remote is not None:
            filesystem.delete_file(target_meta)
        fs.copy_files(str(path), target, source_filesystem=local_fs, destination_filesystem=filesystem)
        with filesystem.open_output_stream(target_meta) as stream:
            stream.write(json.dumps(meta, indent=1).encode())
    return uri


def fetch_staged(config: Config, uri: str, log: Callable[[str], None] = print) -> list[Path]:
    """Worker: copy the staged files of this run's data set into this node's cache folder.

    Skips a file whose identical copy is already there. Several workers of one node take turns
    per file (the lock ``prepare_split`` takes on that file, which dies with its holder; see
    trainers/locks.py). Returns the files it copied."""
    from pyarrow import fs

    from trainers.data.beton import lock_path, read_meta, remove_leftovers
    from trainers.data.multicrop import default_cache_dir
    from trainers.locks import hold

    if not _uses_ffcv(config):
        return []
    filesystem, root = _filesystem(uri)
    cache = Path(config.data.cache_dir or default_cache_dir()).expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in _file_names(config):
        remote = _read_remote_meta(filesystem, f"{root}/{name}.json")
        if remote is None:
            continue  # not staged (the driver had no data): the loader prepares it here
        local = cache / name
        with hold(lock_path(local), wait=True, what=f"the data file {local}", log=log):
            remove_leftovers(local, log)
            meta = read_meta(local)
            if meta and meta.get("key") == remote.get("key") and local.is_file() and local.stat().st_size == meta["bytes"]:
                continue
            if _remote_size(filesystem, f"{root}/{name}") != remote.get("bytes"):
                log(f"warning: the staged {name} in {uri} is incomplete; preparing it on this node instead")
                continue
            sidecar = local.with_name(local.name + ".json")
            sidecar.unlink(missing_ok=True)  # the old sidecar must not vouch for the new file
            temp = local.with_name(f".{name}.fetch-{os.getpid()}")
            try:
                fs.copy_files(f"{root}/{name}", str(temp), source_filesystem=filesystem,
                              destination_filesystem=fs.LocalFileSystem())
                os.replace(temp, local)
            finally:
                temp.unlink(missing_ok=True)
            temp_meta = sidecar.with_name(f".{sidecar.name}.fetch-{os.getpid()}")
            temp_meta.write_text(json.dumps(remote, indent=1))
            os.replace(temp_meta, sidecar)
            log(f"fetched {name} ({remote['bytes'] / 2**20:.1f} MiB) from {uri} to {cache}")
            copied.append(local)
    return copied
