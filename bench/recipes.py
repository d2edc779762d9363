"""The pretraining configs the benchmarks run by default: our faster GPU variants (batch 512, 200
epochs, SwAV/DINO multi-crop), on which BENCHMARKS.md's numbers were measured.
``configs/pretrain/<method>_cifar10.yaml`` are solo-learn's 1000-epoch recipes instead."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_CONFIGS = {"swav": "swav_cifar10_multicrop", "dino": "dino_cifar10_multicrop", "sdmp": "sdmp_cifar10",
                 "supcon": "supcon_cifar10_200ep", "simclr": "simclr_cifar10_200ep"}


def bench_config(method: str) -> Path:
    """configs/pretrain/<the benchmark variant of ``method``>.yaml."""
    return ROOT / "configs" / "pretrain" / f"{BENCH_CONFIGS.get(method, method + '_cifar10')}.yaml"
