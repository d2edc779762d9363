"""MLflow tracking: where the store is, one run per training run, and logging that never stops training.

- ``resolve_tracking_uri``: ``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else an absolute
  ``sqlite:///<state dir>/mlflow/mlflow.db`` (artifacts beside it). Relative sqlite/file paths are made
  absolute: inside a Ray job the working directory is Ray's temporary copy of the project.
- ``RunRecorder``: one MLflow run from open to finish, as pretraining, sweeps (parent and trials) and
  pipelines (parent and stages) all open them: found again by its tags (a rerun continues it) or created
  with the standard tags (kind, run name, git commit, Ray job, parent), params logged once, artifacts
  and the final status at the end.
- ``MetricLogger``: what rank 0 uses during training. Every row carries the global step; steps at or
  below what the run already holds are skipped, so a restarted worker group that repeats the steps
  since its last checkpoint never duplicates them. When the server does not answer, it warns once,
  keeps the rows and replays them when the server is back (checked at most every ``retry_s``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

from trainers.errors import UserError
from trainers.paths import project_root, state_dir

RUN_NAME_TAG = "sslab.run_name"
KIND_TAG = "sslab.kind"
DEFAULT_EXPERIMENT = "sslab"


def default_store() -> Path:
    return state_dir() / "mlflow"


def resolve_tracking_uri(uri: str | None = None, create: bool = True) -> str:
    """The absolute tracking URI. ``create``: make the sqlite store's folder (False: create nothing, e.g.
    for a dry run; the caller checks that the folder exists where it must)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri:
        store = default_store()
        if create:
            store.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{store / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.strip():  # sqlite:/// alone would be the working directory
            raise UserError(f"tracking URI '{uri}' names no database file: use sqlite:///<absolute path>.db, "
                            "e.g. sqlite:////data/mlflow/mlflow.db")
        if not path.startswith("/"):  # sqlite:///relative.db -> absolute
            path = str(Path(path).resolve())
            uri = f"sqlite:///{path}"
        if path.endswith("/") or Path(path).is_dir():
            raise UserError(f"tracking URI '{uri}' names a folder, not a database file: use "
                            f"sqlite:///{path.rstrip('/')}/mlflow.db")
        if create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return uri
    if uri.startswith("sqlite:"):
        raise UserError(f"tracking URI '{uri}' is not a sqlite file URI: use sqlite:///<absolute path>.db "
                        "(three slashes, then the path)")
    if uri.startswith("file:") or "://" not in uri:
        raise UserError(f"tracking URI '{uri}': MLflow's file store is not supported by this MLflow version; use "
                        f"sqlite:///<absolute path>.db for a local store or http://host:5000 for a tracking server")
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside the database (absolute, so Ray jobs find them)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None  # the server decides


PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/search?max_results=1"  # read-only; needs a login and the Host check


def probe(uri: str, timeout_s: float = 5.0) -> tuple[str, str] | None:
    """None when the store answers an API call as this client (its login, its Host header), else
    ``(kind, line)``: kind is ``reach`` (no answer), ``host`` (Host header refused), ``auth`` (login
    missing or refused) or ``server`` (any other answer); line names the problem and, but for
    ``reach``, its fix. /health would not do: MLflow answers it before the Host check and the login."""
    if not uri.startswith(("http://", "https://")):
        return None
    from urllib.parse import urlsplit

    from mlflow.utils.credentials import get_default_host_creds  # the client's own login and TLS settings
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        host = urlsplit(uri).netloc.rsplit("@", 1)[-1]
        response = http_request(creds, PROBE_ENDPOINT, "GET", max_retries=0, backoff_factor=0, timeout=timeout_s,
                                raise_on_status=False)
    except Exception as exc:  # noqa: BLE001 - requests' and MLflow's connection errors alike
        return "reach", f"MLflow server {uri} is unreachable ({_root_cause(exc)})"
    status, text = response.status_code, (response.text or "").strip()
    if status == 200:
        return None
    first = text.splitlines()[0][:120] if text else response.reason or ""
    if status == 403 and "Invalid Host header" in text:
        return "host", (f"MLflow server {uri} refused the Host header '{host}' (403 Invalid Host header): add {host} "
                        f"to the server's --allowed-hosts")
    if status == 401:
        if creds.username and creds.password:
            return "auth", (f"MLflow server {uri} refused the login of user '{creds.username}' (401): set "
                            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user and password the "
                            f"server knows")
        return "auth", (f"MLflow server {uri} asks for a login (401) and MLFLOW_TRACKING_USERNAME/"
                        f"MLFLOW_TRACKING_PASSWORD are not set: set them to a user the server knows")
    if status == 403:
        if not creds.username:
            return "auth", (f"MLflow server {uri} refused an anonymous call ({status} {first}): set "
                            f"MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user the server knows")
        return "auth", (f"MLflow server {uri} refused user '{creds.username}' ({status} {first}): give that user "
                        f"permission to read experiments, or log in as another one")
    return "server", (f"MLflow server {uri} answered HTTP {status} to {PROBE_ENDPOINT.split('?')[0]} ({first}): "
                      f"check that --tracking-uri is the server's root URL (no path behind a proxy) and the "
                      f"server's log")


def _root_cause(exc: BaseException) -> str:
    """The innermost error of a chain (requests and MLflow wrap e.g. 'Connection refused' three times)."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    inner = seen[-1]
    text = getattr(inner, "strerror", None) or str(inner) or type(inner).__name__
    return text.splitlines()[0][:160]


def check_reachable(uri: str, timeout_s: float = 5.0) -> str | None:
    """None when the store answers, else one line saying what is wrong (see ``probe``)."""
    found = probe(uri, timeout_s)
    return found[1] if found else None


def require_reachable(uri: str, timeout_s: float = 5.0, train_later: bool = True) -> None:
    """--require-tracking: raise a UserError (one line: the problem and its fix) unless the store answers."""
    found = probe(uri, timeout_s)
    if found is None:
        return
    kind, line = found
    drop = ("drop --require-tracking to train now and log the metrics when it answers" if train_later
            else "drop --require-tracking")
    if kind == "reach":
        raise UserError(f"{line}; start the server or fix --tracking-uri (or {drop})")
    raise UserError(f"{line} (or {drop})")


def _quiet_http_client() -> None:
    # MLflow retries a dead server for minutes by default; training must not stall that long per call
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def client(uri: str):
    _quiet_http_client()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


# MLflow 3 marks an experiment's kind with this tag (its create-experiment dialog and APIs set it); sslab's
# are model training. In 3.17 the UI's layout does not follow it: the URL (?workflowType=machine_learning,
# which `sslab ui` prints) or the browser's last choice picks it (tests/test_mlflow_ui.py)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def experiment_id(mlflow_client, name: str, uri: str) -> str:
    """The experiment ``name``, created if missing, marked as a model-training experiment (an older one
    without a kind gets the mark too)."""
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND_TAG not in (experiment.tags or {}):
            mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(uri),
                                           tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def find_run(mlflow_client, exp_id: str, run_name: str, kind: str = "pretrain"):
    """The existing MLflow run of this sslab run name (a rerun resumes it), or None."""
    runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}' and "
                                                             f"tags.`{KIND_TAG}` = '{kind}'", max_results=1)
    return runs[0] if runs else None


def git_commit() -> str | None:
    root = project_root()
    if root is None:
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def flat_params(values: dict) -> dict[str, str]:
    """MLflow params are strings of at most 6000 characters."""
    return {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in values.items()}


def log_params(mlflow_client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    existing = mlflow_client.get_run(run_id).data.params
    fresh = [Param(k, v) for k, v in params.items() if k not in existing]
    for start in range(0, len(fresh), 100):  # MLflow's batch limit
        mlflow_client.log_batch(run_id, params=fresh[start:start + 100])


PARENT_TAG = "mlflow.parentRunId"
_experiment = experiment_id  # RunRecorder's argument of the same name hides it


class RunRecorder:
    """MLflow runs of one experiment, opened and finished the same way by every command."""

    def __init__(self, uri: str, experiment: str | None = None, experiment_id: str | None = None, mlflow_client=None):
        self.uri, self.experiment = uri, experiment or DEFAULT_EXPERIMENT
        self.client = mlflow_client or client(uri)
        self._experiment_id = experiment_id

    @property
    def experiment_id(self) -> str:
        """Found or created on first use (finishing a run needs none)."""
        if self._experiment_id is None:
            self._experiment_id = _experiment(self.client, self.experiment, self.uri)
        return self._experiment_id

    def find(self, tags: dict[str, str]):
        """The newest run of the experiment carrying all of ``tags``, or None."""
        where = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=where,
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def open(self, name: str, kind: str, tags: dict | None = None, params: dict | None = None,
             parent: str | None = None, resume: dict | None = None, existing=None) -> tuple[str, bool]:
        """(run id, whether an existing run continues). ``existing`` (a run) or the newest run with the
        ``resume`` tags continues (status RUNNING again); otherwise a run named ``name`` of ``kind`` is
        created, tagged with its name, kind, parent, the checkout's git commit and the Ray job id (when
        there is one) besides ``tags``. ``params`` are logged once (those the run holds already stay)."""
        if existing is None and resume:
            existing = self.find(resume)
        if existing is not None:
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            standard = {RUN_NAME_TAG: name, KIND_TAG: kind}
            if parent:
                standard[PARENT_TAG] = parent
            commit = git_commit()
            if commit:
                standard["git_commit"] = commit
            job_id = os.environ.get("RAY_JOB_ID") or os.environ.get("SSLAB_RAY_JOB_ID")
            if job_id:
                standard["ray_job_id"] = job_id
            run_id = self.client.create_run(self.experiment_id, run_name=name,
                                            tags={**standard, **(tags or {})}).info.run_id
        if params:
            log_params(self.client, run_id, flat_params(params))
        return run_id, existing is not None

    def finish(self, run_id: str, status: str = "FINISHED", artifacts: Iterable[tuple[Path, str | None]] = ()) -> None:
        """Upload ``artifacts`` ((file, folder in the run or None), those that exist) and end the run."""
        for path, folder in artifacts:
            if Path(path).is_file():
                self.client.log_artifact(run_id, str(path), folder)
        self.client.set_terminated(run_id, status=status)


def _metric_values(row: dict) -> dict[str, float]:
    """The finite numbers of a history row, without its step/epoch bookkeeping."""
    return {k: float(v) for k, v in row.items()
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(float(v))}


GAP_TAG = "sslab.tracking_gaps"  # steps whose metrics reached MLflow late, after an outage


class MetricLogger:
    """Rank 0's metric stream into one MLflow run; see the module docstring."""

    def __init__(self, uri: str, run_id: str | None, log: Callable[[str], None] = print, retry_s: float = 60.0):
        self.uri, self.run_id, self.log, self.retry_s = uri, run_id, log, retry_s
        self.pending: list[tuple[int, dict]] = []
        self.last_step: dict[str, int] = {}
        self.warned = False
        self.down_since: float | None = None
        self.next_try = 0.0
        self._client = None

    def _mlflow(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def _known_step(self, key: str) -> int:
        if key not in self.last_step:
            history = self._mlflow().get_metric_history(self.run_id, key)
            self.last_step[key] = max((m.step for m in history), default=-1)
        return self.last_step[key]

    def log_row(self, step: int, row: dict) -> None:
        if self.run_id is None:
            return
        self.pending.append((int(step), _metric_values(row)))
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send what is pending; False when the server did not take it (the rows are kept)."""
        if not self.pending or self.run_id is None:
            return True
        if not force and time.monotonic() < self.next_try:
            return False
        from mlflow.entities import Metric

        try:
            metrics = []
            stamp = int(time.time() * 1000)
            for step, values in self.pending:
                for key, value in values.items():
                    if step > self._known_step(key):
                        metrics.append(Metric(key, value, stamp, step))
            for start in range(0, len(metrics), 1000):
                self._mlflow().log_batch(self.run_id, metrics=metrics[start:start + 1000])
        except Exception as exc:  # noqa: BLE001 - any tracking failure must leave training running
            self.next_try = time.monotonic() + self.retry_s
            if self.down_since is None:
                self.down_since = time.time()
            if not self.warned:
                self.warned = True
                self.log(f"warning: MLflow ({self.uri}) did not take metrics ({str(exc).splitlines()[0][:160]}); "
                         f"training continues, {len(self.pending)} row(s) kept and replayed when it answers")
            return False
        self.next_try = 0.0
        for step, values in self.pending:
            for key in values:
                self.last_step[key] = max(self.last_step.get(key, -1), step)
        if self.down_since is not None:
            steps = [step for step, _ in self.pending]
            gap = f"steps {min(steps)}-{max(steps)} sent {time.time() - self.down_since:.0f} s late"
            self.log(f"MLflow answers again: replayed {len(self.pending)} kept row(s) ({gap})")
            try:  # the outage stays visible in the run, not only in a log file
                previous = self._mlflow().get_run(self.run_id).data.tags.get(GAP_TAG)
                self._mlflow().set_tag(self.run_id, GAP_TAG, f"{previous}; {gap}" if previous else gap)
            except Exception:  # noqa: BLE001
                pass
            self.warned, self.down_since = False, None
        self.pending.clear()
        return True


def replay_history(uri: str, run_id: str, rows: Iterable[dict], log: Callable[[str], None] = print) -> bool:
    """Log every row of a run's ``metrics.jsonl`` the MLflow run does not hold yet (by step)."""
    logger = MetricLogger(uri, run_id, log=log, retry_s=0.0)
    for row in rows:
        if "step" in row:
            logger.pending.append((int(row["step"]), _metric_values(row)))
    return logger.flush(force=True)


def download_backbone(uri: str, run_id: str, device="cpu"):
    """(backbone module, feature_dim, info) of a pretraining run, by its MLflow run id."""
    from mlflow.artifacts import download_artifacts

    from trainers.loop import load_backbone

    _quiet_http_client()
    try:
        path = download_artifacts(run_id=run_id, artifact_path="backbone/backbone.pt", tracking_uri=uri)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"MLflow run {run_id} has no backbone/backbone.pt ({str(exc).splitlines()[0][:120]}): "
                        f"pass the run id of a finished pretraining run") from None
    return load_backbone(path, device)


def check_registered_model_name(name: str) -> str:
    """A Model Registry name: letters, digits, '.', '_' and '-' (it appears in models:/<name>/<version> URIs)."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name or ""):
        raise UserError(f"--register {name!r} is not a model name: use letters, digits, '.', '_' and '-', "
                        "e.g. --register swav-cifar10-resnet18")
    return name


def register_export(uri: str, folder: Path, name: str, fmt: str, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Log an export folder (trainers/export.py) as an MLflow run: the export's files as artifacts and the
    loaded torchvision / timm module as an MLflow pytorch model registered under ``name``, its version
    described by the model card. Returns the version."""
    import mlflow
    import mlflow.pytorch
    import numpy as np

    from trainers.export import library_module

    _quiet_http_client()
    facts = json.loads((Path(folder) / "export.json").read_text())
    module = library_module(facts, fmt)
    weights = Path(folder) / facts["weights"]
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(weights)))
    else:
        import torch

        module.load_state_dict(torch.load(weights, weights_only=True))
    module.eval()
    card = (Path(folder) / "MODEL_CARD.md").read_text()
    mlflow.set_tracking_uri(uri)
    recorder = RunRecorder(uri, experiment)
    run_id, _ = recorder.open(f"export-{name}", "export", {"format": fmt, "backbone": facts["backbone"],
                                                         "method": str(facts.get("method"))},
                              {"format": fmt, "backbone": facts["backbone"], "image_size": facts["image_size"]})
    with mlflow.start_run(run_id=run_id):
        mlflow.log_artifacts(str(folder), artifact_path="export")
        # pickle: the nn.Module itself (MLflow 3's default, a pt2 graph traced at one input shape, would fix
        # the batch size); the input example records the expected image size in the model's signature
        example = np.zeros((1, 3, facts["image_size"], facts["image_size"]), dtype=np.float32)
        logged = mlflow.pytorch.log_model(module, name="model", registered_model_name=name,
                                          serialization_format="pickle", input_example=example)
    version = str(logged.registered_model_version)
    recorder.client.update_model_version(name, version, description=card)
    recorder.client.set_model_version_tag(name, version, "format", fmt)
    recorder.client.set_terminated(run_id, "FINISHED")
    return version


def dataset_sidecars(datasets: Iterable[str], cache_dir: str | None = None) -> list[dict]:
    """The ``.beton`` sidecars (data set, split, content key, source) of these data sets' train and test splits
    in ``cache_dir`` (default: <state dir>/data), as prepared with the default settings; splits not prepared
    on this machine are left out."""
    from trainers.data.beton import PrepareSettings, beton_path, read_meta

    cache = cache_dir or str(state_dir() / "data")
    metas = [read_meta(beton_path(cache, name, split, PrepareSettings())) for name in dict.fromkeys(datasets)
             for split in ("train", "test")]
    return [m for m in metas if m and m.get("key") and m.get("dataset") and m.get("split")]


def log_dataset_inputs(mlflow_client, run_id: str, sidecars: Iterable[dict]) -> int:
    """The run's data sets as MLflow dataset inputs (the lineage from a run back to its data): per prepared
    split (a ``.beton`` sidecar: data set, split, content key, source, count), name ``<data set>-<split>``,
    digest the first 36 characters of the content key (the whole key in the profile), context training for
    the train split and evaluation otherwise. Inputs the run holds already are kept. Returns how many."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for meta in sidecars:
        profile = {"content_key": meta["key"], "count": meta.get("count"), "num_classes": meta.get("num_classes"),
                   "image_size": meta.get("image_size"), "mode": meta.get("mode")}
        if meta.get("holdout"):  # a test split held out of the train images (image folders without one)
            profile["holdout"] = meta["holdout"]
        dataset = Dataset(name=f"{meta['dataset']}-{meta['split']}", digest=str(meta["key"])[:36], source_type="local",
                          source=json.dumps({"uri": str(meta.get("source", ""))}), profile=json.dumps(profile))
        context = "training" if meta["split"] == "train" else "evaluation"
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        mlflow_client.log_inputs(run_id, datasets=inputs)
    return len(inputs)
