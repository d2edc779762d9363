"""Ray Train pretraining on a local Ray (CPU, gloo) with MLflow in a sqlite store.

One Ray instance serves the whole module; runs are tiny (a Fashion-MNIST subset, resnet_mini,
16-px crops, a few steps) so that each takes seconds after Ray's worker start-up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from trainers.config import load_config
from trainers.errors import UserError

pytestmark = pytest.mark.slow  # starts Ray and trains through Ray Train: `make test-fast` leaves it out

ray = pytest.importorskip("ray")
mlflow = pytest.importorskip("mlflow")

STEPS = 8


@pytest.fixture(scope="module")
def local_ray():
    from orchestrator.train import init_ray

    if not ray.is_initialized():
        init_ray(None, num_cpus=8)  # room for trials that ASHA stopped while Ray cleans them up
    yield
    ray.shutdown()


def tiny_config(method="simclr", **extra):
    overrides = [f"method.name={method}", "data.dataset=fashion-mnist", "data.crops=2x16", "data.batch_size=32",
                 "data.train_subset=512", "model.backbone=resnet_mini", "train.epochs=1", "train.log_every=1",
                 "optim.warmup_epochs=0", "optim.lr=0.1", "knn.every_epochs=1", "knn.max_train=256",
                 "knn.max_test=128", "knn.k=[20]", "train.deterministic=true"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def options(tmp_path, workers=1, **kwargs):
    from orchestrator.train import ClusterOptions

    return ClusterOptions(workers=workers, cpus_per_worker=1, storage=str(tmp_path / "ray"),
                          tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", **kwargs)


def mlflow_runs(tmp_path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sslab")
    return client, client.search_runs([experiment.experiment_id]) if experiment else []


def losses(history):
    return {row["step"]: row["loss"] for row in history if "loss" in row}


def test_two_workers_match_one_worker_on_the_same_global_batch(local_ray, tmp_path):
    from orchestrator.train import run_pretraining

    one = run_pretraining(tiny_config(), options(tmp_path, system_metrics_s=0.5), name="one", log=lambda *_: None)
    client, _ = mlflow_runs(tmp_path)  # MLflow's own sampler ran on rank 0 and wrote into the run
    samples = client.get_metric_history(one.run_id, "system/cpu_utilization_percentage")
    assert samples and all(0 <= m.value <= 100 * os.cpu_count() for m in samples)
    assert client.get_metric_history(one.run_id, "system/system_memory_usage_megabytes")
    inputs = client.get_run(one.run_id).inputs.dataset_inputs  # lineage: the prepared splits it trained on
    assert sorted(i.dataset.name for i in inputs) == ["fashion-mnist-test", "fashion-mnist-train"]
    # the second run stages its data files through the run storage and its workers fetch them into
    # their own cache folder, as on nodes without a shared file system
    node = tmp_path / "node-state"
    two = run_pretraining(tiny_config(), options(tmp_path, workers=2, stage_data=True,
                                                 worker_env={"SSLAB_HOME": str(node)}), name="two",
                          log=lambda *_: None)
    from trainers.data.beton import read_meta

    for split in ("train", "test"):
        staged = tmp_path / "ray" / "_data" / f"fashion-mnist-{split}.beton"
        fetched = node / "data" / staged.name
        assert fetched.is_file() and fetched.stat().st_size == staged.stat().st_size == read_meta(staged)["bytes"]
        assert read_meta(fetched) == read_meta(staged), "the workers used the staged file, not one of their own"
    assert one.steps == two.steps == 512 // 32
    a, b = losses(one.history), losses(two.history)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    # The views differ (each rank draws its own augmentations) and each rank's BN sees half the batch,
    # so the curves agree within noise, not exactly. Measured (SimCLR, batch 32, 16 steps): largest
    # per-step difference 0.22, mean-loss difference 0.058, loss drops of 0.36 (1 worker) and 0.20
    # (2 workers). A rank that trained on the wrong shard, skipped the gradient all-reduce or used
    # only local negatives moves these well beyond the bounds below.
    worst = max(abs(a[s] - b[s]) for s in a)
    mean_gap = abs(sum(a.values()) - sum(b.values())) / len(a)
    assert worst < 0.35 and mean_gap < 0.12, (a, b)
    assert a[16] < a[1] - 0.1 and b[16] < b[1] - 0.1, (a, b)


def test_three_sigkills_mid_epoch_give_the_uninterrupted_run_and_one_mlflow_run(local_ray, tmp_path, monkeypatch):
    from orchestrator.faults import FAULT_ENV
    from orchestrator.train import run_pretraining
    from trainers.checkpoint import load_checkpoint

    def config():
        return tiny_config("swav", **{"train.checkpoint_every_steps": 4, "method.prototypes": 30})

    reference = run_pretraining(config(), options(tmp_path / "reference"), name="reference", log=lambda *_: None)
    # rank 0's process kills itself (SIGKILL: no exception, no cleanup) at steps 6, 10 and 15 of the
    # 16-step epoch; the checkpoints are at steps 4, 8 and 12, so each restart redoes 2-3 steps
    monkeypatch.setenv(FAULT_ENV, "kill:6,10,15")
    outcome = run_pretraining(config(), options(tmp_path, max_failures=3), name="faulty", log=lambda *_: None)
    assert sorted(p.name for p in (tmp_path / "ray" / "faulty" / "faults").iterdir()) == \
        ["fault-10", "fault-15", "fault-6"]
    assert outcome.steps == reference.steps == 16 and sorted(losses(outcome.history)) == list(range(1, 17))
    assert losses(outcome.history) == losses(reference.history)
    final = load_checkpoint(f"{outcome.checkpoint}/last.pt")["model"]
    expected = load_checkpoint(f"{reference.checkpoint}/last.pt")["model"]
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in expected), "the same final weights as without kills"

    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == outcome.run_id
    assert run.data.params["method.name"] == "swav" and run.data.params["method.prototypes"] == "30"
    assert run.data.params["data.batch_size"] == "32"
    assert run.data.tags["method"] == "swav" and run.data.tags["dataset"] == "fashion-mnist"
    assert run.data.tags.get("ray_job_id") and run.data.tags.get("git_commit")
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(loss_steps) == list(range(1, 17)), "each step logged exactly once despite the restarts"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1_k20")] == [16]
    assert 0.0 < run.data.metrics["knn_top1_k20"] <= 1.0
    # the online linear probe is on by default: its top-1 reaches MLflow once per evaluation, like kNN
    assert [m.step for m in client.get_metric_history(run.info.run_id, "online_linear_top1")] == [16]
    assert 0.0 < run.data.metrics["online_linear_top1"] <= run.data.metrics["online_linear_top5"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "backbone", "checkpoint"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "backbone")} == {"backbone/backbone.pt"}

    # the backbone loads by run id
    from orchestrator.tracking import download_backbone

    backbone, dim, info = download_backbone(outcome.tracking_uri, run.info.run_id)
    assert dim == 256 and info["method"] == "swav"

    # rerunning the same name resumes the finished run: no new steps, still one MLflow run
    monkeypatch.delenv(FAULT_ENV)
    again = run_pretraining(config(), options(tmp_path), name="faulty", log=lambda *_: None)
    assert again.steps == 16
    _, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == list(range(1, 17))
    summary = json.loads((tmp_path / "ray" / "faulty").glob("checkpoint_*/summary.json").__next__().read_text())
    assert summary["steps"] == 16


def test_asha_sweep_gives_nested_runs_summary_and_best_config(local_ray, tmp_path):
    from orchestrator.sweep import load_sweep, run_sweep

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("""
name: tiny
set: [method.name=swav, method.prototypes=30, data.dataset=fashion-mnist, data.crops=2x16+2x8, data.batch_size=32,
      data.train_subset=256, model.backbone=resnet_mini, train.epochs=2, train.log_every=4, optim.warmup_epochs=0,
      knn.every_epochs=1, knn.max_train=256, knn.max_test=128, "knn.k=[20]"]
space:
  method.temperature: {loguniform: [0.05, 0.2]}
  method.epsilon: {choice: [0.03, 0.05]}
search: random
scheduler: asha
num_samples: 4
max_concurrent_trials: 2
cpus_per_worker: 1
asha: {grace_period: 1, reduction_factor: 2}
""")
    spec = load_sweep(sweep)
    outcome = run_sweep(spec, options(tmp_path), name="tiny-sweep", log=lambda *_: None)
    assert len(outcome.table) == 4 and all(row["error"] is None for row in outcome.table)
    scores = [row["knn_top1_k20"] for row in outcome.table]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    # every trial either ran both epochs or was stopped by ASHA after the first (which ones depends on
    # the order results arrive in); the best one is the top of the table
    assert all(row["iterations"] in (1, 2) for row in outcome.table)
    assert outcome.best["knn_top1_k20"] == max(scores)
    assert 0.05 <= outcome.best["method.temperature"] <= 0.2
    assert (outcome.folder / "summary.md").is_file()
    assert (outcome.folder / "metric_vs_method_temperature.png").is_file()
    best = load_config(outcome.folder / "best_config.yaml")
    assert best.method_options().temperature == pytest.approx(outcome.best["method.temperature"])
    assert best.method_options().epsilon == outcome.best["method.epsilon"]

    client, runs = mlflow_runs(tmp_path)
    parents = [r for r in runs if r.data.tags.get("sslab.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert len(parents) == 1 and len(children) == 4
    assert sorted(float(c.data.params["method.temperature"]) for c in children) == \
        pytest.approx(sorted(row["method.temperature"] for row in outcome.table))
    # a trial ASHA stopped could not close its own run: the driver closes it as KILLED with what it logged
    by_temperature = {round(row["method.temperature"], 6): row for row in outcome.table}
    for child in children:
        row = by_temperature[round(float(child.data.params["method.temperature"]), 6)]
        expected = "KILLED" if row["iterations"] == 1 else "FINISHED"
        assert child.info.status == expected, (row, child.info.status)
        assert (child.data.tags.get("stopped_by") == "asha") == (expected == "KILLED")
        assert child.data.metrics["knn_top1_k20"] == pytest.approx(row["knn_top1_k20"])
    best_checkpoint = outcome.best["checkpoint"]
    assert best_checkpoint and (tmp_path / "ray") in Path(best_checkpoint).parents
    assert (Path(best_checkpoint) / "backbone.pt").is_file() == (outcome.best["iterations"] == 2)
    parent_files = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"summary.md", "summary.json", "best_config.yaml"} <= parent_files


def test_a_trial_that_finished_while_being_stopped_reports_its_last_epoch(tmp_path):
    """Tune may stop a trial after its first epoch's result while the trial completes its last epoch:
    the sweep table must then show what the trial reached (as its MLflow run and checkpoint do)."""
    from orchestrator.sweep import _complete_from_storage
    from orchestrator.train import _latest_checkpoint

    run = tmp_path / "trials" / "tiny-abc_00001"
    for index, (steps, knn, done) in enumerate([(8, 0.50, False), (16, 0.62, True)]):
        folder = run / f"checkpoint_{index:06d}"
        folder.mkdir(parents=True)
        (folder / "metrics.jsonl").write_text(json.dumps({"step": steps, "knn_top1_k20": knn}) + "\n")
        if done:
            (folder / "summary.json").write_text(json.dumps({"steps": steps, "epochs_completed": 2,
                                                             "knn_top1_k20": knn}))
    row = {"knn_top1_k20": 0.50, "iterations": 1, "steps": 8, "checkpoint": None}
    _complete_from_storage(row, "knn_top1_k20", _latest_checkpoint(str(tmp_path / "trials"), "tiny-abc_00001"))
    assert row == {"knn_top1_k20": 0.62, "iterations": 2, "steps": 16, "checkpoint": str(run / "checkpoint_000001")}

    stopped = {"knn_top1_k20": 0.50, "iterations": 1, "steps": 8, "checkpoint": None}
    (run / "checkpoint_000001" / "summary.json").unlink()
    (run / "checkpoint_000001").rename(run / "old")
    _complete_from_storage(stopped, "knn_top1_k20", _latest_checkpoint(str(tmp_path / "trials"), "tiny-abc_00001"))
    assert stopped == {"knn_top1_k20": 0.50, "iterations": 1, "steps": 8, "checkpoint": str(run / "checkpoint_000000")}


def test_non_finite_loss_on_ray_stops_without_replaying_the_run(local_ray, tmp_path):
    """A NaN loss comes back after every restart: the first worker to meet it leaves a note, the
    restarted group stops at once, and the user gets one error naming the step and the resume point."""
    from orchestrator.train import FATAL_NOTE, run_pretraining
    from trainers.loop import NonFiniteLossError

    config = tiny_config("swav", **{"method.prototypes": 30, "optim.lr": "1.0e+30", "train.checkpoint_every_steps": 2})
    with pytest.raises(UserError) as err:
        run_pretraining(config, options(tmp_path, max_failures=2), name="nan", log=lambda *_: None)
    message = str(err.value)
    assert "at step" in message and "of swav" in message and "lower optim.lr" in message
    assert f"{tmp_path / 'ray'}/nan" in message and "--name nan" in message
    assert err.value.exit_code == NonFiniteLossError.exit_code
    note = json.loads((tmp_path / "ray" / "nan" / FATAL_NOTE).read_text())
    assert note["message"] == message
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]


def test_tracking_server_down_at_the_start_gets_the_whole_run_when_it_answers(local_ray, tmp_path, monkeypatch):
    from orchestrator import tracking
    from orchestrator.train import run_pretraining

    answers = iter([f"MLflow server {tmp_path} is unreachable (test)"])  # down once, then up
    monkeypatch.setattr(tracking, "check_reachable", lambda uri, timeout_s=5.0: next(answers, None))
    messages = []
    outcome = run_pretraining(tiny_config("simclr"), options(tmp_path), name="late", log=messages.append)
    assert any("training goes ahead without live tracking" in m for m in messages)
    assert outcome.steps == 16 and outcome.run_id is not None
    client, runs = mlflow_runs(tmp_path)
    assert [r.info.run_id for r in runs] == [outcome.run_id] and runs[0].info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(outcome.run_id, "loss")) == list(range(1, 17))
    assert runs[0].data.tags[tracking.GAP_TAG] == "steps 1-16 sent at the end (the server did not answer at the start)"
