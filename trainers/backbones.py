"""Backbones: torchvision ResNet-18/50 (CIFAR stem for small images) and ViT-Tiny/Small (timm).

``build_backbone(name, image_size)`` returns (module, feature_dim); the module maps [B, 3, s, s] to
[B, feature_dim] for any crop size s (ViTs interpolate their position embeddings).
Which views share a forward call is decided by ``trainers.methods.base.encode_views``.
"""

from __future__ import annotations

import difflib

from torch import nn

from trainers.errors import ConfigError

RESNETS = {"resnet18": 512, "resnet50": 2048}
VITS = {"vit_tiny": ("vit_tiny_patch16_224", 192), "vit_small": ("vit_small_patch16_224", 384)}
MINI = {"resnet_mini": 256}
BACKBONES = tuple(MINI) + tuple(RESNETS) + tuple(VITS)
SMALL_IMAGE = 64  # at or below this side: CIFAR stem for ResNets, 4-pixel patches for ViTs


def check_backbone(name: str) -> str:
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, BACKBONES, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ConfigError(f"unknown backbone '{name}': {hint}use one of {', '.join(BACKBONES)}")
    return name


def build_backbone(name: str, image_size: int, cifar_stem: bool | None = None,
                   patch_size: int | None = None) -> tuple[nn.Module, int]:
    """A randomly initialised backbone without classifier, and its output feature size.

    ``cifar_stem`` (default: image_size <= 64) replaces ResNet's 7x7/2 conv + max-pool by a 3x3/1
    conv, as in SimCLR's CIFAR experiments. ViTs use 16-pixel patches, or 4 for small images.
    """
    check_backbone(name)
    if image_size <= 0:
        raise ConfigError(f"image size {image_size} must be positive")
    small = image_size <= SMALL_IMAGE
    if name in MINI:
        return _mini_resnet(small if cifar_stem is None else cifar_stem), MINI[name]
    if name in RESNETS:
        import torchvision

        model = getattr(torchvision.models, name)(weights=None)
        if small if cifar_stem is None else cifar_stem:
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            model.maxpool = nn.Identity()
        model.fc = nn.Identity()
        return model, RESNETS[name]
    import timm

    timm_name, dim = VITS[name]
    patch = vit_patch_size(image_size, patch_size)
    if image_size % patch:
        raise ConfigError(f"ViT patch size {patch} must divide the global crop size {image_size}")
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=image_size, patch_size=patch,
                              dynamic_img_size=True)
    return model, dim


def vit_patch_size(global_size: int, patch_size: int | None) -> int:
    """The ViT patch size a run uses: as given, else 4 for small images and 16 otherwise."""
    return patch_size or (4 if global_size <= SMALL_IMAGE else 16)


def check_vit_crops(backbone: str, sizes: list[int], patch_size: int | None) -> None:
    """Every crop size of a ViT run must be a whole number of patches (local crops included)."""
    if backbone not in VITS:
        return
    patch = vit_patch_size(sizes[0], patch_size)
    bad = [s for s in sizes if s % patch]
    if bad:
        raise ConfigError(f"ViT patch size {patch} must divide every crop size, not {', '.join(map(str, bad))} px: "
                          f"use crop sizes that are multiples of {patch} (or set model.patch_size)")


def _mini_resnet(cifar_stem: bool) -> nn.Module:
    """ResNet-10 at half width (BasicBlocks [1, 1, 1, 1], widths 32-64-128-256, ~1.2 M parameters):
    about 8x cheaper than ResNet-18, for CPU demos and tests. Same layout as torchvision's ResNet."""
    from torchvision.models.resnet import BasicBlock

    def stage(in_width: int, width: int, stride: int) -> nn.Sequential:
        down = None
        if stride != 1 or in_width != width:
            down = nn.Sequential(nn.Conv2d(in_width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))
        return nn.Sequential(BasicBlock(in_width, width, stride=stride, downsample=down))

    if cifar_stem:
        stem = [nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True)]
    else:
        stem = [nn.Conv2d(3, 32, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, stride=2, padding=1)]
    model = nn.Sequential(*stem, stage(32, 32, 1), stage(32, 64, 2), stage(64, 128, 2), stage(128, 256, 2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    return model
