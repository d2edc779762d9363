"""MLflow's UI as it shows sslab's runs: the screenshots in docs/screenshots/ (README, "What MLflow shows").

    .venv/bin/python docs/screenshots.py        # needs `chromium` (apt-get install chromium); about a minute

It builds an MLflow store (sqlite, in a temporary folder) through sslab's own tracking code, with the
stages' computations replaced by recorded results (no Ray, no training; the values are those of a demo
run on a CPU): the demo pipeline (pipelines/runner.py's PipelineRunner: a parent run, one child run per
stage), the same pipeline again with other linear-probe settings (its unchanged stages cached: link runs
under the new parent), and a SwAV sweep (orchestrator/sweep.py's parent and trial runs, the trials that
ASHA stopped closed by the sweep's own ``_finish_sweep_run``). Then it starts a real ``mlflow server`` on
that store and photographs three pages in headless Chromium: the experiment's runs table, the second
pipeline's parent with its stages, and the sweep's trials in the compare-runs view.

tests/test_mlflow_ui.py builds the same store and checks the same pages' rendered DOM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

EXPERIMENT = "sslab"
PIPELINE = ROOT / "configs" / "pipelines" / "demo.yaml"
SWEEP = ROOT / "configs" / "sweeps" / "swav_fashion-mnist.yaml"
SWEEP_NAME = "swav-fashion-mnist-sweep-20250611-142210"
OUT = Path(__file__).resolve().parent / "screenshots"
WINDOW = (1400, 900)

# --------------------------------------------------------------------------- recorded stage results
# What the demo pipeline's stages returned on a CPU (2 epochs of SwAV on Fashion-MNIST): the stage
# computations below return these instead of running on Ray.
EVAL_METRICS = {
    "knn": {"knn_top1_k20": 0.7412, "knn_top5_k20": 0.9718, "knn_top1_k200_t0.1": 0.7536},
    "semi": {"semi1_top1": 0.6127, "semi1_top5": 0.9402, "semi10_top1": 0.7351, "semi10_top5": 0.9765},
    "transfer": {"transfer_digits_top1": 0.9122, "transfer_digits_top5": 0.9961},
}
LINEAR_TOP1 = {30: 0.7806, 60: 0.7941}  # by the linear stage's epochs
PRETRAIN_STEPS, PRETRAIN_EPOCHS = 156, 2


def _pretrain_history() -> list[dict]:
    """A SwAV loss curve (log every 2 steps) and kNN top-1 after each epoch."""
    rows = []
    for step in range(2, PRETRAIN_STEPS + 1, 2):
        loss = 5.95 + 2.1 * math.exp(-step / 35) + 0.06 * math.sin(step * 1.7)
        rows.append({"step": step, "epoch": (step - 1) * PRETRAIN_EPOCHS // PRETRAIN_STEPS, "loss": round(loss, 4),
                     "lr": round(0.3 * min(1.0, step / 39) * (0.5 + 0.5 * math.cos(math.pi * step / PRETRAIN_STEPS)), 5),
                     "img_per_s": round(310 + 12 * math.sin(step), 1)})
    rows.append({"step": PRETRAIN_STEPS // 2, "knn_top1_k20": 0.6684})
    rows.append({"step": PRETRAIN_STEPS, "knn_top1_k20": 0.7412})
    return rows


def _sidecars(config) -> list[dict]:
    """The prepared splits' ``.beton`` sidecars as trainers.data.beton writes them."""
    out = []
    for split, count in (("train", 60000), ("test", 10000)):
        key = hashlib.sha256(f"{config.data.dataset}/{split}/raw".encode()).hexdigest()
        out.append({"dataset": config.data.dataset, "split": split, "key": key, "count": count, "num_classes": 10,
                    "source": "/data/fashion-mnist", "image_size": 28, "mode": "L"})
    return out


def _replay_runner():
    from orchestrator import tracking
    from pipelines.runner import PipelineRunner

    class ReplayRunner(PipelineRunner):
        """PipelineRunner with every stage's computation replaced by its recorded result: the MLflow
        bookkeeping (parent, stage runs, cache keys, cached stages and their link runs) is the runner's."""

        def _ray(self):
            raise AssertionError("the replayed pipeline must not start Ray")

        def _compute(self, stage, settings, folder):
            if stage.kind == "prepare":
                return {"metrics": {}, "extra": {"files": {d: f"{d}-train.beton" for d in settings["datasets"]
                                                          if isinstance(d, str)}, "skipped": []}, "files": {}}
            if stage.kind == "linear":
                top1 = LINEAR_TOP1.get(settings["epochs"], 0.78)
                return {"metrics": {"linear_top1": top1, "linear_top5": round(top1 + 0.2, 4)}, "extra": {},
                        "files": {}}
            if stage.kind in EVAL_METRICS:
                return {"metrics": dict(EVAL_METRICS[stage.kind]), "extra": {}, "files": {}}
            if stage.kind == "report":
                lines = [f"- {o.name}: " + ", ".join(f"{k}={v:.4f}" for k, v in o.metrics.items())
                         for o in self.outcomes.values()]
                return {"metrics": {}, "extra": {}, "files": {"report.md": "# demo\n\n" + "\n".join(lines) + "\n"}}
            raise AssertionError(stage.kind)

        def _pretrain(self, stage, settings, key, folder):
            from orchestrator.train import _finish_mlflow_run

            config = self._pretrain_config(stage, settings)
            name = f"{self.spec.name}-{stage.name}-{key[:10]}"
            config.name = name
            # as orchestrator.train._open_mlflow_run opens a pipeline's pretraining run
            tags = {"method": config.method_name, "dataset": config.data.dataset, "backbone": config.model.backbone,
                    "workers": "1", **self._stage_tags(stage, key)}
            run_id, _ = self.recorder.open(name, "pretrain", tags, config.flat(),
                                           resume={tracking.RUN_NAME_TAG: name, tracking.KIND_TAG: "pretrain"})
            tracking.log_dataset_inputs(self.client, run_id, _sidecars(config))
            history = _pretrain_history()
            backbone = folder / "backbone.pt"
            backbone.write_bytes(hashlib.sha256(key.encode()).digest() * 64)  # stands in for the weights
            _finish_mlflow_run(self.uri, run_id, None, config, history, "FINISHED", log=self.log)
            from pipelines import stages as stage_impl

            sha = stage_impl.file_sha256(backbone)
            metrics = {"pretrain_loss": history[-3]["loss"], "pretrain_knn_top1_k20": 0.7412,
                       "pretrain_img_per_s": 311.4}
            self.client.set_tag(run_id, "mlflow.runName", f"{self.spec.name}/{stage.name}")
            return run_id, {"metrics": metrics, "output_hash": sha, "files": {},
                            "extra": {"backbone_path": str(backbone), "backbone_sha256": sha,
                                      "dataset": config.data.dataset, "method": config.method_name,
                                      "backbone": config.model.backbone, "ray_run": name, "steps": PRETRAIN_STEPS}}

    return ReplayRunner


# --------------------------------------------------------------------------- the sweep
def _sweep_trials(spec) -> list[dict]:
    """Eight random-search trials of the sweep's space with their kNN top-1 per epoch; ASHA (grace 1,
    reduction 2) stopped the weaker ones early."""
    rng = random.Random(7)
    trials = []
    for index in range(spec.num_samples):
        params = {"method.temperature": round(math.exp(rng.uniform(math.log(0.05), math.log(0.2))), 4),
                  "method.epsilon": rng.choice([0.03, 0.05]),
                  "data.crops": rng.choice(["2x28+2x12", "2x28+4x12", "2x28+6x12"]),
                  "optim.lr": round(math.exp(rng.uniform(math.log(0.1), math.log(0.6))), 4)}
        local = int(params["data.crops"].split("+")[1].split("x")[0])
        final = 0.70 + 0.012 * local - 0.35 * abs(params["method.temperature"] - 0.1) \
            - 0.05 * abs(params["optim.lr"] - 0.3) + rng.uniform(-0.01, 0.01)
        curve = [round(final - 0.09 / (epoch + 1) + 0.02, 4) for epoch in range(4)]
        trials.append({"id": f"{'3f9a1'}_{index:05d}", "params": params, "curve": curve})
    # ASHA at epochs 1 and 2: the lower half of the trials still running is stopped
    alive = list(range(len(trials)))
    for rung in (1, 2):
        alive.sort(key=lambda i: -trials[i]["curve"][rung - 1])
        for i in alive[len(alive) // 2:]:
            trials[i]["epochs"] = rung
        alive = alive[:len(alive) // 2]
    for i in alive:
        trials[i]["epochs"] = 4
    return trials


def record_sweep(uri: str, log=lambda *_: None) -> dict:
    """The sweep's MLflow runs as orchestrator.sweep.run_sweep / run_trial make them: the parent, one
    trial run per trial with its params and its metrics per step; finished trials are closed by the trial,
    stopped ones (still RUNNING) by the sweep's ``_finish_sweep_run`` (KILLED, ``stopped_by: asha``)."""
    from orchestrator import tracking
    from orchestrator.sweep import _finish_sweep_run, load_sweep, trial_config
    from orchestrator.train import _finish_mlflow_run

    spec = load_sweep(SWEEP)
    recorder = tracking.RunRecorder(uri, EXPERIMENT)
    parent, _ = recorder.open(
        SWEEP_NAME, "sweep", {"method": spec.base.method_name, "dataset": spec.base.data.dataset, "search": spec.search,
                              "scheduler": spec.scheduler},
        {"search": spec.search, "scheduler": spec.scheduler, "metric": spec.metric, "mode": spec.mode,
         "num_samples": spec.num_samples, "space": spec.space, "base": spec.base_path or "defaults"})
    steps_per_epoch = 47
    trials = _sweep_trials(spec)
    for trial in trials:
        config = trial_config(spec.base, trial["params"])
        trial["name"] = config.name = f"{SWEEP_NAME}-{trial['id']}"
        trial["run_id"], _ = recorder.open(trial["name"], "trial", {"method": config.method_name,
                                                                    "dataset": config.data.dataset,
                                                                    "sweep": SWEEP_NAME},
                                           config.flat(), parent=parent)
        tracking.log_dataset_inputs(recorder.client, trial["run_id"], _sidecars(config))
        history = []
        for epoch in range(trial["epochs"]):
            for step in range(epoch * steps_per_epoch + 1, (epoch + 1) * steps_per_epoch + 1, 4):
                history.append({"step": step, "loss": round(6.0 + 2.0 * math.exp(-step / 30)
                                                            - 2 * (trial["curve"][-1] - 0.75), 4)})
            history.append({"step": (epoch + 1) * steps_per_epoch, "knn_top1_k20": trial["curve"][epoch]})
        trial["knn_top1_k20"] = trial["curve"][trial["epochs"] - 1]
        trial["status"] = "FINISHED" if trial["epochs"] == 4 else "KILLED"
        if trial["status"] == "FINISHED":
            _finish_mlflow_run(uri, trial["run_id"], None, config, history, "FINISHED", log)
        else:  # killed by ASHA mid-run: its live metrics are in, its run is still open
            tracking.replay_history(uri, trial["run_id"], history, log=log)
    trials.sort(key=lambda t: -t["knn_top1_k20"])
    best = {"trial": trials[0]["name"], spec.metric: trials[0]["knn_top1_k20"], **trials[0]["params"]}
    folder = Path(tempfile.mkdtemp(prefix="sslab-sweep-"))
    try:
        _finish_sweep_run(uri, recorder.experiment_id, parent, str(folder / "trials"), spec, folder, best, log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"parent": parent, "trials": trials, "metric": spec.metric}


# --------------------------------------------------------------------------- the store
@dataclass
class Store:
    uri: str
    experiment_id: str
    pipelines: list = field(default_factory=list)  # PipelineOutcome of the first run, then of the variant
    sweep: dict = field(default_factory=dict)


def create_store(folder: Path) -> str:
    """The sqlite store in ``folder`` with its tables and the experiment (a server can start on it)."""
    from orchestrator import tracking

    folder.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracking.RunRecorder(uri, EXPERIMENT).experiment_id
    return uri


def build_store(folder: Path, log=lambda *_: None) -> Store:
    """sslab's runs of a demo session in ``folder``/mlflow.db (see the module docstring)."""
    from orchestrator import tracking
    from pipelines.spec import load_pipeline

    uri = create_store(folder)
    runner = _replay_runner()
    outcomes = []
    for overrides in ([], ["stages.linear.epochs=60"]):  # the variant reuses every stage but linear and report
        spec = load_pipeline(PIPELINE, [f"experiment={EXPERIMENT}", "stages.linear.epochs=30", *overrides])
        outcomes.append(runner(spec, tracking_uri=uri, out_dir=str(folder / "pipeline"), log=log).run())
    sweep = record_sweep(uri, log)
    experiment_id = tracking.client(uri).get_experiment_by_name(EXPERIMENT).experiment_id
    return Store(uri, experiment_id, outcomes, sweep)


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(uri: str, log_file: Path, meanwhile=None, timeout_s: float = 90.0):
    """``mlflow server`` on ``uri`` at a free port; yields its base URL once it answers an API call (not
    /health: that answers before the Host check). ``meanwhile`` (a callable) runs while it starts."""
    import requests

    port = free_port()
    host = f"127.0.0.1:{port}"
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--allowed-hosts", f"{host},localhost:{port}"]
    with open(log_file, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://{host}"
    try:
        if meanwhile is not None:
            meanwhile()
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({process.returncode}): {log_file.read_text()[-2000:]}")
            try:
                if requests.get(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer in {timeout_s:.0f} s: {log_file.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


# --------------------------------------------------------------------------- the pages
# MLflow 3.17's UI has two layouts, GenAI and Model training, picked by a switch in its side bar that a
# browser remembers (localStorage; a new browser starts in GenAI) or by ?workflowType= in the URL; the
# experiment's kind tag does not pick it. These are the pages as the Model training layout links them.
TRAINING = "workflowType=machine_learning"


def runs_page(url: str, experiment_id: str) -> str:
    """The experiment's runs table, in the Model training layout."""
    return f"{url}/#/experiments/{experiment_id}/runs?{TRAINING}"


def pipeline_page(url: str, store: Store) -> str:
    """The second pipeline's parent run and its stage runs."""
    parent = store.pipelines[-1].parent_run_id
    return f"{url}/#/experiments/{store.experiment_id}/runs/{parent}?{TRAINING}"


def compare_page(url: str, store: Store) -> str:
    """The sweep's trials side by side, best first."""
    ids = json.dumps([t["run_id"] for t in store.sweep["trials"]], separators=(",", ":"))
    return f"{url}/#/compare-runs?runs={quote(ids)}&experiments={quote(json.dumps([store.experiment_id]))}&{TRAINING}"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _browser(args: list[str], profile: Path, timeout_s: float, window=WINDOW) -> subprocess.CompletedProcess:
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed: apt-get install -y chromium")
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
               "--virtual-time-budget=15000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)


def dump_dom(page: str, profile: Path, timeout_s: float = 60.0, window=WINDOW) -> str:
    """The page's DOM after its scripts ran (what the user sees, as HTML)."""
    done = _browser(["--dump-dom", page], profile, timeout_s, window)
    if not done.stdout.strip():
        raise RuntimeError(f"chromium printed no DOM for {page}: {done.stderr[-2000:]}")
    return done.stdout


def screenshot(page: str, path: Path, profile: Path, timeout_s: float = 60.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    done = _browser([f"--screenshot={path}", page], profile, timeout_s)
    if not path.is_file():
        raise RuntimeError(f"chromium wrote no screenshot of {page}: {done.stderr[-2000:]}")
    return path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="sslab-screenshots-") as tmp:
        tmp = Path(tmp)
        os.environ["SSLAB_HOME"] = str(tmp / "home")
        built = []
        with mlflow_server(create_store(tmp / "store"), tmp / "server.log",
                           meanwhile=lambda: built.append(build_store(tmp / "store", log=print))) as url:
            store = built[0]
            for name, page in (("runs", runs_page(url, store.experiment_id)),
                               ("pipeline", pipeline_page(url, store)), ("sweep", compare_page(url, store))):
                path = screenshot(page, OUT / f"{name}.png", tmp / "profile")
                print(f"{path.relative_to(ROOT)}: {path.stat().st_size // 1024} KB  ({page})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
