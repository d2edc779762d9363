"""Do fractional-GPU sweep trials really share the device? (performance target 5, second half; BENCHMARKS.md)

Runs a 4-trial FIFO sweep (grid over the SwAV temperature), each trial one Ray Train worker with
``--gpu`` of a GPU (default 0.25) or ``--cpu`` CPUs, then reads each trial's MLflow child run
(start and end time) and reports how many trials ran at the same time.

  python bench/sweep_concurrency.py --device cuda        # 4 x 0.25 GPU on one GPU
  python bench/sweep_concurrency.py                      # CPU smoke: 4 x 0.4 CPU
Writes bench/results/sweep-concurrency-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import write_result  # noqa: E402


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: (x[0], x[1]))
    running = best = 0
    for _, delta in events:
        running += delta
        best = max(best, running)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--gpu", type=float, default=0.25)
    parser.add_argument("--cpu", type=float, default=None, help="CPUs per trial (default 2 on GPU, 0.4 on CPU)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    gpu = args.device == "cuda"
    cpus = args.cpu or (2.0 if gpu else 0.4)
    scratch = Path(tempfile.mkdtemp(prefix="sslab-sweep-concurrency-"))
    backbone, subset, batch = ("resnet18", "null", 512) if gpu else ("resnet_mini", 512, 64)
    resources = f"cpus_per_worker: {cpus}\ngpus_per_worker: {args.gpu if gpu else 0}"
    spec_path = scratch / "sweep.yaml"
    spec_path.write_text(f"""
name: concurrency
base: {ROOT / 'configs' / 'pretrain' / 'swav_cifar10_multicrop.yaml'}
set: [model.backbone={backbone}, data.batch_size={batch}, data.train_subset={subset}, data.crops=2x32,
      train.epochs={args.epochs}, optim.warmup_epochs=0, method.queue_length=0, knn.every_epochs=1,
      knn.max_train=2000, knn.max_test=500, "knn.k=[20]", train.device={'cuda' if gpu else 'cpu'}]
space:
  method.temperature: {{grid: [0.05, 0.1, 0.2, 0.3]}}
search: grid
scheduler: fifo
max_concurrent_trials: 4
{resources}
""")
    from mlflow.tracking import MlflowClient

    from orchestrator.sweep import load_sweep, run_sweep
    from orchestrator.train import ClusterOptions

    uri = f"sqlite:///{scratch / 'mlflow.db'}"
    started = time.perf_counter()
    outcome = run_sweep(load_sweep(spec_path), ClusterOptions(storage=str(scratch / "ray"), tracking_uri=uri),
                        name="concurrency", log=lambda msg: print(msg, file=sys.stderr))
    wall = time.perf_counter() - started
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("sslab").experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'")
    spans = [(r.info.start_time / 1000, (r.info.end_time or r.info.start_time) / 1000) for r in children]
    result = {"trials": len(spans), "max_concurrent": max_overlap(spans), "wall_s": round(wall, 1),
              "trial_seconds": [round(e - s, 1) for s, e in spans],
              "resources_per_trial": {"cpu": cpus, **({"gpu": args.gpu} if gpu else {})},
              "date": time.strftime("%Y-%m-%d")}
    out = write_result(ROOT / "bench" / "results" / f"sweep-concurrency-{args.device}.json", result)
    print(f"{result['trials']} trials, at most {result['max_concurrent']} at the same time; sweep wall {wall:.0f} s "
          f"(trials {result['trial_seconds']} s); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
