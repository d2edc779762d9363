"""Whole-step capture (train.compile_step, issue 19 item 4): steps/s of the same training step eager, with
the backbone compiled (train.compile) and with the whole step compiled (train.compile_step), in one process
on the same pre-drawn batches (no loader in the timing).

  python bench/whole_step.py                              # CPU: supcon, resnet_mini, 2x32, batch 64
  python bench/whole_step.py --device cuda --method dino --backbone resnet18 --batch 512 \\
      --compile-mode reduce-overhead                      # GPU: CUDA graphs for the captured step
Prints one line per variant (compile seconds = the first steps, steps/s after them) and writes
bench/results/whole-step-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import write_result  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.loop import Trainer  # noqa: E402
from trainers.paths import state_dir  # noqa: E402

VARIANTS = {"eager": [], "backbone-compiled": ["train.compile=true"], "step-compiled": ["train.compile_step={mode}"]}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args, variant: str, extra: list[str]) -> dict:
    overrides = [f"method.name={args.method}", f"data.crops={args.crops}", f"data.batch_size={args.batch}",
                 f"model.backbone={args.backbone}", f"train.device={args.device}", "knn.every_epochs=0",
                 "probe.online_linear=false", "train.resume=null", "optim.warmup_epochs=0", "train.epochs=1",
                 f"train.out_dir={state_dir() / 'bench' / f'whole-step-{variant}'}", *args.set,
                 *(e.format(mode=args.compile_mode) for e in extra)]
    if args.method == "swav":
        overrides.append("method.queue_length=0")
    trainer = Trainer(load_config(None, overrides), progress=False, log=lambda *_: None)
    trainer.setup()
    trainer.method.train()
    batches = []
    for batch in trainer.loader.iterate(0):
        batches.append((batch.views, batch.labels))
        if len(batches) == args.warmup + args.steps:
            break
    started = time.perf_counter()
    for step in range(args.warmup):
        trainer.train_step(*batches[step], step)
    sync(args.device)
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for step in range(args.warmup, len(batches)):
        loss, _ = trainer.train_step(*batches[step], step)
    sync(args.device)
    rate = (len(batches) - args.warmup) / (time.perf_counter() - started)
    return {"variant": variant, "warmup_s": round(warm, 1), "steps_per_s": round(rate, 2),
            "img_per_s": round(rate * args.batch, 1), "last_loss": float(loss)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--method", default="supcon", choices=("swav", "dino", "supcon", "simclr"))
    parser.add_argument("--crops", default="2x32")
    parser.add_argument("--backbone", default=None, help="default resnet18 on GPU, resnet_mini on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 512 on GPU, 64 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 100 GPU, 10 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (compilation)")
    parser.add_argument("--compile-mode", default="default",
                        help="train.compile_step's mode: default, reduce-overhead (CUDA graphs), max-autotune")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    gpu = args.device.startswith("cuda")
    args.backbone = args.backbone or ("resnet18" if gpu else "resnet_mini")
    args.batch = args.batch or (512 if gpu else 64)
    args.steps = args.steps or (100 if gpu else 10)
    rows = []
    for variant in args.variants.split(","):
        row = measure(args, variant, VARIANTS[variant])
        rows.append(row)
        print(f"{variant:18s} first {args.warmup} steps {row['warmup_s']:7.1f} s   {row['steps_per_s']:8.2f} steps/s "
              f"({row['img_per_s']:,.0f} img/s)", flush=True)
    facts = {"device": torch.cuda.get_device_name() if gpu else "cpu", "threads": torch.get_num_threads(),
             "torch": torch.__version__, "method": args.method, "crops": args.crops, "backbone": args.backbone,
             "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "compile_mode": args.compile_mode,
             "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"whole-step-{'cuda' if gpu else 'cpu'}.json"
    write_result(out, {"facts": facts, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
