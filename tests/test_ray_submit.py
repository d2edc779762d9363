"""`sslab submit --wait` against a local Ray head (`ray start --head`), end to end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

from orchestrator.cli import main  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = shutil.which("ray")
    temp = tmp_path_factory.mktemp("rayhead")
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    yield f"http://127.0.0.1:{dashboard}"
    subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_wait_runs_a_job_and_returns_its_status(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "job-run"
    command = ["pretrain", "--local", "--quiet", "--out-dir", str(out), "--set", "method.name=simclr",
               "--set", "data.dataset=digits", "--set", "data.crops=2x8", "--set", "data.batch_size=64",
               "--set", "model.backbone=resnet_mini", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0", "--set", "knn.k=[20]"]
    code = main(["submit", "--address", ray_head, "--python", sys.executable, "--name", "sslab-test-ok", "--wait",
                 "--", *command])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "kNN top-1 (k=20)" in captured.out  # the job's own result table, streamed back
    assert "submitted job sslab-test-ok" in captured.err
    assert (out / "backbone.pt").is_file() and (out / "summary.json").is_file()

    # a job that fails (bad config) makes submit --wait fail too, with the job's message
    code = main(["submit", "--address", ray_head, "--python", sys.executable, "--name", "sslab-test-bad", "--wait",
                 "--", "pretrain", "--local", "--set", "optim.lrr=0.1"])
    captured = capsys.readouterr()
    assert code == 1
    assert "did you mean 'lr'" in captured.out and "job sslab-test-bad failed" in captured.err


def test_submit_to_no_cluster_is_one_line(capsys):
    port = _free_port()
    assert main(["submit", "--address", f"http://127.0.0.1:{port}", "--", "data", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray job server" in err[0] and "ray start --head" in err[0]


def test_a_job_never_uploads_data_state_or_credentials(tmp_path, capsys):
    from orchestrator.submit import upload_listing

    sent = ["pyproject.toml", "trainers/loop.py", "trainers/data/beton.py", "orchestrator/cli.py",
            "configs/pretrain/swav_cifar10.yaml", "cluster/kuberay/secrets.example.yaml", "README.md"]
    kept = [".state/runs/a/checkpoints/last.pt", ".state/mlflow/mlflow.db", ".venv/bin/python", ".git/config",
            "data/cifar10-jpg.tar.gz", "cache/cifar10-train.beton", "cache/cifar10-train.beton.json",
            "runs/backbone.pt", "mlruns/0/meta.yaml", ".env", "deploy/prod.env", "certs/server.pem", "certs/server.key",
            "id_rsa", ".ray/auth_token", ".aws/credentials", ".kube/config", "cluster/kuberay/my-secrets.yaml",
            "bench/results/x.json", "trainers/__pycache__/loop.cpython-311.pyc", "gcp-credentials.json"]
    for name in sent + kept:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    listing = upload_listing(tmp_path)  # no .gitignore here: the exclude list alone must hold
    assert sorted(listing) == sorted(sent)

    # the same list from the command line, for the real checkout
    assert main(["submit", "--list-files"]) == 0
    printed = capsys.readouterr().out.split()
    assert "trainers/loop.py" in printed and "orchestrator/submit.py" in printed
    assert not [p for p in printed if p.startswith((".state/", ".venv/", ".git/")) or p.endswith(".beton")]
