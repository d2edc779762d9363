"""Preemption notices on Ray workers: a SIGTERM ends training at a step boundary, with a checkpoint.

A spot reclaim or a pod eviction sends SIGTERM to the processes of a node, then SIGKILL after a
grace period (Kubernetes: ``terminationGracePeriodSeconds``, 30 s by default; GCP spot: 30 s; AWS
spot: 2 min). Ray's own handler would end the worker at once, so everything since the last regular
checkpoint would be trained again. Here a worker that gets SIGTERM asks the ``Trainer`` to stop
(``Trainer(stop=...)``): at the end of the step in flight all ranks agree to stop, rank 0 writes a
checkpoint and reports it to Ray Train, every rank raises ``StopRequested`` and Ray restarts the
group, which resumes from that step.

The bound: if the checkpoint is not reported within ``SSLAB_STOP_GRACE_S`` seconds (default 20, under
the shortest grace period above) of the signal, or a second SIGTERM arrives, the process ends as
Ray's handler would have ended it; the run then resumes from its previous checkpoint.

Where the handler lives: Python runs signal handlers on a process's main thread, and only that thread
may install one. A Ray Train worker runs the training function in a thread of its own while the
actor's main thread answers the controller's polls, so the handler is installed by a task on the
worker's own actor (``RayTrainWorker.execute``, which runs there). Nothing is sent across processes:
the handler and the training thread share this module's ``PROCESS_STOP``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable

STOP_GRACE_ENV = "SSLAB_STOP_GRACE_S"
DEFAULT_STOP_GRACE_S = 20.0


class StopSignal:
    """A stop request for this process: set by a signal, read by the training loop after each step."""

    def __init__(self) -> None:
        self._requested = threading.Event()
        self._finished = threading.Event()
        self.reason: str | None = None
        self.received_at: float | None = None  # time.monotonic() of the signal
        self._previous: dict[int, object] = {}
        self._give_up = False
        self._timer: threading.Timer | None = None

    # the Trainer's hook: a reason to stop now, or None
    def __call__(self) -> str | None:
        return self.reason if self._requested.is_set() else None

    def request(self, reason: str) -> None:
        if not self._requested.is_set():
            self.reason, self.received_at = reason, time.monotonic()
            self._requested.set()

    def finished(self) -> None:
        """The checkpoint is out: the bound no longer needs to end the process."""
        self._finished.set()
        if self._timer is not None:
            self._timer.cancel()

    def install(self, signals: tuple[int, ...] = (signal.SIGTERM,), grace_s: float | None = None) -> bool:
        """Handle ``signals`` in this process (main thread only; False elsewhere)."""
        if threading.current_thread() is not threading.main_thread():
            return False
        grace = grace_s if grace_s is not None else stop_grace_s()
        for signum in signals:
            self._previous[signum] = signal.signal(signum, lambda s, f: self._handle(s, f, grace))
        return True

    def _handle(self, signum: int, frame, grace: float) -> None:
        if self._give_up or self._requested.is_set():  # a second signal, or the bound ran out
            self._chain(signum, frame)
            return
        self.request(f"{signal.Signals(signum).name} (preemption notice)")
        self._timer = threading.Timer(grace, self._bound_reached, args=(signum,))
        self._timer.daemon = True
        self._timer.start()

    def _bound_reached(self, signum: int) -> None:
        if self._finished.is_set():
            return
        self._give_up = True
        # a real signal to the main thread (it also ends a sleep or a blocking wait there): _handle runs
        # there again and, giving up, hands over to the previous handler
        signal.pthread_kill(threading.main_thread().ident, signum)

    def _chain(self, signum: int, frame) -> None:
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)  # Ray's handler: SystemExit on the main thread, Ray's cleanup runs
            return
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        os.kill(os.getpid(), signum)


def stop_grace_s() -> float:
    try:
        value = float(os.environ.get(STOP_GRACE_ENV, DEFAULT_STOP_GRACE_S))
    except ValueError:
        value = DEFAULT_STOP_GRACE_S
    return value if value > 0 else DEFAULT_STOP_GRACE_S


PROCESS_STOP = StopSignal()  # this process's: shared by the main thread's handler and the training thread


def _install_process_stop() -> bool:
    return PROCESS_STOP.install()


def install_on_ray_worker(log: Callable[[str], None] = print) -> StopSignal | None:
    """From a Ray Train worker's training thread: install ``PROCESS_STOP``'s SIGTERM handler on the
    worker actor's main thread. Returns the signal, or None (with a warning) where that cannot be done."""
    import ray

    try:
        actor = ray.get_runtime_context().current_actor
        installed = ray.get(actor.execute.remote(_install_process_stop), timeout=60)
    except Exception as exc:  # noqa: BLE001 - an older/newer Ray: training goes on, SIGTERM ends it as before
        log(f"warning: SIGTERM will end this worker without a checkpoint ({str(exc).splitlines()[0][:160]})")
        return None
    if not installed:
        log("warning: SIGTERM will end this worker without a checkpoint (the handler could not be installed "
            "on its main thread)")
        return None
    return PROCESS_STOP
