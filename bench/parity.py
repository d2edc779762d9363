"""Learning parity on the CPU: ours against lightly 1.6.0 on the same backbone, data, batch, optimizer,
schedule, steps and seeds, scored by one shared kNN evaluator (the parity table in BENCHMARKS.md).

Per method (SwAV, DINO, SimCLR) and seed, three backbones are scored by the same function:
  random init  the seeded resnet_mini both sides start from (trainers.backbones.build_backbone)
  ours         trainers.loop.Trainer with a config: our on-device augmentation (data.global_augment sets the
               recipe), heads, losses, EMA and schedules
  lightly      lightly's transforms (PIL, per image, in a torchvision DataLoader), heads (lightly.models.modules)
               and losses (lightly.loss) in a plain PyTorch step, written as lightly's examples write it
Shared and checked before any training (the settings table, read back from both sides' objects; a mismatch
stops the script): the backbone and its initial weights, the heads' initial weights (lightly's copied
from ours for the seed, --lightly-heads ours, and checked to compute the same function), the training subset (subset_indices from the seed),
the batch, the augmentation recipe per view (lightly's CIFAR-10 settings: RRC, flip, colour jitter
0.4/0.4/0.4/0.1 p 0.8, grayscale 0.2, no blur at 32 px; DINO solarizes its second view, p 0.2), the head
layer sizes, temperatures, prototypes, EMA, SGD with momentum, weight decay and the learning-rate array
(linear warm-up, then cosine; checked equal to the Trainer's). Differences that stay, as each library
does it: crops cut on the device (roi_align) vs PIL's RandomResizedCrop, jitter order drawn per batch vs
per image, SwaVPrototypes with a bias vs ours without (facebookresearch/swav and solo-learn have none),
Sinkhorn in the log domain vs the plain one (equal to 1e-7). Which views share a forward call (so a
BatchNorm batch) is ours to choose: --forward-views each runs backbone and head once per view as lightly's
loop does (by_size, our default, puts both views in one backbone call and the head over both: BatchNorm
over 2B in both). --lightly-data ours trains lightly's side on our loader's views instead of its PIL
transforms (lightly's step, our data: separates the method code from the data pipeline) and
--lightly-prototype-bias off takes SwaVPrototypes' bias out (then one SwAV step equals ours to ~1e-6).
--jitter-order image draws our colour-jitter order per image, as torchvision does (our default: per batch).

Evaluator: weighted kNN (trainers.knn; k=20, T=0.07, cosine) over frozen features of a fixed bank of
training images and fixed test images, both drawn with EVAL_SEED whatever the run's seed, at 32 px with
CIFAR-10 normalization (what both sides train with). DINO is scored on its teacher on both sides.

lightly is a bench-only tool, NOT a project dependency:  pip install lightly==1.6.0
  python bench/parity.py                       # swav,dino,simclr x seeds 0,1,2, 312 steps (4 epochs of 10k)
  python bench/parity.py --methods simclr --seeds 0 --steps 5 --subset 512 --test-images 200    # smoke
  python bench/parity.py --check-settings      # the settings tables only (no data, no training)
Writes bench/results/parity-cpu.json and prints a markdown table to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.output import write_result  # noqa: E402

from bench.lightly_baseline import PILImages  # noqa: E402
from trainers.backbones import build_backbone  # noqa: E402
from trainers.config import SECTIONS, Config, from_dict  # noqa: E402
from trainers.data.augment import method_crop_groups, normalization_for  # noqa: E402
from trainers.data.multicrop import subset_indices  # noqa: E402
from trainers.knn import extract_features, knn_accuracy, knn_metric  # noqa: E402
from trainers.methods import method_class  # noqa: E402
from trainers.methods.base import MethodContext  # noqa: E402
from trainers.optim import cosine_schedule  # noqa: E402

METHODS = ("swav", "dino", "simclr")
DATASET, BACKBONE, CROP_SIZE = "cifar10", "resnet_mini", 32
CROPS = f"2x{CROP_SIZE}"  # two global views, no local crops (lightly's CIFAR-10 benchmark)
EVAL_SEED = 2024  # draws the kNN bank and test images: the same for every run and seed
LIGHTLY_VERSION = "1.6.0"

# The recipe both sides train with. Provenance of lightly's CIFAR-10 values: lightly-ai/lightly
# docs/source/getting_started/benchmarks/cifar10_benchmark.py @ 0351a522d08b80d0d2a0e4e1ae75cf8b832239f6
# (SGD lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4; SwaV 2 crops of 32 px, min scale 0.14, 512
# prototypes, head 512-512-128; DINO no local views, head hidden 2048 / bottleneck 256 / out 2048 with BN,
# EMA 0.99; blur off at 32 px) and lightly 1.6.0's transforms (jitter p 0.8, gray 0.2, flip 0.5; SimCLR min
# scale 0.08; DINO global scale (0.4, 1), solarize 0.2 on view 2). Jitter 0.4/0.4/0.4/0.1 is lightly's
# 0.8/0.8/0.8/0.2 at cj_strength 0.5 (DINOTransform's default; SimCLR/SwaVTransform default to 1.0 in 1.6.0).
COLOUR = dict(ratio=(3 / 4, 4 / 3), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2,
              blur_p=0.0)
AUGMENT = {
    "swav": dict(scale=(0.14, 1.0), solarize_p=0.0, **COLOUR),
    "dino": dict(scale=(0.4, 1.0), solarize_p=(0.0, 0.2), **COLOUR),
    "simclr": dict(scale=(0.08, 1.0), solarize_p=0.0, **COLOUR),
}
# method options in our config's words; the lightly side is built from the same numbers
METHOD = {
    "swav": dict(hidden_dim=256, out_dim=128, prototypes=512, temperature=0.1, epsilon=0.05, sinkhorn_iterations=3,
                 freeze_prototypes_steps=0, queue_length=0),
    "dino": dict(hidden_dim=2048, bottleneck_dim=256, out_dim=2048, head_layers=3, head_batch_norm=True,
                 norm_last_layer=True, student_temperature=0.1, teacher_temperature=0.04,
                 warmup_teacher_temperature=0.04, warmup_teacher_temperature_epochs=0, center_momentum=0.9,
                 teacher_momentum=0.99, freeze_last_layer_epochs=0),
    "simclr": dict(hidden_dim=256, out_dim=128, temperature=0.5, base_temperature=0.5),
}
MOMENTUM, WEIGHT_DECAY, BASE_LR = 0.9, 5e-4, 0.06  # BASE_LR is per 128 images


# --------------------------------------------------------------------------- what both sides run
def steps_per_epoch(subset: int, batch: int) -> int:
    return subset // batch  # drop_last on both sides


def plan(steps: int, subset: int, batch: int, warmup_epochs: float, lr: float) -> dict:
    """Epochs, schedule length and the learning-rate array both sides follow (the Trainer's formula)."""
    spe = steps_per_epoch(subset, batch)
    if spe < 1:
        raise SystemExit(f"--subset {subset} is smaller than one batch of {batch}")
    epochs = -(-steps // spe)
    total = epochs * spe
    warmup = int(round(warmup_epochs * spe))
    return {"steps": steps, "steps_per_epoch": spe, "epochs": epochs, "total_steps": total, "warmup_steps": warmup,
            "lr": lr, "lr_schedule": cosine_schedule(lr, 0.0, total, warmup)}


def ours_config(method: str, seed: int, args, out_dir: str | None = None) -> Config:
    """Our Trainer's config for one run: the shared recipe in data.global_augment and the method section."""
    p = plan(args.steps, args.subset, args.batch, args.warmup_epochs, args.lr)
    augment = {k: list(v) if isinstance(v, tuple) else v for k, v in AUGMENT[method].items()}
    augment["jitter_order"] = args.jitter_order
    raw = {
        "name": f"parity-{method}-s{seed}",
        "data": {"dataset": DATASET, "data_root": args.data_root, "loader": args.loader, "crops": CROPS,
                 "batch_size": args.batch, "global_augment": augment, "num_workers": args.workers,
                 "train_subset": args.subset},
        "model": {"backbone": BACKBONE, "forward_views": args.forward_views},
        "method": {"name": method, **METHOD[method]},
        "optim": {"name": "sgd", "lr": args.lr, "lr_scaling": "none", "min_lr": 0.0,
                  "warmup_epochs": args.warmup_epochs, "weight_decay": WEIGHT_DECAY, "momentum": MOMENTUM,
                  "exclude_bias_norm": False, "clip_grad": None},  # lightly's benchmark decays every parameter
        "train": {"epochs": p["epochs"], "seed": seed, "device": "cpu", "max_steps": args.steps, "log_every": 1,
                  "checkpoint_every_epochs": p["epochs"], "out_dir": out_dir, "resume": None},
        "knn": {"every_epochs": 0},  # scored by the shared evaluator instead
    }
    if "probe" in SECTIONS:  # the online linear probe off: nothing but the SSL step runs
        raw["probe"] = {"online_linear": False}
    return from_dict(raw)


def random_init(seed: int) -> torch.nn.Module:
    """The backbone both sides start from: the Trainer seeds with train.seed right before building it."""
    torch.manual_seed(seed)
    return build_backbone(BACKBONE, CROP_SIZE)[0]


# --------------------------------------------------------------------------- settings read back
def _r(value):
    if isinstance(value, (tuple, list)):
        return tuple(_r(v) for v in value)
    return round(float(value), 6)


def views_of_groups(groups, dataset: str = DATASET) -> list[dict]:
    """Per view, the augmentation our MultiCropAugment applies (from its crop groups)."""
    mean, std = normalization_for(dataset)
    views = []
    for g in groups:
        for i in range(g.count):
            views.append({"size": g.size, "scale": _r(g.scale), "ratio": _r(g.ratio), "flip_p": _r(g.flip_p),
                          "vflip_p": 0.0, "rotate_p": 0.0, "jitter": _r(g.jitter),
                          "jitter_p": _r(g.per_view("jitter_p")[i]), "grayscale_p": _r(g.per_view("grayscale_p")[i]),
                          "blur_p": _r(g.per_view("blur_p")[i]), "solarize_p": _r(g.per_view("solarize_p")[i]),
                          "normalize": (_r(mean), _r(std))})
    return views


def ours_views(config: Config) -> list[dict]:
    """What the Trainer will apply for ``config`` (the same call its loader makes)."""
    d = config.data
    groups = method_crop_groups(method_class(config.method_name).crop_preset, d.crops,
                                global_augment=d.global_augment, local_augment=d.local_augment)
    return views_of_groups(groups, d.dataset)


def lightly_views(transform) -> list[dict]:
    """Per view, what a lightly multi-view transform applies, read from its torchvision objects."""
    out = []
    for view in transform.transforms:
        found = {"flip_p": 0.0, "vflip_p": 0.0, "rotate_p": 0.0, "jitter": (0.0, 0.0, 0.0, 0.0), "jitter_p": 0.0,
                 "grayscale_p": 0.0, "blur_p": 0.0, "solarize_p": 0.0}
        _walk(view, found)
        out.append({key: found.get(key) for key in ("size", "scale", "ratio", "flip_p", "vflip_p", "rotate_p",
                                                    "jitter", "jitter_p", "grayscale_p", "blur_p", "solarize_p",
                                                    "normalize")})
    return out


def _jitter(op):
    def spread(value):
        return 0.0 if value is None else 1.0 - float(value[0])

    hue = 0.0 if op.hue is None else float(op.hue[1])
    return _r((spread(op.brightness), spread(op.contrast), spread(op.saturation), hue))


def _walk(op, found: dict, probability: float = 1.0) -> None:
    name = type(op).__name__
    if name == "RandomResizedCrop":
        size = op.size if isinstance(op.size, int) else op.size[0]
        found.update(size=int(size), scale=_r(op.scale), ratio=_r(op.ratio))
    elif name == "RandomHorizontalFlip":
        found["flip_p"] = _r(op.p * probability)
    elif name == "RandomVerticalFlip":
        found["vflip_p"] = _r(op.p * probability)
    elif name in ("RandomRotate", "RandomRotateDegrees"):
        found["rotate_p"] = _r(op.prob * probability)
    elif name == "ColorJitter":
        jitter = _jitter(op)
        if any(jitter):  # SwaV's view transform holds a ColorJitter() that does nothing
            found.update(jitter=jitter, jitter_p=_r(probability))
    elif name == "RandomApply":
        for inner in op.transforms:
            _walk(inner, found, probability * op.p)
    elif name == "RandomGrayscale":
        found["grayscale_p"] = _r(op.p * probability)
    elif name == "GaussianBlur" and hasattr(op, "prob"):  # lightly's
        found["blur_p"] = _r(op.prob * probability)
    elif name == "RandomSolarization":
        found["solarize_p"] = _r(op.prob * probability)
    elif name == "Normalize":
        found["normalize"] = (_r(op.mean), _r(op.std))
    elif hasattr(op, "transforms"):  # Compose
        for inner in op.transforms:
            _walk(inner, found, probability)
    elif hasattr(op, "transform"):  # lightly's view transforms wrap a Compose
        _walk(op.transform, found, probability)


def linear_shapes(module: torch.nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every Linear layer, in order: the head sizes."""
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]


def ours_method(method: str, config: Config, feature_dim: int = 256):
    """Our method module for ``config`` (as the Trainer builds it), without data."""
    p = plan(config.train.max_steps, config.data.train_subset, config.data.batch_size, config.optim.warmup_epochs,
             config.optim.lr)
    ctx = MethodContext(BACKBONE, feature_dim, ((2, CROP_SIZE),), config.data.batch_size, 1, config.train.epochs,
                        p["steps_per_epoch"], 10, config.train.seed)
    backbone, _ = build_backbone(BACKBONE, CROP_SIZE)
    return method_class(method)(config.method_options(), ctx, backbone)


def ours_knobs(method: str, module) -> dict:
    o = module.options
    if method == "swav":
        return {"head (Linear in, out)": linear_shapes(module.student.projector),
                "prototypes (Linear in, out)": linear_shapes(module.student.prototypes),
                "temperature": o.temperature, "sinkhorn epsilon": o.epsilon,
                "sinkhorn iterations": o.sinkhorn_iterations,
                "prototypes frozen (steps)": module.freeze_steps, "queue": o.queue_length}
    if method == "dino":
        head = module.student.head
        return {"head (Linear in, out)": linear_shapes(head),
                "head BatchNorm": any(isinstance(x, torch.nn.BatchNorm1d) for x in head.modules()),
                "last layer norm fixed": not head.last_layer.parametrizations.weight.original0.requires_grad,
                "student temperature": o.student_temperature,
                "teacher temperature": f"{o.warmup_teacher_temperature}->{o.teacher_temperature} over "
                                       f"{o.warmup_teacher_temperature_epochs} epochs",
                "center momentum": o.center_momentum, "EMA": f"{o.teacher_momentum}->1 cosine per step",
                "last layer frozen (epochs)": o.freeze_last_layer_epochs,
                "scored": "teacher backbone" if module.eval_backbone() is module.teacher.backbone else "student"}
    base = getattr(module, "base_temperature", None) or o.base_temperature or o.temperature
    return {"head (Linear in, out)": linear_shapes(module.student.head), "temperature": o.temperature,
            "loss scale": round(o.temperature / base, 6)}


# --------------------------------------------------------------------------- lightly's side
class LightlySide:
    """lightly's transform, heads and loss for ``method``, sized by METHOD/AUGMENT, around ``backbone``."""

    def __init__(self, method: str, backbone: torch.nn.Module, feature_dim: int, p: dict):
        from lightly.loss import DINOLoss, NTXentLoss, SwaVLoss
        from lightly.models.modules import DINOProjectionHead, SimCLRProjectionHead, SwaVProjectionHead, SwaVPrototypes
        from lightly.transforms import DINOTransform, SimCLRTransform, SwaVTransform

        self.method, self.p, self.teacher = method, p, None
        a, m = AUGMENT[method], METHOD[method]
        mean, std = normalization_for(DATASET)
        b, c, s, h = a["jitter"]
        # strength 0.5 x doubled values: DINOTransform's second view ignores cj_strength (keeps its 0.5)
        common = dict(hf_prob=a["flip_p"], cj_prob=a["jitter_p"], cj_strength=0.5, cj_bright=2 * b, cj_contrast=2 * c,
                      cj_sat=2 * s, cj_hue=2 * h, random_gray_scale=a["grayscale_p"],
                      normalize={"mean": list(mean), "std": list(std)})
        lo, hi = a["scale"]
        if method == "swav":
            self.transform = SwaVTransform(crop_sizes=(CROP_SIZE,), crop_counts=(2,), crop_min_scales=(lo,),
                                           crop_max_scales=(hi,), gaussian_blur=a["blur_p"], **common)
            self.student = torch.nn.ModuleDict({
                "backbone": backbone, "head": SwaVProjectionHead(feature_dim, m["hidden_dim"], m["out_dim"]),
                "prototypes": SwaVPrototypes(m["out_dim"], m["prototypes"],
                                             n_steps_frozen_prototypes=m["freeze_prototypes_steps"])})
            self.loss_fn = SwaVLoss(temperature=m["temperature"], sinkhorn_iterations=m["sinkhorn_iterations"],
                                    sinkhorn_epsilon=m["epsilon"])
        elif method == "dino":
            first, second = a["solarize_p"]
            check(first == 0.0, "DINOTransform never solarizes its first view")
            self.transform = DINOTransform(global_crop_size=CROP_SIZE, global_crop_scale=(lo, hi), n_local_views=0,
                                           gaussian_blur=(a["blur_p"],) * 3, solarization_prob=second, **common)

            def head():
                return DINOProjectionHead(feature_dim, m["hidden_dim"], m["bottleneck_dim"], m["out_dim"],
                                          batch_norm=m["head_batch_norm"],
                                          freeze_last_layer=m["freeze_last_layer_epochs"],
                                          norm_last_layer=m["norm_last_layer"])

            self.student = torch.nn.ModuleDict({"backbone": backbone, "head": head()})
            # lightly's weight-normed last layer cannot be deep-copied: a fresh head with the student's weights
            self.teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": head()})
            self.teacher.load_state_dict(self.student.state_dict())
            self.teacher.requires_grad_(False)
            self.loss_fn = DINOLoss(output_dim=m["out_dim"], warmup_teacher_temp=m["warmup_teacher_temperature"],
                                    teacher_temp=m["teacher_temperature"],
                                    warmup_teacher_temp_epochs=m["warmup_teacher_temperature_epochs"],
                                    student_temp=m["student_temperature"], center_momentum=m["center_momentum"])
        else:
            check(hi == 1.0, "SimCLRTransform crops up to the whole image")
            self.transform = SimCLRTransform(input_size=CROP_SIZE, min_scale=lo, gaussian_blur=a["blur_p"], **common)
            self.student = torch.nn.ModuleDict({
                "backbone": backbone,
                "head": SimCLRProjectionHead(feature_dim, m["hidden_dim"], m["out_dim"], num_layers=2,
                                             batch_norm=False)})
            self.loss_fn = NTXentLoss(temperature=m["temperature"])

    def eval_backbone(self) -> torch.nn.Module:
        return (self.teacher or self.student)["backbone"]

    def before_step(self, step: int) -> None:
        if self.method == "swav":
            self.student["prototypes"].normalize()

    def loss(self, views, step: int) -> torch.Tensor:
        s = self.student
        if self.method == "swav":
            scores = [s["prototypes"](F.normalize(s["head"](s["backbone"](v)), dim=1), step) for v in views]
            return self.loss_fn(scores[:2], scores[2:])
        if self.method == "dino":
            with torch.no_grad():
                teacher_out = [self.teacher["head"](self.teacher["backbone"](v)) for v in views[:2]]
            student_out = [s["head"](s["backbone"](v)) for v in views]
            return self.loss_fn(teacher_out, student_out, epoch=step // self.p["steps_per_epoch"])
        z0, z1 = (s["head"](s["backbone"](v)) for v in views)
        return self.loss_fn(z0, z1)

    def before_optimizer_step(self, step: int) -> None:
        if self.method == "dino":
            self.student["head"].cancel_last_layer_gradients(step // self.p["steps_per_epoch"])

    def after_step(self, step: int) -> None:
        if self.method == "dino":
            from lightly.models.utils import update_momentum
            from lightly.utils.scheduler import cosine_schedule as lightly_cosine

            momentum = lightly_cosine(step, self.p["total_steps"], METHOD["dino"]["teacher_momentum"], 1.0)
            update_momentum(self.student, self.teacher, m=momentum)

    def knobs(self) -> dict:
        s = self.student
        if self.method == "swav":
            return {"head (Linear in, out)": linear_shapes(s["head"]),
                    "prototypes (Linear in, out)": linear_shapes(s["prototypes"]),
                    "temperature": self.loss_fn.temperature, "sinkhorn epsilon": self.loss_fn.sinkhorn_epsilon,
                    "sinkhorn iterations": self.loss_fn.sinkhorn_iterations,
                    "prototypes frozen (steps)": s["prototypes"].n_steps_frozen_prototypes, "queue": 0}
        if self.method == "dino":
            head, loss = s["head"], self.loss_fn
            warm = loss.warmup_teacher_temp_epochs
            start = float(loss.teacher_temp_schedule[0]) if warm else loss.teacher_temp
            return {"head (Linear in, out)": linear_shapes(head),
                    "head BatchNorm": any(isinstance(x, torch.nn.BatchNorm1d) for x in head.modules()),
                    "last layer norm fixed": not head.last_layer.weight_g.requires_grad,
                    "student temperature": loss.student_temp,
                    "teacher temperature": f"{round(start, 6)}->{loss.teacher_temp} over {warm} epochs",
                    "center momentum": loss.center_momentum,
                    "EMA": f"{METHOD['dino']['teacher_momentum']}->1 cosine per step",
                    "last layer frozen (epochs)": max(head.freeze_last_layer, 0),
                    "scored": "teacher backbone" if self.eval_backbone() is self.teacher["backbone"] else "student"}
        return {"head (Linear in, out)": linear_shapes(s["head"]), "temperature": self.loss_fn.temperature,
                "loss scale": 1.0}  # NTXentLoss: plain NT-Xent


# --------------------------------------------------------------------------- the shared evaluator
class SharedKnn:
    """One kNN scorer for every backbone: fixed bank and test images, k, temperature, normalization."""

    def __init__(self, bank_images: np.ndarray, bank_labels: np.ndarray, test_images: np.ndarray,
                 test_labels: np.ndarray, k: int = 20, temperature: float = 0.07, dataset: str = DATASET,
                 batch: int = 500):
        self.bank = (bank_images, np.asarray(bank_labels, dtype=np.int64))
        self.test = (test_images, np.asarray(test_labels, dtype=np.int64))
        self.k, self.temperature, self.batch = k, temperature, batch
        self.mean, self.std = normalization_for(dataset)
        self.num_classes = int(max(self.bank[1].max(), self.test[1].max())) + 1

    @classmethod
    def from_dataset(cls, data_root, bank: int, test_images: int, k: int, temperature: float) -> "SharedKnn":
        from trainers.data.datasets import load_split

        def draw(split, count):
            indices = subset_indices(len(split), count, EVAL_SEED)
            indices = np.arange(len(split)) if indices is None else indices
            return np.stack([split.images[int(i)] for i in indices]), split.labels[indices]

        train, test = load_split(DATASET, "train", data_root), load_split(DATASET, "test", data_root)
        return cls(*draw(train, bank), *draw(test, test_images), k=k, temperature=temperature)

    def _batches(self, images, labels):
        for start in range(0, len(labels), self.batch):
            yield torch.from_numpy(images[start:start + self.batch]), torch.from_numpy(labels[start:start + self.batch])

    @torch.no_grad()
    def score(self, backbone: torch.nn.Module) -> float:
        """kNN top-1 (a fraction) of ``backbone``'s frozen features; the module's train/eval mode is kept."""
        extract = dict(size=CROP_SIZE, mean=self.mean, std=self.std, device="cpu")
        bank_features, bank_labels = extract_features(backbone, self._batches(*self.bank), **extract)
        test_features, test_labels = extract_features(backbone, self._batches(*self.test), **extract)
        result = knn_accuracy(bank_features, bank_labels, test_features, test_labels, (self.k,), self.temperature,
                              self.num_classes)
        return result[knn_metric(self.k, self.temperature)]


# --------------------------------------------------------------------------- one run per side
def check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"parity broken: {message}")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def window_means(losses: list[float], width: int = 10) -> tuple[float, float]:
    width = max(1, min(width, len(losses)))
    return float(np.mean(losses[:width])), float(np.mean(losses[-width:]))


def _layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm1d))]


@torch.no_grad()
def copy_layers(source: torch.nn.Module, target: torch.nn.Module, keep_target_bias: bool = False) -> None:
    """Our head's weights into lightly's head of the same layout, layer by layer (Linear and BatchNorm in
    module order; weight-normalised layers by their direction v and norm g). ``keep_target_bias``: lightly's
    layer has a bias ours has not (SwaVPrototypes), which keeps its own."""
    ours, theirs = _layers(source), _layers(target)
    check(len(ours) == len(theirs) and all(isinstance(a, torch.nn.Linear) == isinstance(b, torch.nn.Linear)
                                            for a, b in zip(ours, theirs)),
          f"head layouts differ: {[type(m).__name__ for m in ours]} vs {[type(m).__name__ for m in theirs]}")
    for a, b in zip(ours, theirs):
        if isinstance(a, torch.nn.BatchNorm1d):
            b.load_state_dict(a.state_dict())
            continue
        if hasattr(a, "parametrizations"):  # torch's parametrized weight_norm vs lightly's old weight_norm hooks
            b.weight_g.copy_(a.parametrizations.weight.original0)
            b.weight_v.copy_(a.parametrizations.weight.original1)
        else:
            b.weight.copy_(a.weight)
        if a.bias is not None and b.bias is not None:
            b.bias.copy_(a.bias)
        elif a.bias is not None:  # DINO's head before a BatchNorm: ours has a bias (zero at init, and BN
            # takes the batch mean, so its gradient is 0 and it stays 0), lightly's has none
            check(not a.bias.any(), f"our layer {a} starts with a non-zero bias lightly's has not")
        else:
            check(b.bias is None or keep_target_bias, f"lightly's layer {b} has a bias ours has not")


def pair_heads(method: str, seed: int, args, side: "LightlySide") -> None:
    """Start lightly's heads (and SwAV's prototypes) from our initial weights for this seed, so that the
    two sides differ only in what each step does: with independently drawn heads, the head init is a
    per-seed difference of its own, as large as the effects measured here. Our heads are built as the
    Trainer builds them (seed, backbone, method); the backbone check proves the random stream lined up."""
    torch.manual_seed(seed)
    ours = ours_method(method, ours_config(method, seed, args))
    check(same_weights(ours.student.backbone, side.student["backbone"]), "our seeded backbone is not the shared one")
    s = side.student
    if method == "swav":
        copy_layers(ours.student.projector, s["head"])
        copy_layers(ours.student.prototypes.layer, s["prototypes"], keep_target_bias=True)
        pairs = [(ours.student.projector, s["head"])]
    else:
        copy_layers(ours.student.head, s["head"])
        pairs = [(ours.student.head, s["head"])]
    if side.teacher is not None:  # DINO: the teacher starts as the student, on both sides
        side.teacher.load_state_dict(s.state_dict())
    probe = torch.randn(8, 256, generator=torch.Generator().manual_seed(seed))
    for a, b in pairs:  # the same function: same outputs (eval mode: BN on its running statistics)
        a.eval(), b.eval()
        check(torch.allclose(a(probe), b(probe), atol=1e-6), f"{method}: lightly's head is not ours after the copy")
        a.train(), b.train()


@torch.no_grad()
def drop_prototype_bias(side: "LightlySide") -> None:
    """lightly's SwaVPrototypes without its bias (zero and frozen, so out of the optimizer): the prototype
    layer of facebookresearch/swav, solo-learn and ours. From the same weights the two SwAV steps then
    give the same loss and gradients to ~1e-6 (the audit in BENCHMARKS.md)."""
    for layer in side.student["prototypes"].heads:
        layer.bias.zero_()
        layer.bias.requires_grad_(False)


def run_ours(method: str, seed: int, args, init: torch.nn.Module, p: dict, evaluator: SharedKnn, verbose: bool):
    from trainers.loop import Trainer

    with tempfile.TemporaryDirectory(prefix=f"parity-{method}-") as folder:
        config = ours_config(method, seed, args, folder)
        started = time.perf_counter()
        trainer = Trainer(config, device="cpu", log=print if verbose else (lambda *_: None), progress=False)
        try:
            trainer.setup()
            # what "the same" means, checked on the objects the run uses
            check(trainer.steps_per_epoch == p["steps_per_epoch"], f"{trainer.steps_per_epoch} steps per epoch")
            check(np.allclose(trainer.lr_schedule, p["lr_schedule"], rtol=0, atol=1e-12), "learning-rate arrays differ")
            check(same_weights(trainer.method.student.backbone, init), "our initial backbone is not the shared one")
            check(views_of_groups(trainer.loader.augment.groups) == shared_views(method), "views are not the recipe")
        except BaseException:
            trainer.close()
            raise
        result = trainer.fit()
        wall = time.perf_counter() - started
        losses = [row["loss"] for row in result.history if "loss" in row]
        top1 = evaluator.score(trainer.method.eval_backbone())
    return {"knn_top1": top1, "wall_s": wall, "steps": result.steps, "loss_first_last": window_means(losses)}


def run_lightly(method: str, seed: int, args, init: torch.nn.Module, p: dict, evaluator: SharedKnn, split):
    started = time.perf_counter()
    torch.manual_seed(seed)
    backbone = copy.deepcopy(init)
    side = LightlySide(method, backbone, 256, p)
    if args.lightly_heads == "ours":
        pair_heads(method, seed, args, side)
    if method == "swav" and args.lightly_prototype_bias == "off":
        drop_prototype_bias(side)
    ours = None
    if args.lightly_data == "ours":  # our loader's views (our crops and augmentation, batched) into lightly's step
        from trainers.loop import Trainer

        folder = tempfile.TemporaryDirectory(prefix=f"parity-{method}-data-")
        ours = Trainer(ours_config(method, seed, args, folder.name), device="cpu", log=lambda *_: None,
                       progress=False)
        ours.setup()
        check(views_of_groups(ours.loader.augment.groups) == shared_views(method), "views are not the recipe")
        loader = OurViews(ours.loader)
    torch.manual_seed(seed * 1000 + 1)  # training randomness, as the Trainer seeds it
    if ours is None:
        indices = subset_indices(len(split), args.subset, seed)  # the Trainer's subset for this seed
        indices = np.arange(len(split)) if indices is None else indices
        dataset = torch.utils.data.Subset(PILImages(split, side.transform), indices.tolist())
        loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch, shuffle=True, drop_last=True,
                                             num_workers=args.workers, persistent_workers=args.workers > 0,
                                             generator=torch.Generator().manual_seed(seed))
    check(len(loader) == p["steps_per_epoch"], f"lightly's loader has {len(loader)} steps per epoch")
    params = [q for q in side.student.parameters() if q.requires_grad]
    optimizer = torch.optim.SGD(params, lr=float(p["lr_schedule"][0]), momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    side.student.train()
    if side.teacher is not None:
        side.teacher.train()
    step, losses = 0, []
    while step < p["steps"]:
        for views, _ in loader:
            for group in optimizer.param_groups:
                group["lr"] = float(p["lr_schedule"][step])
            side.before_step(step)
            loss = side.loss(views, step)
            if not torch.isfinite(loss):
                raise RuntimeError(f"lightly {method} seed {seed}: loss {float(loss)} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            side.before_optimizer_step(step)
            optimizer.step()
            side.after_step(step)
            losses.append(float(loss.detach()))
            step += 1
            if step >= p["steps"]:
                break
    wall = time.perf_counter() - started
    if ours is not None:
        ours.close()
        folder.cleanup()
    top1 = evaluator.score(side.eval_backbone())
    return {"knn_top1": top1, "wall_s": wall, "steps": step, "loss_first_last": window_means(losses)}


class OurViews:
    """Our multi-crop loader as lightly's loop reads a DataLoader: ``(views, labels)`` per batch, a new
    epoch (and shuffle) on every pass, as the Trainer drives it."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.loader.set_epoch(self.epoch)
        self.epoch += 1
        for batch in self.loader.iterate(0):
            yield [v.contiguous() for v in batch.views], batch.labels


# --------------------------------------------------------------------------- settings table
def shared_views(method: str) -> list[dict]:
    """The recipe, per view, in the readback's vocabulary (what both sides must show)."""
    a = AUGMENT[method]
    mean, std = normalization_for(DATASET)

    def at(key, view):  # a probability given per view, e.g. DINO's solarization (0.0, 0.2)
        value = a[key]
        return value[view] if isinstance(value, tuple) else value

    return [{"size": CROP_SIZE, "scale": _r(a["scale"]), "ratio": _r(a["ratio"]), "flip_p": _r(a["flip_p"]),
             "vflip_p": 0.0, "rotate_p": 0.0, "jitter": _r(a["jitter"]), "jitter_p": _r(at("jitter_p", view)),
             "grayscale_p": _r(at("grayscale_p", view)), "blur_p": _r(at("blur_p", view)),
             "solarize_p": _r(at("solarize_p", view)), "normalize": (_r(mean), _r(std))} for view in range(2)]


def settings_rows(method: str, config: Config, side: LightlySide | None, p: dict) -> list[tuple[str, str, str, bool]]:
    """(setting, ours, lightly, equal) for every compared setting; lightly '-' when it is not installed."""
    rows = []
    ours_v = ours_views(config)
    theirs_v = lightly_views(side.transform) if side is not None else None
    if theirs_v is not None and len(theirs_v) != len(ours_v):
        rows.append(("views", str(len(ours_v)), str(len(theirs_v)), False))
    for key in ours_v[0]:  # one row per setting, the views' values joined by " / "
        ours_values = [view[key] for view in ours_v]
        theirs_values = [view[key] for view in theirs_v] if theirs_v is not None else None
        rows.append((f"views: {key}", " / ".join(map(str, ours_values)),
                     " / ".join(map(str, theirs_values)) if theirs_values is not None else "-",
                     ours_values == theirs_values))
    ours_k = ours_knobs(method, ours_method(method, config))
    theirs_k = side.knobs() if side is not None else {}
    for key, value in ours_k.items():
        other = theirs_k.get(key)
        same = other == value or (isinstance(value, float) and isinstance(other, float) and math.isclose(value, other))
        rows.append((key, str(value), str(other) if side is not None else "-", same))
    shared = {"backbone": f"{BACKBONE} (CIFAR stem), same initial weights", "batch": config.data.batch_size,
              "optimizer": f"SGD momentum {MOMENTUM}, weight decay {WEIGHT_DECAY} on every parameter",
              "learning rate": f"{p['lr']:.4g} peak, warm-up {p['warmup_steps']} steps, cosine to 0 over "
                               f"{p['total_steps']} steps ({p['epochs']} epochs x {p['steps_per_epoch']})",
              "steps": p["steps"], "training images": f"{config.data.train_subset:,} (subset from the seed)",
              "precision": "fp32, CPU"}
    rows += [(key, str(value), "same", True) for key, value in shared.items()]
    return rows


def print_settings(method: str, rows) -> None:
    print(f"\n{method} settings\n| setting | ours | lightly | |\n|---|---|---|---|")
    for key, ours, theirs, same in rows:
        print(f"| {key} | {ours} | {theirs} | {'ok' if same else 'DIFFERS'} |")


# --------------------------------------------------------------------------- report
def mean_sd(values: list[float]) -> tuple[float, float]:
    return float(statistics.mean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def fmt(values: list[float], signed: bool = False) -> str:
    mean, sd = mean_sd([100 * v for v in values])
    text = f"{mean:+.1f}" if signed else f"{mean:.1f}"
    return f"{text} ± {sd:.1f}" if len(values) > 1 else text


def summarize(runs: list[dict], methods, seeds) -> list[dict]:
    summary = []
    for method in methods:
        by_side = {side: {r["seed"]: r["knn_top1"] for r in runs if r["method"] == method and r["side"] == side}
                   for side in ("random", "ours", "lightly")}
        done = [s for s in seeds if all(s in by_side[side] for side in by_side)]
        if not done:
            continue
        row = {"method": method, "seeds": done}
        for side, values in by_side.items():
            row[side] = [values[s] for s in done]
        row["ours_minus_lightly"] = [by_side["ours"][s] - by_side["lightly"][s] for s in done]
        summary.append(row)
    return summary


def markdown(summary: list[dict], facts: dict) -> str:
    lines = [f"kNN top-1 (%, k={facts['k']}, T={facts['temperature']}, bank {facts['bank']:,} train images, "
             f"{facts['test_images']:,} test images), {facts['backbone']}, {facts['steps']} steps of batch "
             f"{facts['batch']} on {facts['subset']:,} CIFAR-10 images, CPU; mean ± sd over seeds",
             "", "| method | seeds | random init | ours mean ± sd | lightly mean ± sd | ours − lightly |",
             "|---|---|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['method']} | {','.join(map(str, row['seeds']))} | {fmt(row['random'])} | "
                     f"{fmt(row['ours'])} | {fmt(row['lightly'])} | {fmt(row['ours_minus_lightly'], signed=True)} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, from %(choices)s" % {
        "choices": ", ".join(METHODS)} + " (default: %(default)s)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=312, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--subset", type=int, default=10_000,
                        help="training images, a fixed subset drawn from the seed (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=None,
                        help=f"peak learning rate (default: {BASE_LR} x batch / 128, lightly's CIFAR-10 benchmark)")
    parser.add_argument("--warmup-epochs", type=float, default=0.5,
                        help="linear warm-up before the cosine, in epochs (default: %(default)s)")
    parser.add_argument("--test-images", type=int, default=2_000, help="kNN test images (default: %(default)s)")
    parser.add_argument("--bank", type=int, default=10_000,
                        help="kNN bank: this many training images, drawn once for all runs (default: %(default)s)")
    parser.add_argument("--k", type=int, default=20, help="kNN neighbours (default: %(default)s)")
    parser.add_argument("--knn-temperature", type=float, default=0.07, help="kNN temperature (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="loader workers, both sides (default: %(default)s)")
    parser.add_argument("--loader", default="torch", choices=("torch", "ffcv", "auto"),
                        help="our canvas loader (default: %(default)s)")
    parser.add_argument("--data-root", default=None, help="folder with cifar10-jpg.tar.gz (default: $SSLAB_DATA_ROOT)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "parity-cpu.json"),
                        help="result JSON (default: %(default)s)")
    parser.add_argument("--forward-views", default="by_size", choices=("by_size", "each"),
                        help="our model.forward_views: both views in one backbone call and the head over both "
                             "(BatchNorm over 2B) or backbone and head once per view, as lightly's loop does "
                             "(default: %(default)s)")
    parser.add_argument("--lightly-heads", default="ours", choices=("ours", "own"),
                        help="lightly's initial head (and SwAV prototype) weights: copied from ours for the same "
                             "seed (a paired comparison: the sides differ only in what a step does) or its own "
                             "draw (default: %(default)s)")
    parser.add_argument("--lightly-prototype-bias", default="on", choices=("on", "off"),
                        help="SwAV: lightly's SwaVPrototypes as lightly has it, with a trainable bias, or without "
                             "one as in the references and ours (default: %(default)s)")
    parser.add_argument("--lightly-data", default="own", choices=("own", "ours"),
                        help="what lightly's side trains on: its own transforms (PIL, per image) or our loader's "
                             "views (our crops and batched augmentation), to tell the data pipeline from the "
                             "step (default: %(default)s)")
    parser.add_argument("--jitter-order", default="batch", choices=("batch", "image"),
                        help="our colour-jitter order: one random order per batch (our default) or one per image "
                             "as torchvision's ColorJitter (default: %(default)s)")
    parser.add_argument("--sides", default="ours,lightly",
                        help="which trained sides to run, comma-separated from ours, lightly (default: %(default)s)")
    parser.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                        help="combine earlier result files (random init and lightly rows from any of them, ours "
                             "from those made with --forward-views) into --out and print the table; no training")
    parser.add_argument("--verbose", action="store_true", help="show our Trainer's log lines")
    parser.add_argument("--check-settings", action="store_true",
                        help="print the settings tables, check that both sides agree and stop (no data, no training)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad or not args.methods:
        parser.error(f"--methods {','.join(bad) or '(none)'}: use some of {', '.join(METHODS)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r} must be comma-separated integers")
    if not args.seeds or any(s < 0 for s in args.seeds):
        parser.error("--seeds needs at least one seed >= 0")
    for name in ("steps", "subset", "batch", "test_images", "bank", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 0 or args.warmup_epochs < 0 or args.knn_temperature <= 0:
        parser.error("--workers and --warmup-epochs must be >= 0, --knn-temperature > 0")
    if args.subset < args.batch:
        parser.error(f"--subset {args.subset} must hold at least one batch of {args.batch}")
    if args.k > args.bank:
        parser.error(f"--k {args.k} is larger than the kNN bank of {args.bank}")
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not args.sides or any(s not in ("ours", "lightly") for s in args.sides):
        parser.error(f"--sides {','.join(args.sides) or '(none)'}: use ours, lightly or both")
    if args.lr is None:
        args.lr = BASE_LR * args.batch / 128
    return args


# Methods whose head has BatchNorm in this benchmark: until 2026-12-07 'each' ran the backbone per view but
# the head over both views, so their 'each' runs from older files measured something else
HEAD_BATCHNORM = ("swav", "dino")


# How lightly's side was run (fact / option name, its value in files from before the option, the methods it
# applies to): merge takes lightly's rows only from files of the asked variant
LIGHTLY_VARIANTS = (("lightly_heads", "own", METHODS),  # before --lightly-heads lightly drew its own heads
                    ("lightly_prototype_bias", "on", ("swav",)),
                    ("lightly_data", "own", METHODS))


def merge(args) -> int:
    """One table from several runs of this script: lightly's and the random init's scores do not depend
    on our code, so they are taken from any file; ours only from files made with ``--forward-views``
    (for SwAV and DINO under 'each': only from files whose heads also ran per view)."""
    runs, facts, seen = [], None, set()
    for name in args.merge:
        data = json.loads(Path(name).read_text())
        mode = data["facts"].get("forward_views", "by_size")  # files from before the option: by_size
        heads_per_view = data["facts"].get("heads_per_view", False)
        for run in data["runs"]:
            if run["method"] not in args.methods or run["seed"] not in args.seeds:
                continue
            if run["side"] == "lightly" and any(
                    data["facts"].get(fact, before) != getattr(args, fact)
                    for fact, before, methods in LIGHTLY_VARIANTS if run["method"] in methods):
                continue
            if run["side"] == "ours" and mode != args.forward_views:
                continue
            if ((run["side"] == "ours" or data["facts"].get("lightly_data", "own") == "ours")
                    and data["facts"].get("jitter_order", "batch") != args.jitter_order):
                continue  # these views were made with the other jitter order
            if run["side"] == "ours" and mode == "each" and run["method"] in HEAD_BATCHNORM and not heads_per_view:
                continue
            key = (run["method"], run["seed"], run["side"])
            if key not in seen:
                seen.add(key)
                runs.append({**run, "source": name})
        facts = facts or dict(data["facts"])
    facts.update(methods=args.methods, seeds=args.seeds, forward_views=args.forward_views, merged_from=args.merge,
                 heads_per_view=args.forward_views == "each", lightly_heads=args.lightly_heads,
                 lightly_prototype_bias=args.lightly_prototype_bias, lightly_data=args.lightly_data,
                 jitter_order=args.jitter_order)
    summary = summarize(runs, args.methods, args.seeds)
    out = write_result(args.out, {"facts": facts, "runs": runs, "summary": summary,
                                  "markdown": markdown(summary, facts)})
    missing = [f"{m} seed {s} {side}" for m in args.methods for s in args.seeds for side in ("random", "ours", "lightly")
               if (m, s, side) not in seen]
    print(markdown(summary, facts))
    if missing:
        print("\nnot in the files: " + ", ".join(missing))
    print(f"\nwrote {out}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    # lightly 1.6.0's DINO head uses the old weight_norm
    warnings.filterwarnings("ignore", message=".*torch.nn.utils.weight_norm.*deprecated", category=FutureWarning)
    try:
        import lightly
    except ImportError:
        print(f"lightly is not installed: pip install lightly=={LIGHTLY_VERSION} (a benchmark baseline, not a "
              "project dependency)", file=sys.stderr)
        return 2
    from trainers.data.datasets import load_split

    p = plan(args.steps, args.subset, args.batch, args.warmup_epochs, args.lr)
    all_settings, mismatched = {}, []
    for method in args.methods:
        config = ours_config(method, args.seeds[0], args)
        rows = settings_rows(method, config, LightlySide(method, random_init(0), 256, p), p)
        print_settings(method, rows)
        all_settings[method] = [{"setting": k, "ours": o, "lightly": t, "same": s} for k, o, t, s in rows]
        mismatched += [f"{method}: {k} (ours {o}, lightly {t})" for k, o, t, s in rows if not s]
    if mismatched:
        print("\nthe two sides' settings differ, nothing trained:\n  " + "\n  ".join(mismatched), file=sys.stderr)
        return 3
    if args.check_settings:
        print(f"\nboth sides agree on every compared setting ({', '.join(args.methods)})")
        return 0
    started = time.perf_counter()
    evaluator = SharedKnn.from_dataset(args.data_root, args.bank, args.test_images, args.k, args.knn_temperature)
    split = load_split(DATASET, "train", args.data_root)
    print(f"\nkNN: bank {len(evaluator.bank[1]):,} train images, {len(evaluator.test[1]):,} test images, k={args.k}, "
          f"T={args.knn_temperature} | lightly {lightly.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads | {p['steps']} steps x batch {args.batch}", flush=True)
    runs = []
    facts = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "cpu": platform.processor() or platform.machine(),
             "threads": torch.get_num_threads(), "torch": torch.__version__, "lightly": lightly.__version__,
             "backbone": BACKBONE, "crops": CROPS, "batch": args.batch, "steps": args.steps, "subset": args.subset,
             "epochs": p["epochs"], "lr": args.lr, "warmup_steps": p["warmup_steps"], "weight_decay": WEIGHT_DECAY,
             "momentum": MOMENTUM, "bank": len(evaluator.bank[1]), "test_images": len(evaluator.test[1]),
             "k": args.k, "temperature": args.knn_temperature, "eval_seed": EVAL_SEED, "workers": args.workers,
             "loader": args.loader, "methods": args.methods, "seeds": args.seeds,
             "forward_views": args.forward_views, "heads_per_view": args.forward_views == "each",
             "lightly_heads": args.lightly_heads, "lightly_prototype_bias": args.lightly_prototype_bias,
             "lightly_data": args.lightly_data, "jitter_order": args.jitter_order,
             "sides": args.sides}

    def save():
        summary = summarize(runs, args.methods, args.seeds)
        out = write_result(args.out, {"facts": facts, "settings": all_settings, "runs": runs, "summary": summary,
                                      "markdown": markdown(summary, facts)})
        return out, summary

    total = len(args.methods) * len(args.seeds)
    for index, (method, seed) in enumerate([(m, s) for m in args.methods for s in args.seeds], start=1):
        init = random_init(seed)
        base = evaluator.score(init)
        runs.append({"method": method, "seed": seed, "side": "random", "knn_top1": base})
        print(f"[{index}/{total}] {method:6s} seed {seed}: random init {base:.2%}", flush=True)
        for side in args.sides:
            if side == "ours":
                result = run_ours(method, seed, args, init, p, evaluator, args.verbose)
            else:
                result = run_lightly(method, seed, args, init, p, evaluator, split)
            runs.append({"method": method, "seed": seed, "side": side, **result})
            first, last = result["loss_first_last"]
            print(f"[{index}/{total}] {method:6s} seed {seed}: {side:7s} {result['knn_top1']:.2%}  loss {first:.3f} -> "
                  f"{last:.3f}  {result['steps']} steps in {result['wall_s']:.0f} s "
                  f"(elapsed {time.perf_counter() - started:.0f} s)", flush=True)
        out, summary = save()  # after every pair: a long measurement keeps what it finished
    facts["wall_s"] = round(time.perf_counter() - started, 1)
    out, summary = save()
    print("\n" + markdown(summary, facts))
    print(f"\nwrote {out} ({facts['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
