"""Evaluation cost as the data set grows (issue 19): time and peak memory of feature extraction, kNN and the
frozen-feature linear probe at growing sizes, each size in a fresh subprocess (so each peak is its own).

Rows (stage x size):
  extract     streamed: CIFAR-10 train images (a fixed subset of N) from the jpeg loader, batch by batch
              through a random resnet_mini (32 px) into a .npy FeatureFile (trainers/evaluate.py extract_split)
  extract-today   the path before issue 19: the whole subset decoded into memory (load_images), then extracted
  knn         a synthetic bank of N x D rows, generated chunk by chunk (bank_chunk rows, float16), scored by
              1,024 queries at k=200 (trainers/knn.py knn_topk + vote_hits, the knn stage's one pass)
  linear      the frozen_features probe, one epoch over N x 512 synthetic features in a .npy FeatureFile
              (statistics in chunks, mini-batches of 256 read from the file)
  beton       writing the .beton of N CIFAR-10 train images (a fixed subset; raw pixels, the writer's
              processes: trainers/data/beton.py, as `sslab data prepare`)
  finetune    one epoch of semi-supervised fine-tuning (resnet_mini, batch 256, random-resized crops on the
              device) on N CIFAR-10 train images streamed from the jpeg loader (trainers/finetune.py), the
              augmented probe's path too; scored on a fixed 100-image test set
Memory: peak resident set of the measuring process over the measured phase only (Linux: VmHWM after
resetting it through /proc/self/clear_refs; the imports and the setup are not counted), loader workers'
peak separately (``workers_mb``), and torch.cuda.max_memory_allocated on a GPU.

One command:  python bench/scale.py        (CPU defaults finish in about 10 minutes on 2 cores)
Writes bench/results/scale-<device>.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import markdown_table, write_result  # noqa: E402

DEFAULT_SIZES = {"extract": [1000, 3000, 6000], "extract-today": [1000, 6000],
                 "knn": [10_000, 100_000, 1_280_000], "knn-2048": [10_000, 100_000],
                 "linear": [10_000, 100_000, 400_000], "beton": [2000, 10_000, 50_000],
                 "finetune": [1000, 3000, 6000]}  # CPU: about 15 minutes on 2 (busy) cores


# --------------------------------------------------------------------------- memory
START = {}


def reset_peak() -> None:
    """Start a new peak-RSS window (Linux >= 4.0: writing 5 to clear_refs resets VmHWM)."""
    START["rss"] = rss_mb()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def rss_mb() -> float:
    """The resident set now (VmRSS), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    """The process's peak resident set since ``reset_peak`` (VmHWM), else since it started (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------- one measurement
class SyntheticBank:
    """An N x D bank generated chunk by chunk: one random base block, shifted by a per-chunk vector (no two
    chunks alike, so top-k merges see no artificial ties); never held whole."""

    def __init__(self, rows: int, dim: int, block: int, dtype):
        import torch

        self.count, self.dim, self.dtype = rows, dim, dtype
        self.base = torch.randn(block, dim, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return self.count

    def rows(self, start: int, stop: int):
        import torch

        shift = torch.randn(self.dim, generator=torch.Generator().manual_seed(start)) * 0.1
        return (self.base[:stop - start] + shift).to(self.dtype)


def measure_knn(size: int, dim: int, device, bank_chunk: int = 65536, queries: int = 1024) -> dict:
    import torch

    from trainers.knn import knn_topk, vote_hits

    bank = SyntheticBank(size, dim, bank_chunk, torch.float16)
    query = torch.nn.functional.normalize(torch.randn(queries, dim, generator=torch.Generator().manual_seed(1)), dim=1)
    bank_labels = torch.randint(0, 1000, (size,), generator=torch.Generator().manual_seed(2))
    query_labels = torch.randint(0, 1000, (queries,), generator=torch.Generator().manual_seed(3))
    sync(device)
    reset_peak()
    start = time.perf_counter()
    sims, idx = knn_topk(query.to(device), bank, 200, bank_chunk=bank_chunk, device=device)
    hits = vote_hits(sims, idx, bank_labels, query_labels, [(20, 0.07), (200, 0.1)], 1000)
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "queries": queries, "dim": dim, "bank_chunk": bank_chunk, "bank_dtype": "float16",
            "query_bank_pairs_per_s": queries * size / seconds, "hits": str(hits)}


def measure_extract(size: int, device, today: bool, image_size: int = 32, batch: int = 256) -> dict:
    import torch

    from trainers.backbones import build_backbone
    from trainers.data.augment import normalization_for
    from trainers.evaluate import BackboneSpec, extract, extract_split, load_images

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet_mini", image_size)
    backbone = backbone.to(device)
    mean, std = normalization_for("cifar10")
    spec = BackboneSpec(image_size, mean, std, torch.device(device), batch)
    with tempfile.TemporaryDirectory() as folder:
        sync(device)
        reset_peak()
        start = time.perf_counter()
        if today:
            images = load_images("cifar10", "train", loader="jpeg", subset=size)
            features = extract(backbone, images, spec)
            rows = len(features)
        else:
            features, labels, _ = extract_split(backbone, "cifar10", "train", spec, path=Path(folder) / "f.npy",
                                                loader="jpeg", subset=size)
            rows = len(labels)
        sync(device)
        seconds = time.perf_counter() - start
    assert rows == size, (rows, size)
    return {"seconds": seconds, "images_per_s": size / seconds, "dim": dim, "image_size": image_size,
            "batch": batch, "loader": "jpeg"}


def measure_linear(size: int, device, dim: int = 512, chunk: int = 65536) -> dict:
    import torch

    from trainers.evaluate import LinearSettings, linear_probe
    from trainers.knn import FeatureFile

    with tempfile.TemporaryDirectory() as folder:
        files = []
        for name, rows in (("train", size), ("test", 10_000)):
            matrix = FeatureFile.create(Path(folder) / f"{name}.npy", rows, dim)
            for start in range(0, rows, chunk):
                n = min(chunk, rows - start)
                matrix.write(start, torch.randn(n, dim, generator=torch.Generator().manual_seed(start)))
            files.append(matrix)
        train_y = torch.randint(0, 1000, (size,), generator=torch.Generator().manual_seed(1))
        test_y = torch.randint(0, 1000, (10_000,), generator=torch.Generator().manual_seed(2))
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # its first use imports torch._dynamo
        sync(device)
        reset_peak()
        start = time.perf_counter()
        linear_probe(files[0], train_y, files[1], test_y, 1000, LinearSettings(epochs=1), device=device, chunk=chunk)
        sync(device)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "epochs": 1, "dim": dim, "classes": 1000, "batch": 256, "chunk": chunk,
            "rows_per_s": size / seconds}


class _Subset:
    """The images ``index`` of an image source, as an image source (what the .beton writer reads)."""

    def __init__(self, images, index):
        self.images, self.index = images, index
        self.fixed_size = getattr(images, "fixed_size", None)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        return self.images[int(self.index[i])]

    def size_of(self, i: int):
        return self.images.size_of(int(self.index[i]))


def measure_beton(size: int, device) -> dict:
    from dataclasses import replace

    from trainers.data.beton import PrepareSettings, _prepare_locked
    from trainers.data.datasets import load_split
    from trainers.data.multicrop import subset_indices

    split = load_split("cifar10", "train")
    index = subset_indices(len(split), size, 0)
    index = range(len(split)) if index is None else index
    source = replace(split, images=_Subset(split.images, index), labels=split.labels[list(index)],
                     fingerprint=f"{split.fingerprint}-subset{size}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.beton"
        reset_peak()
        start = time.perf_counter()
        _prepare_locked(source, "cifar10", "train", path, PrepareSettings(), None, True, False, lambda *_: None)
        seconds = time.perf_counter() - start
        size_mb = path.stat().st_size / 2**20
    return {"seconds": seconds, "images_per_s": size / seconds, "file_mb": round(size_mb, 1), "mode": "raw"}


def measure_finetune(size: int, device, batch: int = 256) -> dict:
    import torch

    from trainers.backbones import build_backbone
    from trainers.data.augment import normalization_for
    from trainers.data.multicrop import subset_indices
    from trainers.evaluate import BackboneSpec, FinetuneSettings, load_images
    from trainers.finetune import LoaderImages, MemoryImages, finetune

    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet_mini", 32)
    mean, std = normalization_for("cifar10")
    spec = BackboneSpec(32, mean, std, torch.device(device), 512)
    train = LoaderImages("cifar10", "train", loader="jpeg", log=lambda *_: None)
    test = MemoryImages(load_images("cifar10", "test", loader="jpeg", subset=100))
    settings = FinetuneSettings(epochs=1, batch_size=batch, min_steps=0)
    sync(device)
    reset_peak()
    start = time.perf_counter()
    finetune(backbone, dim, train, subset_indices(len(train.labels), size, 0), test, spec, settings)
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": size / seconds, "batch": batch, "loader": "jpeg", "epochs": 1}


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def measure(stage: str, size: int, device: str) -> dict:
    import torch

    if stage == "knn":
        row = measure_knn(size, 128, device)
    elif stage == "knn-2048":
        row = measure_knn(size, 2048, device, queries=256 if device == "cpu" else 1024)
    elif stage in ("extract", "extract-today"):
        row = measure_extract(size, device, today=stage == "extract-today")
    elif stage == "beton":
        row = measure_beton(size, device)
    elif stage == "finetune":
        row = measure_finetune(size, device)
    else:
        row = measure_linear(size, device)
    row.update(stage=stage, size=size, start_rss_mb=round(START["rss"], 1), peak_rss_mb=round(peak_mb(), 1))
    if stage.startswith("extract") or stage in ("beton", "finetune"):
        row["workers_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    if str(device).startswith("cuda"):
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


# --------------------------------------------------------------------------- driver
def run_one(stage: str, size: int, device: str, timeout: float) -> dict:
    command = [sys.executable, __file__, "--one", stage, str(size), "--device", device]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"stage": stage, "size": size, "error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        return {"stage": stage, "size": size, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "-"

    return markdown_table(
        ["stage", "size", "seconds", "rate", "RSS at start MB", "peak RSS MB", "peak - start MB", "workers MB",
         "CUDA peak MB"],
        [[r["stage"], f"{r['size']:,}", cell(r, "seconds", "{:.1f}"),
          (f"{r['images_per_s']:.0f} img/s" if "images_per_s" in r else
           f"{r['query_bank_pairs_per_s'] / 1e6:.0f} M pairs/s" if "query_bank_pairs_per_s" in r else
           f"{r['rows_per_s'] / 1e3:.0f} k rows/s per epoch" if "rows_per_s" in r else r.get("error", "-")),
          cell(r, "start_rss_mb", "{:.0f}"), cell(r, "peak_rss_mb", "{:.0f}"),
          f"{r['peak_rss_mb'] - r['start_rss_mb']:.0f}" if "peak_rss_mb" in r else "-",
          cell(r, "workers_mb", "{:.0f}"), cell(r, "cuda_peak_mb", "{:.0f}")]
         for r in rows])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="knn,knn-2048,linear,extract,extract-today,beton,finetune")
    parser.add_argument("--sizes", default=None, help="stage=n1/n2/...;... (default: DEFAULT_SIZES)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", nargs=2, metavar=("STAGE", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), device)))
        return 0
    sizes = dict(DEFAULT_SIZES)
    for item in filter(None, (args.sizes or "").split(";")):
        stage, values = item.split("=")
        sizes[stage] = [int(v) for v in values.split("/")]
    rows = []
    for stage in args.stages.split(","):
        for size in sizes[stage]:
            rows.append(run_one(stage, size, device, args.timeout))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    kind = "cuda" if device.startswith("cuda") else "cpu"
    payload = {"benchmark": "scale", "device": torch.cuda.get_device_name() if kind == "cuda" else platform.processor()
               or "cpu", "cpus": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "command": "python bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "rows": rows}
    path = write_result(args.out or ROOT / "bench" / "results" / f"scale-{kind}.json", payload)
    print(table(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
