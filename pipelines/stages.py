"""What each pipeline stage computes, in a plain Python process (the runner wraps them in Ray tasks).

Every stage returns a ``StageResult`` (a JSON-able typed dict: ``metrics`` {name: fraction}, ``extra``
with the keys its kind promises in ``EXTRA_KEYS``, ``files`` {name: text}), checked by ``check_result``
when the stage returns: the runner logs metrics and files to the stage's MLflow run and keeps the result
as the stage's output. Evaluations cache extracted features on the node (keyed by the backbone's
hash, the data set, the split and the input size), so kNN, linear and transfer decode each split once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, TypedDict

import torch

from trainers.errors import ConfigError, DataNotFoundError
from trainers.paths import state_dir

Log = Callable[[str], None]


class _Result(TypedDict):
    metrics: dict[str, float]  # logged to the stage's MLflow run; accuracies as fractions
    extra: dict  # free per kind; at least EXTRA_KEYS[kind]
    files: dict[str, str]  # file name -> text, written into the stage folder and logged as artifacts


class StageResult(_Result, total=False):
    """What a stage returns and its ``result.json`` holds."""

    output_hash: str  # what later stages' cache keys read (set by the runner when absent)


# the extra keys later stages read from a kind's result (the report reads the others only when present)
EXTRA_KEYS = {
    "pretrain": ("backbone_path", "dataset"),  # evaluations read the backbone file and default to its data set
    "sweep": ("best_config",),  # a pretrain stage with from_sweep trains it
}


def check_result(kind: str, result) -> StageResult:
    """``result`` if it has the shape of a ``kind`` stage's result: a stage that breaks it fails here, when it
    returns, not later in a stage or report that reads it."""
    problems = []
    if not isinstance(result, dict) or not {"metrics", "extra", "files"} <= set(result):
        problems.append("not a mapping with metrics, extra and files")
    else:
        bad = [k for k, v in result["metrics"].items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
        if bad:
            problems.append(f"metrics {bad} are not numbers")
        missing = [k for k in EXTRA_KEYS.get(kind, ()) if k not in result["extra"]]
        if missing:
            problems.append(f"extra lacks {missing}")
        if not all(isinstance(v, str) for v in result["files"].values()):
            problems.append("files must map names to text")
    if problems:
        raise TypeError(f"the {kind} stage returned a malformed result: {'; '.join(problems)}")
    return result


def log_stderr(message: str) -> None:
    """Progress lines of Ray tasks: stderr, so that a driver's stdout stays for results (--json)."""
    import sys

    print(message, file=sys.stderr, flush=True)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metric_key(dataset: str) -> str:
    """A data set name as part of a metric name (MLflow takes letters, digits, '_', '-', '.', ' ', '/')."""
    import re

    return re.sub(r"[^\w.]", "_", dataset)


def eval_device(requested: str | None = None) -> torch.device:
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- prepare
def run_prepare(settings: dict, data_root: str | None, log: Log = print) -> StageResult:
    from trainers.data.beton import read_meta
    from trainers.data.multicrop import default_cache_dir, ffcv_available

    if not ffcv_available():
        log("prepare: ffcv is not installed; the stages read the archives with the torch loader")
        return {"metrics": {}, "extra": {"files": {}, "skipped": []}, "files": {}}
    from trainers.data.beton import prepare

    files, skipped = {}, []
    for entry in settings["datasets"]:
        try:
            paths = prepare(entry["name"], "all", default_cache_dir(), data_root, progress=False, log=log)
        except DataNotFoundError as exc:
            if not entry["optional"]:
                raise
            log(f"prepare: skipping optional {entry['name']} ({str(exc)[:100]}...)")
            skipped.append(entry["name"])
            continue
        files[entry["name"]] = {split: read_meta(path)["key"] for split, path in paths.items()}
    return {"metrics": {}, "extra": {"files": files, "skipped": skipped}, "files": {}}


# --------------------------------------------------------------------------- features
def _load_backbone(path: str, device):
    from trainers.loop import load_backbone

    return load_backbone(path, device)


RESIDENT_BYTES = 2 << 30  # feature matrices up to this size are loaded whole; larger ones are read in chunks


def features(backbone_path: str, dataset: str, split: str, data_root: str | None, device, batch_size: int = 512,
             log: Log = print):
    """(features [N, D] float32, labels [N], class names) of a whole split, cached on this node as a .npy
    file written batch by batch as the split streams from its loader (``extract_split``: no split is ever
    held in memory as images). The features come back as a CPU tensor up to ``RESIDENT_BYTES``, else as a
    ``FeatureFile`` that the kNN and the linear probe read in chunks."""
    from trainers.data.augment import normalization_for
    from trainers.evaluate import BackboneSpec, extract_split
    from trainers.knn import FeatureFile

    backbone, _, info = _load_backbone(backbone_path, device)
    sha = file_sha256(backbone_path)[:16]
    stem = state_dir() / "features" / f"{sha}-{metric_key(dataset)}-{split}-{info['image_size']}"
    matrix, sidecar = Path(f"{stem}.npy"), Path(f"{stem}.labels.pt")
    if matrix.is_file() and sidecar.is_file():
        try:
            saved = torch.load(sidecar, map_location="cpu", weights_only=True)
            return _resident(FeatureFile(matrix)), saved["labels"], saved["classes"]
        except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
            sidecar.unlink(missing_ok=True)
    matrix.parent.mkdir(parents=True, exist_ok=True)
    mean, std = normalization_for(dataset)
    spec = BackboneSpec(info["image_size"], mean, std, device, batch_size)
    log(f"extracting {dataset} {split} features (streamed, at {info['image_size']} px)")
    temp = matrix.parent / f".{matrix.name}.{os.getpid()}.npy"
    try:
        _, labels, classes = extract_split(backbone, dataset, split, spec, path=temp, data_root=data_root, log=log)
        os.replace(temp, matrix)
    finally:
        temp.unlink(missing_ok=True)
    handle, temp_sidecar = tempfile.mkstemp(dir=sidecar.parent, prefix=f".{sidecar.name}.")
    os.close(handle)
    torch.save({"labels": labels, "classes": classes}, temp_sidecar)
    os.replace(temp_sidecar, sidecar)
    return _resident(FeatureFile(matrix)), labels, classes


def _resident(matrix):
    """A small feature file as a tensor in memory; a large one stays a file."""
    rows, dim = matrix.shape
    return matrix.tensor() if rows * dim * matrix.dtype.itemsize <= RESIDENT_BYTES else matrix


# --------------------------------------------------------------------------- evaluations
def feature_block(backbone_path: str, dataset: str, split: str, block: tuple[int, int], data_root, device,
                  batch_size: int = 512, log: Log = print):
    """One worker's share of a split's features: the ``block`` (i, n)-th contiguous block, streamed (not
    cached: the driver gathers the n blocks once, in order, into the whole split's features)."""
    from trainers.data.augment import normalization_for
    from trainers.evaluate import BackboneSpec, extract_split

    backbone, _, info = _load_backbone(backbone_path, device)
    mean, std = normalization_for(dataset)
    spec = BackboneSpec(info["image_size"], mean, std, device, batch_size)
    log(f"extracting {dataset} {split} features, block {block[0] + 1} of {block[1]} (at {info['image_size']} px)")
    return extract_split(backbone, dataset, split, spec, data_root=data_root, log=log, block=block)


def knn_block(backbone_path: str, dataset: str, block: tuple[int, int], data_root, device, queries: torch.Tensor,
              batch_size: int = 512, log: Log = print) -> tuple:
    """One worker's shard of the kNN bank: its ``block`` of the training features, extracted here and never
    sent anywhere; returns the top-k lists of every query (the test features) within it and its labels."""
    from trainers.evaluate import KNN_LARGEST
    from trainers.knn import knn_topk

    features, labels, _ = feature_block(backbone_path, dataset, "train", block, data_root, device, batch_size, log)
    if features is None or not len(labels):
        return torch.zeros(len(queries), 0), torch.zeros(len(queries), 0, dtype=torch.long), labels
    sims, idx = knn_topk(queries.to(device), features.to(device), KNN_LARGEST, normalize=True)
    return sims.cpu(), idx.cpu(), labels


def knn_from_shards(settings: dict, parts: list, test: tuple) -> StageResult:
    """The knn stage's result from the bank shards' top-k lists (``knn_block``, in block order) and the test
    features: as ``knn_result`` on the gathered features."""
    from trainers.evaluate import knn_suite_from_shards

    return _knn_stage_result(settings, knn_suite_from_shards(parts, test[1], len(test[2])))


def gather_blocks(blocks: list[tuple]) -> tuple:
    """The n workers' (features, labels, classes) blocks, in block order, as one split's (a block left empty,
    more workers than images, holds no features)."""
    full = [b for b in blocks if b[0] is not None]
    return (torch.cat([b[0] for b in full]), torch.cat([b[1] for b in full]), full[0][2])


FeaturesOf = Callable[[str, str, int], tuple]  # (dataset, split, batch size) -> (features, labels, classes)


def local_features(backbone_path: str, data_root, device, log: Log = print) -> FeaturesOf:
    """Features extracted (and cached) in this process: ``features``."""
    return lambda dataset, split, batch: features(backbone_path, dataset, split, data_root, device, batch, log)


def run_knn(settings: dict, backbone_path: str, data_root, device, seed: int = 0, log: Log = print,
            features_of: FeaturesOf | None = None) -> StageResult:
    features_of = features_of or local_features(backbone_path, data_root, device, log)
    dataset = settings["dataset"]
    train = features_of(dataset, "train", settings["batch_size"])
    test = features_of(dataset, "test", settings["batch_size"])
    return knn_result(settings, train, test)


def knn_result(settings: dict, train: tuple, test: tuple) -> StageResult:
    """The knn stage's result from the (features, labels, classes) of its data set's train and test splits."""
    from trainers.evaluate import knn_suite

    (train_x, train_y, classes), (test_x, test_y, _) = train, test
    return _knn_stage_result(settings, knn_suite(train_x, train_y, test_x, test_y, len(classes)))


def _knn_stage_result(settings: dict, result: dict) -> StageResult:
    dataset = settings["dataset"]
    sweep = result.pop("knn_sweep")
    return {"metrics": result, "extra": {"knn_sweep": {str(k): v for k, v in sweep.items()}, "dataset": dataset,
                                         "protocol": protocol_record("knn", resolve_settings("knn", settings))},
            "files": {}}


# --------------------------------------------------------------------------- protocols
LINEAR_KEYS = ("epochs", "lr", "weight_decay", "batch_size")  # what a stage may set over its protocol
SEMI_KEYS = ("epochs", "lr", "head_lr", "weight_decay", "batch_size", "min_steps")


def resolve_settings(kind: str, settings: dict) -> dict:
    """The stage's settings with its evaluation protocol spelled out: the protocol's name and every
    setting it fixes (schedule, crops, test view, ...), the stage's own values (None: the protocol's).
    What the runner hashes and logs as the stage's MLflow params; resolving twice changes nothing.

    ``semi``: ``lr`` / ``head_lr`` None means SwAV's per-fraction values, listed in ``lrs``
    (``{"semi1": [trunk, head], ...}``); the other settings are those of every fraction."""
    from trainers.evaluate import KNN_PROTOCOL, FinetuneSettings, LinearSettings

    out = dict(settings)
    if kind == "knn":
        out.update(KNN_PROTOCOL)
    elif kind in ("linear", "transfer"):
        protocol = out.get("protocol") or "frozen_features"  # transfer: always the fast probe
        dataset = out.get("dataset") or ""
        probe = LinearSettings.for_protocol(protocol, dataset, **{k: out.get(k) for k in LINEAR_KEYS}).validate()
        out.update(probe.record())
    elif kind == "semi":
        protocol, dataset = out.get("protocol") or "swav", out.get("dataset") or ""
        lrs, tune = {}, None
        for fraction in out["fractions"]:
            tune = FinetuneSettings.for_fraction(protocol, dataset, fraction,
                                                 **{k: out.get(k) for k in SEMI_KEYS}).validate()
            lrs[fraction_name(fraction)] = [tune.lr, tune.head_lr]
        out.update({k: v for k, v in tune.record().items() if k not in ("lr", "head_lr")})
        out["lrs"] = lrs
    return out


def protocol_record(kind: str, settings: dict) -> dict:
    """The protocol part of resolved settings, with its reference: what a stage's result JSON holds."""
    from trainers.evaluate import KNN_PROTOCOL, FinetuneSettings, LinearSettings, protocol_reference

    fields = {"knn": list(KNN_PROTOCOL), "linear": list(LinearSettings.__dataclass_fields__),
              "transfer": list(LinearSettings.__dataclass_fields__),
              "semi": list(FinetuneSettings.__dataclass_fields__) + ["lrs"]}[kind]
    record = {k: settings[k] for k in fields if k in settings and k != "seed"}
    record["reference"] = protocol_reference(settings["protocol"], settings.get("dataset") or "")
    if kind == "semi":
        record["label_subset"] = "stratified: class-proportional, fixed seed (stratified_subset), indices saved"
    return record


def _linear_settings(settings: dict, seed: int):
    from trainers.evaluate import LinearSettings

    names = set(LinearSettings.__dataclass_fields__) - {"seed"}
    values = {k: settings[k] for k in names}
    values["decay_at"] = tuple(values["decay_at"])
    values["crop_scale"] = tuple(values["crop_scale"]) if values["crop_scale"] is not None else None
    return LinearSettings(**values, seed=seed)


def _probe(settings: dict, features_of: FeaturesOf, dataset: str, device, prefix: str, seed: int):
    from trainers.evaluate import linear_probe

    batch = settings.get("feature_batch_size", 512)
    train_x, train_y, classes = features_of(dataset, "train", batch)
    test_x, test_y, _ = features_of(dataset, "test", batch)
    probe = _linear_settings(settings, seed)
    result = linear_probe(train_x, train_y, test_x, test_y, len(classes), probe, prefix=prefix, device=device)
    return result, classes


def image_source(dataset: str, split: str, data_root, log: Log):
    """A split streamed from its loader (``LoaderImages``): what the augmented probe and fine-tuning read. Its
    loader workers: as many as this process's torch threads (a Ray task's or worker's CPUs: Ray sets
    OMP_NUM_THREADS to them), not one per core of the node."""
    from trainers.finetune import LoaderImages

    return LoaderImages(dataset, split, data_root=data_root, num_workers=max(1, torch.get_num_threads()), log=log)


def _augmented_probe(settings: dict, backbone_path: str, dataset: str, data_root, device, prefix: str, seed: int,
                     log: Log):
    from trainers.data.augment import normalization_for
    from trainers.evaluate import BackboneSpec
    from trainers.finetune import augmented_linear_probe, data_parallel

    train, test = image_source(dataset, "train", data_root, log), image_source(dataset, "test", data_root, log)
    backbone, dim, info = _load_backbone(backbone_path, device)
    mean, std = normalization_for(dataset)
    spec = BackboneSpec(info["image_size"], mean, std, device, settings.get("feature_batch_size", 512))
    probe = _linear_settings(settings, seed)
    workers = data_parallel()[1]
    log(f"linear: augmented probe, {probe.epochs} epochs over {len(train.labels):,} {dataset} images (streamed"
        f"{f', {workers} workers' if workers > 1 else ''})")
    result = augmented_linear_probe(backbone, dim, train, test, spec, probe, prefix=prefix)
    return result, train.classes


def run_linear(settings: dict, backbone_path: str, data_root, device, seed: int = 0, log: Log = print,
               features_of: FeaturesOf | None = None) -> StageResult:
    settings = resolve_settings("linear", settings)
    if settings["protocol"] == "augmented":
        result, classes = _augmented_probe(settings, backbone_path, settings["dataset"], data_root, device, "linear",
                                           seed, log)
    else:
        features_of = features_of or local_features(backbone_path, data_root, device, log)
        result, classes = _probe(settings, features_of, settings["dataset"], device, "linear", seed)
    per_class = result.pop("per_class")
    return {"metrics": result, "extra": {"per_class": dict(zip(classes, per_class)), "dataset": settings["dataset"],
                                         "protocol": protocol_record("linear", settings)},
            "files": {}}


def run_transfer(settings: dict, backbone_path: str, data_root, device, seed: int = 0, log: Log = print,
                 features_of: FeaturesOf | None = None) -> StageResult:
    settings = resolve_settings("transfer", settings)
    features_of = features_of or local_features(backbone_path, data_root, device, log)
    metrics, per_dataset, skipped = {}, {}, []
    for entry in settings["datasets"]:
        name = entry["name"]
        try:
            result, _ = _probe(settings, features_of, name, device, f"transfer_{metric_key(name)}", seed)
        except DataNotFoundError as exc:
            if not entry["optional"]:
                raise
            log(f"transfer: skipping optional {name} ({str(exc)[:100]}...)")
            skipped.append(name)
            continue
        result.pop("per_class")
        metrics.update(result)
        per_dataset[name] = result[f"transfer_{metric_key(name)}_top1"]
    if not per_dataset:
        raise ConfigError("transfer: none of the listed data sets is on this machine: pass data_root or list one "
                          "that is (digits always is)")
    return {"metrics": metrics, "extra": {"top1": per_dataset, "skipped": skipped,
                                          "protocol": protocol_record("transfer", settings)}, "files": {}}


def fraction_name(fraction: float) -> str:
    return f"semi{fraction * 100:g}".replace(".", "p")


def run_semi(settings: dict, backbone_path: str, data_root, device, seed: int = 0, log: Log = print) -> StageResult:
    from trainers.data.augment import normalization_for
    from trainers.evaluate import BackboneSpec, FinetuneSettings, stratified_subset
    from trainers.finetune import data_parallel, finetune

    settings = resolve_settings("semi", settings)
    dataset = settings["dataset"]
    train, test = image_source(dataset, "train", data_root, log), image_source(dataset, "test", data_root, log)
    workers = data_parallel()[1]
    mean, std = normalization_for(dataset)
    metrics, files, extra = {}, {}, {}
    for fraction in settings["fractions"]:
        name = fraction_name(fraction)
        indices = stratified_subset(train.labels.numpy(), fraction, seed)
        backbone, dim, info = _load_backbone(backbone_path, device)  # each fraction starts from the pretrained weights
        spec = BackboneSpec(info["image_size"], mean, std, device, 512)
        trunk, head = settings["lrs"][name]
        tune = FinetuneSettings.for_fraction(settings["protocol"], dataset, fraction, lr=trunk, head_lr=head,
                                             **{k: settings[k] for k in SEMI_KEYS if k not in ("lr", "head_lr")},
                                             seed=seed)
        log(f"semi: fine-tuning on {len(indices):,} labels ({fraction:.0%}) of {dataset}, trunk lr {trunk:g}, "
            f"head lr {head:g}{f', {workers} workers' if workers > 1 else ''}")
        result = finetune(backbone, dim, train, indices, test, spec, tune, prefix=name)
        result.pop("per_class")
        plan = result.pop("plan")
        metrics.update(result)
        files[f"{name}_indices.txt"] = "\n".join(map(str, indices.tolist())) + "\n"
        extra[name] = {"labels": len(indices), "fraction": fraction, "lr": trunk, "head_lr": head, **plan}
    return {"metrics": metrics, "extra": {"subsets": extra, "dataset": dataset,
                                          "protocol": protocol_record("semi", settings)}, "files": files}


EVALUATIONS = {"knn": run_knn, "linear": run_linear, "semi": run_semi, "transfer": run_transfer}


def run_evaluation(kind: str, settings: dict, backbone_path: str, data_root=None, device=None, seed: int = 0,
                   log: Log = print, features_of: FeaturesOf | None = None) -> StageResult:
    """One evaluation stage on a backbone file; ``device`` None: CUDA when there is one. ``features_of``: where
    the frozen features come from (knn, the frozen-feature probe, transfer; None: extracted here). Under a
    torch.distributed process group, fine-tuning and the augmented probe run data-parallel over it."""
    device = eval_device(device)
    if features_of is not None and kind != "semi":
        return EVALUATIONS[kind](settings, backbone_path, data_root, device, seed=seed, log=log,
                                 features_of=features_of)
    return EVALUATIONS[kind](settings, backbone_path, data_root, device, seed=seed, log=log)


def trains_on_images(kind: str, settings: dict) -> bool:
    """Whether a stage trains on images (fine-tuning, the augmented probe: data-parallel workers) rather than
    on frozen features (knn, the frozen-feature probe, transfer: extraction sharded over workers)."""
    return kind == "semi" or (kind == "linear" and resolve_settings("linear", settings)["protocol"] == "augmented")


def result_digest(result: dict) -> str:
    return hashlib.sha256(json.dumps({k: result.get(k) for k in ("metrics", "extra")}, sort_keys=True,
                                     default=str).encode()).hexdigest()
