"""Shared fixtures. Tests run on the CPU against the real data in ../shared/data (CI has it too)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before the project is imported anywhere: no downloads, no writes into the checkout's state dir.
os.environ.setdefault("SSLAB_DOWNLOAD", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from trainers.paths import default_data_root  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("SSLAB_HOME", str(tmp_path_factory.getbasetemp() / "state"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = default_data_root()
    if root is None or not (root / "cifar10-jpg.tar.gz").is_file():
        pytest.fail("real data not found: put ../shared/data beside the checkout or set SSLAB_DATA_ROOT "
                    "(it must hold cifar10-jpg.tar.gz and the tin200-*.tar.gz archives)")
    return root


@pytest.fixture(scope="session")
def cifar_betons(tmp_path_factory, data_root) -> dict:
    """CIFAR-10 train and test written once per test session (raw pixels)."""
    from trainers.data.beton import prepare

    out = tmp_path_factory.mktemp("betons")
    return prepare("cifar10", "all", out, data_root, progress=False, log=lambda *_: None)


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray (4 CPUs) per test module; a module that needs more defines its own."""
    import ray

    from orchestrator.train import init_ray

    if not ray.is_initialized():
        init_ray(None, num_cpus=4)
    yield
    ray.shutdown()
