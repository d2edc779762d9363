"""Where a training step spends its time: torch.profiler over the real Trainer (the write-up in BENCHMARKS.md).

Runs a few steps of the real loop (loader + augmentation, then the method's forward, loss, backward
and optimizer step) under torch.profiler and reports
  - the share of wall time in each half (``load+augment`` = waiting for the next batch, which holds
    the decode and the batched crop/augment kernels; ``method+step`` = everything else),
  - time by operator family (convolution, matmul, normalisation, augmentation kernels, optimizer,
    EMA, communication, copies), by device time on a GPU and by self CPU time on a CPU,
  - host syncs per step (``aten::item`` / ``_local_scalar_dense``: each one stalls the CPU until
    the GPU catches up; the loop is meant to have none between its logging windows),
  - the top operators.

One command:
  python bench/profile_step.py --method dino --crops 2x32+6x16            # CPU: resnet_mini, batch 64
  python bench/profile_step.py --device cuda --method dino --crops 2x32+6x16   # GPU: resnet18, batch 512, bf16
Writes bench/results/profile-<method>-<crops>-<device>.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402

from trainers.config import load_config  # noqa: E402
from trainers.loop import Trainer  # noqa: E402

# operator name -> family; the first pattern that matches wins
FAMILIES = [
    ("communication", r"nccl|gloo|all_gather|all_reduce|broadcast|c10d"),
    ("host sync", r"_local_scalar_dense|aten::item|cudaStreamSynchronize|cudaDeviceSynchronize"),
    ("convolution", r"conv|cudnn|implicit_gemm|winograd|sm\d+_xmma_fprop|dgrad|wgrad"),
    ("matmul", r"aten::(mm|bmm|addmm|matmul|linear)|gemm|cublas|cutlass|sm\d+_xmma_gemm"),
    ("normalisation", r"batch_norm|layer_norm|native_norm|bn_fw|bn_bw|welford"),
    ("augmentation", r"roi_align|grid_sampler|affine_grid|upsample|interpolate|gaussian|conv_depthwise|flip|rgb|hsv|"
                     r"randperm|uniform_|normal_|bernoulli"),
    ("optimizer / EMA", r"foreach|_fused_sgd|adamw|lars|addcmul|lerp"),
    ("copies / casts", r"copy_|aten::to\b|_to_copy|Memcpy|contiguous|clone|cat|stack"),
]


def family(name: str) -> str:
    for label, pattern in FAMILIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "elementwise / other"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="swav", choices=("swav", "dino", "sdmp", "supcon", "simclr"))
    parser.add_argument("--crops", default="2x32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default 512 on GPU, 64 on CPU")
    parser.add_argument("--backbone", default=None, help="default resnet18 on GPU, resnet_mini on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="steps before profiling (default 20 GPU, 2 CPU)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default 20 GPU, 3 CPU)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--top", type=int, default=15, help="operators listed")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch or (512 if gpu else 64)
    backbone = args.backbone or ("resnet18" if gpu else "resnet_mini")
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    steps = args.steps or (20 if gpu else 3)
    config_name = "supcon" if args.method == "simclr" else args.method
    overrides = [f"method.name={args.method}", f"data.crops={args.crops}", f"data.batch_size={batch}",
                 f"model.backbone={backbone}", "knn.every_epochs=0", f"train.device={device.type}",
                 f"train.compile={str(args.compile).lower()}", "train.resume=null", "optim.warmup_epochs=0",
                 f"train.out_dir={ROOT / '.state' / 'bench' / 'profile'}"]
    if args.method == "swav":
        overrides.append("method.queue_length=0")
    if args.data_root:
        overrides.append(f"data.data_root={args.data_root}")
    config = load_config(bench_config(config_name), overrides)
    trainer = Trainer(config, progress=False, log=lambda msg: print(msg, file=sys.stderr))
    trainer.setup()
    trainer.method.train()

    def batches():
        epoch = 0
        while True:
            trainer.loader.set_epoch(epoch)
            yield from trainer.loader.iterate(0)
            epoch += 1

    stream = batches()

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    step = 0
    for _ in range(warmup):
        batch_data = next(stream)
        trainer.train_step(batch_data.views, batch_data.labels, step % trainer.total_steps)
        step += 1
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sections = defaultdict(float)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            t0 = time.perf_counter()
            with record_function("sslab.load+augment"):
                batch_data = next(stream)
                sync()  # charge the augmentation kernels to this half
            t1 = time.perf_counter()
            with record_function("sslab.method+step"):
                trainer.train_step(batch_data.views, batch_data.labels, step % trainer.total_steps)
                sync()
            t2 = time.perf_counter()
            sections["load+augment"] += t1 - t0
            sections["method+step"] += t2 - t1
            step += 1
    wall = time.perf_counter() - started
    events = [e for e in prof.key_averages() if not e.key.startswith("sslab.")]

    def device_time(e) -> float:  # microseconds
        if gpu:
            return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        return float(e.self_cpu_time_total)

    by_family = defaultdict(float)
    for e in events:
        by_family[family(e.key)] += device_time(e)
    total = sum(by_family.values()) or 1.0
    syncs = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")  # item(), bool(), float()
    top = sorted(events, key=device_time, reverse=True)[: args.top]
    images = batch * steps
    result = {
        "facts": {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "method": args.method, "crops": args.crops, "batch": batch,
                  "backbone": backbone, "compiled": args.compile, "steps": steps, "warmup": warmup,
                  "date": time.strftime("%Y-%m-%d")},
        "img_per_s_profiled": images / wall,
        "wall_share": {k: v / wall for k, v in sections.items()},
        "time_by_family": {k: v / total for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])},
        "host_syncs_per_step": syncs / steps,
        "top_ops": [{"op": e.key, "family": family(e.key), "ms_per_step": device_time(e) / 1000 / steps,
                     "calls_per_step": e.count / steps} for e in top],
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / \
        f"profile-{args.method}-{args.crops}-{device.type}{'-compiled' if args.compile else ''}.json"
    write_result(out, result)
    clock = "device time" if gpu else "self CPU time"
    print(f"\n{result['facts']['device']}, {args.method} {args.crops}, {backbone}, batch {batch}: "
          f"{result['img_per_s_profiled']:,.0f} img/s under the profiler, "
          f"{result['host_syncs_per_step']:.1f} host syncs per step\n")
    print(markdown_table(("half of the step", "share of wall time"),
                         [(k, f"{v:.1%}") for k, v in result["wall_share"].items()]))
    print("\n" + markdown_table(("operator family", f"share of {clock}"),
                                [(k, f"{v:.1%}") for k, v in result["time_by_family"].items()]))
    print("\n" + markdown_table(("operator", "family", "ms/step", "calls/step"), [
        (f"`{row['op']}`", row["family"], f"{row['ms_per_step']:.2f}", f"{row['calls_per_step']:.0f}")
        for row in result["top_ops"]]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
