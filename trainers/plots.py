"""Figures shared by the layers above: a pretraining run's curves (used by orchestrator/train.py after
a run and by the pipeline's report stage). matplotlib only, Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: list, path: Path, title: str = "") -> Path | None:
    """Loss (and kNN / online linear probe top-1 when present) against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [(r["step"], r["loss"]) for r in history if "loss" in r]
    knn_keys = sorted({k for r in history for k in r if k.startswith("knn_top1_") or k == "online_linear_top1"})
    if not losses:
        return None
    fig, axes = plt.subplots(1, 2 if knn_keys else 1, figsize=(10 if knn_keys else 5, 3.6), squeeze=False)
    axes[0][0].plot(*zip(*losses))
    axes[0][0].set(xlabel="step", ylabel="loss", title=f"{title} loss")
    for key in knn_keys:
        points = [(r["step"], 100 * r[key]) for r in history if key in r]
        axes[0][1].plot(*zip(*points), marker="o", label=key.replace("knn_top1_", "kNN k=").replace(
            "online_linear_top1", "linear probe"))
    if knn_keys:
        axes[0][1].set(xlabel="step", ylabel="top-1 (%)", title="online kNN / linear probe")
        axes[0][1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
