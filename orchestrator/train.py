"""Distributed pretraining: the plain-PyTorch ``Trainer`` inside a Ray Train ``TorchTrainer``.

Driver (this process): checks the config, prepares the data files once, opens (or reopens, for a
rerun of the same name) the MLflow run and starts the ``TorchTrainer``. Workers: each builds its
own loader shard (rank / world size), resumes from ``ray.train.get_checkpoint()`` when Ray restarts
the group, and reports at every checkpoint (every rank calls ``report``; rank 0 attaches the
checkpoint folder). Rank 0 alone logs metrics to MLflow, by global step. At the end the driver logs
the final checkpoint, the backbone, the config and a loss / kNN plot as artifacts of the run.

Ray 2.60 runs Train V2: restarting the same (storage, name) resumes from its latest checkpoint;
``TorchTrainer.restore`` and ``resume_from_checkpoint`` are gone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from trainers.checkpoint import checksum_path
from trainers.config import Config, from_dict
from trainers.errors import ConfigError, UserError
from trainers.events import TrainerEvents
from trainers.knn import DEFAULT_TEMPERATURE, online_knn_metrics
from trainers.paths import state_dir

from orchestrator import tracking
from orchestrator.faults import FAULT_ENV, FaultPlan, parse_fault

FATAL_NOTE = "fatal-error.txt"  # in <storage>/<name>/: a user error that a restart would only repeat


def run_markers(storage: str, name: str) -> dict:
    """The run's folder in storage, and the fatal-error note its restarted workers read (None for URI
    storage, which the workers cannot read as a file)."""
    fatal = str(Path(storage) / name / FATAL_NOTE) if "://" not in storage else None
    return {"run_folder": f"{storage}/{name}", "fatal_marker": fatal}


CHECKPOINT_FILES = ("last.pt", "metrics.jsonl", "config.yaml", "backbone.pt", "summary.json",
                    "last.pt.sha256", "backbone.pt.sha256")  # *.sha256: the checksums written with them


@dataclass
class ClusterOptions:
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    address: str | None = None  # None/"local": embedded Ray on this machine; "auto"; "ray://host:10001"
    storage: str | None = None  # run storage (shared file system or s3://...); default <state>/ray_results
    max_failures: int = 2
    num_to_keep: int = 2
    tracking_uri: str | None = None
    experiment: str = tracking.DEFAULT_EXPERIMENT
    # copy the .beton files through storage to each node's disk; None: on for a cluster, off for local Ray
    stage_data: bool | None = None
    # how long to wait for the cluster to offer the requested CPUs/GPUs (an autoscaler adding nodes);
    # None: 0 s for the embedded Ray (nothing will appear), 600 s for a cluster
    resource_timeout_s: float | None = None
    require_tracking: bool = False  # refuse to start when MLflow does not answer (default: train, replay later)
    worker_env: dict = field(default_factory=dict)  # extra environment variables for the workers
    run_tags: dict = field(default_factory=dict)  # extra MLflow tags (a pipeline's parent run id, stage)
    # MLflow's system metrics (CPU, memory, GPU utilisation and memory) sampled every N seconds on rank 0's
    # node into the run (system/...); None: off
    system_metrics_s: float | None = None


@dataclass
class RunOutcome:
    name: str
    storage: str
    steps: int
    metrics: dict
    checkpoint: str | None
    run_id: str | None
    tracking_uri: str
    history: list = field(default_factory=list)


# --------------------------------------------------------------------------- names and storage
def unique_name(base: str) -> str:
    return f"{base}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid() % 10000:04d}"


def resolve_storage(storage: str | None) -> str:
    if not storage:
        return str(state_dir() / "ray_results")
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


def check_cluster_options(options: ClusterOptions, config: Config) -> None:
    if options.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {options.workers}")
    if not (0 <= options.gpus_per_worker < float("inf")) or not (0 < options.cpus_per_worker < float("inf")):
        raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
    if options.num_to_keep is not None and options.num_to_keep < 1:
        raise ConfigError(f"--num-to-keep must be >= 1 (checkpoints kept in storage), got {options.num_to_keep}")
    if options.resource_timeout_s is not None and not (0 <= options.resource_timeout_s < float("inf")):
        raise ConfigError(f"--resource-timeout must be a number of seconds >= 0, got {options.resource_timeout_s}")
    if options.system_metrics_s is not None and not (0.1 <= options.system_metrics_s < float("inf")):
        raise ConfigError(f"--system-metrics {options.system_metrics_s:g} must be an interval of at least 0.1 seconds "
                          "(10 is usual)")
    if options.max_failures < -1:
        raise ConfigError("--max-failures must be >= 0 (or -1 for unlimited restarts)")
    if config.data.batch_size % options.workers:
        raise ConfigError(f"data.batch_size {config.data.batch_size} is not divisible by --workers {options.workers}: "
                          f"use a multiple of {options.workers}")
    if options.gpus_per_worker > 0 and config.train.device == "cpu":
        raise ConfigError("--gpus-per-worker > 0 but train.device is cpu: drop one of them")


def init_ray(address: str | None, log: Callable[[str], None] = print, num_cpus: int | None = None) -> None:
    """Connect to (or start) Ray. Local mode keeps the dashboard off and logs quiet."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if address in (None, "", "local"):
        # on a busy single machine a worker group can take over Ray's default 60 s to start
        env = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", **_worker_env()}
        ray.init(include_dashboard=False, log_to_driver=True, num_cpus=num_cpus,
                 runtime_env={"env_vars": env}, logging_level="WARNING")
        return
    problem = _probe_address(address)
    if problem:
        raise UserError(f"cannot reach the Ray cluster at {address} ({problem}): start it with `ray start --head` "
                        f"or pass --address local for an embedded Ray")
    try:
        # a node's own state folder and data root win over the driver's (applied in the workers, see apply_env)
        env = {k: v for k, v in _worker_env(address).items() if k not in NODE_OWN}
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env}, logging_level="WARNING")
    except ConnectionError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address} ({str(exc).splitlines()[0][:120]}): start it with "
                        f"`ray start --head` or pass --address local for an embedded Ray") from None


def _probe_address(address: str) -> str | None:
    """A TCP connect to HOST:PORT of ``ray://HOST:PORT`` or ``HOST:PORT`` (ray.init would retry a dead
    address for a long time); None when it answers or the address names no port ("auto")."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d+)/?", address.strip())
    if not match:
        return None
    host, port = match.group(1), int(match.group(2))
    try:
        with socket.create_connection((host, port), timeout=5):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def check_resources(options: ClusterOptions, per_trial_workers: int | None = None,
                    log: Callable[[str], None] = print) -> None:
    """Fail fast when the cluster cannot place the workers, instead of waiting forever for them.

    The embedded Ray is checked at once; a cluster gets ``resource_timeout_s`` (default 10 minutes) for
    an autoscaler to add nodes. One worker's bundle must fit on one node; all workers on the cluster."""
    import ray

    workers = per_trial_workers or options.workers
    need = {"CPU": options.cpus_per_worker, "GPU": options.gpus_per_worker}
    local = options.address in (None, "", "local")
    timeout = options.resource_timeout_s if options.resource_timeout_s is not None else (0.0 if local else 600.0)
    deadline = time.monotonic() + timeout
    announced = False
    demand_posted = False
    try:
        while True:
            nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
            total = {k: sum(n.get(k, 0.0) for n in nodes) for k in need}
            fits_node = any(all(n.get(k, 0.0) >= v for k, v in need.items() if v > 0) for n in nodes)
            fits_all = all(total[k] >= v * workers for k, v in need.items() if v > 0)
            if fits_node and fits_all:
                return
            if time.monotonic() >= deadline:
                _raise_unplaceable(options, workers, nodes, total, fits_node, timeout)
            # Polling ray.nodes() creates no demand: tell the autoscaler what the workers need, or a cluster
            # that starts with zero GPU nodes never adds one. Posted on every pass: the request is one per
            # cluster, and another run that ends its wait withdraws it.
            demand_posted = post_resource_demand(worker_bundles(options, workers), log) or demand_posted
            if not announced:
                log(f"waiting up to {timeout:.0f} s for the cluster to offer {workers} x {need} ...")
                announced = True
            time.sleep(min(5.0, max(deadline - time.monotonic(), 0.1)))
    finally:
        if demand_posted:  # the workers' own placement group is the demand from here on
            post_resource_demand([], log)


def worker_bundles(options: ClusterOptions, workers: int) -> list[dict]:
    """One resource bundle per training worker, as Ray Train asks for them."""
    bundle = {"CPU": float(options.cpus_per_worker)}
    if options.gpus_per_worker:
        bundle["GPU"] = float(options.gpus_per_worker)
    return [dict(bundle) for _ in range(workers)]


def post_resource_demand(bundles: list[dict], log: Callable[[str], None] = print) -> bool:
    """Ask the cluster's autoscaler for ``bundles`` (``ray.autoscaler.sdk.request_resources``: a
    standing request, replaced by the next call; ``[]`` withdraws it). True when it was posted."""
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - an old or locked-down GCS: waiting still works, just slower
        log(f"warning: could not post the resource request to the autoscaler ({str(exc).splitlines()[0][:120]})")
        return False
    return True


def _raise_unplaceable(options: ClusterOptions, workers: int, nodes: list, total: dict, fits_node: bool,
                       timeout: float) -> None:
    have = f"{total['CPU']:g} CPU and {total['GPU']:g} GPU over {len(nodes)} node(s)"
    asked = (f"{workers} worker(s) x {options.cpus_per_worker:g} CPU"
             + (f" + {options.gpus_per_worker:g} GPU" if options.gpus_per_worker else ""))
    per_node = ""
    if not fits_node:  # name the resource no single node has enough of
        need = {"CPU": options.cpus_per_worker, "GPU": options.gpus_per_worker}
        short = [k for k, v in need.items() if v > 0 and max((n.get(k, 0.0) for n in nodes), default=0.0) < v]
        if short:
            largest = max((n.get(short[0], 0.0) for n in nodes), default=0.0)
            per_node = f"; no node has {need[short[0]]:g} {short[0]} for one worker (largest: {largest:g})"
        else:
            per_node = "; no single node has both the CPUs and the GPUs one worker needs"
    waited = f" after waiting {timeout:.0f} s" if timeout else ""
    raise UserError(f"the cluster cannot place {asked}: it has {have}{per_node}{waited}; lower --workers, "
                    f"--gpus-per-worker or --cpus-per-worker, or add nodes (--resource-timeout waits for "
                    f"an autoscaler)")


NODE_OWN = ("SSLAB_HOME", "SSLAB_DATA_ROOT")  # on a cluster, a node that sets these keeps its own


def node_default_keys(options: ClusterOptions) -> list[str]:
    """The variables of ``_worker_env`` that a cluster's nodes may set for themselves (each node its own
    disk: the state folder with its data cache, the data root); the driver's values fill in only where a
    node has none. The embedded Ray's workers are this machine: the driver's values hold there."""
    if options.address in (None, "", "local"):
        return []
    return [k for k in NODE_OWN if k not in options.worker_env]  # an explicit --env still wins


def apply_env(env: dict, node_defaults=()) -> None:
    """In a worker: set the driver's variables, keeping the node's own values of ``node_defaults``."""
    for key, value in env.items():
        if key in node_defaults:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def _worker_env(address: str | None = None) -> dict:
    """Environment the workers need to find the same data, state and tracking store as the driver.

    A driver on a cluster node (``--address auto``, a job) passes its node's settings on; a driver
    that reaches a cluster from outside (``ray://``, Ray Client) passes none of its own paths, so
    the workers keep their nodes' ``SSLAB_HOME``, ``SSLAB_DATA_ROOT`` and tracking URI."""
    # No secrets: a runtime env is shown to every dashboard user. Workers read MLflow credentials from
    # their own environment (a Kubernetes Secret, the env `ray start` ran with, or the driver's own env
    # for the embedded Ray, whose workers inherit it).
    if address and address.startswith("ray://"):
        env = {k: os.environ[k] for k in (FAULT_ENV, "RAY_AUTH_MODE") if k in os.environ}
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        if uri and not uri.startswith(("sqlite:", "file:", "/")):  # a server URL means the same everywhere
            env["MLFLOW_TRACKING_URI"] = uri
        return env
    keep = ("SSLAB_HOME", "SSLAB_DATA_ROOT", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", FAULT_ENV,
            "RAY_AUTH_MODE")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.setdefault("SSLAB_HOME", str(state_dir()))
    from trainers.paths import default_data_root

    root = default_data_root()
    if root is not None:
        env.setdefault("SSLAB_DATA_ROOT", str(root))
    return env


# --------------------------------------------------------------------------- worker side
def _copy_checkpoint_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in CHECKPOINT_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


class RayReporter(TrainerEvents):
    """A Ray Train worker's side of the loop's events: logged rows to MLflow (rank 0, by global step, so a
    restart never duplicates one), checkpoints with the held-out metrics to ``ray.train.report`` (rank 0
    uploads the files, every rank reports), and the test fault plan after each logged row."""

    def __init__(self, loop_config: dict, rank: int, out_dir: Path, faults: FaultPlan | None = None):
        self.rank, self.out_dir, self.faults = rank, out_dir, faults
        self.run_folder = loop_config.get("run_folder")
        self.metric_logger = None
        if rank == 0 and loop_config.get("run_id"):
            self.metric_logger = tracking.MetricLogger(loop_config["tracking_uri"], loop_config["run_id"])
        self.monitor = None
        if self.metric_logger is not None and loop_config.get("system_metrics_s"):
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(loop_config["run_id"], sampling_interval=loop_config["system_metrics_s"],
                                                tracking_uri=loop_config["tracking_uri"],
                                                resume_logging=loop_config.get("resumed", False))
            self.monitor.start()
        if self.run_folder:  # the worker's own checkpoint folder is scratch: point at what survives it
            self.resume_hint = (f"the run resumes from its last checkpoint in {self.run_folder} "
                                f"(rerun with --name {loop_config['name']})")
        self.held_out: dict = {}  # the latest online kNN / probe metrics, sent with every report
        knn = loop_config["config"].get("knn", {})
        self.held_out_defaults = online_knn_metrics(knn.get("k") or [], knn.get("temperature", DEFAULT_TEMPERATURE))

    def on_log(self, step: int, row: dict) -> None:
        if self.metric_logger is not None:
            self.metric_logger.log_row(step, row)
        if self.faults is not None:
            self.faults.after_step(step)

    def on_checkpoint(self, step: int, metrics: dict, path: Path) -> None:
        self.report(step, metrics, path)

    def on_epoch_end(self, step: int, completed: int, metrics: dict, path: Path | None, final: bool) -> None:
        if not final:  # the final report follows fit(), with the backbone
            self.report(step, metrics, path)

    def flush(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.flush(force=True)

    def close(self) -> None:
        """Stop the system-metrics sampler (its last samples are logged)."""
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.finish()

    def report(self, step: int, metrics: dict, path: Path | None, final: bool = False) -> None:
        import ray.train

        # the held-out evaluations (online kNN, online linear probe) come with epoch ends, not with on_log
        held_out = {k: v for k, v in metrics.items() if k.startswith(("knn_", "online_linear_top"))}
        self.held_out.update(held_out)
        if self.metric_logger is not None and held_out:
            self.metric_logger.log_row(step, held_out)
        payload = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        payload.update(self.held_out)
        for key in self.held_out_defaults:  # every kNN metric (the checkpoint score, a sweep's metric) exists
            payload.setdefault(key, 0.0)       # in every report, 0 before the first kNN
        payload.update(step=step, final=float(final))
        if self.rank != 0 or path is None:
            ray.train.report(payload, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="sslab-report-") as folder:
            staged = Path(folder)
            shutil.copy2(path, staged / "last.pt")
            if checksum_path(path).is_file():
                shutil.copy2(checksum_path(path), staged / "last.pt.sha256")
            for name in CHECKPOINT_FILES[1:]:
                if (self.out_dir / name).is_file():
                    shutil.copy2(self.out_dir / name, staged / name)
            try:
                ray.train.report(payload, checkpoint=ray.train.Checkpoint.from_directory(folder))
            except OSError as exc:  # the run storage is full or read-only; Ray has kept the last upload
                from trainers.checkpoint import storage_error

                raise storage_error(self.run_folder or "the run storage", exc) from None


def worker_loop(loop_config: dict) -> None:
    """What each Ray Train worker runs (rank / world size from Ray's context)."""
    import ray.train
    import ray.train.torch

    from orchestrator.preempt import install_on_ray_worker
    from trainers.loop import StopRequested, Trainer

    # 1. this worker's settings: the driver's environment (state dir, data root, tracking URI; a cluster
    #    node keeps its own folders), the config, staged data, the device and a scratch run folder
    apply_env(loop_config.get("env", {}), loop_config.get("env_node_defaults", ()))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    def worker_log(msg: str) -> None:
        print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)

    config = from_dict(loop_config["config"])
    if loop_config.get("staged_data"):
        from orchestrator.staging import fetch_staged

        fetch_staged(config, loop_config["staged_data"], log=worker_log)
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        config.train.device = "cpu"
    out_dir = Path(tempfile.mkdtemp(prefix=f"sslab-{loop_config['name']}-rank{rank}-"))  # what must survive
    config.train.out_dir = str(out_dir)                                                # goes through reports

    # 2. a restarted worker group resumes from the checkpoint Ray hands back
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            _copy_checkpoint_files(Path(folder), out_dir / "checkpoints")
            if (Path(folder) / "metrics.jsonl").is_file():
                shutil.copy2(Path(folder) / "metrics.jsonl", out_dir / "metrics.jsonl")
    config.train.resume = "auto" if checkpoint is not None else None

    # 3. a user error (NaN loss, bad data) happens again after a restart: the first worker to meet it leaves
    #    a note in the run's storage, and restarted workers stop at once instead of training up to it again
    fatal = Path(loop_config["fatal_marker"]) if loop_config.get("fatal_marker") else None
    if fatal is not None and fatal.is_file():
        note = json.loads(fatal.read_text())
        error = UserError(note["message"])
        error.exit_code = note["exit_code"]
        raise error

    # 4. train; the loop's events go through the reporter, a SIGTERM (spot reclaim, pod eviction) stops every
    #    rank after the step in flight with a checkpoint
    fault = loop_config.get("fault")  # (kind, steps) or None: the restart tests' plan
    faults = (FaultPlan(fault[0], fault[1], Path(loop_config["fault_marker"]))
              if fault is not None and loop_config.get("fault_marker") else None)
    reporter = RayReporter({**loop_config, "resumed": checkpoint is not None}, rank, out_dir, faults)
    stop = install_on_ray_worker(worker_log)
    try:
        trainer = Trainer(config, rank=rank, world_size=world, device=device, progress=False, log=worker_log,
                          events=reporter, stop=stop)
        trainer.setup()
        ranks = _where_ranks_run(world)
        if rank == 0:
            record_attempt(loop_config, {"start_step": trainer.step, "workers": world,
                                         "nodes": len({r["node"] for r in ranks}), "ranks": ranks})
        result = trainer.fit()
    except StopRequested as exc:
        if stop is not None:
            stop.finished()
            if stop() is not None:  # this rank got the signal: say when, and how long the checkpoint took
                record_attempt(loop_config, {"stopped_at_step": exc.step, "rank": rank, "reason": exc.reason,
                                             "checkpoint_s": round(time.monotonic() - stop.received_at, 3)},
                               file=PREEMPTIONS_FILE)
        reporter.flush()
        # the controller must hold every rank's report of that checkpoint before it sees the first error, or
        # it restarts from the previous one: each rank waits until its report is taken, then all ranks meet
        _wait_until_reports_taken(worker_log)
        if world > 1:
            import torch.distributed as dist

            dist.barrier()
        raise  # Ray Train restarts the group, which resumes from the checkpoint just reported
    except UserError as exc:
        if fatal is not None:
            fatal.parent.mkdir(parents=True, exist_ok=True)
            fatal.write_text(json.dumps({"message": str(exc), "exit_code": exc.exit_code}))
        raise
    finally:
        reporter.close()

    # 5. the final report: fit() always checkpoints its last step (rank 0 uploads it with the backbone)
    reporter.flush()
    reporter.report(result.steps, result.metrics, result.checkpoint if rank == 0 else None, final=True)
    shutil.rmtree(out_dir, ignore_errors=True)


ATTEMPTS_FILE, PREEMPTIONS_FILE = "attempts.jsonl", "preemptions.jsonl"  # in <storage>/<name>/


def record_attempt(loop_config: dict, row: dict, file: str = ATTEMPTS_FILE) -> None:
    """Append ``row`` (with the time) to a record in the run's folder: where each start of the worker
    group resumed (attempts.jsonl), and each stop on a signal (preemptions.jsonl). Local storage only."""
    folder = loop_config.get("run_folder")
    if not folder or "://" in folder:
        return
    try:
        path = Path(folder) / file
        with path.open("a") as handle:
            handle.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **row}) + "\n")
    except OSError:
        pass  # a record, not worth failing the run for


def _wait_until_reports_taken(log, timeout_s: float = 60.0) -> None:
    """Block until Ray Train's controller has taken this worker's reports (its result queue is empty and
    done). Ray-internal; where that is not reachable, a short pause instead."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        results = get_train_context().get_result_queue()
    except Exception:  # noqa: BLE001 - another Ray version
        time.sleep(5.0)
        return
    deadline = time.monotonic() + timeout_s
    while results.unfinished_tasks and time.monotonic() < deadline:
        time.sleep(0.05)
    if results.unfinished_tasks:
        log(f"warning: the controller did not take the last report within {timeout_s:.0f} s")


def _where_ranks_run(world: int) -> list[dict]:
    """Each rank's node (Ray node id) and state folder, gathered on every rank (a collective)."""
    import ray

    own = {"node": ray.get_runtime_context().get_node_id()[:12], "pid": os.getpid(),
           "home": os.environ.get("SSLAB_HOME")}
    if world == 1:
        return [own]
    import torch.distributed as dist

    gathered: list = [None] * world
    dist.all_gather_object(gathered, own)
    return gathered


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError inside what Ray raises for failed workers (``WorkerGroupError.worker_failures``,
    causes, ``RayTaskError``), so that the user sees the worker's one line, not Ray's wrapper."""
    seen, todo = set(), [error]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        wrapped = getattr(current, "cause", None)  # RayTaskError: the worker's own exception
        if isinstance(current, UserError) and wrapped is None:
            return current
        todo += [wrapped, getattr(current, "__cause__", None)]
        todo += list((getattr(current, "worker_failures", None) or {}).values())
    return None


# --------------------------------------------------------------------------- driver side
def _open_mlflow_run(config: Config, name: str, options: ClusterOptions, uri: str, log) -> str | None:
    problem = tracking.check_reachable(uri)
    if problem:
        log(f"warning: {problem}; training goes ahead without live tracking: its metrics stay in the run's "
            f"metrics.jsonl and are logged at the end if the server answers by then")
        return None
    try:
        recorder = tracking.RunRecorder(uri, options.experiment)
        tags = {"method": config.method_name, "dataset": config.data.dataset, "backbone": config.model.backbone,
                "workers": str(options.workers), **options.run_tags}
        run_id, continued = recorder.open(name, "pretrain", tags, config.flat(),
                                          resume={tracking.RUN_NAME_TAG: name, tracking.KIND_TAG: "pretrain"})
        log(f"MLflow: continuing run {run_id} ({name})" if continued else
            f"MLflow: run {run_id} in experiment '{options.experiment}' ({uri})")
        try:
            tracking.log_dataset_inputs(recorder.client, run_id, prepared_sidecars(config))
        except Exception as exc:  # noqa: BLE001 - lineage is worth a warning, not the run's tracking
            log(f"warning: the run's data sets were not logged as MLflow inputs ({str(exc).splitlines()[0][:160]})")
        return run_id
    except Exception as exc:  # noqa: BLE001 - tracking must not stop training
        log(f"warning: MLflow at {uri} failed ({str(exc).splitlines()[0][:160]}); training goes ahead without "
            f"tracking")
        return None


def _finish_mlflow_run(uri: str, run_id: str, checkpoint_dir: Path | None, config: Config, history: list,
                       status: str, log) -> None:
    try:
        tracking.replay_history(uri, run_id, history, log=log)  # anything the workers could not send
        with tempfile.TemporaryDirectory(prefix="sslab-artifacts-") as folder:
            folder = Path(folder)
            config.dump(folder / "config.yaml")
            artifacts = [(folder / "config.yaml", None)]
            if history:
                from trainers.plots import plot_history

                artifacts.append((plot_history(history, folder / "curves.png", title=config.name), None))
            if checkpoint_dir is not None:
                artifacts.append((checkpoint_dir / "backbone.pt", "backbone"))
                artifacts += [(checkpoint_dir / name, "checkpoint") for name in ("last.pt", "metrics.jsonl",
                                                                                  "summary.json")]
            tracking.RunRecorder(uri).finish(
                run_id, status, [(path, where) for path, where in artifacts if path is not None])
    except Exception as exc:  # noqa: BLE001
        log(f"warning: could not finish the MLflow run {run_id} ({str(exc).splitlines()[0][:160]})")


def run_pretraining(config: Config, options: ClusterOptions, name: str | None = None,
                    log: Callable[[str], None] = print) -> RunOutcome:
    """Train ``config`` on a Ray cluster (or an embedded local Ray); see the module docstring."""
    from trainers.loop import check_config

    check_cluster_options(options, config)
    check_config(config, options.workers)
    name = name or unique_name(config.name)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ConfigError(f"run name '{name}' may only hold letters, digits, '.', '_' and '-'")
    config.name = name
    storage = resolve_storage(options.storage)
    with _hold_run_folder(storage, name):
        return _train_on_ray(config, options, name, storage, log)


def _hold_run_folder(storage: str, name: str):
    """One driver per run name: a second ``--name X`` while X trains would mix their checkpoints."""
    import contextlib

    from trainers.checkpoint import storage_error
    from trainers.locks import hold

    if "://" in storage:
        return contextlib.nullcontext()  # object stores have no locks; names there should be unique
    folder = Path(storage) / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise storage_error(folder, exc, "run folder", hint="choose a writable --storage") from None
    return hold(folder / ".sslab-run.lock", wait=False, what=f"run {name} ({folder})",
                busy_hint="another driver is training it; wait for it to end, or pass another --name")


def _train_on_ray(config: Config, options: ClusterOptions, name: str, storage: str, log) -> RunOutcome:
    """One pretraining run on Ray Train, in the steps of Ray's own examples."""
    # 1. tracking, the cluster's resources and the data files, before any worker starts
    uri = tracking.resolve_tracking_uri(options.tracking_uri)
    if options.require_tracking:  # an API call with this client's login: reach, Host check and login
        tracking.require_reachable(uri)
    init_ray(options.address, log)
    check_resources(options, log=log)
    staged = prepare_or_stage(config, options, storage, log)
    run_id = _open_mlflow_run(config, name, options, uri, log)
    _tag_ray_job(uri, run_id)
    # 2. the trainer: worker_loop on N workers, checkpoints ranked by the online kNN
    trainer = _torch_trainer(config, options, name, storage, _loop_config(config, options, name, storage, uri,
                                                                          run_id, staged))
    log(f"Ray Train: {options.workers} worker(s) x ({options.cpus_per_worker:g} CPU"
        f"{f', {options.gpus_per_worker:g} GPU' if options.gpus_per_worker > 0 else ''}), storage {storage}/{name}")
    # 3. fit; the outcome comes from fit()'s Result (its latest checkpoint), or after a failure from storage
    error, result = None, None
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - report it, close the MLflow run as failed, re-raise
        error = exc
    checkpoint_dir = _result_checkpoint(result) or _latest_checkpoint(storage, name)
    history, metrics = _read_checkpoint(checkpoint_dir)
    # 4. MLflow: a run the server missed at the start is replayed now; then closed
    if run_id is None and history:
        run_id = _replay_missed_run(config, name, options, uri, history, log)
    if run_id is not None:
        _finish_mlflow_run(uri, run_id, checkpoint_dir, config, history, "FAILED" if error else "FINISHED", log)
    # 5. a failure as one line for the user
    if error is not None:
        cause = user_error_in(error) or getattr(error, "__cause__", None) or error
        if isinstance(cause, UserError):
            raise cause
        raise UserError(f"training failed after {options.max_failures} restart(s): {str(cause).splitlines()[0][:300]} "
                        f"(worker logs: Ray's session folder; rerun with --name {name} to resume)") from error
    return RunOutcome(name, storage, int(metrics.get("steps", 0)), metrics,
                      str(checkpoint_dir) if checkpoint_dir else None, run_id, uri, history)


def _tag_ray_job(uri: str, run_id: str | None) -> None:
    if run_id is None:
        return
    import ray

    try:
        tracking.client(uri).set_tag(run_id, "ray_job_id", ray.get_runtime_context().get_job_id())
    except Exception:  # noqa: BLE001 - a tag is not worth stopping for
        pass


def _loop_config(config: Config, options: ClusterOptions, name: str, storage: str, uri: str, run_id, staged) -> dict:
    """What every worker's ``worker_loop`` gets: the config, the run's MLflow and storage markers, faults."""
    fault = parse_fault(os.environ.get(FAULT_ENV))
    markers = run_markers(storage, name)
    if markers["fatal_marker"]:
        Path(markers["fatal_marker"]).unlink(missing_ok=True)  # this attempt may have fixed what stopped the last one
    return {"config": config.to_dict(), "name": name, "env": {**_worker_env(options.address), **options.worker_env},
            "env_node_defaults": node_default_keys(options), "run_id": run_id, "tracking_uri": uri,
            "staged_data": staged, "fault": fault, "system_metrics_s": options.system_metrics_s,
            "fault_marker": str(Path(storage) / name / "faults") if fault and "://" not in storage else None,
            **markers}


def _torch_trainer(config: Config, options: ClusterOptions, name: str, storage: str, loop_config: dict):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = options.gpus_per_worker > 0
    resources = {"CPU": options.cpus_per_worker, **({"GPU": options.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        worker_loop, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=options.workers, use_gpu=use_gpu,
                                               resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=options.num_to_keep,
                                                         checkpoint_score_attribute=checkpoint_score(config),
                                                         checkpoint_score_order="max")))


def _result_checkpoint(result) -> Path | None:
    """The latest checkpoint of ``fit()``'s Result, when it is a folder on this machine."""
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is None or "://" in str(checkpoint.path):
        return None
    path = Path(checkpoint.path)
    return path if path.is_dir() else None


def _read_checkpoint(checkpoint_dir: Path | None) -> tuple[list[dict], dict]:
    """The run's metric rows (metrics.jsonl) and its summary (summary.json) from a checkpoint folder."""
    history, metrics = [], {}
    if checkpoint_dir is not None and (checkpoint_dir / "metrics.jsonl").is_file():
        history = [json.loads(line) for line in (checkpoint_dir / "metrics.jsonl").read_text().splitlines() if line]
    if checkpoint_dir is not None and (checkpoint_dir / "summary.json").is_file():
        metrics = json.loads((checkpoint_dir / "summary.json").read_text())
    return history, metrics


def _replay_missed_run(config: Config, name: str, options: ClusterOptions, uri: str, history: list[dict], log):
    """The server did not answer at the start: open the run now (the history is sent when it is finished)."""
    run_id = _open_mlflow_run(config, name, options, uri, log)
    if run_id is not None:
        steps = [row["step"] for row in history if "step" in row]
        try:
            tracking.client(uri).set_tag(run_id, tracking.GAP_TAG, f"steps {min(steps)}-{max(steps)} sent at "
                                         f"the end (the server did not answer at the start)")
        except Exception:  # noqa: BLE001 - a tag is not worth failing for
            pass
    return run_id


def _latest_checkpoint(storage: str, name: str) -> Path | None:
    """The newest checkpoint folder of the run (by the step in its metrics), on a local file system."""
    if "://" in storage:
        return None
    root = Path(storage) / name
    best, best_step = None, -1
    for candidate in root.glob("checkpoint_*"):
        if not candidate.is_dir():  # Ray's checkpoint_manager_snapshot.json
            continue
        summary = candidate / "summary.json"
        step = -1
        if summary.is_file():
            step = json.loads(summary.read_text()).get("steps", -1)
        elif (candidate / "metrics.jsonl").is_file():
            lines = (candidate / "metrics.jsonl").read_text().splitlines()
            step = json.loads(lines[-1]).get("step", -1) if lines else -1
        if best is None or step > best_step or (step == best_step and candidate.stat().st_mtime > best.stat().st_mtime):
            best, best_step = candidate, step
    return best


def checkpoint_score(config: Config) -> str:
    """The metric that ranks a run's checkpoints in storage: kNN top-1 at the first online k (0 until the
    first kNN, so the latest checkpoints rank by recency until then)."""
    return online_knn_metrics(config.knn.k[:1], config.knn.temperature)[0]


def prepared_sidecars(config: Config) -> list[dict]:
    """The ``.beton`` sidecars (data set, split, content key, source) of the run's prepared splits, on
    the driver's disk; those not prepared here (a cluster node prepares its own) are left out."""
    return tracking.dataset_sidecars([config.data.dataset], config.data.cache_dir)


def prepare_or_stage(config: Config, options: ClusterOptions, storage: str, log) -> str | None:
    """Write the data files once on the driver, not in every worker at the same time; on a cluster
    (or when asked) also stage them through the run storage. Returns the staging URI or None."""
    local = options.address in (None, "", "local")
    stage = options.stage_data if options.stage_data is not None else not local
    if stage:
        from orchestrator.staging import stage_data

        return stage_data(config, storage, log)
    if local:
        _prepare_data(config, log)
    return None


def _prepare_data(config: Config, log) -> None:
    from trainers.data.beton import PrepareSettings, prepare

    if config.data.loader in ("torch", "jpeg"):  # they read the images themselves: no .beton to write
        return
    try:
        from trainers.data.ffcv_import import import_ffcv

        import_ffcv()
    except ImportError:
        return
    cache = config.data.cache_dir or str(state_dir() / "data")
    prepare(config.data.dataset, "all", cache, config.data.data_root, PrepareSettings(), progress=False,
            log=lambda msg: None)
