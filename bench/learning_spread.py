"""Seed-to-seed spread of tests/test_learning.py: its exact settings, several seeds, one table.

tests/test_learning.py asserts, per method, that a short CPU pretraining raises kNN top-1 over the
same network at random initialisation by a margin. A margin means something only when it is many
times the spread of the gain across seeds (another CPU's float rounding is, in effect, another
seed). This script measures that spread with the test's own settings and prints, per method, the
gains, their mean and standard deviation, and how many standard deviations separate the asserted
margin from 0 and from the mean gain.

  python bench/learning_spread.py                       # every method, seeds 0,1,2 (~35 min on 2 cores)
  python bench/learning_spread.py --methods swav --seeds 0,1,2,3
Writes bench/results/learning-spread-cpu.json. Re-measure after changing the test's settings and
copy the table into the test's docstring.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import write_result  # noqa: E402

from trainers.config import load_config  # noqa: E402
from trainers.loop import Trainer  # noqa: E402


def test_settings():
    spec = importlib.util.spec_from_file_location("test_learning", ROOT / "tests" / "test_learning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_once(settings, method: str, seed: int) -> dict:
    started = time.time()
    with tempfile.TemporaryDirectory() as out:
        config = load_config(None, settings.overrides(method, seed, out))
        trainer = Trainer(config, progress=False, log=lambda *_: None)
        trainer.setup()
        before = trainer.knn()[settings.METRIC]
        result = trainer.fit()
    after = result.metrics[settings.METRIC]
    return {"method": method, "seed": seed, "before": before, "after": after, "gain": after - before,
            "seconds": round(time.time() - started, 1)}


def summary(rows: list[dict], margins: dict) -> str:
    lines = ["| method | seeds | random init | after | gain mean ± sd | min gain | margin | margin / sd | "
             "(mean − margin) / sd |", "|---|---|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        gains = [100 * r["gain"] for r in mine]
        mean = statistics.fmean(gains)
        sd = statistics.stdev(gains) if len(gains) > 1 else float("nan")
        margin = 100 * margins[method]
        before = " / ".join(f"{100 * r['before']:.1f}" for r in mine)
        after = " / ".join(f"{100 * r['after']:.1f}" for r in mine)
        seeds = ",".join(str(r["seed"]) for r in mine)
        lines.append(f"| {method} | {seeds} | {before} | {after} | {mean:+.2f} ± {sd:.2f} | {min(gains):+.2f} | "
                     f"{margin:.1f} | {margin / sd:.1f} | {(mean - margin) / sd:.1f} |")
    return "\n".join(lines)


def main() -> int:
    settings = test_settings()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(settings.SETTINGS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=settings.STEPS,
                        help="optimizer steps per run: try a shorter test before changing it (default: the "
                             "test's, %(default)s)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "learning-spread-cpu.json"),
                        help="JSON written after every run (default: %(default)s)")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in settings.SETTINGS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}: use some of {', '.join(settings.SETTINGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be comma-separated whole numbers, e.g. 0,1,2")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    settings.STEPS = args.steps  # overrides() reads it
    rows = []
    for method in methods:
        for seed in seeds:
            row = run_once(settings, method, seed)
            rows.append(row)
            print(f"{method} seed {seed}: {100 * row['before']:.2f}% -> {100 * row['after']:.2f}% "
                  f"({100 * row['gain']:+.2f}) in {row['seconds']:.0f} s", flush=True)
            write_result(args.out, {"metric": settings.METRIC, "steps": args.steps, "rows": rows})
    print(summary(rows, settings.MARGINS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
