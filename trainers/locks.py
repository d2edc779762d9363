"""Locks that die with their holder: POSIX record locks (``fcntl.lockf``) on a small hidden file.

Why not ``flock``: a ``flock`` belongs to the open file, and a forked child (ffcv's writer
processes, DataLoader workers) inherits it, so an orphaned child keeps the lock after its parent is
killed and every later run waits forever. A POSIX record lock belongs to the *process*: children do
not inherit it and the kernel drops it the moment the holder dies, SIGKILL included.

POSIX locks do not exclude the same process, so this module also keeps the paths it holds and
refuses a second hold from the same process. The holder writes its PID into the file; a waiter
names that PID in its message (informative only: the kernel, not the file, decides who holds it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path
from typing import Callable

from trainers.errors import UserError

_HELD: dict[str, int] = {}  # resolved lock path -> fd, for locks this process holds
_GUARD = threading.Lock()


class LockedError(UserError):
    """Another process (or this one) holds the lock."""

    exit_code = 2


def holder_pid(path: str | Path) -> int | None:
    """The PID the holder wrote into the lock file (None when unknown)."""
    try:
        text = Path(path).read_text().strip()
        return int(text.split()[0]) if text else None
    except (OSError, ValueError, IndexError):
        return None


def describe_pid(pid: int | None) -> str:
    """``PID 123 (sslab data prepare ...)``, from /proc where it can."""
    if pid is None:
        return "another process"
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"PID {pid}" + (f" ({command[:120]})" if command else "")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except (BlockingIOError, PermissionError):
        return False


@contextlib.contextmanager
def hold(path: str | Path, *, wait: bool, what: str, busy_hint: str = "",
         log: Callable[[str], None] | None = None, poll_s: float = 0.5):
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    ``wait=False``: refuse at once with a :class:`LockedError` naming the holder's PID and
    ``busy_hint``. ``wait=True``: wait for the holder, saying once (through ``log``) whom it waits
    for. ``what`` names the locked thing in messages (e.g. "run folder /x").
    """
    path = Path(path)
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            raise LockedError(f"{what} is already in use by this process (PID {os.getpid()}): "
                              f"{busy_hint or 'use another location'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        if not _try_lock(fd):
            pid = holder_pid(path)
            if not wait:
                raise LockedError(f"{what} is in use by {describe_pid(pid)}: {busy_hint or 'wait for it to finish'}")
            if log is not None:
                log(f"waiting for {describe_pid(pid)}, which holds {what} (it is released when that process ends)")
            while not _try_lock(fd):
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _GUARD:
            _HELD[key] = fd
        try:
            yield path
        finally:
            with _GUARD:
                _HELD.pop(key, None)
    finally:
        os.close(fd)  # releases the lock (the file stays: removing it would race with a waiter)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent(parent_pid: int) -> None:
    """In a forked child: be killed (SIGKILL) when the parent dies; exit now if it already has.

    Linux only (``prctl(PR_SET_PDEATHSIG)``); elsewhere a no-op."""
    import ctypes
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)
