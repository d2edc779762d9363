"""Loader throughput: images/s of multi-crop batches, FFCV vs batched-JPEG vs PIL canvases, same augmentation.

Rows (each a path x case):
  ffcv     .beton decoded once per image (ffcv threads) -> uint8 canvases -> MultiCropAugment on the device
  jpeg     file bytes read in DataLoader workers, JPEGs decoded in batches by torchvision.io.decode_jpeg (nvjpeg
           in the main process on a GPU, libjpeg in the workers on a CPU) -> the same canvases -> the same
           MultiCropAugment (the path without ffcv)
  torch    PIL decode in DataLoader worker processes -> the same canvases -> the same MultiCropAugment
  classic  the usual recipe: torchvision PIL transforms per view in DataLoader workers (float views on the CPU,
           then copied to the device). The baseline most SSL repos use; not our code path.
  decode   the ffcv loader alone: uint8 canvases on the device, no views (the decoder's ceiling)
  decode-jpeg, decode-torch   the same for the jpeg and the torch loader
  crop     the ffcv loader + the random-resized crops and flips only (no colour, blur or solarization)
  ceiling  no data at all: the backbone's forward + backward + SGD step on random tensors of the case's crops
           (--ceiling-backbone: ResNet-18 for CIFAR-10 and ResNet-50 for 2x224+6x96 on a GPU, bf16,
           channels_last; resnet_mini on a CPU), the rate the loader has to keep up with
Cases: CIFAR-10 2x32 and 2x32+4x16 (raw 32 px), Tiny-ImageNet upsampled to 256 px JPEG files 2x224+6x96.

One command:  python bench/loader.py            (CPU: small sizes; GPU: batch 512 and more batches)
Writes bench/results/loader-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import dataclasses

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402
sys.path.insert(0, str(ROOT / "bench"))

from trainers.data.augment import MultiCropAugment, method_crop_groups, normalization_for  # noqa: E402
from trainers.data.beton import FfcvCanvasLoader, PrepareSettings, prepare_split  # noqa: E402
from trainers.data.datasets import load_split  # noqa: E402
from trainers.data.jpeg_loader import JpegCanvasLoader  # noqa: E402
from trainers.data.torch_loader import TorchCanvasLoader  # noqa: E402
from trainers.paths import default_data_root, state_dir  # noqa: E402

CASES = {
    "cifar10-2x32": dict(dataset="cifar10", crops="2x32", method="swav"),
    "cifar10-2x32+4x16": dict(dataset="cifar10", crops="2x32+4x16", method="swav"),
    "tin256-2x224+6x96": dict(dataset="tin256", crops="2x224+6x96", method="dino"),
}
PATHS = ("ffcv", "jpeg", "torch", "classic", "decode", "decode-jpeg", "decode-torch", "crop", "ceiling")


def crops_only(groups):
    """The same crop groups with every colour, blur and solarize probability at 0 (crops and flips stay)."""
    return [dataclasses.replace(g, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0) for g in groups]


def upsampled_tiny_imagenet(cache: Path, data_root, count: int) -> str:
    """An ImageNet-like image folder: Tiny-ImageNet train images upsampled to 256 px, JPEG q90 files."""
    folder = cache / f"tin256-{count}"
    done = folder / ".complete"
    if not done.exists():
        from trainers.data.beton import square_resize
        from PIL import Image

        source = load_split("tiny-imagenet", "train", data_root)
        step = max(1, len(source) // count)
        for index in range(0, len(source), step)[:count]:
            target = folder / "train" / source.classes[source.labels[index]] / f"{index}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(square_resize(source.images[index], 256)).save(target, quality=90)
        done.touch()
    return f"imagefolder:{folder}"


class ClassicMultiCrop(torch.utils.data.Dataset):
    """Per-view torchvision transforms on PIL images (the common SSL-repo data path)."""

    def __init__(self, split, groups, mean, std):
        import torchvision.transforms as T

        self.split = split
        self.transforms = []
        for group in groups:
            for view in range(group.count):
                steps = [T.RandomResizedCrop(group.size, scale=group.scale, ratio=group.ratio),
                         T.RandomHorizontalFlip(group.flip_p),
                         T.RandomApply([T.ColorJitter(*group.jitter)], p=group.per_view("jitter_p")[view]),
                         T.RandomGrayscale(group.per_view("grayscale_p")[view])]
                blur_p = group.per_view("blur_p")[view]
                if blur_p > 0:
                    kernel = 2 * max(1, round(0.05 * group.size)) + 1
                    steps.append(T.RandomApply([T.GaussianBlur(kernel, group.blur_sigma)], p=blur_p))
                solarize_p = group.per_view("solarize_p")[view]
                if solarize_p > 0:
                    steps.append(T.RandomSolarize(128, p=solarize_p))
                steps += [T.ToTensor(), T.Normalize(mean, std)]
                self.transforms.append(T.Compose(steps))

    def __len__(self):
        return len(self.split)

    def __getitem__(self, index):
        from PIL import Image

        image = Image.fromarray(self.split.images[index])
        return [t(image) for t in self.transforms], int(self.split.labels[index])


def measure(batches, step, warmup: int, timed: int, batch_size: int, device) -> tuple[float, int]:
    iterator = iter(batches)
    for _ in range(warmup):
        step(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(timed):
        step(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return timed * batch_size / seconds, timed * batch_size


def endless(loader):
    for epoch in itertools.count():
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        yield from loader


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if gpu else "cpu")
    parser.add_argument("--batch-size", type=int, default=512 if gpu else 256, help="CIFAR-10 batch size")
    parser.add_argument("--tin-batch-size", type=int, default=128 if gpu else 32, help="2x224+6x96 batch size")
    parser.add_argument("--batches", type=int, default=40 if gpu else 6, help="timed batches per row")
    parser.add_argument("--warmup", type=int, default=5 if gpu else 2, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="loader threads / worker processes")
    parser.add_argument("--tin-images", type=int, default=20_000 if gpu else 2_000,
                        help="Tiny-ImageNet images to upsample for the ImageNet-like case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, from {', '.join(PATHS)}")
    parser.add_argument("--ceiling-backbone", default=None,
                        help="backbone of the ceiling row (default: resnet18 / resnet50 at 224 px on a GPU, "
                             "resnet_mini on a CPU)")
    parser.add_argument("--data-root", default=str(default_data_root()) if default_data_root() else None)
    parser.add_argument("--cache-dir", default=str(state_dir() / "bench"))
    parser.add_argument("--out", default=None, help="JSON results (default bench/results/loader-<device>.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for case_name in args.cases.split(","):
        case = CASES[case_name]
        dataset = case["dataset"]
        batch_size = args.tin_batch_size if dataset == "tin256" else args.batch_size
        if dataset == "tin256":
            dataset = upsampled_tiny_imagenet(cache, args.data_root, args.tin_images)
        groups = method_crop_groups(case["method"], case["crops"])
        mean, std = normalization_for(case["dataset"])
        augment = MultiCropAugment(groups, mean, std, seed=0, dtype=torch.bfloat16 if gpu else torch.float32,
                                   channels_last=gpu).to(device)
        canvas = 256 if case["dataset"] == "tin256" else None

        def augment_step(batch, augment=augment):
            images, labels = batch
            views = augment(images)
            return views

        for path in args.paths.split(","):
            if path == "ceiling":
                from throughput import ceiling

                backbone = args.ceiling_backbone or (("resnet50" if canvas else "resnet18") if gpu else "resnet_mini")
                rate = ceiling(backbone, case["crops"], batch_size, device, steps=args.batches, warmup=args.warmup,
                               teacher=False, compile_model=False, dtype=torch.bfloat16 if gpu else None)
                rows.append(dict(case=case_name, path=path, crops=case["crops"], batch_size=batch_size,
                                 images=args.batches * batch_size, img_per_s=round(rate, 1), backbone=backbone))
                print(f"{case_name:<20} {path:<8} {rate:>10,.0f} img/s  ({backbone} forward+backward+step)", flush=True)
                continue
            if path in ("ffcv", "decode", "crop"):
                beton = prepare_split(dataset, "train", cache, args.data_root, PrepareSettings(), progress=False,
                                      log=lambda *_: None)
                loader = FfcvCanvasLoader(beton, batch_size, device, canvas_size=canvas, seed=0,
                                          num_workers=args.workers)
                if path == "ffcv":
                    step = augment_step
                elif path == "decode":
                    def step(batch):
                        return batch[0]
                else:
                    crop = MultiCropAugment(crops_only(groups), mean, std, seed=0, dtype=augment.dtype,
                                            channels_last=gpu).to(device)

                    def step(batch, crop=crop):
                        return crop(batch[0])
            elif path in ("jpeg", "torch", "decode-jpeg", "decode-torch"):
                kind = JpegCanvasLoader if path.endswith("jpeg") else TorchCanvasLoader
                loader = kind(load_split(dataset, "train", args.data_root), batch_size, device,
                              canvas_size=canvas, seed=0, num_workers=args.workers)
                if path.startswith("decode"):
                    def step(batch):
                        return batch[0]
                else:
                    step = augment_step
            elif path == "classic":
                data = ClassicMultiCrop(load_split(dataset, "train", args.data_root), groups, mean, std)
                loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, drop_last=True,
                                                     num_workers=args.workers, pin_memory=gpu,
                                                     persistent_workers=True, prefetch_factor=4)

                def step(batch):
                    views, _ = batch
                    return [v.to(device, non_blocking=True) for v in views]
            else:
                raise SystemExit(f"unknown path {path}: use {', '.join(PATHS)}")
            # decoding alone is so fast that the 3 batches ffcv prefetches during warm-up would dominate a
            # short window: time at least 50 batches there
            timed = max(args.batches, 50) if path.startswith("decode") else args.batches
            rate, images = measure(endless(loader), step, args.warmup, timed, batch_size, device)
            row = dict(case=case_name, path=path, crops=case["crops"], batch_size=batch_size, images=images,
                       img_per_s=round(rate, 1))
            print(f"{case_name:<20} {path:<12} {rate:>10,.0f} img/s", flush=True)
            rows.append(row)
            del loader

    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                device_type=device.type, cpu_count=os.cpu_count(), workers=args.workers, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"), command="python bench/loader.py " + " ".join(argv or sys.argv[1:]))
    out = write_result(args.out or ROOT / "bench" / "results" / f"loader-{device.type}.json", dict(meta=meta, rows=rows))
    print(f"\n{meta['device']}, {meta['cpu_count']} cores, torch {meta['torch']}, {meta['date']}\n")
    print(markdown_table(("case", "path", "batch", "img/s"), [
        (row["case"], f"{row['path']} ({row['backbone']})" if "backbone" in row else row["path"], row["batch_size"],
         f"{row['img_per_s']:,.0f}") for row in rows]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
