"""The pipeline: YAML validation, and the demo on a reduced budget end to end on a local Ray.

One Ray instance for the module. The end-to-end test runs the demo once (every stage), again
(everything cached: no new MLflow runs, through the CLI with --json), and then a variant whose
driver is killed (SIGKILL) inside the linear stage and is rerun: one run per stage in the end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.spec import load_pipeline, parse_pipeline
from trainers.errors import ConfigError

pytestmark = pytest.mark.slow  # runs whole pipelines: `make test-fast` leaves it out

DEMO = Path(__file__).resolve().parents[1] / "configs" / "pipelines" / "demo.yaml"
SMALL = ["stages.prepare.datasets=[fashion-mnist, digits]",
         "stages.pretrain.set=[data.crops=2x16+2x8, data.batch_size=64, data.train_subset=512, train.epochs=1, "
         "optim.warmup_epochs=0, knn.every_epochs=1, knn.max_train=256, knn.max_test=128, 'knn.k=[20]', "
         "train.log_every=2]",
         "stages.pretrain.cpus_per_worker=1", "stages.linear.epochs=2", "stages.semi.epochs=1",
         "stages.semi.min_steps=40", "stages.semi.batch_size=64", "stages.transfer.datasets=[digits]",
         "stages.transfer.epochs=2",
         # the demo's bands are for its full budget; this one's are what the test asserts below
         "stages.knn.expect={knn_top1_k20: [0.3, 1.0]}", "stages.linear.expect={linear_top1: [0.3, 1.0]}",
         "stages.semi.expect={semi1_top1: [0.3, 1.0], semi10_top1: [0.3, 1.0]}",
         "stages.transfer.expect={transfer_digits_top1: [0.3, 1.0]}"]


def _raw(**stages):
    return {"name": "t", "stages": stages}


@pytest.mark.parametrize("raw, message", [
    (_raw(knn={}), "needs a backbone"),
    (_raw(pretrian={"config": str(DEMO)}), "unknown kind 'pretrian' (did you mean 'pretrain'?)"),
    (_raw(linear={"backbone": "pretrain"}), "is not an earlier stage"),
    (_raw(prepare={"datasets": ["digits"]}, linear={"backbone": "prepare"}), "is a prepare stage, expected pretrain"),
    (_raw(prepare={"datasets": ["digits"]}, report={"inputs": ["prepare", "knn"]}), "input 'knn' is not an earlier"),
    (_raw(prepare={"datasets": ["digitz"]}), "digitz"),
    (_raw(prepare={"datasets": ["digits"], "dataset": ["digits"]}), "did you mean 'datasets'"),
    (_raw(prepare={}), "needs datasets"),
    ({"stages": {"prepare": {"datasets": ["digits"]}}}, "needs a 'name'"),
    ({"name": "t", "stages": {}, "sedd": 1}, "unknown pipeline key 'sedd'"),
])
def test_bad_pipelines_are_refused_with_one_line(raw, message):
    with pytest.raises(ConfigError, match=None) as error:
        parse_pipeline(raw)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_demo_pipeline_parses_with_its_inputs():
    spec = load_pipeline(DEMO)
    assert [s.name for s in spec.stages] == ["prepare", "pretrain", "knn", "linear", "semi", "transfer", "report"]
    assert spec.stage("linear").inputs == {"backbone": "pretrain"}
    assert spec.stage("report").inputs["inputs"] == ["prepare", "pretrain", "knn", "linear", "semi", "transfer"]
    assert Path(spec.stage("pretrain").settings["config"]).is_file()
    assert spec.digest() != load_pipeline(DEMO, ["stages.linear.epochs=3"]).digest()
    with pytest.raises(ConfigError, match="no stage 'linaer'"):
        load_pipeline(DEMO, ["stages.linaer.epochs=3"])


def test_unreachable_tracking_server_is_one_clear_error(tmp_path, capsys):
    from sslab.cli import main

    code = main(["pipeline", "run", "--config", str(DEMO), "--tracking-uri", "http://127.0.0.1:9",
                 "--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("error: ") and error.count("\n") == 1
    assert "127.0.0.1:9" in error and "--tracking-uri" in error
    assert not (tmp_path / "out").exists(), "nothing written before the store answers"


ray = pytest.importorskip("ray")
pytest.importorskip("mlflow")


def _runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sslab-pipelines")
    return client, client.search_runs([experiment.experiment_id], max_results=1000)


def test_demo_pipeline_end_to_end_cached_and_resumed(local_ray, tmp_path, capsys):
    from sslab.cli import main
    from pipelines.runner import FAULT_ENV, run_pipeline

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    outcome = run_pipeline(load_pipeline(DEMO, SMALL), tracking_uri=uri, out_dir=str(out), log=lambda *_: None)
    names = [s.name for s in outcome.stages]
    assert names == ["prepare", "pretrain", "knn", "linear", "semi", "transfer", "report"]
    assert not any(s.cached for s in outcome.stages)
    m = {k: v for s in outcome.stages for k, v in s.metrics.items()}
    # Fashion-MNIST and digits have 10 classes: chance is 0.1
    for key in ("knn_top1_k20", "knn_top1_k200_t0.1", "linear_top1", "semi1_top1", "semi10_top1", "transfer_digits_top1"):
        assert 0.3 < m[key] <= 1.0, (key, m[key])
    assert m["knn_top5_k20"] >= m["knn_top1_k20"] and m["linear_top5"] >= m["linear_top1"]

    client, runs = _runs(uri)
    parents = [r for r in runs if r.data.tags.get("sslab.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].info.run_id == outcome.parent_run_id
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == outcome.parent_run_id]
    assert sorted(r.data.tags["sslab.stage"] for r in children) == sorted(names)
    assert all(r.info.status == "FINISHED" and r.data.tags.get("sslab.stage_done") == "1" for r in children)
    by_stage = {r.data.tags["sslab.stage"]: r for r in children}
    assert by_stage["linear"].data.metrics["linear_top1"] == pytest.approx(m["linear_top1"])
    assert by_stage["pretrain"].data.params["method.name"] == "swav"
    assert {a.path for a in client.list_artifacts(by_stage["pretrain"].info.run_id, "backbone")} == \
        {"backbone/backbone.pt"}
    semi_files = {a.path for a in client.list_artifacts(by_stage["semi"].info.run_id)}
    assert {"semi1_indices.txt", "semi10_indices.txt", "result.json"} <= semi_files
    assert len((out / "semi" / "semi1_indices.txt").read_text().split()) == 600
    report = {a.path for a in client.list_artifacts(outcome.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/accuracy.png", "report/knn_vs_k.png",
            "report/per_class.png", "report/pretraining_curves.png"} <= report
    assert "linear probe top-1" in (out / "report" / "report.md").read_text()

    # the same command again: every stage cached, no new run, same parent; --json for schedulers
    capsys.readouterr()
    args = ["pipeline", "run", "--config", str(DEMO), "--tracking-uri", uri, "--out", str(out), "--json"]
    for item in SMALL:
        args += ["--set", item]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parent_run_id"] == outcome.parent_run_id and printed["tracking_uri"] == uri
    assert [s["name"] for s in printed["stages"]] == names and all(s["cached"] for s in printed["stages"])
    assert printed["stages"][3]["metrics"]["linear_top1"] == pytest.approx(m["linear_top1"])
    # every declared band checked, cached stages included: the verdict a scheduler reads
    assert printed["verdict"]["status"] == "pass" and outcome.verdict == "pass"
    assert sorted(c["metric"] for c in printed["verdict"]["checks"]) == sorted(
        ["knn_top1_k20", "linear_top1", "semi1_top1", "semi10_top1", "transfer_digits_top1"])
    _, again = _runs(uri)
    assert len(again) == len(runs)

    # other linear settings, run by the CLI in its own process; the driver SIGKILLs itself inside the
    # linear stage after its outputs are written and logged but before the stage is marked done
    import os
    import signal
    import subprocess
    import sys

    command = [sys.executable, "-m", "sslab", "pipeline", "run", "--config", str(DEMO), "--tracking-uri",
               uri, "--out", str(out)]
    for item in SMALL + ["stages.linear.epochs=3"]:
        command += ["--set", item]
    killed = subprocess.run(command, env={**os.environ, FAULT_ENV: "linear:kill"}, capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    _, stopped = _runs(uri)
    interrupted = [r for r in stopped if r.data.tags.get("sslab.stage") == "linear" and r.info.status == "RUNNING"]
    assert len(interrupted) == 1 and "sslab.stage_done" not in interrupted[0].data.tags
    assert (out / "linear" / "result.json").is_file()  # written, but not vouched for: the stage runs again
    # the same command again (in this process, so that its JSON can be read)
    capsys.readouterr()
    assert main(command[3:] + ["--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    cached = {s["name"]: s["cached"] for s in resumed["stages"]}
    assert cached == {"prepare": True, "pretrain": True, "knn": True, "linear": False, "semi": True,
                      "transfer": True, "report": False}
    linear = next(s for s in resumed["stages"] if s["name"] == "linear")
    assert linear["run_id"] == interrupted[0].info.run_id, "the interrupted stage's run is reused, not duplicated"
    assert linear["status"] == "finished" and 0.3 < linear["metrics"]["linear_top1"] <= 1.0
    _, final = _runs(uri)
    stage_runs = [r for r in final if "sslab.stage_hash" in r.data.tags]
    hashes = [r.data.tags["sslab.stage_hash"] for r in stage_runs]
    assert len(hashes) == len(set(hashes)), "exactly one run per stage"
    assert all(r.info.status == "FINISHED" for r in stage_runs)
    assert len(stage_runs) == 7 + 2  # the second pipeline added only its linear and report runs
    # ... and its parent shows every stage: the cached ones as finished links to the runs that hold them
    under = [r for r in final if r.data.tags.get("mlflow.parentRunId") == resumed["parent_run_id"]]
    assert resumed["parent_run_id"] != outcome.parent_run_id
    assert sorted(r.data.tags["sslab.stage"] for r in under) == sorted(names)
    links = {r.data.tags["sslab.stage"]: r for r in under if "sslab.cached_from" in r.data.tags}
    assert set(links) == {"prepare", "pretrain", "knn", "semi", "transfer"}, "one link per cached stage, no repeats"
    assert links["knn"].data.tags["sslab.cached_from"] == by_stage["knn"].info.run_id
    assert links["knn"].data.metrics["knn_top1_k20"] == pytest.approx(m["knn_top1_k20"])
    assert all(r.info.status == "FINISHED" and "sslab.stage_done" not in r.data.tags for r in links.values())


@pytest.mark.parametrize("path", sorted((DEMO.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_parses(path):
    spec = load_pipeline(path)
    assert spec.stages[0].kind == "prepare" and spec.stages[-1].kind == "report"
    assert any(s.kind == "pretrain" for s in spec.stages)


def test_sweep_stage_feeds_its_best_config_to_pretraining(local_ray, tmp_path):
    from pipelines.runner import run_pipeline

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("""
name: tiny
set: [method.name=simclr, data.dataset=digits, data.train_subset=512, data.crops=2x16, data.batch_size=64,
      model.backbone=resnet_mini, train.epochs=1, optim.warmup_epochs=0, knn.every_epochs=1, "knn.k=[20]"]
space:
  method.temperature: {grid: [0.1, 0.5]}
search: grid
scheduler: fifo
num_samples: 1
max_concurrent_trials: 2
cpus_per_worker: 1
""")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(f"""
name: swept
stages:
  sweep: {{config: {sweep}}}
  pretrain: {{from_sweep: sweep, set: [train.epochs=2]}}
  knn: {{dataset: digits}}
  report: {{}}
""")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    outcome = run_pipeline(load_pipeline(pipeline), tracking_uri=uri, out_dir=str(tmp_path / "out"),
                           log=lambda *_: None)
    stages = {s.name: s for s in outcome.stages}
    best = stages["sweep"].result["extra"]["best_config"]
    assert best["method"]["temperature"] in (0.1, 0.5) and best["data"]["dataset"] == "digits"
    trials = stages["sweep"].result["extra"]["best_trial"]
    assert trials["method.temperature"] == best["method"]["temperature"]
    pretrain = stages["pretrain"].result["extra"]
    assert pretrain["method"] == "simclr" and pretrain["dataset"] == "digits"
    assert pretrain["steps"] == 2 * (512 // 64), "the pipeline's own overrides apply on top of the best config"
    assert stages["knn"].metrics["knn_top1_k20"] > 0.5


def test_a_failing_stage_is_one_line_and_marks_its_runs_failed(local_ray, tmp_path, capsys):
    from sslab.cli import main

    pipeline = tmp_path / "broken.yaml"
    pipeline.write_text(f"name: broken\nstages:\n  prepare: {{datasets: ['imagefolder:{tmp_path / 'absent'}']}}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["pipeline", "run", "--config", str(pipeline), "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 3, lines
    assert lines[-1].startswith("error: image folder") and "does not exist" in lines[-1]
    assert not any("Traceback" in line for line in lines)
    _, runs = _runs(uri)
    assert sorted(r.info.status for r in runs) == ["FAILED", "FAILED"]  # the parent and the prepare stage
    assert not (tmp_path / "out" / "prepare" / "result.json").exists()


def test_an_error_after_the_stages_marks_the_pipeline_run_failed(tmp_path, monkeypatch):
    """The stages finished, then logging the summary fails (the tracking server went away): the parent run
    is FAILED, not left RUNNING, and the error is the one raised."""
    from mlflow.tracking import MlflowClient

    from pipelines.runner import PipelineRunner, StageOutcome

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    spec = parse_pipeline({"name": "after", "stages": {"prepare": {"datasets": ["digits"]}}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = PipelineRunner(spec, tracking_uri=uri, out_dir=str(tmp_path / "out"), log=lambda *_: None)
    done = StageOutcome("prepare", "prepare", None, "finished", False, "k", "h", {"metrics": {"x": 1.0}, "extra": {}})
    monkeypatch.setattr(runner, "_run_stage", lambda stage: done)

    def gone(run_id, metrics):
        raise ConnectionError("tracking server gone")

    monkeypatch.setattr(runner, "_log_metrics", gone)
    with pytest.raises(ConnectionError, match="tracking server gone"):
        runner.run()
    assert MlflowClient(uri).get_run(runner.parent_id).info.status == "FAILED"


def test_a_forced_pretraining_resumes_when_stopped_and_starts_fresh_when_finished(tmp_path, monkeypatch):
    """--force pretrain: a new Ray run after a finished one; the same one (resumed from its checkpoints) when
    the forced run was stopped midway and the same command runs again."""
    from orchestrator import tracking
    from pipelines.runner import PipelineRunner

    monkeypatch.setenv("SSLAB_HOME", str(tmp_path / "home"))
    spec = parse_pipeline({"name": "f", "stages": {"prepare": {"datasets": ["digits"]}}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runner = PipelineRunner(spec, tracking_uri=uri, out_dir=str(tmp_path / "out"), log=lambda *_: None)
    runner._open_parent()
    recorder = tracking.RunRecorder(uri, spec.experiment)
    assert runner._forced_name("f-pretrain-abc") == "f-pretrain-abc-forced-1"
    first, _ = recorder.open("f-pretrain-abc-forced-1", "pretrain")  # started, then stopped: still RUNNING
    assert runner._forced_name("f-pretrain-abc") == "f-pretrain-abc-forced-1"
    recorder.finish(first, "FINISHED")
    assert runner._forced_name("f-pretrain-abc") == "f-pretrain-abc-forced-2"
    assert runner._forced_name("f-pretrain-other") == "f-pretrain-other-forced-1"
