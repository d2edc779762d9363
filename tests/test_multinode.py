"""Several Ray nodes on this machine: DDP across nodes, a node lost mid-run, a SIGTERM to a worker.

The cluster is ``ray.cluster_utils.Cluster``: a GCS and one raylet per node, the processes ``ray start``
runs, with the driver (this test process) connected by address as to any cluster. Each node has its own
state folder (so its own data cache) and an empty data root: a worker can read the data only from the
``.beton`` files the driver staged through the run storage. The storage folder stands for the shared
file system (or bucket) that Ray Train needs on a real cluster.

Nodes have one CPU each (the head none), so a 2-worker group must span two nodes; the reference run
goes to one node with two CPUs. Runs are tiny (Fashion-MNIST subset, resnet_mini, 16-px crops, 16
steps) and deterministic, so a run that lost a node or was preempted must give the reference's
losses exactly, step for step.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")

from test_ray_train import losses, tiny_config  # noqa: E402

pytestmark = pytest.mark.slow  # starts a Ray cluster of several nodes: `make test-fast` leaves it out

WAIT_STEP = 6  # the step at which rank 0 stands still while the test sends the preemption signal


class Nodes:
    """The module's cluster and one state folder per node."""

    def __init__(self, base: Path):
        from ray.cluster_utils import Cluster

        self.base = base
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "env_vars": self.env("head")})
        self.nodes: dict = {}

    def env(self, name: str) -> dict:
        (self.base / name / "no-data").mkdir(parents=True, exist_ok=True)
        return {"SSLAB_HOME": str(self.base / name), "SSLAB_DATA_ROOT": str(self.base / name / "no-data"),
                "RAY_AUTH_MODE": "disabled", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}

    def add(self, name: str, cpus: int) -> str:
        node = self.cluster.add_node(num_cpus=cpus, env_vars=self.env(name))
        self.cluster.wait_for_nodes()
        self.nodes[name] = node
        return node.node_id[:12]

    def remove(self, name: str) -> None:
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)  # raylet and workers: SIGKILL

    def clear(self) -> None:
        """Remove the nodes an earlier test left (one that failed before its own clean-up)."""
        for name in list(self.nodes):
            self.remove(name)

    def cache(self, name: str) -> Path:
        return self.base / name / "data"


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    if ray.is_initialized():
        ray.shutdown()
    cluster = Nodes(tmp_path_factory.mktemp("nodes"))
    yield cluster
    ray.shutdown()
    cluster.cluster.shutdown()
    if saved is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def cluster_options(nodes: Nodes, tmp_path: Path, **kwargs):
    from orchestrator.train import ClusterOptions

    return ClusterOptions(workers=2, cpus_per_worker=1, address=nodes.cluster.address, storage=str(tmp_path / "ray"),
                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", stage_data=True,
                          resource_timeout_s=120, **kwargs)


def config(**extra):
    return tiny_config("swav", **{"method.prototypes": 30, **extra})


def records(run_folder: Path, name: str) -> list[dict]:
    path = run_folder / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def logged_steps(tmp_path: Path, run_id: str, key: str = "loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(run_id, key))


def run_in_thread(target) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def body():
        try:
            box["outcome"] = target()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, box


def wait_for(path: Path, thread: threading.Thread, box: dict, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if not thread.is_alive():
            raise AssertionError(f"the run ended before {path.name}: {box.get('error')!r}")
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.1)


def wait_registered(run_folder: Path, step: int, thread, box, timeout: float = 120) -> None:
    """Until Ray Train's checkpoint manager lists a checkpoint of ``step`` (a node lost before that would
    take the report with it, and the restart would go back to the previous checkpoint, as it should)."""
    snapshot = run_folder / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout
    while True:
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):
            results = []
        if any(r.get("metrics", {}).get("step") == step for r in results):
            return
        assert thread.is_alive(), f"the run ended early: {box.get('error')!r}"
        assert time.monotonic() < deadline, f"Ray Train registered no checkpoint of step {step} in {timeout} s"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(nodes, tmp_path_factory):
    """The uninterrupted 2-worker run, both workers on one node (the only one with 2 CPUs)."""
    from orchestrator.train import run_pretraining

    tmp = tmp_path_factory.mktemp("reference")
    nodes.clear()
    single = nodes.add("single", cpus=2)
    outcome = run_pretraining(config(), cluster_options(nodes, tmp), name="reference", log=lambda *_: None)
    attempts = records(tmp / "ray" / "reference", "attempts.jsonl")
    nodes.remove("single")
    assert [a["start_step"] for a in attempts] == [0] and attempts[0]["nodes"] == 1
    assert {r["node"] for r in attempts[0]["ranks"]} == {single}
    assert outcome.steps == 16 and sorted(losses(outcome.history)) == list(range(1, 17))
    return outcome


def test_ddp_across_two_nodes_survives_a_preemption_and_a_lost_node_and_matches_the_single_node_run(
        nodes, reference, tmp_path, monkeypatch):
    """One 2-worker run spread over two nodes (each fetching the staged data into its own cache) meets
    both faults a cluster has (one run, not two: each run costs a minute of CI):

    1. SIGTERM to rank 1's process at step 6 (a spot reclaim, a pod eviction): all ranks stop after the
       step in flight (6, or 7 if the signal lands after rank 1 entered the step-6 agreement), rank 0
       writes and reports a checkpoint there within the grace period, and the restarted group resumes
       from that step, not from the last regular checkpoint (step 4).
    2. Node B lost at step 11 (its raylet and worker killed): Ray Train restarts the group on what
       remains plus a new node C from the step-8 checkpoint.

    The run ends with the single-node reference's 16 steps and losses, and MLflow holds each step once."""
    from orchestrator.preempt import DEFAULT_STOP_GRACE_S
    from orchestrator.faults import FAULT_ENV
    from orchestrator.train import run_pretraining
    from trainers.data.beton import read_meta

    preempt_step, lose_step = WAIT_STEP, 11
    nodes.clear()
    node_a, node_b = nodes.add("a", cpus=1), nodes.add("b", cpus=1)
    monkeypatch.setenv(FAULT_ENV, f"wait:{preempt_step},{lose_step}")
    run_folder = tmp_path / "ray" / "spread"
    thread, box = run_in_thread(lambda: run_pretraining(
        config(**{"train.checkpoint_every_steps": 4}), cluster_options(nodes, tmp_path), name="spread",
        log=lambda *_: None))

    # 1. the preemption notice
    wait_for(run_folder / "faults" / f"fault-{preempt_step}", thread, box)
    ranks = records(run_folder, "attempts.jsonl")[0]["ranks"]
    assert {r["node"] for r in ranks} == {node_a, node_b}, "one worker on each node"
    victim = ranks[1]["pid"]
    sent = time.monotonic()
    os.kill(victim, signal.SIGTERM)
    time.sleep(1.0)  # the handler runs on the worker's main thread between the controller's polls
    (run_folder / "faults" / f"go-{preempt_step}").write_text("")

    # 2. the lost node, once the restarted group stands at step 11 and Ray Train holds the step-8 checkpoint
    wait_for(run_folder / "faults" / f"fault-{lose_step}", thread, box)
    wait_registered(run_folder, step=8, thread=thread, box=box)
    nodes.remove("b")
    node_c = nodes.add("c", cpus=1)
    (run_folder / "faults" / f"go-{lose_step}").write_text("")
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    outcome = box["outcome"]

    stops = records(run_folder, "preemptions.jsonl")
    assert len(stops) == 1 and stops[0]["rank"] == 1 and stops[0]["reason"].startswith("SIGTERM"), stops
    stopped = stops[0]["stopped_at_step"]
    assert stopped in (preempt_step, preempt_step + 1), stops
    assert stops[0]["checkpoint_s"] < DEFAULT_STOP_GRACE_S, "the checkpoint was out within the grace period"
    attempts = records(run_folder, "attempts.jsonl")
    assert [a["start_step"] for a in attempts] == [0, stopped, 8], \
        "resumed from the step it was stopped at, then from the step-8 checkpoint after the node loss"
    assert {r["node"] for r in attempts[1]["ranks"]} == {node_a, node_b}
    assert {r["node"] for r in attempts[2]["ranks"]} == {node_a, node_c}
    assert outcome.steps == reference.steps == 16
    assert losses(outcome.history) == losses(reference.history), "the same losses as on one node, uninterrupted"
    assert logged_steps(tmp_path, outcome.run_id) == list(range(1, 17)), "each step in MLflow once"
    staged = {p.name: read_meta(p) for p in (tmp_path / "ray" / "_data").glob("*.beton")}
    assert sorted(staged) == ["fashion-mnist-test.beton", "fashion-mnist-train.beton"]
    for name in ("a", "b", "c"):  # every node read the staged files, fetched into its own cache
        for file, meta in staged.items():
            assert read_meta(nodes.cache(name) / file) == meta, (name, file)
            assert (nodes.cache(name) / file).stat().st_size == meta["bytes"]
    deadline = sent + DEFAULT_STOP_GRACE_S + 30
    while _alive(victim) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _alive(victim), "the signalled worker process exited"
    nodes.remove("a")
    nodes.remove("c")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
