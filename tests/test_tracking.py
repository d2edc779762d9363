"""MLflow tracking helpers: store resolution and logging that survives an unreachable server."""

from __future__ import annotations

import json
import socket

import pytest

from orchestrator import tracking
from trainers.errors import UserError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_default_store_is_an_absolute_sqlite_path_in_the_state_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    uri = tracking.resolve_tracking_uri(None)
    assert uri == f"sqlite:///{tmp_path / 'home' / 'mlflow' / 'mlflow.db'}"
    assert tracking.artifact_location(uri) == (tmp_path / "home" / "mlflow" / "artifacts").as_uri()


def test_relative_sqlite_becomes_absolute_and_file_store_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path / 'rel' / 'm.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(UserError, match="file store is not supported"):
        tracking.resolve_tracking_uri(None)


def test_unreachable_server_is_reported_not_raised():
    problem = tracking.check_reachable(f"http://127.0.0.1:{_closed_port()}", timeout_s=2)
    assert problem is not None and "unreachable" in problem


def test_metric_logger_keeps_rows_while_the_server_is_down_and_replays_them_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    store = f"sqlite:///{tmp_path / 'm.db'}"
    client = tracking.client(store)
    exp = tracking.experiment_id(client, "t", store)
    run_id = client.create_run(exp).info.run_id

    messages = []
    logger = tracking.MetricLogger(f"http://127.0.0.1:{_closed_port()}", run_id, log=messages.append, retry_s=3600)
    for step in (1, 2, 3):
        logger.log_row(step, {"step": step, "loss": 5.0 - step, "lr": 0.1})  # must not raise
    assert len(messages) == 1 and "training continues" in messages[0]
    assert [s for s, _ in logger.pending] == [1, 2, 3]

    logger.uri, logger._client = store, None  # the server is back
    assert logger.flush(force=True)
    assert "replayed 3" in messages[-1] and "steps 1-3" in messages[-1]
    assert client.get_run(run_id).data.tags[tracking.GAP_TAG].startswith("steps 1-3 sent")
    logger.log_row(3, {"loss": 99.0})  # a restarted worker repeating step 3: skipped
    logger.log_row(4, {"loss": 0.5})
    history = client.get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 4.0), (2, 3.0), (3, 2.0), (4, 0.5)]


def test_replay_history_logs_only_missing_steps(tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    client = tracking.client(store)
    run_id = client.create_run(tracking.experiment_id(client, "t", store)).info.run_id
    rows = [{"step": s, "epoch": 0, "loss": float(s)} for s in range(1, 6)] + [{"step": 5, "knn_top1_k20": 0.4}]
    assert tracking.replay_history(store, run_id, rows[:3], log=lambda *_: None)
    assert tracking.replay_history(store, run_id, rows, log=lambda *_: None)
    assert [m.step for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)] == [1, 2, 3, 4, 5]
    assert [m.value for m in client.get_metric_history(run_id, "knn_top1_k20")] == [0.4]


def test_run_recorder_opens_continues_and_finishes_runs_one_way(tmp_path, monkeypatch):
    """Every command's runs get the same standard tags; a run found by its resume tags continues (status
    RUNNING again, params it holds kept); finish uploads the files that exist and sets the status."""
    monkeypatch.setenv("SSLAB_RAY_JOB_ID", "raysubmit_42")
    store = f"sqlite:///{tmp_path / 'm.db'}"
    recorder = tracking.RunRecorder(store, "exp")
    parent, continued = recorder.open("sweep-a", "sweep", {"search": "grid"}, {"metric": "loss", "space": {"a": [1]}})
    assert not continued
    child, _ = recorder.open("sweep-a-1", "trial", {"sweep": "sweep-a"}, {"optim.lr": 0.1}, parent=parent)
    run = recorder.client.get_run(child)
    tags = run.data.tags
    assert tags[tracking.RUN_NAME_TAG] == "sweep-a-1" and tags[tracking.KIND_TAG] == "trial"
    assert tags[tracking.PARENT_TAG] == parent and tags["ray_job_id"] == "raysubmit_42" and tags["sweep"] == "sweep-a"
    assert tags.get("git_commit") == tracking.git_commit()  # the checkout's commit (none outside a checkout)
    assert run.data.params == {"optim.lr": "0.1"} and run.info.run_name == "sweep-a-1"
    assert recorder.client.get_run(parent).data.params == {"metric": "loss", "space": '{"a": [1]}'}

    (tmp_path / "summary.csv").write_text("a,loss\n1,0.5\n")
    recorder.finish(child, "KILLED", [(tmp_path / "summary.csv", "report"), (tmp_path / "missing.png", None)])
    assert recorder.client.get_run(child).info.status == "KILLED"
    assert [f.path for f in recorder.client.list_artifacts(child, "report")] == ["report/summary.csv"]
    assert recorder.client.list_artifacts(child) and len(recorder.client.list_artifacts(child)) == 1

    again, continued = recorder.open("sweep-a-1", "trial", params={"optim.lr": 0.2, "seed": 1},
                                     resume={tracking.RUN_NAME_TAG: "sweep-a-1", tracking.KIND_TAG: "trial"})
    assert continued and again == child
    run = recorder.client.get_run(child)
    assert run.info.status == "RUNNING" and run.data.params == {"optim.lr": "0.1", "seed": "1"}
    other = tracking.RunRecorder(store, experiment_id=recorder.experiment_id)
    assert other.find({tracking.KIND_TAG: "sweep"}).info.run_id == parent
    assert other.find({tracking.KIND_TAG: "pipeline"}) is None


def test_experiments_are_marked_as_model_training_for_mlflows_ui(tmp_path):
    """Experiments are marked as model training (mlflow.experimentKind), as MLflow's own dialog marks them."""
    store = f"sqlite:///{tmp_path / 'm.db'}"
    client = tracking.client(store)
    fresh = tracking.experiment_id(client, "fresh", store)
    assert client.get_experiment(fresh).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    older = client.create_experiment("older")  # as sslab created them before
    assert tracking.EXPERIMENT_KIND_TAG not in client.get_experiment(older).tags
    assert tracking.experiment_id(client, "older", store) == older
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    client.set_experiment_tag(older, tracking.EXPERIMENT_KIND_TAG, "genai_development")  # a user's choice stays
    tracking.experiment_id(client, "older", store)
    assert client.get_experiment(older).tags[tracking.EXPERIMENT_KIND_TAG] == "genai_development"


def test_prepared_splits_become_the_runs_dataset_inputs(tmp_path):
    store = f"sqlite:///{tmp_path / 'm.db'}"
    recorder = tracking.RunRecorder(store, "t")
    run_id, _ = recorder.open("r", "pretrain")
    key = "ab" * 32
    sidecars = [{"dataset": "cifar10", "split": "train", "key": key, "source": "/data/cifar10-jpg.tar.gz",
                 "count": 50000, "num_classes": 10},
                {"dataset": "cifar10", "split": "test", "key": "cd" * 32, "source": "/data/cifar10-jpg.tar.gz",
                 "count": 10000}]
    assert tracking.log_dataset_inputs(recorder.client, run_id, sidecars) == 2
    inputs = recorder.client.get_run(run_id).inputs.dataset_inputs
    found = {i.dataset.name: i for i in inputs}
    assert set(found) == {"cifar10-train", "cifar10-test"}
    train = found["cifar10-train"]
    assert train.dataset.digest == key[:36] and json.loads(train.dataset.profile)["content_key"] == key
    assert json.loads(train.dataset.source)["uri"] == "/data/cifar10-jpg.tar.gz"
    assert [(t.key, t.value) for t in train.tags] == [("mlflow.data.context", "training")]
    assert [t.value for t in found["cifar10-test"].tags] == ["evaluation"]
