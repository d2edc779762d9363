"""Runs a pipeline: stages in order on Ray, one MLflow parent run, one child run per stage, cached.

Caching: a stage's key is a hash of its kind, its resolved settings, the pipeline seed and data
root, and the output hashes of its inputs (the backbone file's sha256, a sweep's best config, the
data files' content keys). A stage whose key has a finished run tagged ``sslab.stage_done`` in the
experiment is not run again: its result comes from the stage folder (or the run's ``result.json``).
The ``done`` tag is written last, after the result and every artifact, so a stage killed midway is
never taken for complete. Rerunning the same pipeline reuses its parent run; a stage that was
interrupted reuses its own child run (pretraining resumes from its last Ray checkpoint).

Only this driver talks to MLflow; evaluation stages run as Ray tasks and return their results.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainers.errors import ConfigError, UserError
from trainers.paths import state_dir, write_text_atomic

from orchestrator import tracking
from pipelines import stages as stage_impl
from pipelines.expect import Check, check_expectations, verdict, verdict_json
from pipelines.spec import EVAL_KINDS, PipelineSpec, StageSpec

FORMAT = 1  # bump when a stage's computation changes for the same settings (invalidates caches)
# per stage kind, over FORMAT: knn 2 since its metrics took the one kNN vocabulary (knn_top1 -> knn_top1_k20)
STAGE_FORMATS = {"knn": 2}
PIPELINE_TAG, STAGE_TAG, HASH_TAG, DONE_TAG = "sslab.pipeline", "sslab.stage", "sslab.stage_hash", "sslab.stage_done"
# a cached stage under a new parent: a link run (not a cache source: it has no HASH_TAG / DONE_TAG)
LINK_TAG, CACHED_FROM_TAG = "sslab.link_hash", "sslab.cached_from"
FORCED_TAG = "sslab.forced"  # a stage run with --force despite a finished run of the same key
PARENT_TAG = tracking.PARENT_TAG
# Fault injection for tests: "<stage>:kill" makes the driver SIGKILL itself once that stage's outputs are
# written and logged but before the stage is marked done: the worst moment for a resume to tell a
# finished stage from a half-written one.
FAULT_ENV = "SSLAB_PIPELINE_FAULT"


@dataclass
class StageOutcome:
    name: str
    kind: str
    run_id: str | None
    status: str  # finished | failed
    cached: bool
    key: str
    output_hash: str
    result: dict
    seconds: float = 0.0
    link_run_id: str | None = None  # a cached stage's link run under this pipeline's parent, if one was made

    @property
    def metrics(self) -> dict:
        return self.result.get("metrics", {})

    def as_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "run_id": self.run_id, "status": self.status,
                "cached": self.cached, "metrics": self.metrics}


@dataclass
class PipelineOutcome:
    name: str
    parent_run_id: str
    tracking_uri: str
    out_dir: str
    stages: list[StageOutcome] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)  # the declared bands (expect:), checked

    @property
    def verdict(self) -> str:
        return verdict(self.checks)

    def as_json(self) -> dict:
        return {"pipeline": self.name, "parent_run_id": self.parent_run_id, "tracking_uri": self.tracking_uri,
                "out_dir": self.out_dir, "stages": [s.as_json() for s in self.stages],
                "verdict": verdict_json(self.checks)}


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


class PipelineRunner:
    def __init__(self, spec: PipelineSpec, tracking_uri: str | None = None, out_dir: str | None = None,
                 resume: str | None = None, address: str | None = None, log: Callable[[str], None] = print,
                 force: list[str] | None = None):
        self.spec, self.resume, self.log = spec, resume, log
        self.forced = forced_stages(spec, force or [])
        self.uri = tracking.resolve_tracking_uri(tracking_uri)
        self.out = Path(out_dir or spec.output_dir or state_dir() / "pipelines" / spec.name).expanduser().resolve()
        self.address = address if address is not None else spec.ray.get("address", "local")
        self.outcomes: dict[str, StageOutcome] = {}
        self._ray_ready = False

    # ------------------------------------------------------------------ MLflow bookkeeping
    def _open_parent(self):
        found = tracking.probe(self.uri)
        if found:
            kind, problem = found
            if kind == "reach":
                raise UserError(f"{problem}: the pipeline keeps its stage cache in MLflow; start the server or pass "
                                f"--tracking-uri (e.g. sqlite:///{state_dir() / 'mlflow' / 'mlflow.db'})")
            raise UserError(f"{problem} (the pipeline keeps its stage cache in MLflow)")
        recorder = tracking.RunRecorder(self.uri, self.spec.experiment)
        self.client, self.experiment_id = recorder.client, recorder.experiment_id
        digest = self.spec.digest()
        if self.resume:
            try:
                run = self.client.get_run(self.resume)
            except Exception:  # noqa: BLE001
                raise UserError(f"--resume {self.resume}: no such MLflow run at {self.uri}; list the pipeline runs "
                                f"with `sslab ui`") from None
            if run.data.tags.get(tracking.KIND_TAG) != "pipeline":
                raise UserError(f"--resume {self.resume} is not a pipeline run (it is a "
                                f"{run.data.tags.get(tracking.KIND_TAG, 'plain')} run)")
        tags = {PIPELINE_TAG: self.spec.name, "sslab.pipeline_hash": digest}
        parent_id, _ = self.recorder.open(
            self.spec.name, "pipeline", tags,
            {"pipeline": self.spec.name, "seed": self.spec.seed, "stages": [s.name for s in self.spec.stages],
             "config": self.spec.path or "", "data_root": self.spec.data_root or "default"},
            existing=run if self.resume else None, resume=None if self.resume else {tracking.KIND_TAG: "pipeline", **tags})
        self.parent_id = parent_id
        self.children = {r.data.tags.get(HASH_TAG): r for r in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'")}
        self.log(f"MLflow: pipeline run {parent_id} in experiment '{self.spec.experiment}' ({self.uri})")

    def _finished_run(self, key: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{HASH_TAG}` = '{key}' and "
                                        f"tags.`{DONE_TAG}` = '1'", max_results=1)
        return runs[0] if runs else None

    @property
    def recorder(self) -> tracking.RunRecorder:
        """Runs of this pipeline's experiment, through the runner's client."""
        return tracking.RunRecorder(self.uri, experiment_id=self.experiment_id, mlflow_client=self.client)

    def _child_run(self, stage: StageSpec, key: str, settings: dict) -> str:
        forced = stage.name in self.forced  # a new run: the finished one with this key stays as it was
        tags = {STAGE_TAG: stage.name, PIPELINE_TAG: self.spec.name, HASH_TAG: key, **({FORCED_TAG: "1"} if forced else {})}
        run_id, _ = self.recorder.open(f"{self.spec.name}/{stage.name}", f"stage:{stage.kind}", tags, settings,
                                       parent=self.parent_id, existing=None if forced else self.children.get(key))
        return run_id

    def _stage_tags(self, stage: StageSpec, key: str) -> dict:
        return {PARENT_TAG: self.parent_id, tracking.KIND_TAG: f"stage:{stage.kind}", STAGE_TAG: stage.name,
                PIPELINE_TAG: self.spec.name, HASH_TAG: key, **({FORCED_TAG: "1"} if stage.name in self.forced else {})}

    # ------------------------------------------------------------------ Ray
    def _ray(self):
        if not self._ray_ready:
            from orchestrator.train import init_ray

            init_ray(self.address, self.log, num_cpus=self.spec.ray.get("num_cpus"))
            self._ray_ready = True
        import ray

        return ray

    def _remote(self, function, stage: StageSpec):
        """``function`` as a Ray task with the stage's resources (per worker)."""
        ray = self._ray()
        cpus = float(stage.resources.get("cpu", 1))
        gpus = float(stage.resources.get("gpu", 0))
        return ray.remote(function).options(num_cpus=cpus, num_gpus=gpus, max_retries=1)

    def _task(self, function, stage: StageSpec, *args):
        return self._gather([self._remote(function, stage).remote(*args)])[0]

    def _gather(self, refs: list) -> list:
        ray = self._ray()
        try:
            return ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, UserError):  # one line for the user, not the task's traceback
                raise cause from None
            raise

    # ------------------------------------------------------------------ stages
    def _settings(self, stage: StageSpec) -> dict:
        """The stage's settings as it runs them: an evaluation's data set filled in and its protocol spelled
        out (name and every setting, pipelines.stages.resolve_settings): what is hashed and logged as params."""
        settings = dict(stage.settings)
        if stage.kind in ("knn", "linear", "semi") and not settings.get("dataset"):
            settings["dataset"] = self.outcomes[stage.inputs["backbone"]].result["extra"]["dataset"]
        if stage.kind in EVAL_KINDS:
            settings = stage_impl.resolve_settings(stage.kind, settings)
        if stage.kind == "report":  # the report marks its inputs' bands: new bands, a new report
            bands = {name: self.spec.stage(name).expect for name in stage.inputs["inputs"]
                     if self.spec.stage(name).expect}
            if bands:
                settings["expect"] = bands
        return settings

    def _key(self, stage: StageSpec, settings: dict) -> str:
        inputs = {}
        for role, value in stage.inputs.items():
            names = value if isinstance(value, list) else [value]
            inputs[role] = [self.outcomes[n].output_hash for n in names]
        prepared = [o.output_hash for o in self.outcomes.values() if o.kind == "prepare"]
        return _digest({"format": STAGE_FORMATS.get(stage.kind, FORMAT), "kind": stage.kind, "settings": settings, "inputs": inputs,
                        "prepared": prepared, "seed": self.spec.seed, "data_root": self.spec.data_root})

    def run(self) -> PipelineOutcome:
        self._open_parent()
        outcome = PipelineOutcome(self.spec.name, self.parent_id, self.uri, str(self.out))
        try:
            for stage in self.spec.stages:
                result = self._run_stage(stage)
                self.outcomes[stage.name] = result
                outcome.stages.append(result)
            # what follows the stages may fail too (the tracking server gone): the parent must not stay RUNNING
            outcome.checks = self._certify(outcome.stages)
            read = [d for o in outcome.stages for d in stage_datasets(self.spec.stage(o.name), self._settings(
                self.spec.stage(o.name)), o.result)]
            self._log_inputs(self.parent_id, read)  # the parent shows every data set its stages read
            if not all(s.cached for s in outcome.stages):  # a rerun that did no work logs nothing new
                summary = {k: v for s in outcome.stages for k, v in s.metrics.items() if isinstance(v, (int, float))}
                self._log_metrics(self.parent_id, summary)
        except Exception:
            try:
                self.client.set_terminated(self.parent_id, status="FAILED")
            except Exception:  # noqa: BLE001 - the original error is the one to report
                pass
            raise
        self.client.set_terminated(self.parent_id, status="FINISHED")
        write_text_atomic(self.out / "pipeline.json", json.dumps(outcome.as_json(), indent=1))
        return outcome

    def _certify(self, outcomes: list[StageOutcome]) -> list[Check]:
        """Each declared band checked; the verdict tagged on the parent run and each check on the stage's run
        as this parent shows it (``sslab.expect.<metric>``), so the MLflow UI shows them too."""
        checks = check_expectations({s.name: s.expect for s in self.spec.stages if s.expect},
                                    {o.name: o.metrics for o in outcomes})
        for check in checks:
            outcome = self.outcomes[check.stage]
            run_id = outcome.link_run_id or outcome.run_id
            if run_id:
                self.client.set_tag(run_id, f"sslab.expect.{check.metric}", check.describe().split(" ", 1)[1])
            self.log(f"[{check.stage}] expected: {check.describe()}")
        self.client.set_tag(self.parent_id, "sslab.verdict", verdict(checks))
        return checks

    def _link_cached(self, stage: StageSpec, done, key: str, result: dict, settings: dict) -> str | None:
        """A cached stage whose run sits under another pipeline run appears under this one too: a finished
        child run tagged ``sslab.cached_from`` (the run that holds the stage's outputs) with its metrics, so
        every parent shows all its stages. One link per parent and stage."""
        if done.data.tags.get(PARENT_TAG) == self.parent_id:
            return None
        linked = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.`{PARENT_TAG}` = '{self.parent_id}' and tags.`{LINK_TAG}` = '{key}'"), max_results=1)
        if linked:
            return linked[0].info.run_id
        run_id, _ = self.recorder.open(f"{self.spec.name}/{stage.name}", f"stage:{stage.kind}",
                                       {STAGE_TAG: stage.name, PIPELINE_TAG: self.spec.name, LINK_TAG: key,
                                        CACHED_FROM_TAG: done.info.run_id}, parent=self.parent_id)
        self._log_metrics(run_id, {k: v for k, v in result.get("metrics", {}).items() if isinstance(v, (int, float))})
        self._log_inputs(run_id, stage_datasets(stage, settings, result))
        self.client.set_terminated(run_id, status="FINISHED")
        return run_id

    def _log_inputs(self, run_id: str, datasets: list[str]) -> None:
        """The data sets a run read, as MLflow dataset inputs (from the .beton sidecars on this machine); a
        failure only warns."""
        if not datasets:
            return
        try:
            tracking.log_dataset_inputs(self.client, run_id, tracking.dataset_sidecars(datasets))
        except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not the pipeline
            self.log(f"warning: data sets not logged as MLflow inputs of run {run_id} ({str(exc).splitlines()[0][:160]})")

    def _run_stage(self, stage: StageSpec) -> StageOutcome:
        settings = self._settings(stage)
        key = self._key(stage, settings)
        folder = self.out / stage.name
        done = None if stage.name in self.forced else self._finished_run(key)
        if stage.name in self.forced:
            self.log(f"[{stage.name}] forced: running despite the cache")
        if done is not None:
            result = self._cached_result(done, folder, key)
            if result is not None:
                self.log(f"[{stage.name}] cached (MLflow run {done.info.run_id})")
                if stage.kind == "pretrain":
                    self._restore_backbone(done.info.run_id, folder, result)
                link = self._link_cached(stage, done, key, result, settings)
                return StageOutcome(stage.name, stage.kind, done.info.run_id, "finished", True, key,
                                    result["output_hash"], result, link_run_id=link)
        self.log(f"[{stage.name}] running ({stage.kind})")
        started = time.time()
        if folder.exists():
            shutil.rmtree(folder)  # leftovers of an interrupted attempt are not outputs
        folder.mkdir(parents=True)
        run_id = None
        try:
            if stage.kind == "pretrain":
                run_id, result = self._pretrain(stage, settings, key, folder)
            else:
                run_id = self._child_run(stage, key, settings)
                result = self._compute(stage, settings, folder)
            stage_impl.check_result(stage.kind, result)
            result["output_hash"] = result.get("output_hash") or stage_impl.result_digest(result)
            if stage.kind != "pretrain":  # pretraining logs its own (orchestrator/train.py)
                self._log_inputs(run_id, stage_datasets(stage, settings, result))
            self._record(run_id, stage, key, folder, result)
        except Exception:
            if run_id is not None:
                self.client.set_terminated(run_id, status="FAILED")
            raise
        seconds = time.time() - started
        self.log(f"[{stage.name}] done in {seconds:.0f} s " + " ".join(
            f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)))
        return StageOutcome(stage.name, stage.kind, run_id, "finished", False, key, result["output_hash"], result,
                            seconds)

    def _fault_hook(self, stage: StageSpec) -> None:
        if os.environ.get(FAULT_ENV) == f"{stage.name}:kill":
            import signal

            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    def _compute(self, stage: StageSpec, settings: dict, folder: Path) -> dict:
        data_root = self.spec.data_root
        if stage.kind == "prepare":
            return self._task(stage_impl.run_prepare, stage, settings, data_root, stage_impl.log_stderr)
        if stage.kind in EVAL_KINDS:
            source = self.outcomes[stage.inputs["backbone"]].result["extra"]["backbone_path"]
            ray = self._ray()
            backbone = ray.put(Path(source).read_bytes())
            workers = int(stage.resources.get("workers", 1))
            if workers == 1:
                return self._task(_eval_task, stage, stage.kind, settings, backbone, data_root, self.spec.seed)
            if stage_impl.trains_on_images(stage.kind, settings):
                return self._data_parallel(stage, settings, backbone, workers)
            if stage.kind == "knn":
                return self._sharded_knn(stage, settings, backbone, workers)
            return stage_impl.run_evaluation(stage.kind, settings, source, data_root, seed=self.spec.seed,
                                             log=lambda message: self.log(f"[{stage.name}] {message}"),
                                             features_of=self._sharded_features(stage, backbone, workers))
        if stage.kind == "sweep":
            return self._sweep(stage, settings, folder)
        if stage.kind == "report":
            from pipelines.report import write_report

            inputs = [self.outcomes[name] for name in stage.inputs["inputs"]]
            files = write_report(self.spec, inputs, folder, self.uri, self.parent_id,
                                 check_expectations(settings.get("expect", {}), {o.name: o.metrics for o in inputs}))
            files += self._export_final_backbone(inputs, folder)
            for path in files:
                self.client.log_artifact(self.parent_id, str(path), "report")
            return {"metrics": {}, "extra": {"files": [p.name for p in files], "folder": str(folder)}, "files": {}}
        raise AssertionError(stage.kind)

    def _sharded_features(self, stage: StageSpec, backbone, workers: int):
        """Features from ``workers`` Ray tasks: each extracts one contiguous block of a split; the blocks are
        gathered once, in order (the same features as one worker's). For knn, the frozen-feature probe and
        transfer, whose training on the gathered features is cheap and runs here."""
        remote = self._remote(_feature_block_task, stage)

        def features_of(dataset: str, split: str, batch: int):
            refs = [remote.remote(backbone, dataset, split, (i, workers), self.spec.data_root, batch)
                    for i in range(workers)]
            out = stage_impl.gather_blocks(self._gather(refs))
            self.log(f"[{stage.name}] {dataset} {split} features from {workers} workers: {len(out[1]):,} images")
            return out

        return features_of

    def _sharded_knn(self, stage: StageSpec, settings: dict, backbone, workers: int) -> dict:
        """kNN with the bank sharded: the test features are gathered once (the queries); then each of ``workers``
        tasks extracts one block of the training split and keeps it, scoring every query against it; only the
        blocks' top-k lists come back, merged exactly here (``knn_suite_from_shards``). The bank is never in one
        place: the same numbers as one worker's."""
        dataset, batch = settings["dataset"], settings["batch_size"]
        test = self._sharded_features(stage, backbone, workers)(dataset, "test", batch)
        queries = self._ray().put(test[0])
        remote = self._remote(_knn_block_task, stage)
        parts = self._gather([remote.remote(backbone, dataset, (i, workers), self.spec.data_root, batch, queries)
                              for i in range(workers)])
        self.log(f"[{stage.name}] kNN bank in {workers} shards: {sum(len(p[2]) for p in parts):,} {dataset} train "
                 f"images, top-{max(p[0].shape[1] for p in parts)} lists merged")
        return stage_impl.knn_from_shards(settings, parts, test)

    def _data_parallel(self, stage: StageSpec, settings: dict, backbone, workers: int) -> dict:
        """Fine-tuning or the augmented probe on ``workers`` Ray Train workers (DDP), as pretraining runs."""
        from orchestrator.parallel import run_data_parallel

        options = self._cluster_options(stage, {"workers": workers, "cpus_per_worker": stage.resources.get("cpu", 1),
                                                "gpus_per_worker": stage.resources.get("gpu"), "max_failures": 1})
        return run_data_parallel(_data_parallel_eval_task,
                                 (stage.kind, settings, backbone, self.spec.data_root, self.spec.seed), options,
                                 f"{self.spec.name}-{stage.name}", log=lambda m: self.log(f"[{stage.name}] {m}"))

    def _export_final_backbone(self, inputs: list, folder: Path) -> list[Path]:
        """The last pretrained backbone as ``sslab export`` writes it (report/export/: torchvision for ResNets,
        timm for ViTs, with the pipeline's metrics on its card); nothing for a backbone neither library has."""
        from trainers.export import default_format, export_backbone

        pretrain = next((o for o in reversed(inputs) if o.kind == "pretrain"), None)
        source = pretrain.result["extra"].get("backbone_path") if pretrain is not None else None
        fmt = default_format(pretrain.result["extra"].get("backbone", "")) if pretrain is not None else None
        if source is None or fmt is None or not Path(source).is_file():
            return []
        metrics = {k: v for o in inputs for k, v in o.metrics.items() if isinstance(v, (int, float))}
        out = export_backbone(source, fmt, folder / "export", metrics=metrics)
        self.log(f"[report] exported the {fmt} backbone to {out}")
        return sorted(out.iterdir())

    def _record(self, run_id: str, stage: StageSpec, key: str, folder: Path, result: dict) -> None:
        """Write the stage's files and result, log them, and only then mark the stage done."""
        for name, text in result.pop("files", {}).items():
            (folder / name).write_text(text)
            self.client.log_artifact(run_id, str(folder / name))
        logged = self.client.get_run(run_id).data.metrics  # a resumed stage's run may hold them already
        self._log_metrics(run_id, {k: v for k, v in result["metrics"].items() if logged.get(k) != v})
        write_text_atomic(folder / "result.json", json.dumps(result, indent=1, default=str))
        self.client.log_artifact(run_id, str(folder / "result.json"))
        self.client.set_tag(run_id, "sslab.output_hash", result["output_hash"])
        self._fault_hook(stage)
        self.client.set_terminated(run_id, status="FINISHED")
        self.client.set_tag(run_id, DONE_TAG, "1")

    def _log_metrics(self, run_id: str, metrics: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        if rows:
            self.client.log_batch(run_id, metrics=rows)

    def _cached_result(self, run, folder: Path, key: str) -> dict | None:
        local = folder / "result.json"
        expected = run.data.tags.get("sslab.output_hash")
        if local.is_file():
            result = json.loads(local.read_text())
            if result.get("output_hash") == expected:
                return result
        try:
            from mlflow.artifacts import download_artifacts

            path = download_artifacts(run_id=run.info.run_id, artifact_path="result.json", tracking_uri=self.uri)
            result = json.loads(Path(path).read_text())
        except Exception as exc:  # noqa: BLE001 - recompute rather than fail
            self.log(f"warning: the cached result of run {run.info.run_id} is unreadable ({str(exc)[:100]}); "
                     f"running the stage again")
            return None
        folder.mkdir(parents=True, exist_ok=True)
        local.write_text(json.dumps(result, indent=1))
        return result

    # ------------------------------------------------------------------ pretrain and sweep
    def _pretrain_config(self, stage: StageSpec, settings: dict):
        from trainers.config import apply_overrides, from_dict, load_config

        if "from_sweep" in stage.inputs:
            best = self.outcomes[stage.inputs["from_sweep"]].result["extra"]["best_config"]
            config = from_dict(apply_overrides(best, settings.get("set") or []))
        else:
            config = load_config(settings["config"], settings.get("set") or [])
        if self.spec.data_root:
            config.data.data_root = self.spec.data_root
        return config

    def _cluster_options(self, stage: StageSpec, settings: dict, run_tags: dict | None = None):
        import torch

        from orchestrator.train import ClusterOptions

        gpus = settings.get("gpus_per_worker")
        if gpus is None:
            gpus = 1.0 if torch.cuda.is_available() else 0.0
        return ClusterOptions(workers=settings.get("workers", 1), gpus_per_worker=float(gpus),
                              cpus_per_worker=float(settings.get("cpus_per_worker", 1.0)), address=self.address,
                              storage=self.spec.ray.get("storage"), max_failures=settings.get("max_failures", 2),
                              tracking_uri=self.uri, experiment=self.spec.experiment, run_tags=run_tags or {})

    def _pretrain(self, stage: StageSpec, settings: dict, key: str, folder: Path):
        from orchestrator.train import run_pretraining

        config = self._pretrain_config(stage, settings)
        if config.train.device == "auto":
            import torch

            config.train.device = "cuda" if torch.cuda.is_available() else "cpu"
        self._ray()
        name = f"{self.spec.name}-{stage.name}-{key[:10]}"
        if stage.name in self.forced:
            name = self._forced_name(name)
        options = self._cluster_options(stage, settings, self._stage_tags(stage, key))
        outcome = run_pretraining(config, options, name=name, log=self.log)
        if outcome.run_id is None:
            raise UserError(f"stage {stage.name}: the pretraining run could not be recorded in MLflow at {self.uri}")
        if not outcome.checkpoint or not (Path(outcome.checkpoint) / "backbone.pt").is_file():
            raise UserError(f"stage {stage.name}: the pretraining run {name} left no backbone.pt in its checkpoint")
        backbone = folder / "backbone.pt"
        shutil.copy2(Path(outcome.checkpoint) / "backbone.pt", backbone)
        sha = stage_impl.file_sha256(backbone)
        metrics = {f"pretrain_{k}": v for k, v in outcome.metrics.items()
                   if k == "loss" or k.startswith("knn_top1") or k == "img_per_s"}
        history = [{k: v for k, v in row.items() if k in ("step", "loss") or k.startswith("knn_top1")}
                   for row in outcome.history]
        result = {"metrics": metrics, "output_hash": sha, "files": {},
                  "extra": {"backbone_path": str(backbone), "backbone_sha256": sha, "dataset": config.data.dataset,
                            "method": config.method_name, "backbone": config.model.backbone, "ray_run": name,
                            "steps": outcome.steps, "checkpoint": outcome.checkpoint, "history": history}}
        self.client.set_tag(outcome.run_id, "mlflow.runName", f"{self.spec.name}/{stage.name}")
        return outcome.run_id, result

    def _forced_name(self, base: str) -> str:
        """A forced pretraining's Ray run name: ``<base>-forced-<n>``, n the first whose MLflow run did not
        finish: a fresh run after a finished one, and the same run (resumed from its checkpoints) when a forced
        run stopped midway is forced again."""
        n = 1
        while True:
            run = tracking.find_run(self.client, self.experiment_id, f"{base}-forced-{n}")
            if run is None or run.info.status != "FINISHED":
                return f"{base}-forced-{n}"
            n += 1

    def _restore_backbone(self, run_id: str, folder: Path, result: dict) -> None:
        """A cached pretrain stage: its backbone from the stage folder, else from the MLflow run."""
        path = folder / "backbone.pt"
        if path.is_file() and stage_impl.file_sha256(path) == result["output_hash"]:
            result["extra"]["backbone_path"] = str(path)
            return
        from mlflow.artifacts import download_artifacts

        folder.mkdir(parents=True, exist_ok=True)
        downloaded = download_artifacts(run_id=run_id, artifact_path="backbone/backbone.pt", tracking_uri=self.uri)
        shutil.copy2(downloaded, path)
        result["extra"]["backbone_path"] = str(path)

    def _sweep(self, stage: StageSpec, settings: dict, folder: Path) -> dict:
        from orchestrator.sweep import load_sweep, run_sweep, trial_config

        sweep = load_sweep(settings["config"], settings.get("set") or [])
        if self.spec.data_root:
            sweep.base.data.data_root = self.spec.data_root
        self._ray()
        outcome = run_sweep(sweep, self._cluster_options(stage, {}), name=f"{self.spec.name}-{stage.name}",
                            log=self.log)
        if outcome.best is None:
            raise UserError(f"stage {stage.name}: the sweep finished without a trial reporting {sweep.metric}")
        best = trial_config(sweep.base, {k: outcome.best[k] for k in sweep.space})
        value = outcome.best.get(sweep.metric)
        return {"metrics": {f"sweep_best_{sweep.metric}": float(value)} if isinstance(value, (int, float)) else {},
                "extra": {"best_config": best.to_dict(), "best_trial": outcome.best, "sweep_run": outcome.parent_run_id},
                "files": {}}


def _eval_task(kind: str, settings: dict, backbone_bytes: bytes, data_root, seed: int) -> dict:
    """Ray task body: write the backbone to a temp file on this node and run the evaluation there."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sslab-eval-") as folder:
        path = Path(folder) / "backbone.pt"
        path.write_bytes(backbone_bytes)
        # the feature cache is keyed by the file's hash, so a temp path still hits it
        return stage_impl.run_evaluation(kind, settings, str(path), data_root, seed=seed, log=stage_impl.log_stderr)


def _data_parallel_eval_task(kind: str, settings: dict, backbone_bytes: bytes, data_root, seed: int) -> dict:
    """Ray Train worker body: the evaluation on this worker's device, data-parallel over the worker group's
    process group (trainers/finetune.py); only rank 0 logs."""
    import tempfile

    import ray.train
    import ray.train.torch

    rank = ray.train.get_context().get_world_rank()
    log = stage_impl.log_stderr if rank == 0 else (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="sslab-eval-") as folder:
        path = Path(folder) / "backbone.pt"
        path.write_bytes(backbone_bytes)
        return stage_impl.run_evaluation(kind, settings, str(path), data_root, device=ray.train.torch.get_device(),
                                         seed=seed, log=log)


def _knn_block_task(backbone_bytes: bytes, dataset: str, block: tuple[int, int], data_root, batch_size: int, queries):
    """Ray task body: one shard of the kNN bank on this node: its block of the training features and the
    queries' top-k lists within it (``stage_impl.knn_block``)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sslab-eval-") as folder:
        path = Path(folder) / "backbone.pt"
        path.write_bytes(backbone_bytes)
        return stage_impl.knn_block(str(path), dataset, block, data_root, stage_impl.eval_device(), queries,
                                    batch_size, log=stage_impl.log_stderr)


def _feature_block_task(backbone_bytes: bytes, dataset: str, split: str, block: tuple[int, int], data_root,
                        batch_size: int):
    """Ray task body: one block of a split's features on this node (the backbone written to a temp file)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="sslab-eval-") as folder:
        path = Path(folder) / "backbone.pt"
        path.write_bytes(backbone_bytes)
        return stage_impl.feature_block(str(path), dataset, split, block, data_root, stage_impl.eval_device(),
                                        batch_size, log=stage_impl.log_stderr)


def stage_datasets(stage: StageSpec, settings: dict, result: dict | None = None) -> list[str]:
    """The data sets a stage reads: a prepare or transfer stage's list, an evaluation's data set, and (from its
    ``result``) a pretraining stage's or the best config of a sweep stage."""
    names = [entry["name"] for entry in settings.get("datasets") or []]
    if settings.get("dataset"):
        names.append(settings["dataset"])
    extra = (result or {}).get("extra") or {}
    if stage.kind == "pretrain" and extra.get("dataset"):
        names.append(extra["dataset"])
    if stage.kind == "sweep" and (extra.get("best_config") or {}).get("data", {}).get("dataset"):
        names.append(extra["best_config"]["data"]["dataset"])
    return names


def forced_stages(spec: PipelineSpec, names: list[str]) -> set[str]:
    """``--force`` names (or ``all``) and every later stage that reads one of them (a prepare stage is read by
    all later stages): the stages to run despite the cache."""
    stage_names = [s.name for s in spec.stages]
    forced = set()
    for name in names:
        if name == "all":
            return set(stage_names)
        if name not in stage_names:
            import difflib

            close = difflib.get_close_matches(name, stage_names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"--force {name}: no stage '{name}' in pipeline {spec.name}{hint}: name one of "
                            f"{', '.join(stage_names)}, or all")
        forced.add(name)
    for stage in spec.stages:
        read = [n for v in stage.inputs.values() for n in (v if isinstance(v, list) else [v])]
        if any(n in forced for n in read) or any(spec.stage(n).kind == "prepare" for n in forced
                                                   if stage_names.index(n) < stage_names.index(stage.name)):
            forced.add(stage.name)
    return forced


def run_pipeline(spec: PipelineSpec, **kwargs) -> PipelineOutcome:
    return PipelineRunner(spec, **kwargs).run()
