"""Time to accuracy (performance target 3, BENCHMARKS.md): wall clock from the first training step until the online kNN
top-1 (k=200, T=0.1, cosine: lightly's protocol, full CIFAR-10 train bank and test split) passes a
target, online kNN time included. Prints and saves the whole curve.

  python bench/time_to_accuracy.py --method swav --device cuda                  # target 0.842, 8 min
  python bench/time_to_accuracy.py --method dino --target 0.813 --device cuda
  python bench/time_to_accuracy.py --device cpu --budget-s 300 --set model.backbone=resnet_mini   # smoke
Set the recipe with --config / --set (defaults: bench/recipes.py's variant of <method> with kNN every
--knn-every epochs). Writes bench/results/tta-<method>-<device>.json (or --out), rewritten after every kNN
point, so a run stopped early keeps its curve.

--deadline-at UNIX_SECONDS (bench/gpu_proof.sh): a hard end for the whole process. Training stops at the
end of the first epoch after which the next one (with its kNN, timed on the slowest epoch so far) would
not finish before it, and SIGTERM stops the run and writes the result at once; facts.stopped says why.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402
from trainers.knn import knn_metric  # noqa: E402
from trainers.paths import state_dir  # noqa: E402

KNN = knn_metric(200, 0.1)  # online kNN as lightly reports it: k=200, T=0.1

from trainers.config import load_config  # noqa: E402

LIGHTLY_200_EPOCHS = {"swav": 0.842, "dino": 0.813}  # lightly's published CIFAR-10 kNN, batch 512


class Done(Exception):
    pass


class Terminated(BaseException):
    """SIGTERM (a timeout around the run): not an Exception, so no handler inside the trainer keeps it."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav")
    parser.add_argument("--config", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--target", type=float, default=None, help="kNN top-1 to reach (default: lightly's figure)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="stop after this many seconds of training")
    parser.add_argument("--knn-every", type=int, default=2, help="epochs between online kNN evaluations")
    parser.add_argument("--deadline-at", type=float, default=None, metavar="UNIX_SECONDS",
                        help="stop at the last epoch end that leaves the next epoch no time before this moment")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/tta-<method>-<device>.json)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _terminate)
    target = args.target or LIGHTLY_200_EPOCHS.get(args.method, 0.8)
    config_path = args.config or bench_config(args.method)
    overrides = [f"train.device={args.device}", "knn.k=[200]", "knn.temperature=0.1", "knn.max_train=null",
                 "knn.max_test=null", f"knn.every_epochs={args.knn_every}", "train.resume=null",
                 f"train.out_dir={state_dir() / 'bench' / f'tta-{args.method}'}", *args.set]
    config = load_config(config_path, overrides)

    from trainers.loop import Trainer, TrainerEvents

    curve: list[dict] = []
    clock: dict = {"epoch_s": 0.0}
    stopped = {"why": "max epochs"}

    class Curve(TrainerEvents):
        def on_epoch_end(self, step: int, completed: int, metrics: dict, path, final: bool) -> None:
            on_epoch_end(completed, metrics)

    def on_epoch_end(completed: int, metrics: dict) -> None:
        now = time.perf_counter()
        elapsed = now - clock["start"]
        clock["epoch_s"] = max(clock["epoch_s"], now - clock.get("last", clock["start"]))
        clock["last"] = now
        if KNN in metrics:  # the curve keeps its field name of earlier result files
            curve.append({"epoch": completed, "seconds": round(elapsed, 1), "knn_top1_k200": metrics[KNN]})
            print(f"epoch {completed:4d}  {elapsed:7.1f} s  kNN top-1 (k=200, T=0.1) {metrics[KNN]:.2%}", flush=True)
            save("running")
            if metrics[KNN] >= target:
                stopped["why"] = "target reached"
                raise Done()
        if elapsed > args.budget_s:
            stopped["why"] = "budget"
            raise Done()
        if args.deadline_at is not None and time.time() + clock["epoch_s"] > args.deadline_at:
            stopped["why"] = "deadline (the next epoch would not fit)"
            raise Done()

    out_path = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"tta-{args.method}-{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    setup = {"s": None}

    def save(state: str) -> Path:
        reached = next((p for p in curve if p["knn_top1_k200"] >= target), None)
        facts = {"method": args.method,
                 "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "config": str(config_path), "overrides": overrides, "target": target, "budget_s": args.budget_s,
                 "setup_s": setup["s"], "reached_at_s": reached["seconds"] if reached else None,
                 "best": max((p["knn_top1_k200"] for p in curve), default=None), "state": state,
                 "stopped": stopped["why"], "deadline_at": args.deadline_at, "date": time.strftime("%Y-%m-%d")}
        return write_result(out_path, {"facts": facts, "curve": curve})

    trainer = Trainer(config, progress=False, log=lambda *_: None, events=Curve())
    setup_started = time.perf_counter()
    try:
        trainer.setup()
        setup["s"] = round(time.perf_counter() - setup_started, 1)
        clock["start"] = time.perf_counter()
        if args.deadline_at is not None and time.time() >= args.deadline_at:
            stopped["why"] = "deadline (passed during setup)"
        else:
            trainer.fit()
    except Done:
        pass
    except Terminated:
        stopped["why"] = "terminated (SIGTERM)"
    out = save("finished")
    reached = next((p for p in curve if p["knn_top1_k200"] >= target), None)
    best = max((p["knn_top1_k200"] for p in curve), default=0.0)
    verdict = f"reached {target:.1%} at {reached['seconds']:.0f} s" if reached else \
        f"did not reach {target:.1%} within {args.budget_s:.0f} s (best {best:.1%}; stopped: {stopped['why']})"
    print(f"\n{args.method}: {verdict}; setup {setup['s'] or 0:.0f} s not counted; wrote {out}")
    return 0


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop; the result is written on the way out
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
