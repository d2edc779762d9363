"""`sslab data prepare` under faults, driven through the real CLI in subprocesses.

A run killed mid-write leaves no process and no lock behind, and the next run removes its partial
file and finishes; a second run of the same output waits for the first and finds its file; a full
disk (a small tmpfs) and a read-only folder (a read-only bind mount) end with exit 4 and one line
naming the path and the free space. The mounts live in a private mount namespace (``unshare -m``),
since root writes through chmod.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from trainers.data.beton import FfcvCanvasLoader, PrepareSettings, beton_path, inspect_beton, lock_path
from trainers.data.datasets import load_split

REPO = Path(__file__).resolve().parents[1]
LEFTOVER_MARKS = (".tmp-", ".errors-", ".fetch-")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslab", *args]


def _prepare_args(out: Path, data_root: Path, dataset: str = "cifar10", *extra: str) -> list[str]:
    return ["data", "prepare", "--dataset", dataset, "--split", "train", "--out", str(out),
            "--data-root", str(data_root), "--quiet", *extra]


def _processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, start time) of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), fields[0], fields[19])
    return table


def _tree(pid: int) -> dict[int, str]:
    """The descendants of ``pid``, each with its start time (so a reused PID is not mistaken for it)."""
    table, found, todo = _processes(), {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, started) in table.items():
            if ppid == parent and child not in found:
                found[child] = started
                todo.append(child)
    return found


def _alive(tree: dict[int, str]) -> list[int]:
    table = _processes()
    return [pid for pid, started in tree.items()
            if pid in table and table[pid][2] == started and table[pid][1] not in ("Z", "X")]


def _kill_left(tree: dict[int, str]) -> None:
    for pid in _alive(tree):  # only processes this test started
        os.kill(pid, signal.SIGKILL)


def _wait_for(predicate, timeout: float, what: str, process=None, log: Path | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if process is not None and process.poll() is not None:
            break
        time.sleep(0.05)
    detail = log.read_text()[-2000:] if log is not None and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s {detail}")


def _assert_valid_cifar_train(path: Path, data_root: Path) -> None:
    info = inspect_beton(path)
    assert info["count"] == 50_000 and info["image_size"] == (32, 32) and info["num_classes"] == 10
    assert info["meta"]["count"] == 50_000 and info["meta"]["bytes"] == path.stat().st_size
    loader = FfcvCanvasLoader(path, 500, shuffle=False, drop_last=False, num_workers=1, indices=np.arange(1000))
    images = np.concatenate([x.numpy() for x, _ in loader])
    source = load_split("cifar10", "train", data_root)
    assert np.array_equal(images, np.stack([source.images[i] for i in range(1000)]))


def test_killed_prepare_leaves_no_process_and_the_rerun_finishes(tmp_path, data_root):
    out = tmp_path / "out"
    path = beton_path(out, "cifar10", "train", PrepareSettings())
    args = _prepare_args(out, data_root, "cifar10", "--writers", "1")
    log = tmp_path / "first.log"
    with open(log, "w") as stream:
        first = subprocess.Popen(_cli(*args), stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)
    tmp = out / f".{path.name}.tmp-{first.pid}"
    tree: dict[int, str] = {}
    try:
        # mid-write: the partial file exists and has grown past its first pages
        _wait_for(lambda: tmp.is_file() and tmp.stat().st_size > 8 * 2**20, 240, "the first run's writing",
                  first, log)
        tree = _tree(first.pid)
        assert tree, "the writer runs its ffcv worker in a child process"
        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        killed = time.time()
        _wait_for(lambda: not _alive(tree), 10, f"the end of the killed run's children {_alive(tree)}")
        children_gone_s = time.time() - killed
        assert tmp.is_file()  # what the killed run leaves: its partial file, and nothing that looks complete
        assert not path.exists() and not (out / f"{path.name}.json").exists()

        started = time.time()
        rerun = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300, cwd=REPO)
        rerun_s = time.time() - started
    finally:
        first.kill()
        _kill_left(tree)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"removed 1 file(s) left by an earlier run that did not finish: {tmp.name}" in rerun.stdout
    assert sorted(p.name for p in out.iterdir()) == [f".{path.name}.lock", path.name, f"{path.name}.json"]
    _assert_valid_cifar_train(path, data_root)
    print(f"children gone {children_gone_s:.2f} s after the SIGKILL; rerun finished in {rerun_s:.1f} s")


def test_a_second_prepare_of_the_same_file_waits_for_the_first(tmp_path, data_root):
    """Both start together; whichever takes the lock writes, the other names its PID, waits, finds it up to date."""
    out = tmp_path / "out"
    path = beton_path(out, "cifar10", "train", PrepareSettings())
    args = _prepare_args(out, data_root, "cifar10", "--writers", "1")
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    runs = []
    for log in logs:
        with open(log, "w") as stream:
            runs.append(subprocess.Popen(_cli(*args), stdout=stream, stderr=subprocess.STDOUT, cwd=REPO))
    try:
        codes = [run.wait(timeout=300) for run in runs]
    finally:
        for run in runs:
            run.kill()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    wrote = [i for i, text in enumerate(texts) if f"writing {path}" in text]
    assert len(wrote) == 1, texts  # one process wrote the file
    writer, waiter = wrote[0], 1 - wrote[0]
    lines = texts[waiter].splitlines()
    waiting = [i for i, line in enumerate(lines) if line.startswith(f"waiting for PID {runs[writer].pid} (")]
    up_to_date = [i for i, line in enumerate(lines) if line == f"up to date: {path} (50,000 images)"]
    assert waiting and up_to_date and waiting[0] < up_to_date[0], texts[waiter]
    assert f"which holds the output file {path}" in lines[waiting[0]]
    assert f"writing {path}" not in texts[waiter]
    assert sorted(p.name for p in out.iterdir()) == [f".{path.name}.lock", path.name, f"{path.name}.json"]
    assert inspect_beton(path)["count"] == 50_000


# --------------------------------------------------------------------------- full disk, read-only folder
NAMESPACE_SCRIPT = """
python="$1"; folder="$2"; listing="$3"; shift 3
{mount} || exit 90
timeout -s KILL 100 "$python" -m sslab "$@"
code=$?
ls -A "$folder" > "$listing"
exit $code
"""


@pytest.fixture(scope="module")
def mount_namespace():
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
        pytest.skip("`unshare -m true` fails on this machine: no private mount namespace for a tmpfs or a "
                    "read-only bind mount (root writes through chmod)")


def _prepare_in_namespace(mount: str, folder: Path, listing: Path, args: list[str]):
    """The CLI in a private mount namespace where ``mount`` (a shell command on "$folder") has been
    applied to ``folder``; returns its result and the folder's listing as that namespace sees it."""
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["unshare", "-m", "sh", "-c", NAMESPACE_SCRIPT.format(mount=mount), "sh",
                             sys.executable, str(folder), str(listing), *args],
                            capture_output=True, text=True, timeout=150, cwd=REPO)
    assert result.returncode != 90, f"mount failed in the namespace: {result.stderr}"
    return result, listing.read_text().split()


def _assert_storage_error(result, path: Path, reason: str) -> None:
    assert result.returncode == 4, (result.returncode, result.stdout[-1000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert lines[0].startswith(f"error: cannot write .beton file {path}: {reason}")
    assert " free on that file system)" in lines[0]


def _assert_nothing_left(names: list[str], path: Path) -> None:
    assert set(names) <= {f".{path.name}.lock"}, names  # at most the lock file: no .beton, sidecar or temp file
    assert not any(mark in name for name in names for mark in LEFTOVER_MARKS)


def test_full_disk_is_refused_before_writing(tmp_path, data_root, mount_namespace):
    folder = tmp_path / "small"
    path = beton_path(folder, "digits", "train", PrepareSettings())
    result, names = _prepare_in_namespace('mount -t tmpfs -o size=2m tmpfs "$folder"', folder,
                                          tmp_path / "listing", _prepare_args(folder, data_root, "digits"))
    _assert_storage_error(result, path, "not enough space: 1,347 images need about 4.0 MiB")
    assert "(2.0 MiB free on that file system)" in result.stderr
    _assert_nothing_left(names, path)


def _noise_folder(root: Path, count: int = 1000) -> Path:
    """Random 64x64 images: JPEG cannot shrink them, so the file outgrows the low size estimate."""
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / "train" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_disk_filling_up_mid_write_stops_every_writer_process(tmp_path, data_root, mount_namespace):
    """The space check passes (about 4 MiB estimated, 6 MiB free) and the 8 MiB file fails in a writer
    process; with two of them the other would wait forever for the failed one's page."""
    images = _noise_folder(tmp_path / "noise")
    folder = tmp_path / "small"
    dataset = f"imagefolder:{images}"
    path = beton_path(folder, dataset, "train", PrepareSettings(format="jpeg"))
    started = time.time()
    result, names = _prepare_in_namespace('mount -t tmpfs -o size=6m tmpfs "$folder"', folder, tmp_path / "listing",
                                          _prepare_args(folder, data_root, dataset, "--format", "jpeg",
                                                        "--writers", "2"))
    assert f"writing {path}" in result.stdout  # it got past the space check
    _assert_storage_error(result, path, "No space left on device")
    _assert_nothing_left(names, path)
    assert time.time() - started < 90  # no hang (the run is killed at 100 s)


def test_read_only_output_folder(tmp_path, data_root, mount_namespace):
    folder = tmp_path / "readonly"
    path = beton_path(folder, "digits", "train", PrepareSettings())
    read_only = 'mount --bind "$folder" "$folder" && mount -o remount,bind,ro "$folder"'
    result, names = _prepare_in_namespace(read_only, folder, tmp_path / "listing",
                                          _prepare_args(folder, data_root, "digits"))
    _assert_storage_error(result, path, "Read-only file system")
    assert "make that folder writable or write elsewhere" in result.stderr
    assert names == []
    # an up-to-date file in a read-only folder is used as it is
    assert subprocess.run(_cli(*_prepare_args(folder, data_root, "digits")), capture_output=True,
                          cwd=REPO, timeout=300).returncode == 0
    result, names = _prepare_in_namespace(read_only, folder, tmp_path / "listing",
                                          _prepare_args(folder, data_root, "digits"))
    assert result.returncode == 0, result.stderr
    assert f"up to date: {path} (its folder is not writable: Read-only file system)" in result.stdout
    assert sorted(names) == [f".{path.name}.lock", path.name, f"{path.name}.json"]


# --------------------------------------------------------------------------- staging takes the same lock
def test_fetching_a_staged_file_waits_for_its_lock_and_clears_a_dead_fetch(tmp_path):
    """orchestrator/staging.py locks each file as prepare_split does: it waits for the holder (named by
    PID), goes on the moment that holder is killed, and removes what a killed fetch left."""
    pytest.importorskip("pyarrow")
    from orchestrator.staging import fetch_staged, stage_data
    from trainers.config import load_config

    images = tmp_path / "pets"
    for split in ("train", "test"):
        for label, name in enumerate(("cat", "dog")):
            (images / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8, 3), 60 * label + 20 * i, np.uint8)).save(images / split / name / f"{i}.png")

    def config(cache):
        return load_config(None, [f"data.dataset=imagefolder:{images}", f"data.cache_dir={cache}", "data.loader=ffcv"])

    uri = stage_data(config(tmp_path / "driver"), str(tmp_path / "storage"), log=lambda *_: None)
    node = tmp_path / "node"
    node.mkdir()
    local = node / beton_path("/", f"imagefolder:{images}", "train", PrepareSettings()).name
    stale = node / f".{local.name}.fetch-999999"
    stale.write_bytes(bytes(4096))  # a fetch killed mid-copy
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom trainers.locks import hold\n"
                               "with hold(sys.argv[1], wait=False, what='it'):\n print('held', flush=True)\n"
                               " time.sleep(600)\n", str(lock_path(local))], stdout=subprocess.PIPE, cwd=REPO)
    messages, result = [], []
    fetch = threading.Thread(target=lambda: result.append(fetch_staged(config(node), uri, log=messages.append)))
    try:
        assert holder.stdout.readline() == b"held\n"
        fetch.start()
        _wait_for(lambda: any(m.startswith(f"waiting for PID {holder.pid} (") for m in messages), 60,
                  "the fetch's waiting message")
        time.sleep(1.0)
        assert fetch.is_alive() and not local.exists()  # it waits while the holder lives
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        fetch.join(timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert not fetch.is_alive() and local in result[0]
    assert local.read_bytes() == (tmp_path / "driver" / local.name).read_bytes()
    assert not stale.exists()
    assert any(m.startswith(f"removed 1 file(s) left by an earlier run that did not finish: {stale.name}")
               for m in messages), messages
