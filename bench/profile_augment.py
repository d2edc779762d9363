"""Where the GPU augmentation spends its time: torch.profiler over MultiCropAugment alone.

python bench/profile_augment.py --crops 2x224+6x96 --method dino --batch-size 128 --canvas 256
Prints img/s of the augmentation alone, the kernels it launches per call (the cost at small crops,
where the GPU runs each kernel faster than the host launches the next) and the top operators by
device (or CPU) time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainers.data.augment import MultiCropAugment, method_crop_groups  # noqa: E402
from trainers.kernel_count import count_kernels  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--crops", default="2x32+4x16")
    parser.add_argument("--method", default="swav")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--canvas", type=int, default=32)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="the pixel ops through torch.compile (compile_ops)")
    args = parser.parse_args()
    device = torch.device(args.device)
    augment = MultiCropAugment(method_crop_groups(args.method, args.crops), seed=0,
                               dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                               channels_last=device.type == "cuda", compile_ops=args.compile).to(device)
    images = torch.randint(0, 256, (args.batch_size, args.canvas, args.canvas, 3), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        augment(images)
    sync()
    started = time.perf_counter()
    for _ in range(args.iters):
        augment(images)
    sync()
    rate = args.iters * args.batch_size / (time.perf_counter() - started)
    print(f"{args.crops} batch {args.batch_size} canvas {args.canvas}: {rate:,.0f} img/s (augmentation alone)")
    if args.compile:  # a dispatch mode cannot watch compiled code: count the same module run eagerly
        eager = MultiCropAugment(augment.groups, augment.mean.view(3).tolist(), augment.std.view(3).tolist(), seed=0,
                                 dtype=augment.dtype, channels_last=augment.channels_last).to(device)
        eager(images)  # per-group constants are built on the first call
        kernels, operators = count_kernels(eager, images)
        print("(kernel count below is of the eager module; compiled, each pixel op is one fused kernel)")
    else:
        kernels, operators = count_kernels(augment, images)
    sync()
    started = time.perf_counter()
    for _ in range(5):
        augment(images)
    host_ms = (time.perf_counter() - started) / 5 * 1e3  # no sync: on a GPU this is the launch cost alone
    print(f"{kernels} kernels per call ({len(augment.groups)} crop groups); host time per call {host_ms:.2f} ms")
    print("  " + ", ".join(f"{name} {count}" for name, count in operators.most_common()))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        for _ in range(5):
            augment(images)
        sync()
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    print(profile.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=40))
    return 0


if __name__ == "__main__":
    sys.exit(main())
