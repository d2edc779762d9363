"""Ray overhead (performance target 5, BENCHMARKS.md): the same pretraining, plain process vs one Ray Train worker.

Both run the real ``Trainer`` on the same config for the same number of steps; the figure is the
steady-state throughput (median of the logging windows after the first, which holds start-up),
so Ray's worker start-up time is reported separately and not mixed into img/s.

One command:
  python bench/ray_overhead.py                   # CPU: resnet_mini, batch 64, SwAV 2x32
  python bench/ray_overhead.py --device cuda     # GPU: resnet18, batch 512, 1 GPU worker
Writes bench/results/ray-overhead-<device>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402

from trainers.config import load_config  # noqa: E402


def steady(history: list[dict]) -> float:
    rates = [row["img_per_s"] for row in history if "img_per_s" in row]
    return statistics.median(rates[1:] or rates)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", default="swav")
    parser.add_argument("--crops", default="2x32")
    parser.add_argument("--batch", type=int, default=None, help="default 512 on GPU, 64 on CPU")
    parser.add_argument("--window", type=int, default=None, help="steps per logging window (50 GPU, 3 CPU)")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--cpus", type=float, default=None, help="CPUs for the Ray worker (default: all)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    gpu = args.device.startswith("cuda")
    batch = args.batch or (512 if gpu else 64)
    window = args.window or (50 if gpu else 3)
    backbone = "resnet18" if gpu else "resnet_mini"
    scratch = Path(tempfile.mkdtemp(prefix="sslab-ray-overhead-"))
    overrides = [f"data.crops={args.crops}", f"data.batch_size={batch}", f"model.backbone={backbone}",
                 f"train.max_steps={window * args.windows}", f"train.log_every={window}", "knn.every_epochs=0",
                 f"train.device={'cuda' if gpu else 'cpu'}", "train.resume=null", "optim.warmup_epochs=0"]
    if args.method == "swav":
        overrides.append("method.queue_length=0")
    config_path = bench_config(args.method)

    from trainers.loop import Trainer

    plain_config = load_config(config_path, overrides + [f"train.out_dir={scratch / 'plain'}"])
    started = time.perf_counter()
    plain = Trainer(plain_config, progress=False, log=lambda *_: None).fit()
    plain_wall = time.perf_counter() - started

    from orchestrator.train import ClusterOptions, init_ray, run_pretraining

    init_ray(None, log=lambda *_: None)
    ray_config = load_config(config_path, overrides)
    options = ClusterOptions(workers=1, gpus_per_worker=1.0 if gpu else 0.0,
                             cpus_per_worker=args.cpus or float(os.cpu_count() or 1), storage=str(scratch / "ray"),
                             tracking_uri=f"sqlite:///{scratch / 'mlflow.db'}", max_failures=0)
    started = time.perf_counter()
    outcome = run_pretraining(ray_config, options, name="overhead", log=lambda *_: None)
    ray_wall = time.perf_counter() - started
    rows = {"plain_img_s": round(steady(plain.history), 1), "ray_img_s": round(steady(outcome.history), 1),
            "plain_wall_s": round(plain_wall, 1), "ray_wall_s": round(ray_wall, 1)}
    rows["ray_over_plain"] = round(rows["ray_img_s"] / rows["plain_img_s"], 4)
    facts = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "cpus": os.cpu_count(),
             "method": args.method, "crops": args.crops, "batch": batch, "backbone": backbone,
             "steps": window * args.windows, "window": window, "date": time.strftime("%Y-%m-%d")}
    out = write_result(ROOT / "bench" / "results" / f"ray-overhead-{'cuda' if gpu else 'cpu'}.json",
                       {"facts": facts, "result": rows})
    print(markdown_table(("path", "steady img/s", "wall s (incl. start-up)"), [
        ("plain process", f"{rows['plain_img_s']:,.0f}", rows["plain_wall_s"]),
        ("Ray Train, 1 worker", f"{rows['ray_img_s']:,.0f}", rows["ray_wall_s"])]))
    print(f"\nRay / plain steady-state throughput: {rows['ray_over_plain']:.1%}   (wrote {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
