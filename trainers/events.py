"""The training loop's events, for whoever runs it (a Ray worker, a benchmark, a test).

No torch import here: the orchestrator's modules load this without the training stack.
"""

from __future__ import annotations

from pathlib import Path


class TrainerEvents:
    """What the loop tells whoever runs it (a Ray worker, a benchmark, a test): subclass and override what
    you need; the defaults do nothing."""

    # where a stopped run resumes from when that is not this process's checkpoint folder (said in errors)
    resume_hint: str | None = None

    def on_log(self, step: int, row: dict) -> None:
        """Rank 0, every ``train.log_every`` steps: loss, learning rate, throughput, ..."""

    def on_checkpoint(self, step: int, metrics: dict, path: Path) -> None:
        """Every rank, after a mid-epoch checkpoint (``train.checkpoint_every_steps``, a stop request)."""

    def on_epoch_end(self, step: int, completed: int, metrics: dict, path: Path | None, final: bool) -> None:
        """Every rank, after each epoch (and after the last step) at global ``step``, ``completed`` epochs:
        the epoch's metrics with the held-out evaluations, the checkpoint written then (if any); ``final``:
        the run's last step (``fit()`` returns next)."""
