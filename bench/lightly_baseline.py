"""lightly 1.6.0's SwAV and DINO on the same backbone, crops and batch: the baseline of performance
target 2 (BENCHMARKS.md).

What a lightly user runs: lightly's transforms (PIL, per view) in a torchvision DataLoader with worker
processes, lightly's heads and losses, and a plain PyTorch step (bf16 autocast and channels_last on
CUDA, as ours). The backbone is ours (``build_backbone``, the same ResNet-18 CIFAR stem) so only the
data path and the method code differ. Images are CIFAR-10 from the data root, handed over as PIL
images. Reported: steady-state images/s (median of the windows after the first).

Needs lightly: ``pip install lightly==1.6.0`` (pure Python; not a project dependency).
  python bench/lightly_baseline.py                    # CPU: resnet_mini, batch 64, 2 workers
  python bench/lightly_baseline.py --device cuda --workers 16
Writes bench/results/lightly-<device>.json and prints a table; compare with bench/throughput.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
from bench.recipes import bench_config  # noqa: E402

from trainers.backbones import build_backbone  # noqa: E402
from trainers.data.augment import parse_crop_spec  # noqa: E402
from trainers.data.datasets import load_split  # noqa: E402

CASES = [("swav", "2x32"), ("swav", "2x32+4x16"), ("dino", "2x32"), ("dino", "2x32+6x16")]


class PILImages(torch.utils.data.Dataset):
    def __init__(self, split, transform):
        self.split, self.transform = split, transform

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        from PIL import Image

        return self.transform(Image.fromarray(self.split.images[index])), int(self.split.labels[index])


def build(method: str, crops: str, backbone_name: str, device, spec: dict | None = None):
    """lightly's transform, heads and loss for ``method``, sized like our recipe (``spec``: our config's
    ``method`` section, default bench/recipes.py's config for <method>) so only the code differs."""
    from lightly.loss import DINOLoss, SwaVLoss
    from lightly.models.modules import DINOProjectionHead, SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms import DINOTransform, SwaVTransform

    spec = spec if spec is not None else recipe(method)
    groups = parse_crop_spec(crops)
    backbone, dim = build_backbone(backbone_name, groups[0][1])
    if method == "swav":
        sizes = tuple(s for _, s in groups) if len(groups) > 1 else (groups[0][1], groups[0][1] // 2)
        counts = tuple(c for c, _ in groups) if len(groups) > 1 else (groups[0][0], 0)
        transform = SwaVTransform(crop_sizes=sizes, crop_counts=counts, crop_min_scales=(0.14, 0.05),
                                  crop_max_scales=(1.0, 0.14))
        head = SwaVProjectionHead(dim, spec["hidden_dim"] or dim, spec["out_dim"])
        prototypes = SwaVPrototypes(spec["out_dim"], spec["prototypes"])
        model = torch.nn.ModuleDict({"backbone": backbone, "head": head, "prototypes": prototypes}).to(device)
        loss_fn = SwaVLoss(temperature=spec["temperature"], sinkhorn_iterations=spec["sinkhorn_iterations"],
                           sinkhorn_epsilon=spec["epsilon"])
        n_global = groups[0][0]

        def step_loss(views, _step):
            outputs = []
            for view in views:
                z = torch.nn.functional.normalize(model["head"](model["backbone"](view)), dim=1)
                outputs.append(model["prototypes"](z))
            return loss_fn(outputs[:n_global], outputs[n_global:])

        return model, transform, step_loss, None
    local = groups[1] if len(groups) > 1 else (0, groups[0][1] // 2)
    transform = DINOTransform(global_crop_size=groups[0][1], local_crop_size=local[1], n_local_views=local[0])

    def head():
        return DINOProjectionHead(dim, spec["hidden_dim"], spec["bottleneck_dim"], spec["out_dim"],
                                  batch_norm=spec["head_batch_norm"])

    student = torch.nn.ModuleDict({"backbone": backbone, "head": head()}).to(device)
    # the head's weight_norm cannot be deep-copied: a fresh head with the student's weights
    teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": head()}).to(device)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(output_dim=spec["out_dim"], warmup_teacher_temp_epochs=0,
                       teacher_temp=spec["warmup_teacher_temperature"], student_temp=spec["student_temperature"],
                       center_momentum=spec["center_momentum"]).to(device)

    def step_loss(views, _step):
        with torch.no_grad():
            teacher_out = [teacher["head"](teacher["backbone"](v)) for v in views[:2]]
        student_out = [student["head"](student["backbone"](v)) for v in views]
        return loss_fn(teacher_out, student_out, epoch=0)

    def after_step():
        from lightly.models.utils import update_momentum

        update_momentum(student, teacher, m=spec["teacher_momentum"])

    return student, transform, step_loss, after_step


def recipe(method: str) -> dict:
    """Our recipe's resolved ``method`` section (heads, temperatures) for bench/recipes.py's config of ``method``."""
    from trainers.config import load_config

    return load_config(bench_config(method)).to_dict()["method"]


def measure(method, crops, batch, device, backbone_name, workers, window, windows, data_root):
    model, transform, step_loss, after_step = build(method, crops, backbone_name, device)
    split = load_split("cifar10", "train", data_root)
    loader = torch.utils.data.DataLoader(PILImages(split, transform), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    gpu = device.type == "cuda"
    if gpu:
        model = model.to(memory_format=torch.channels_last)
    rates, seen, started, step = [], 0, time.perf_counter(), 0
    for views, _ in loader:
        views = [v.to(device, non_blocking=True) for v in views]
        if gpu:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            loss = step_loss(views, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        seen += batch
        step += 1
        if step % window == 0:
            loss.item()  # one sync per window, as our loop
            now = time.perf_counter()
            rates.append(seen / (now - started))
            seen, started = 0, now
            if len(rates) == windows:
                break
    return statistics.median(rates[1:] or rates), rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 16 GPU, 2 CPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--cases", default=None, help="e.g. swav:2x32,dino:2x32+6x16")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    try:
        import lightly
    except ImportError:
        print("lightly is not installed: pip install lightly==1.6.0 (a benchmark baseline, not a project dependency)",
              file=sys.stderr)
        return 2
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch, window = args.batch or (512 if gpu else 64), args.window or (20 if gpu else 3)
    workers = args.workers if args.workers is not None else (16 if gpu else 2)
    backbone = "resnet18" if gpu else "resnet_mini"
    cases = [tuple(c.split(":")) for c in args.cases.split(",")] if args.cases else CASES
    rows = []
    for method, crops in cases:
        rate, rates = measure(method, crops, batch, device, backbone, workers, window, args.windows, args.data_root)
        rows.append({"method": method, "crops": crops, "lightly_img_s": round(rate, 1),
                     "windows": [round(r, 1) for r in rates]})
        print(f"lightly {lightly.__version__} {method:5s} {crops:10s} {rate:10,.0f} img/s", flush=True)
    facts = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "lightly": lightly.__version__,
             "batch": batch, "backbone": backbone, "workers": workers, "date": time.strftime("%Y-%m-%d")}
    out = write_result(ROOT / "bench" / "results" / f"lightly-{device.type}.json", {"facts": facts, "rows": rows})
    print("\n" + markdown_table(("method", "crops", "lightly img/s"),
                                [(r["method"], r["crops"], f"{r['lightly_img_s']:,.0f}") for r in rows]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
