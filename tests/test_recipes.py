"""configs/pretrain/{swav,dino,simclr,supcon}_cifar10.yaml are solo-learn's CIFAR-10 recipes: the resolved
configs (crop groups as the loop builds them, method options, optimizer, schedule) are held against a
recorded table of solo-learn's values. Any drift in a recipe, or in a default it relies on, fails here.

Source of every value: vturrisi/solo-learn at commit 9187ea39c2c3f43c455ab06664d2b019a9802954, files
scripts/pretrain/cifar/{swav,dino,simclr,supcon}.yaml, scripts/pretrain/cifar/augmentations/{symmetric,
asymmetric}.yaml, and the defaults they rely on in solo/methods/{base,swav,dino,simclr,supcon}.py,
solo/losses/{dino,simclr}.py, solo/args/pretrain.py, solo/utils/lars.py, solo/data/pretrain_dataloader.py.
Each row names its solo-learn key; "ours" marks how the value is spelled in our config where it differs.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from trainers.backbones import build_backbone
from trainers.config import load_config
from trainers.data.augment import method_crop_groups
from trainers.loop import check_config
from trainers.methods import method_class
from trainers.methods.base import MethodContext

SOLO_COMMIT = "9187ea39c2c3f43c455ab06664d2b019a9802954"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"

# ---------------------------------------------------------------------------------------------- views
# scripts/pretrain/cifar/augmentations/symmetric.yaml (SwAV, SimCLR, SupCon): one pipeline, num_crops 2
SYMMETRIC = {
    "count": 2, "size": 32,                              # num_crops 2, crop_size 32
    "scale": (0.08, 1.0),                                # rrc.crop_min_scale, rrc.crop_max_scale
    "ratio": (3 / 4, 4 / 3),                             # pretrain_dataloader.py: RandomResizedCrop default
    "flip_p": 0.5,                                       # horizontal_flip.prob
    "jitter": (0.8, 0.8, 0.8, 0.2),                      # color_jitter brightness, contrast, saturation, hue
    "jitter_p": (0.8, 0.8),                              # color_jitter.prob
    "grayscale_p": (0.2, 0.2),                           # grayscale.prob
    "blur_p": (0.5, 0.5),                                # gaussian_blur.prob
    "blur_sigma": (0.1, 2.0),                            # pretrain_dataloader.py GaussianBlur sigma [0.1, 2.0]
    "solarize_p": (0.0, 0.0),                            # solarization.prob
    "solarize_threshold": 0.5,                           # PIL ImageOps.solarize threshold 128 (of 255)
}
# scripts/pretrain/cifar/augmentations/asymmetric.yaml (DINO): two pipelines of num_crops 1
ASYMMETRIC = {
    "count": 2, "size": 32,                              # 2 x (num_crops 1), crop_size 32
    "scale": (0.08, 1.0),                                # rrc.crop_min_scale, rrc.crop_max_scale (both)
    "ratio": (3 / 4, 4 / 3),                             # pretrain_dataloader.py: RandomResizedCrop default
    "flip_p": 0.5,                                       # horizontal_flip.prob (both)
    "jitter": (0.4, 0.4, 0.2, 0.1),                      # color_jitter brightness, contrast, saturation, hue (both)
    "jitter_p": (0.8, 0.8),                              # color_jitter.prob
    "grayscale_p": (0.2, 0.2),                           # grayscale.prob
    "blur_p": (0.0, 0.0),                                # gaussian_blur.prob 0.0 in both pipelines
    "blur_sigma": (0.1, 2.0),                            # pretrain_dataloader.py GaussianBlur sigma (unused)
    "solarize_p": (0.0, 0.2),                            # solarization.prob: first pipeline 0.0, second 0.2
    "solarize_threshold": 0.5,                           # PIL ImageOps.solarize threshold 128 (of 255)
}

# ------------------------------------------------------------------------------------ shared settings
COMMON = {
    "data.dataset": "cifar10",                           # data.dataset
    "data.crops": "2x32",                                # crop_size 32, 2 large crops, no small crops
    "data.batch_size": 256,                              # optimizer.batch_size 256 on devices [0]
    "model.backbone": "resnet18",                        # backbone.name
    "model.cifar_stem": True,                            # methods/base.py: cifar -> 3x3 conv1, no max-pool
    "model.forward_views": "each",                       # methods/base.py:512 training_step: one forward per crop
    "train.epochs": 1000,                                # max_epochs
    "optim.lr_scaling": "linear",                        # args/pretrain.py: lr * batch * devices * nodes / 256
    "optim.min_lr": 0.0,                                 # methods/base.py scheduler.min_lr default
    "optim.warmup_epochs": 10.0,                         # methods/base.py scheduler.warmup_epochs default
    "optim.weight_decay_end": None,                      # constant weight decay
    "optim.momentum": 0.9,                               # args/pretrain.py optimizer.kwargs.momentum default
    "optim.clip_grad": None,                             # no gradient clipping (dino.py clip_grad default 0)
}
LARS = {
    "optim.name": "lars",                                # optimizer.name
    "optim.lars_eta": 0.02,                              # optimizer.kwargs.eta
    "optim.lars_clip_lr": True,                          # optimizer.kwargs.clip_lr
    "optim.lars_trust": "paper",                         # utils/lars.py: eta |w| / (|g| + wd |w| + eps)
    "optim.exclude_bias_norm": True,                     # optimizer.kwargs.exclude_bias_n_norm
}

REFERENCE = {
    "swav": {  # scripts/pretrain/cifar/swav.yaml + solo/methods/swav.py defaults
        "views": SYMMETRIC, **COMMON, **LARS,
        "optim.lr": 0.6,                                 # optimizer.lr
        "optim.weight_decay": 1e-6,                      # optimizer.weight_decay
        "method": {
            "hidden_dim": 2048,                          # method_kwargs.proj_hidden_dim
            "out_dim": 128,                              # method_kwargs.proj_output_dim
            "prototypes": 3000,                          # method_kwargs.num_prototypes
            "temperature": 0.1,                          # method_kwargs.temperature
            "epsilon": 0.05,                             # methods/swav.py sk_epsilon default
            "sinkhorn_iterations": 3,                    # methods/swav.py sk_iters default
            "assign_crops": [0, 1],                      # assignments of the num_large_crops (2) crops
            "queue_length": 3840,                        # method_kwargs.queue_size
            "queue_start_epoch": 50,                     # method_kwargs.epoch_queue_starts
            "freeze_prototypes_epochs": 2,               # method_kwargs.freeze_prototypes_epochs
            "freeze_prototypes_steps": None,             # ours: the epochs option is used
        },
    },
    "dino": {  # scripts/pretrain/cifar/dino.yaml + solo/methods/dino.py, solo/losses/dino.py defaults
        "views": ASYMMETRIC, **COMMON, **LARS,
        "optim.lr": 0.3,                                 # optimizer.lr
        "optim.weight_decay": 1e-6,                      # optimizer.weight_decay
        "method": {
            "out_dim": 4096,                             # method_kwargs.num_prototypes
            "hidden_dim": 2048,                          # method_kwargs.proj_hidden_dim
            "bottleneck_dim": 256,                       # method_kwargs.proj_output_dim
            "head_layers": 3,                            # DINOHead num_layers default
            "head_batch_norm": False,                    # use_bn_in_head default
            "norm_last_layer": True,                     # norm_last_layer default
            "student_temperature": 0.1,                  # student_temperature default
            "teacher_temperature": 0.07,                 # teacher_temperature default
            "warmup_teacher_temperature": 0.04,          # warmup_teacher_temperature default (unused)
            "warmup_teacher_temperature_epochs": 0,      # warmup_teacher_temperature_epochs default
            "center_momentum": 0.9,                      # losses/dino.py center_momentum default
            "teacher_momentum": 0.9995,                  # momentum.base_tau (final_tau 1.0: ours is always 1)
            "freeze_last_layer_epochs": 1,               # freeze_last_layer default
        },
    },
    "simclr": {  # scripts/pretrain/cifar/simclr.yaml + solo/losses/simclr.py
        "views": SYMMETRIC, **COMMON, **LARS,
        "optim.lr": 0.4,                                 # optimizer.lr
        "optim.weight_decay": 1e-4,                      # optimizer.weight_decay
        "method": {
            "labels": "none",                            # positives by image index
            "temperature": 0.2,                          # method_kwargs.temperature
            "base_temperature": None,                    # ours: = temperature, no T / base T factor
            "loss_form": "in",                           # simclr_loss_func: -log(sum_pos / (sum_pos + sum_neg))
            "hidden_dim": 2048,                          # method_kwargs.proj_hidden_dim
            "out_dim": 256,                              # method_kwargs.proj_output_dim
        },
    },
    "supcon": {  # scripts/pretrain/cifar/supcon.yaml + solo/losses/simclr.py with class labels
        "views": SYMMETRIC, **COMMON,
        "optim.name": "sgd",                             # optimizer.name
        "optim.lr": 0.4,                                 # optimizer.lr
        "optim.weight_decay": 1e-5,                      # optimizer.weight_decay
        "optim.exclude_bias_norm": False,                # methods/base.py exclude_bias_n_norm_wd default False
        "method": {
            "labels": "dataset",                         # positives by class label
            "temperature": 0.2,                          # method_kwargs.temperature
            "base_temperature": None,                    # ours: = temperature, no T / base T factor
            "loss_form": "in",                           # simclr_loss_func: -log(sum_pos / (sum_pos + sum_neg))
            "hidden_dim": 2048,                          # method_kwargs.proj_hidden_dim
            "out_dim": 256,                              # method_kwargs.proj_output_dim
        },
    },
}
# solo-learn README.md (same commit), "CIFAR-10" table, ResNet18, 1000 epochs, Acc@1
PUBLISHED_TOP1 = {"swav": 89.17, "dino": 89.52, "simclr": 90.74, "supcon": 93.82}


def same(ours, want) -> bool:
    """Exact for strings, bools and None; numbers to 1e-12 relative (YAML 1.3333333333333333 vs 4 / 3)."""
    if isinstance(want, (list, tuple)):
        return isinstance(ours, (list, tuple)) and len(ours) == len(want) and all(map(same, ours, want))
    if isinstance(want, bool) or want is None or isinstance(want, str):
        return type(ours) is type(want) and ours == want
    return isinstance(ours, (int, float)) and not isinstance(ours, bool) and math.isclose(ours, want, rel_tol=1e-12)


def resolved_views(config) -> list[dict]:
    """The crop groups exactly as the loop builds them, one dict per group with per-view probabilities."""
    d = config.data
    overrides = {k: v for k, v in (("global_scale", d.global_scale), ("local_scale", d.local_scale)) if v is not None}
    groups = method_crop_groups(method_class(config.method_name).crop_preset, d.crops,
                                global_augment=d.global_augment, local_augment=d.local_augment, **overrides)
    rows = []
    for group in groups:
        row = {name: getattr(group, name) for name in ("count", "size", "scale", "ratio", "flip_p", "jitter",
                                                       "blur_sigma", "solarize_threshold")}
        row.update({name: group.per_view(name) for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p")})
        rows.append(row)
    return rows


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_recipe_matches_solo_learn(method):
    config = load_config(CONFIGS / f"{method}_cifar10.yaml")
    check_config(config)
    reference = REFERENCE[method]
    assert config.method_name == method
    flat = config.flat()
    mismatches = {key: (flat[key], want) for key, want in reference.items()
                  if key not in ("views", "method") and not same(flat[key], want)}
    assert not mismatches, f"{method}: (ours, solo-learn) {mismatches}"
    # every method option is recorded: a changed default fails too
    options = dataclasses.asdict(config.method_options())
    assert set(options) == set(reference["method"]), set(options) ^ set(reference["method"])
    wrong = {k: (v, reference["method"][k]) for k, v in options.items() if not same(v, reference["method"][k])}
    assert not wrong, f"{method} method: (ours, solo-learn) {wrong}"
    views = resolved_views(config)
    assert len(views) == 1, "solo-learn's CIFAR recipes have no small crops"
    wrong = {k: (views[0][k], want) for k, want in reference["views"].items() if not same(views[0][k], want)}
    assert not wrong, f"{method} views: (ours, solo-learn) {wrong}"


@pytest.mark.parametrize("method", sorted(REFERENCE))
def test_recipe_learning_rate_is_solo_learns_at_its_batch(method):
    # solo-learn: lr * batch_size * devices * nodes / 256 = lr at 256 on one GPU; ours: lr * batch / 256
    config = load_config(CONFIGS / f"{method}_cifar10.yaml")
    scale = config.data.batch_size / 256 if config.optim.lr_scaling == "linear" else 1.0
    assert config.optim.lr * scale == pytest.approx(REFERENCE[method]["optim.lr"])
    # and it stays per 256 images: at batch 512 the peak doubles, as solo-learn's rule
    doubled = load_config(CONFIGS / f"{method}_cifar10.yaml", ["data.batch_size=512"])
    assert doubled.optim.lr * doubled.data.batch_size / 256 == pytest.approx(2 * REFERENCE[method]["optim.lr"])


def _context(config, steps_per_epoch=195):  # 50,000 images // 256 (solo-learn's loader drops the last batch)
    from trainers.data.augment import parse_crop_spec

    return MethodContext("resnet_mini", 256, tuple(parse_crop_spec(config.data.crops)), config.data.batch_size, 1,
                         config.train.epochs, steps_per_epoch, 10, 0)


def test_swav_recipe_queue_and_prototype_freeze_in_steps():
    config = load_config(CONFIGS / "swav_cifar10.yaml")
    ctx = _context(config)
    backbone, _ = build_backbone("resnet_mini", 32)
    swav = method_class("swav")(config.method_options(), ctx, backbone)
    assert swav.freeze_steps == 2 * 195  # freeze_prototypes_epochs 2
    assert swav.queue.shape[:2] == (2, 3840)  # one queue of 3840 per assign crop (solo: queue[2, queue_size])
    assert swav.queue_start_step == 50 * 195
    assert not swav._queue_active(50 * 195 - 1) and swav._queue_active(50 * 195)


def test_dino_recipe_teacher_schedules():
    config = load_config(CONFIGS / "dino_cifar10.yaml")
    ctx = _context(config, steps_per_epoch=4)  # a short epoch keeps the schedules small
    backbone, _ = build_backbone("resnet_mini", 32)
    dino = method_class("dino")(config.method_options(), ctx, backbone)
    assert dino.teacher_momenta[0] == pytest.approx(0.9995) and dino.teacher_momenta[-1] == pytest.approx(1.0)
    assert dino.teacher_temperature(0) == pytest.approx(0.07)  # no warm-up: solo's schedule is 0.07 throughout
    assert dino.teacher_temperature(ctx.total_steps - 1) == pytest.approx(0.07)
    assert dino.student.head.last_layer.weight.shape == (4096, 256)


@pytest.mark.parametrize("method", ["simclr", "supcon"])
def test_contrastive_recipes_have_no_temperature_factor(method):
    config = load_config(CONFIGS / f"{method}_cifar10.yaml")
    backbone, _ = build_backbone("resnet_mini", 32)
    model = method_class(method)(config.method_options(), _context(config, 4), backbone)
    assert model.base_temperature == model.options.temperature == 0.2  # factor T / base T = 1, as solo-learn
    linears = [m for m in model.student.head.modules() if m.__class__.__name__ == "Linear"]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 2048), (2048, 256)]  # resnet_mini: 256 in


def test_the_readme_table_holds_the_recorded_published_numbers():
    readme = (CONFIGS.parents[1] / "README.md").read_text()
    for method, top1 in PUBLISHED_TOP1.items():
        assert f"configs/pretrain/{method}_cifar10.yaml" in readme and f"{top1:.2f}" in readme, method
    assert SOLO_COMMIT[:8] in readme
