"""orchestrator/preempt.py's StopSignal in a process of its own: the first SIGTERM becomes a stop request,
a second one (or the grace period running out) ends the process as its previous handler would.

The whole path on Ray (the handler installed on a worker's main thread, all ranks stopping together,
the checkpoint reported, the group resuming there) is tests/test_multinode.py's SIGTERM test."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import signal, sys, time
sys.path.insert(0, {root!r})
from orchestrator.preempt import StopSignal

def previous(signum, frame):  # stands for Ray's handler: SystemExit on the main thread
    print("previous handler", flush=True)
    raise SystemExit(7)

signal.signal(signal.SIGTERM, {previous})
stop = StopSignal()
assert stop.install(grace_s={grace})
print("ready", flush=True)
deadline = time.monotonic() + 20
while stop() is None and time.monotonic() < deadline:
    time.sleep(0.01)
print("asked:", stop(), flush=True)
if {finish}:
    stop.finished()
    time.sleep({linger})
    print("done", flush=True)
else:
    time.sleep(30)  # a checkpoint that never ends
"""


def start(grace: float, finish: bool, linger: float = 0.0, previous: str = "previous") -> subprocess.Popen:
    code = textwrap.dedent(CHILD).format(root=str(ROOT), grace=grace, finish=finish, linger=linger,
                                         previous=previous)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def test_the_first_sigterm_is_a_stop_request_and_the_work_finishes():
    child = start(grace=1.0, finish=True, linger=2.0)  # lingers past the grace: finished() cancelled the bound
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.splitlines() == ["asked: SIGTERM (preemption notice)", "done"]


def test_the_grace_period_running_out_ends_the_process_through_the_previous_handler():
    child = start(grace=1.0, finish=False)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    took = time.monotonic() - sent
    assert child.returncode == 7, err  # the previous handler's exit
    assert out.splitlines() == ["asked: SIGTERM (preemption notice)", "previous handler"]
    assert 0.9 < took < 10, took


def test_a_second_sigterm_ends_the_process_at_once_and_the_default_action_stays_the_default():
    child = start(grace=60.0, finish=False)
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline().strip() == "asked: SIGTERM (preemption notice)"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 7 and out.strip() == "previous handler", err
    # without a Python handler before it, the process dies of the signal itself (exit -15)
    child = start(grace=60.0, finish=False, previous="signal.SIG_DFL")
    child.send_signal(signal.SIGTERM)
    assert child.stdout.readline().strip() == "asked: SIGTERM (preemption notice)"
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGTERM


def test_install_refuses_outside_the_main_thread():
    import threading

    from orchestrator.preempt import StopSignal

    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("installed", StopSignal().install()))
    thread.start()
    thread.join()
    assert result["installed"] is False
