"""Pretraining throughput against the compute ceiling, per method and crop set (performance target 1, BENCHMARKS.md).

For each (method, crops) case, measured in the same process on the same device:
  ceiling  the backbone's forward + backward + optimizer step on random tensors of exactly the inputs
           the method trains on (globals and locals as separate groups; for SDMP the mixed image is one
           more global-size batch), plus the EMA teacher's forward on the global-size inputs for DINO
           and SDMP; no loader, no augmentation, no head, no loss.
  ours     the real ``Trainer``: FFCV loader + GPU augmentation + method (heads, loss, EMA, queue) +
           optimizer step, steady state (the first logging window, which holds warm-up and
           compilation, is dropped; the median of the others is reported).
  lightly  (--lightly) lightly 1.6.0's SwAV / DINO on the same backbone, crops, batch and head sizes with
           its PIL transforms in a torchvision DataLoader (bench/lightly_baseline.py), for target 2.
Both run eager, or both under torch.compile (--compile: the backbones, and for ours also the
augmentation's pixel operations, data.compile_augment).

One command:
  python bench/throughput.py                     # CPU: resnet_mini, batch 64, a few steps (smoke)
  python bench/throughput.py --device cuda       # GPU: resnet18 CIFAR stem, batch 512, bf16, channels_last
  python bench/throughput.py --memory-format contiguous   # NCHW instead (channels_last is the default on both)
  python bench/throughput.py --lightly           # + lightly in the same run (pip install lightly==1.6.0)
Writes bench/results/throughput-<device>[-compiled].json (rewritten after every case, so a run stopped
early keeps the cases it finished: facts.cases_done of facts.cases_planned) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))

from trainers.backbones import build_backbone  # noqa: E402
from trainers.config import load_config  # noqa: E402
from trainers.data.augment import parse_crop_spec  # noqa: E402
from trainers.paths import state_dir  # noqa: E402

CASES = [("swav", "2x32"), ("dino", "2x32"), ("sdmp", "2x32"), ("supcon", "2x32"),
         ("swav", "2x32+4x16"), ("dino", "2x32+6x16")]
TEACHER_METHODS = {"dino", "sdmp"}
# Inputs a method forwards besides its crops: SDMP also trains on its mixed image, one more
# global-size batch through the student and the teacher, so its ceiling includes that batch.
EXTRA_GLOBAL_INPUTS = {"sdmp": 1}


def ceiling_inputs(method: str, crops: str) -> str:
    """The crop spec the backbone really sees for ``method`` (e.g. SDMP 2x32 -> 3x32)."""
    groups = parse_crop_spec(crops)
    groups[0] = (groups[0][0] + EXTRA_GLOBAL_INPUTS.get(method, 0), groups[0][1])
    return "+".join(f"{count}x{size}" for count, size in groups)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ceiling(backbone_name: str, crops: str, batch: int, device: torch.device, steps: int, warmup: int,
            teacher: bool, compile_model: bool, dtype, channels_last: bool = True) -> float:
    """Images/s (a sample = all its crops) of backbone forward+backward+SGD step (+ teacher forward)."""
    groups = parse_crop_spec(crops)
    model, _ = build_backbone(backbone_name, groups[0][1])
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).requires_grad_(False) if teacher else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    forward = torch.compile(model) if compile_model else model
    teacher_forward = (torch.compile(ema) if compile_model else ema) if ema is not None else None
    inputs = []
    for count, size in groups:
        x = torch.randn(count * batch, 3, size, size, device=device)
        inputs.append(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            if teacher_forward is not None:
                with torch.no_grad():
                    teacher_forward(inputs[0])
            loss = sum(forward(x).float().mean() for x in inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - started)


def ours(method: str, crops: str, batch: int, device: torch.device, backbone: str, window: int, windows: int,
         compile_model: bool, data_root: str | None, channels_last: bool = True,
         extra: list[str] | None = None) -> tuple[float, list[float]]:
    from trainers.loop import Trainer

    overrides = [f"data.crops={crops}", f"data.batch_size={batch}", f"model.backbone={backbone}",
                 f"train.max_steps={window * windows}", f"train.log_every={window}", "knn.every_epochs=0",
                 f"train.device={device.type}", f"train.compile={str(compile_model).lower()}",
                 f"data.compile_augment={str(compile_model).lower()}", "train.resume=null",
                 f"train.channels_last={str(channels_last).lower()}",
                 f"train.out_dir={state_dir() / 'bench' / f'{method}-{crops}'}", "optim.warmup_epochs=0"]
    if method == "swav":
        overrides.append("method.queue_length=0")
    if data_root:
        overrides.append(f"data.data_root={data_root}")
    config = load_config(bench_config(method), overrides + list(extra or []))
    trainer = Trainer(config, progress=False, log=lambda *_: None)
    result = trainer.fit()
    rates = [row["img_per_s"] for row in result.history if "img_per_s" in row]
    steady = rates[1:] or rates
    return statistics.median(steady), rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the ceiling's and our backbone, and our augmentation's pixel ops")
    parser.add_argument("--cases", default=None, help="comma-separated method:crops, e.g. swav:2x32,dino:2x32+6x16")
    parser.add_argument("--batch", type=int, default=None, help="default 512 on GPU, 64 on CPU")
    parser.add_argument("--backbone", default=None, help="default resnet18 on GPU, resnet_mini on CPU")
    parser.add_argument("--window", type=int, default=None, help="steps per timing window (default 50 GPU, 3 CPU)")
    parser.add_argument("--windows", type=int, default=None, help="windows for ours; the first is dropped (default 4)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--memory-format", default="channels_last", choices=("channels_last", "contiguous"),
                        help="weights and inputs of the ceiling and ours (train.channels_last; default: %(default)s)")
    parser.add_argument("--lightly", action="store_true",
                        help="also measure lightly 1.6.0 on the SwAV/DINO cases (needs pip install lightly==1.6.0)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader workers for lightly (default: every core)")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/throughput-<device>.json)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for ours (e.g. knn.max_test=64: a smaller final evaluation)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for --compile (default: torch's, inductor); 'eager' only "
                             "traces the graphs (a CPU smoke of the compiled path, no kernels generated)")
    args = parser.parse_args()
    if args.compile_backend:
        default_compile = torch.compile

        def compile_with_backend(*a, **kw):  # nn.Module.compile and the augmentation call torch.compile
            kw.setdefault("backend", args.compile_backend)
            return default_compile(*a, **kw)

        torch.compile = compile_with_backend
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (512 if gpu else 64)
    backbone = args.backbone or ("resnet18" if gpu else "resnet_mini")
    window = args.window or (50 if gpu else 3)
    windows = args.windows or 4
    dtype = torch.bfloat16 if gpu else None
    cases = [tuple(c.split(":")) for c in args.cases.split(",")] if args.cases else CASES
    baseline = None
    if args.lightly:
        try:
            import lightly  # noqa: F401

            import lightly_baseline as baseline
        except ImportError:
            print("--lightly needs lightly: pip install lightly==1.6.0 (a benchmark baseline, not a project "
                  "dependency)", file=sys.stderr)
            return 2
    loader_workers = args.loader_workers if args.loader_workers is not None else (os.cpu_count() or 1)
    rows = []
    channels_last = args.memory_format == "channels_last"
    facts = {"device": torch.cuda.get_device_name(device) if gpu else platform.processor() or "cpu",
             "cpus": torch.get_num_threads(), "torch": torch.__version__, "batch": batch, "backbone": backbone,
             "precision": "bf16" if gpu else "fp32", "compiled": args.compile, "window": window, "windows": windows,
             "memory_format": args.memory_format,
             "date": time.strftime("%Y-%m-%d"), "cases_planned": len(cases), "cases_done": 0}
    if args.compile_backend:
        facts["compile_backend"] = args.compile_backend
    if args.set:
        facts["overrides"] = list(args.set)
    if baseline is not None:
        facts.update(lightly=lightly.__version__, lightly_loader_workers=loader_workers)
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"throughput-{device.type}{'-compiled' if args.compile else ''}.json"
    for method, crops in cases:
        top = ceiling(backbone, ceiling_inputs(method, crops), batch, device, steps=window * 2,
                      warmup=max(3, window // 5), teacher=method in TEACHER_METHODS, compile_model=args.compile,
                      dtype=dtype, channels_last=channels_last)
        mine, rates = ours(method, crops, batch, device, backbone, window, windows, args.compile, args.data_root,
                           channels_last=channels_last, extra=args.set)
        row = {"method": method, "crops": crops, "ceiling_inputs": ceiling_inputs(method, crops),
               "ceiling_img_s": round(top, 1), "ours_img_s": round(mine, 1),
               "ratio": round(mine / top, 3), "ours_windows": [round(r, 1) for r in rates]}
        line = f"{method:7s} {crops:10s} ceiling {top:10,.0f} img/s  ours {mine:10,.0f} img/s  {mine / top:6.1%}"
        if baseline is not None and method in ("swav", "dino"):
            theirs, their_rates = baseline.measure(method, crops, batch, device, backbone, loader_workers, window,
                                                   windows, args.data_root)
            row.update(lightly_img_s=round(theirs, 1), ours_vs_lightly=round(mine / theirs, 2),
                       lightly_windows=[round(r, 1) for r in their_rates])
            line += f"  lightly {theirs:10,.0f} img/s  ours {mine / theirs:5.1f}x"
        rows.append(row)
        facts["cases_done"] = len(rows)
        write_result(out, {"facts": facts, "rows": rows})  # each case as soon as it is measured
        print(line, flush=True)
    print(f"\n{facts['device']}, {backbone}, batch {batch}, {facts['precision']}, "
          f"{'compiled' if args.compile else 'eager'}\n")
    print(markdown_table(
        ("method", "crops", "ceiling img/s", "ours img/s", "ours / ceiling", "lightly img/s", "ours / lightly"),
        [(r["method"], r["crops"], f"{r['ceiling_img_s']:,.0f}", f"{r['ours_img_s']:,.0f}", f"{r['ratio']:.1%}",
          *((f"{r['lightly_img_s']:,.0f}", f"{r['ours_vs_lightly']:.1f}x") if "lightly_img_s" in r else ("-", "-")))
         for r in rows]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
