"""Jobs on a local Ray head (`ray start --head`), end to end: `sslab submit` (exit statuses, what the
job's runtime env carries), plain `ray job submit --working-dir . -- sslab ...`, and the resource
request a run posts for an autoscaler while it waits for nodes.

The head is started with the virtual environment's bin/ first on PATH, as the image provides
`sslab` on a real cluster."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")

from sslab.cli import main  # noqa: E402
from trainers.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow  # starts a Ray cluster and submits jobs: `make test-fast` leaves it out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Head(str):
    """The job server's address, with the head's GCS address and the `ray` command beside it."""

    def __new__(cls, address: str, gcs: str, ray_bin: str):
        head = super().__new__(cls, address)
        head.gcs, head.ray_bin = gcs, ray_bin
        return head


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = shutil.which("ray")
    temp = tmp_path_factory.mktemp("rayhead")
    port, dashboard = _free_port(), _free_port()
    # the v1 autoscaler protocol (the default): a resource request is a key in the GCS (see the last test)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_enable_autoscaler_v2": "0",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    start = subprocess.run([str(ray_bin), "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
                            "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp}",
                            "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    yield Head(f"http://127.0.0.1:{dashboard}", gcs=f"127.0.0.1:{port}", ray_bin=str(ray_bin))
    subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_wait_runs_a_job_and_returns_its_status(ray_head, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    out = tmp_path / "job-run"
    command = ["pretrain", "--local", "--quiet", "--out", str(out), "--set", "method.name=simclr",
               "--set", "data.dataset=digits", "--set", "data.crops=2x8", "--set", "data.batch_size=64",
               "--set", "model.backbone=resnet_mini", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0", "--set", "knn.k=[20]"]
    code = main(["submit", "--address", ray_head, "--python", sys.executable, "--name", "sslab-test-ok", "--wait",
                 "--", *command])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "kNN top-1 (k=20, T=0.07)" in captured.out  # the job's own result table, streamed back
    assert "submitted job sslab-test-ok" in captured.err
    assert (out / "backbone.pt").is_file() and (out / "summary.json").is_file()

    # a job that fails (bad config) makes submit --wait fail too, with the job's message
    code = main(["submit", "--address", ray_head, "--python", sys.executable, "--name", "sslab-test-bad", "--wait",
                 "--", "pretrain", "--local", "--set", "optim.lrr=0.1"])
    captured = capsys.readouterr()
    assert code == 2  # the job's own exit status: a bad setting, as when run here (docs/errors.md)
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


LONG_JOB = ["pretrain", "--local", "--quiet", "--set", "method.name=simclr", "--set", "data.dataset=digits",
            "--set", "data.crops=2x8", "--set", "data.batch_size=64", "--set", "model.backbone=resnet_mini",
            "--set", "train.epochs=500", "--set", "knn.k=[20]"]


def test_a_remote_job_gets_no_secret_and_no_local_path_and_a_stopped_job_exits_6(ray_head, monkeypatch, capsys):
    from ray.job_submission import JobSubmissionClient

    import orchestrator.submit as submit_module

    client = JobSubmissionClient(ray_head)
    assert submit_module.cluster_is_this_machine(client)  # every node of this head is this host

    # the same head seen as a remote cluster behind a tunnel (kubectl port-forward): nothing local may travel
    monkeypatch.setattr(submit_module, "cluster_is_this_machine", lambda client: False)
    for key, value in {"RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "tok-123", "MLFLOW_TRACKING_PASSWORD": "pw-456",
                       "MLFLOW_TRACKING_TOKEN": "tok-789", "MLFLOW_TRACKING_USERNAME": "alice",
                       "MLFLOW_TRACKING_URI": "sqlite:////home/alice/sslab/.state/mlflow.db",
                       "SSLAB_HOME": "/home/alice/sslab/.state", "SSLAB_DATA_ROOT": "/home/alice/data"}.items():
        monkeypatch.setenv(key, value)
    code = main(["submit", "--address", ray_head, "--python", sys.executable, "--name", "sslab-test-remote",
                 "--env", "OMP_NUM_THREADS=1", "--", *LONG_JOB])
    assert code == 0
    info = client.get_job_info("sslab-test-remote")
    assert info.runtime_env["env_vars"] == {"OMP_NUM_THREADS": "1"}  # the pods' own URI, state and Secrets stay
    assert "pw-456" not in json.dumps(info.runtime_env) and "tok-" not in json.dumps(info.runtime_env)

    deadline = time.monotonic() + 120
    while (status := str(client.get_job_status("sslab-test-remote")).split(".")[-1]) != "RUNNING":
        assert status not in submit_module.TERMINAL, client.get_job_logs("sslab-test-remote")[-2000:]
        assert time.monotonic() < deadline, "the job did not start within 120 s"
        time.sleep(0.5)
    client.stop_job("sslab-test-remote")
    assert submit_module.follow(client, "sslab-test-remote", poll_s=0.5) == submit_module.STOPPED_EXIT == 6
    assert "job sslab-test-remote stopped" in capsys.readouterr().err

    # an explicit --tracking-uri is sent; a secret in --env is refused before anything is submitted
    assert submit_module.job_env("http://sslab-mlflow:5000", [], same_machine=False) == \
        {"MLFLOW_TRACKING_URI": "http://sslab-mlflow:5000"}
    assert main(["submit", "--address", ray_head, "--env", "MLFLOW_TRACKING_PASSWORD=pw", "--", "data", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MLFLOW_TRACKING_PASSWORD" in err[0] and "Kubernetes Secret" in err[0]
    assert "pw" not in err[0].split("MLFLOW_TRACKING_PASSWORD")[1][:4]  # the value is never echoed


def test_a_local_job_gets_this_checkouts_state_and_tracking_store(tmp_path, monkeypatch):
    import orchestrator.submit as submit_module

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-456")
    env = submit_module.job_env(None, ["A=1", "TOKENIZERS_PARALLELISM=false"], same_machine=True)
    assert env["SSLAB_HOME"] == str(tmp_path / "state") and env["A"] == "1"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'state' / 'mlflow' / 'mlflow.db'}"
    assert "pw-456" not in env.values() and env["TOKENIZERS_PARALLELISM"] == "false"  # a name, not a token
    for bad in (["HF_TOKEN=x"], ["PGPASSWORD=x"], ["DB_URL=postgresql://me:pw@db/x"]):
        with pytest.raises(UserError, match="dashboard user"):
            submit_module.job_env(None, bad, same_machine=True)
    with pytest.raises(UserError, match="--tracking-uri holds a password"):
        submit_module.job_env("http://alice:pw@sslab-mlflow:5000", [], same_machine=False)


class _OtherHost:
    """A job server whose nodes report another host name (a pod behind kubectl port-forward)."""

    def _do_request(self, method, endpoint, **kwargs):
        class Response:
            def json(self):
                return {"result": True, "data": {"hostNameList": ["sslab-head-7x9k2"]}}
        return Response()


def test_a_cluster_of_other_hosts_is_remote_even_on_loopback():
    import orchestrator.submit as submit_module

    assert not submit_module.cluster_is_this_machine(_OtherHost())
    assert not submit_module.cluster_is_this_machine(object())  # a server that does not say: remote


def test_plain_ray_job_submit_runs_sslab_from_the_working_dir(ray_head, tmp_path):
    """What cluster/README.md documents for users without `sslab submit`: the image holds the
    project (`sslab` on PATH), the checkout travels as the working dir."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "plain-job"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(
        [ray_head.ray_bin, "job", "submit", "--address", ray_head, "--working-dir", str(root), "--",
         "sslab", "pretrain", "--local", "--quiet", "--out", str(out), "--set", "method.name=simclr",
         "--set", "data.dataset=digits", "--set", "data.crops=2x8", "--set", "data.batch_size=128",
         "--set", "model.backbone=resnet_mini", "--set", "train.epochs=1", "--set", "optim.warmup_epochs=0",
         "--set", "knn.k=[20]"], env=env, capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "kNN top-1 (k=20, T=0.07)" in done.stdout and "succeeded" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["knn_top1_k20"] > 0.5  # digits: random guessing is 0.1


def test_waiting_for_nodes_posts_the_demand_for_an_autoscaler(ray_head, tmp_path):
    """A run that waits for GPU workers asks the autoscaler for them (request_resources), asks again
    on every pass of its wait (the request is one per cluster: another run may withdraw it), and
    withdraws it when the wait ends."""
    script = tmp_path / "driver.py"
    script.write_text(f"""
import json, threading, time
import ray
from ray.experimental.internal_kv import _internal_kv_get
from orchestrator.train import ClusterOptions, check_resources
from trainers.errors import UserError

ray.init(address="{ray_head.gcs}", logging_level="ERROR")
seen, result = [], {{}}
options = ClusterOptions(workers=2, cpus_per_worker=4, gpus_per_worker=1, address="{ray_head.gcs}",
                         resource_timeout_s=6)
def wait():
    try:
        check_resources(options, log=lambda m: None)
    except UserError as exc:
        result["error"] = str(exc)
def poll():
    value = _internal_kv_get("autoscaler_resource_request")
    if value:
        seen.append(json.loads(value))
    time.sleep(0.2)
thread = threading.Thread(target=wait)
thread.start()
while thread.is_alive() and not seen:
    poll()
from orchestrator.train import post_resource_demand
post_resource_demand([])  # another run ends its wait and withdraws the cluster's one request
withdrawn_at = len(seen)
while thread.is_alive():
    value = _internal_kv_get("autoscaler_resource_request")
    if value:
        seen.append(json.loads(value))
    time.sleep(0.2)
result["seen"] = seen
result["reposted"] = any(x == [{{"CPU": 4.0, "GPU": 1.0}}] * 2 for x in seen[withdrawn_at:])
result["after"] = json.loads(_internal_kv_get("autoscaler_resource_request") or b"null")
print("RESULT " + json.dumps(result))
""")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_enable_autoscaler_v2": "0",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line, (done.stdout + done.stderr)[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert [{"CPU": 4.0, "GPU": 1.0}] * 2 in result["seen"]  # two single-GPU workers, as Ray Train asks
    assert result["reposted"]  # posted again after another run withdrew the cluster's single request
    assert result["after"] == []  # withdrawn once the wait is over
    assert "cannot place 2 worker(s) x 4 CPU + 1 GPU" in result["error"] and "after waiting 6 s" in result["error"]


@pytest.mark.parametrize("cpus, gpus, nodes, expected", [
    (4, 1, [{"CPU": 2.0}], "no node has 4 CPU for one worker (largest: 2)"),
    (1, 2, [{"CPU": 8.0, "GPU": 1.0}], "no node has 2 GPU for one worker (largest: 1)"),
    (8, 1, [{"CPU": 8.0}, {"CPU": 2.0, "GPU": 1.0}], "no single node has both the CPUs and the GPUs"),
    (16, 0, [{"CPU": 8.0}, {"CPU": 8.0}], "no node has 16 CPU for one worker (largest: 8)"),
])
def test_an_unplaceable_worker_names_the_resource_no_node_has(cpus, gpus, nodes, expected):
    from orchestrator.train import ClusterOptions, _raise_unplaceable

    options = ClusterOptions(workers=1, cpus_per_worker=cpus, gpus_per_worker=gpus)
    total = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("CPU", "GPU")}
    with pytest.raises(UserError) as raised:
        _raise_unplaceable(options, 1, nodes, total, fits_node=False, timeout=0)
    assert expected in str(raised.value) and "GPU for one worker (largest" not in str(raised.value).replace(
        expected, "")


def test_a_driver_outside_the_cluster_sends_none_of_its_paths_to_the_workers(tmp_path, monkeypatch):
    """`--address ray://head:10001` (Ray Client from a laptop): the workers keep their nodes' own
    state folder, data root and tracking store; a driver on a node (`auto`) passes its own on."""
    from orchestrator.train import _worker_env

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "laptop-state"))
    monkeypatch.setenv("SSLAB_DATA_ROOT", str(tmp_path / "laptop-data"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/laptop.db")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-456")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # a setting, not a secret: it travels
    assert _worker_env("ray://head:10001") == {"RAY_AUTH_MODE": "token"}
    on_node = _worker_env("auto")
    assert on_node["SSLAB_HOME"] == str(tmp_path / "laptop-state") and "pw-456" not in on_node.values()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://sslab-mlflow:5000")  # a server URL means the same everywhere
    assert _worker_env("ray://head:10001") == {"MLFLOW_TRACKING_URI": "http://sslab-mlflow:5000", "RAY_AUTH_MODE": "token"}
