"""Kernels launched per training step and per augmentation call, ours against the backbone alone.

On a GPU at CIFAR sizes a step is partly launch-bound: the host spends ~5-10 us launching each kernel,
and many of the method's kernels (loss, heads, EMA, optimizer, augmentation) finish faster than that.
The count does not depend on the device, so this runs anywhere (a CPU run counts what a GPU would
launch) and shows what stands between a method and its compute ceiling besides the backbone:

  ceiling   the backbone's forward + backward + SGD step on the method's crops (+ the teacher's
            forward for DINO / SDMP): what throughput.py's ceiling runs
  step      one real ``Trainer.train_step`` (heads, loss, Sinkhorn / EMA / queue, clipping, optimizer)
  augment   one ``MultiCropAugment`` call making every view of the batch
  syncs     host syncs per step (``.item()`` and friends); the loop's only one is a CPU-only
            finiteness check, so a GPU step has none

  python bench/kernels.py                      # every performance-target case, resnet18, batch 16 (counts do not depend on it)
Writes bench/results/kernels.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))

from throughput import CASES, TEACHER_METHODS, ceiling_inputs  # noqa: E402
from trainers.backbones import build_backbone  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data.augment import parse_crop_spec  # noqa: E402
from trainers.kernel_count import HOST_SYNC, count_kernels  # noqa: E402


def ceiling_kernels(backbone_name: str, crops: str, batch: int, teacher: bool) -> int:
    groups = parse_crop_spec(crops)
    model, _ = build_backbone(backbone_name, groups[0][1])
    ema = copy.deepcopy(model).requires_grad_(False) if teacher else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True)
    inputs = [torch.randn(count * batch, 3, size, size) for count, size in groups]

    def step():
        if ema is not None:
            with torch.no_grad():
                ema(inputs[0])
        with torch.enable_grad():
            loss = sum(model(x).float().mean() for x in inputs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        optimizer.step()

    for _ in range(2):  # optimizer state exists from the second step on
        step()
    return count_kernels(step)[0]


def trainer_kernels(method: str, crops: str, batch: int, backbone: str, data_root: str | None) -> dict:
    from trainers.loop import Trainer

    overrides = [f"data.crops={crops}", f"data.batch_size={batch}", f"model.backbone={backbone}", "train.max_steps=4",
                 "knn.every_epochs=0", "train.device=cpu", "train.resume=null", "optim.warmup_epochs=0",
                 f"train.out_dir={ROOT / '.state' / 'bench' / f'kernels-{method}-{crops}'}", "data.train_subset=512"]
    if method == "swav":
        overrides.append("method.queue_length=0")
    if data_root:
        overrides.append(f"data.data_root={data_root}")
    config = load_config(bench_config(method), overrides)
    trainer = Trainer(config, progress=False, log=lambda *_: None)
    trainer.setup()
    trainer.method.train()
    canvases, labels = next(iter(trainer.loader.canvases))
    views = trainer.loader.augment(canvases)
    for step in range(2):
        trainer.train_step(views, labels, step)
    step_count, operators = count_kernels(lambda: trainer.train_step(views, labels, 2))
    augment_count, _ = count_kernels(trainer.loader.augment, canvases)
    syncs = operators.get(HOST_SYNC, 0)
    return {"step": step_count, "augment": augment_count, "syncs": syncs,
            "top": dict(operators.most_common(8))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help="comma-separated method:crops (default: the cases of the performance targets, BENCHMARKS.md)")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch", type=int, default=16, help="the counts do not depend on it")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernels.json"))
    args = parser.parse_args()
    cases = [tuple(c.split(":")) for c in args.cases.split(",")] if args.cases else CASES
    rows = []
    for method, crops in cases:
        top = ceiling_kernels(args.backbone, ceiling_inputs(method, crops), args.batch, method in TEACHER_METHODS)
        ours = trainer_kernels(method, crops, args.batch, args.backbone, args.data_root)
        rows.append({"method": method, "crops": crops, "ceiling": top, **ours,
                     "added_by_method": ours["step"] - top})
        print(f"{method:7s} {crops:10s} ceiling {top:5d}  step {ours['step']:5d}  augment {ours['augment']:4d}  "
              f"syncs {ours['syncs']}", flush=True)
    facts = {"backbone": args.backbone, "batch": args.batch, "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d"), "note": "dispatcher-level counts: the same on CPU and GPU"}
    out = write_result(args.out, {"facts": facts, "rows": rows})
    print(f"\n{args.backbone}, kernels per call (dispatcher-level ATen operators that launch work)\n")
    print(markdown_table(("method", "crops", "ceiling step", "our step", "added by the method", "augmentation",
                          "host syncs"),
                         [(r["method"], r["crops"], r["ceiling"], r["step"], r["added_by_method"], r["augment"],
                           r["syncs"]) for r in rows]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
