"""Fault injection for the restart tests: a plan read from ``SSLAB_FAULT_AT_STEP``, carried out by rank 0.

"11" makes rank 0 raise once at step 11; "kill:5,9,14" makes rank 0's process SIGKILL itself once at each
listed step; "wait:6" makes rank 0 wait at step 6 until a file ``go-6`` appears beside its marker, so that a
test can remove a node or send a signal while the run stands at a known step. A marker file per step (in
the run's storage, written before the fault) lets the restarted worker group go past that step.
Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from trainers.errors import ConfigError

FAULT_ENV = "SSLAB_FAULT_AT_STEP"


def parse_fault(text: str | None) -> tuple[str, list[int]] | None:
    """(kind, steps) of a ``SSLAB_FAULT_AT_STEP`` value; kind is "raise", "kill" or "wait"."""
    if not text:
        return None
    kind, _, steps = text.rpartition(":")
    kind = kind or "raise"
    try:
        numbers = sorted({int(s) for s in steps.split(",") if s.strip()})
    except ValueError:
        numbers = []
    if kind not in ("raise", "kill", "wait") or not numbers or numbers[0] < 1:
        raise ConfigError(f"{FAULT_ENV}={text!r} is not a fault plan: use STEP, or kill:STEP[,STEP...] or "
                          f"wait:STEP[,STEP...] with steps >= 1")
    return kind, numbers


@dataclass
class FaultPlan:
    kind: str
    steps: list[int]
    folder: Path  # where the markers go

    def after_step(self, step: int) -> None:
        """Fail once at each planned step up to ``step`` not marked done yet."""
        due = [s for s in self.steps if s <= step and not (self.folder / f"fault-{s}").exists()]
        if not due:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for planned in due:
            (self.folder / f"fault-{planned}").write_text(f"{self.kind} at step {step}\n")
        if self.kind == "wait":
            go = [self.folder / f"go-{s}" for s in due]
            deadline = time.monotonic() + 300
            while not all(path.exists() for path in go) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        if self.kind == "kill":
            import signal

            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: like the OOM killer or a lost node
        raise RuntimeError(f"injected fault at step {step} ({FAULT_ENV})")
