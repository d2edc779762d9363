"""Multi-crop augmentation in batch on the device (CUDA or CPU), from decoded uint8 canvases.

Each image is decoded once by the loader; this module cuts every view from that canvas:
per crop group (count, output size, scale range, ratio range) a random-resized crop with a box per
sample (``torchvision.ops.roi_align``: bilinear, averaging over the box so large boxes shrink
without aliasing), horizontal flip, colour jitter, grayscale, Gaussian blur, solarization and
normalization. Probabilities can differ per view inside a group (DINO blurs its first global view
always, its second rarely, and solarizes only the second).

Randomness comes from one ``torch.Generator`` on the device, so a seeded module on the same device
makes the same views from the same canvases. Colour-jitter order is drawn once per group and call
by default (``jitter_order="batch"``, as Kornia does); ``jitter_order="image"`` draws it per image, as
torchvision's ColorJitter does, at four times the jitter's cost (each position of the order runs all
four operations, neutral for the images that did not draw it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from trainers.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per data set channel statistics (of the training split), used to normalize.
NORMALIZATION = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "fashion-mnist": ((0.2860, 0.2860, 0.2860), (0.3530, 0.3530, 0.3530)),
    "digits": ((0.3050, 0.3050, 0.3050), (0.3870, 0.3870, 0.3870)),
}
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and torchvision


def normalization_for(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return NORMALIZATION.get(dataset, (IMAGENET_MEAN, IMAGENET_STD))


@dataclass(frozen=True)
class CropGroup:
    """Views of one output size. Probabilities given as a tuple hold one value per view."""

    count: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float | tuple[float, ...] = 0.8
    grayscale_p: float | tuple[float, ...] = 0.2
    blur_p: float | tuple[float, ...] = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float | tuple[float, ...] = 0.0
    solarize_threshold: float = 0.5  # on [0, 1] values: 128/255 in uint8 terms, inclusive
    jitter_order: str = "batch"  # batch: one random order of the four jitter operations per call; image: per image

    def per_view(self, name: str) -> tuple[float, ...]:
        value = getattr(self, name)
        values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * self.count
        if len(values) != self.count:
            raise ConfigError(f"{name} has {len(values)} values for a group of {self.count} views: "
                              f"give one value or exactly {self.count}")
        return tuple(float(v) for v in values)

    def validate(self) -> "CropGroup":
        where = f"crop group {self.count}x{self.size}"
        if not isinstance(self.count, int) or self.count < 0:
            raise ConfigError(f"{where}: count must be a whole number >= 0")
        if not isinstance(self.size, int) or self.size <= 0:
            raise ConfigError(f"{where}: output size must be a positive number of pixels, got {self.size}")
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise ConfigError(f"{where}: crop scale {tuple(self.scale)} must satisfy 0 < min <= max <= 1 "
                              "(fractions of the image area)")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi):
            raise ConfigError(f"{where}: aspect ratio range {tuple(self.ratio)} must satisfy 0 < min <= max")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            values = self.per_view(name) if name != "flip_p" else (self.flip_p,)
            if any(not (0.0 <= v <= 1.0) for v in values):
                raise ConfigError(f"{where}: probability {name}={getattr(self, name)} must lie in [0, 1]")
        if any(j < 0 for j in self.jitter) or self.jitter[3] > 0.5:
            raise ConfigError(f"{where}: jitter {self.jitter} needs strengths >= 0 and hue <= 0.5")
        if self.jitter_order not in JITTER_ORDERS:
            raise ConfigError(f"{where}: jitter_order {self.jitter_order!r} must be one of {', '.join(JITTER_ORDERS)} "
                              "(one random order per call, or one per image as torchvision)")
        slo, shi = self.blur_sigma
        if not (0 < slo <= shi):
            raise ConfigError(f"{where}: blur sigma range {self.blur_sigma} must satisfy 0 < min <= max")
        return self


# --------------------------------------------------------------------------- crop specs and presets
_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(-?\d+)\s*$")


MIN_CROP, MAX_CROP, MAX_VIEWS = 2, 2048, 64  # beyond these a spec is a typo, not a recipe (and can exhaust memory)


def parse_crop_spec(spec: str) -> list[tuple[int, int]]:
    """``"2x32+6x16"`` -> ``[(2, 32), (6, 16)]``: the first group is the global crops."""
    groups = []
    for part in str(spec).split("+"):
        match = _SPEC.match(part)
        if not match:
            raise ConfigError(f"cannot read crop spec '{spec}': write COUNTxSIZE groups joined by '+', "
                              "e.g. 2x224+6x96")
        count, size = int(match.group(1)), int(match.group(2))
        if not MIN_CROP <= size <= MAX_CROP:
            raise ConfigError(f"crop spec '{spec}': size {size} must be a positive number of pixels in "
                              f"{MIN_CROP}..{MAX_CROP} (the blur pads by reflection, which needs 2 pixels)")
        groups.append((count, size))
    if sum(c for c, _ in groups) > MAX_VIEWS:
        raise ConfigError(f"crop spec '{spec}' asks for {sum(c for c, _ in groups)} views per image, more than "
                          f"{MAX_VIEWS}: multi-crop recipes use 2 global + up to 10 local crops")
    if sum(c for c, _ in groups) == 0:
        raise ConfigError(f"crop spec '{spec}' asks for 0 crops: ask for at least one view, e.g. 2x32")
    if groups[0][0] == 0:
        raise ConfigError(f"crop spec '{spec}' has 0 global crops: the first group needs at least one view")
    return groups


def crop_spec_string(groups: Sequence[CropGroup]) -> str:
    return "+".join(f"{g.count}x{g.size}" for g in groups)


# Defaults from the papers / reference code. Sizes are filled in from the crop spec.
_SWAV_COLOR = dict(jitter=(0.8, 0.8, 0.8, 0.2), jitter_p=0.8, grayscale_p=0.2)
_DINO_COLOR = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)
_SUPCON_COLOR = dict(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2)
METHOD_PRESETS = {
    # SwAV (Caron et al. 2020): blur p 0.5 on every crop, no solarization.
    "swav": dict(global_=dict(scale=(0.14, 1.0), blur_p=0.5, **_SWAV_COLOR),
                 local=dict(scale=(0.05, 0.14), blur_p=0.5, **_SWAV_COLOR)),
    # DINO (Caron et al. 2021): BYOL-style asymmetric globals; locals blur 0.5.
    "dino": dict(global_=dict(scale=(0.4, 1.0), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2), **_DINO_COLOR),
                 local=dict(scale=(0.05, 0.4), blur_p=0.5, **_DINO_COLOR)),
    # SDMP (Ren et al. 2022) trains on top of DINO-style views.
    "sdmp": dict(global_=dict(scale=(0.4, 1.0), blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2), **_DINO_COLOR),
                 local=dict(scale=(0.05, 0.4), blur_p=0.5, **_DINO_COLOR)),
    # SupCon / SimCLR CIFAR recipe (Khosla et al. 2020): RRC (0.2, 1), jitter p 0.8, gray 0.2, no blur.
    "supcon": dict(global_=dict(scale=(0.2, 1.0), **_SUPCON_COLOR),
                   local=dict(scale=(0.05, 0.2), **_SUPCON_COLOR)),
}
METHOD_PRESETS["simclr"] = METHOD_PRESETS["supcon"]


AUGMENT_KEYS = ("scale", "ratio", "flip_p", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma", "solarize_p",
                "solarize_threshold", "jitter_order")
JITTER_ORDERS = ("batch", "image")
_PAIRS = {"scale": 2, "ratio": 2, "blur_sigma": 2, "jitter": 4}
_PER_VIEW = ("jitter_p", "grayscale_p", "blur_p", "solarize_p")


def check_augment_settings(settings: dict | None, where: str) -> dict:
    """A ``data.global_augment`` / ``data.local_augment`` mapping checked and normalised (tuples)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise ConfigError(f"{where} must be a mapping of augmentation settings, e.g. {{jitter: [0.4, 0.4, 0.4, 0.1]}}")
    out = {}
    for key, value in settings.items():
        if key not in AUGMENT_KEYS:
            import difflib

            close = difflib.get_close_matches(str(key), AUGMENT_KEYS, n=1, cutoff=0.5)
            raise ConfigError(f"unknown augmentation setting '{where}.{key}': "
                              f"{f'did you mean {close[0]!r}? ' if close else ''}use {', '.join(AUGMENT_KEYS)}")
        number = (int, float)
        if key in _PAIRS:
            if (not isinstance(value, (list, tuple)) or len(value) != _PAIRS[key]
                    or not all(isinstance(v, number) and not isinstance(v, bool) for v in value)):
                raise ConfigError(f"{where}.{key} = {value!r} must be a list of {_PAIRS[key]} numbers")
            value = tuple(float(v) for v in value)
        elif key == "jitter_order":
            if value not in JITTER_ORDERS:
                raise ConfigError(f"{where}.jitter_order = {value!r} must be one of {', '.join(JITTER_ORDERS)}")
        elif key in _PER_VIEW and isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, number) and not isinstance(v, bool) for v in value):
                raise ConfigError(f"{where}.{key} = {value!r} must be a probability or a list of them (one per view)")
            value = tuple(float(v) for v in value)
        else:
            if not isinstance(value, number) or isinstance(value, bool) or value != value:
                raise ConfigError(f"{where}.{key} = {value!r} must be a number")
            value = float(value)
        out[key] = value
    return out


def method_crop_groups(method: str, spec: str, global_augment: dict | None = None, local_augment: dict | None = None,
                       **overrides) -> list[CropGroup]:
    """Crop groups for ``method`` with the paper's defaults, sizes from ``spec`` ("2x32+6x16").

    ``global_augment`` / ``local_augment``: CropGroup settings over the preset for the first group /
    every other group (``data.global_augment``, ``data.local_augment``); ``overrides`` may hold
    ``global_scale``/``local_scale`` or any CropGroup field (applied to all groups).
    """
    if method not in METHOD_PRESETS:
        raise ConfigError(f"unknown method '{method}' for crop defaults: use one of {', '.join(METHOD_PRESETS)}")
    preset = METHOD_PRESETS[method]
    global_scale = overrides.pop("global_scale", None)
    local_scale = overrides.pop("local_scale", None)
    own = (check_augment_settings(global_augment, "data.global_augment"),
           check_augment_settings(local_augment, "data.local_augment"))
    groups = []
    for index, (count, size) in enumerate(parse_crop_spec(spec)):
        kwargs = dict(preset["global_" if index == 0 else "local"])
        mine = own[0 if index == 0 else 1]
        for name, value in mine.items():
            # a per-view list the user wrote must have one value, or one per view of this group
            if isinstance(value, tuple) and name in _PER_VIEW and len(value) not in (1, count):
                where = "data.global_augment" if index == 0 else "data.local_augment"
                raise ConfigError(f"{where}.{name} lists {len(value)} probabilities for the {count} views of crop "
                                  f"group {count}x{size}: give one value for all views or exactly {count}")
        kwargs.update(mine)
        for name, value in list(kwargs.items()):
            # per-view tuples sized for 2 globals: repeat the last value for extra views, cut for fewer
            if isinstance(value, tuple) and name.endswith("_p"):
                kwargs[name] = tuple(value[min(i, len(value) - 1)] for i in range(count))
        scale = global_scale if index == 0 else local_scale
        if scale is not None:
            kwargs["scale"] = tuple(scale)
        kwargs.update(overrides)
        where = "data.global_augment" if index == 0 else "data.local_augment"
        try:
            groups.append(CropGroup(count=count, size=size, **kwargs).validate())
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") if own[0 if index == 0 else 1] else exc
    return groups


# --------------------------------------------------------------------------- random geometry
BOX_ATTEMPTS = 10


def central_crop_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[float, float]:
    """(w, h) of the fallback crop: the whole image with its aspect ratio clamped into ``ratio``."""
    in_ratio = width / height
    if in_ratio < ratio[0]:
        return float(width), width / ratio[0]
    if in_ratio > ratio[1]:
        return height * ratio[1], float(height)
    return float(width), float(height)


def crop_boxes(area: torch.Tensor, log_aspect: torch.Tensor, position: torch.Tensor, limits: torch.Tensor,
               fallback: torch.Tensor) -> torch.Tensor:
    """Random-resized-crop boxes [n, 4] as (x0, y0, x1, y1) from already drawn values.

    ``area`` [n, attempts] in pixels and ``log_aspect`` [n, attempts] are the candidate draws (the
    first candidate that fits wins, as torchvision tries up to 10 times), ``position`` [n, 2] in [0, 1)
    places the box inside ``limits`` (width, height). No candidate fits: the ``fallback`` (w, h) box,
    centred. Every step works on the whole batch: a fixed number of kernels, however many boxes.
    """
    aspect = log_aspect.exp()
    w = (area * aspect).sqrt()
    size = torch.stack([w, w / aspect], dim=-1)  # [n, attempts, (w, h)]
    fits = (size <= limits).all(dim=-1)
    first = fits.to(torch.uint8).argmax(dim=1)  # first fitting attempt (0 if none)
    any_fit = fits.any(dim=1, keepdim=True)
    chosen = size.gather(1, first.view(-1, 1, 1).expand(-1, 1, 2)).squeeze(1)
    chosen = torch.where(any_fit, chosen, fallback)
    free = limits - chosen
    corner = torch.where(any_fit, position * free, free * 0.5)
    return torch.cat([corner, corner + chosen], dim=1)


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator, device, attempts: int = BOX_ATTEMPTS) -> torch.Tensor:
    """Random-resized-crop boxes [n, 4] as (x0, y0, x1, y1) in pixels, continuous coordinates.

    As torchvision: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of
    ``attempts`` draws that fits wins, else a central crop with the ratio clamped into range.
    """
    area = float(height * width)
    u = torch.rand((n, 2 * attempts + 2), generator=generator, device=device)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    return crop_boxes(area * (scale[0] + (scale[1] - scale[0]) * u[:, :attempts]),
                      log_lo + (log_hi - log_lo) * u[:, attempts:2 * attempts], u[:, 2 * attempts:],
                      torch.tensor([float(width), float(height)], device=device),
                      torch.tensor(central_crop_size(height, width, ratio), device=device))


# --------------------------------------------------------------------------- colour operations
# Each operation is a handful of whole-batch kernels: at 32 px the GPU finishes a kernel faster than
# the host can launch the next, so the count of kernels (not their size) sets the augmentation's cost.
def _gray(images: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    if weights is None:
        weights = torch.tensor(GRAY_WEIGHTS, device=images.device, dtype=images.dtype)
    return (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) in HSV space, per sample (torchvision's adjust_hue)."""
    maxc, channel = images.max(dim=1)  # ties go to the first channel: red, then green, as torchvision
    delta = maxc - images.amin(dim=1)
    # hue in sixths of a turn: (g - b) / delta, 2 + (b - r) / delta or 4 + (r - g) / delta
    differences = images.roll(-1, dims=1) - images.roll(-2, dims=1)  # (g - b, b - r, r - g)
    sixths = differences.gather(1, channel.unsqueeze(1)).squeeze(1) / delta.clamp_min(1e-12)
    sixths = torch.add(sixths, channel, alpha=2.0) + (6.0 * shift).view(-1, 1, 1)
    # HSV -> RGB: channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6,
    # and v*s is delta (s = delta / v)
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + sixths.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), delta.unsqueeze(1), ramp, value=-1.0)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample; sigma 0 leaves a sample untouched.

    The kernel reaches 3 * ``max_sigma`` (capped by the image size, as reflect padding needs).
    """
    n, c, h, w = images.shape
    radius = max(1, min(math.ceil(3.0 * max_sigma), h - 1, w - 1))
    squared_taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype).square_()
    # sigma 0 -> 1e-3: exp(-0.5 / 1e-6) is exactly 0 in float32, so the kernel is exactly (0, .., 1, .., 0)
    coefficient = -0.5 / sigma.to(images.dtype).clamp_min(1e-3).square()
    kernel = torch.exp(coefficient.view(-1, 1) * squared_taps)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = kernel.view(n, 1, -1).expand(n, c, -1).reshape(n * c, 1, 1, -1)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel, groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=n * c)
    return flat.view(n, c, h, w)


# --------------------------------------------------------------------------- pixel operations
# The per-pixel steps of ``MultiCropAugment``, each a function of whole-batch tensors so that
# ``compile_ops=True`` can hand every one to torch.compile (one fused kernel each, instead of one kernel
# per arithmetic step and one memory pass per kernel). Factors are [n, 1, 1, 1]; masks [n].
def _flip_where(out: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return torch.where(flips.view(-1, 1, 1, 1), out.flip(3), out)


def _brightness(out: torch.Tensor, factor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (out * factor).clamp(0.0, 1.0)  # scale towards black


def _contrast(out: torch.Tensor, factor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    mean_gray = (out.mean(dim=(2, 3)) * weights).sum(dim=1).view(-1, 1, 1, 1)  # blend with the mean gray level
    return torch.lerp(mean_gray.expand_as(out), out, factor).clamp(0.0, 1.0)


def _saturation(out: torch.Tensor, factor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.lerp(_gray(out, weights).expand_as(out), out, factor).clamp(0.0, 1.0)  # blend with gray


def _hue(out: torch.Tensor, factor: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # samples without jitter (shift 0) keep their exact values: no HSV round trip
    return torch.where(factor != 0, _shift_hue(out, factor.reshape(-1)), out)


def _grayscale_where(out: torch.Tensor, gray_on: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.where(gray_on.view(-1, 1, 1, 1), _gray(out, weights).expand_as(out), out)


def _finish(out: torch.Tensor, solarize_on: torch.Tensor | None, threshold: float, scale: torch.Tensor,
            bias: torch.Tensor, dtype: torch.dtype, channels_last: bool) -> torch.Tensor:
    """Solarize (where drawn), normalize as one multiply-add, cast and lay out."""
    if solarize_on is not None:
        out = torch.where(solarize_on.view(-1, 1, 1, 1) & (out >= threshold), 1.0 - out, out)
    out = torch.addcmul(bias, out, scale)
    return out.to(dtype=dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


PIXEL_OPS = {"flip": _flip_where, "jitter": (_brightness, _contrast, _saturation, _hue),
             "grayscale": _grayscale_where, "finish": _finish}


# --------------------------------------------------------------------------- the module
@dataclass
class AugmentRecord:
    """What the last call drew (for tests and previews): per group, boxes and per-view decisions."""

    boxes: list[torch.Tensor] = field(default_factory=list)
    flips: list[torch.Tensor] = field(default_factory=list)
    grayscale: list[torch.Tensor] = field(default_factory=list)
    solarize: list[torch.Tensor] = field(default_factory=list)
    blur_sigma: list[torch.Tensor] = field(default_factory=list)
    # [n, 4] brightness, contrast, saturation factors and hue shift (1, 1, 1, 0 where jitter was off)
    jitter: list[torch.Tensor] = field(default_factory=list)
    # [n, 4] the jitter operations (0 brightness .. 3 hue) in the order they were applied, per view
    jitter_order: list[torch.Tensor] = field(default_factory=list)


class MultiCropAugment(torch.nn.Module):
    """uint8 canvases [B, H, W, 3] (or [B, 3, H, W]) -> a list of normalized views [B, 3, s, s].

    With ``stack_groups=True`` the result is one tensor [count, B, 3, s, s] per crop group instead.
    """

    def __init__(self, groups: Sequence[CropGroup], mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, stack_groups: bool = False,
                 record: bool = False, compile_ops: bool = False):
        super().__init__()
        groups = [g.validate() for g in groups]
        if not groups or sum(g.count for g in groups) == 0:
            raise ConfigError("no crops requested: give at least one crop group with count >= 1")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"normalization needs 3 means and 3 positive stds, got mean={mean} std={std}")
        self.groups = list(groups)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        # (x - mean) / std as one multiply-add: x * (1 / std) + (-mean / std)
        self.register_buffer("norm_scale", 1.0 / self.std, persistent=False)
        self.register_buffer("norm_bias", -self.mean / self.std, persistent=False)
        self.register_buffer("gray_weights", torch.tensor(GRAY_WEIGHTS, dtype=torch.float32), persistent=False)
        self._constants: dict = {}  # per (group, batch, device): tensors the hot path would otherwise rebuild
        # compile_ops: every pixel operation through torch.compile (fused kernels; compiled on first use,
        # once per crop size). The random draws, boxes, roi_align and blur stay eager.
        self.compile_ops = compile_ops
        if compile_ops:
            def fused(fn):
                return torch.compile(fn, dynamic=False, fullgraph=True)

            self._ops = {"flip": fused(_flip_where), "jitter": tuple(fused(f) for f in PIXEL_OPS["jitter"]),
                         "grayscale": fused(_grayscale_where), "finish": fused(_finish)}
        else:
            self._ops = PIXEL_OPS
        self.seed = seed
        self.dtype = dtype
        self.channels_last = channels_last
        self.stack_groups = stack_groups
        self.record = AugmentRecord() if record else None
        self._generator: torch.Generator | None = None
        self._order_generator: torch.Generator | None = None

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            generator = torch.Generator(device=device)
            seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
            generator.manual_seed(seed)
            self._generator = generator
            self._order_generator = torch.Generator().manual_seed(seed)
        return self._generator

    def rng_state(self, device) -> dict:
        """Generator states (CPU byte tensors) for exact resumption from a checkpoint."""
        self.generator(torch.device(device))
        return {"views": self._generator.get_state(), "order": self._order_generator.get_state()}

    def load_rng_state(self, state: dict, device) -> None:
        self.generator(torch.device(device))
        self._generator.set_state(state["views"])
        self._order_generator.set_state(state["order"])

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self._generator = None

    @staticmethod
    def to_float_nchw(images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4:
            raise ConfigError(f"expected a batch of images [B, H, W, 3] or [B, 3, H, W], got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        elif images.shape[1] != 3:
            raise ConfigError(f"expected 3 colour channels, got shape {tuple(images.shape)}")
        # one copy into a contiguous float32 NCHW canvas (roi_align reads NCHW)
        canvas = images.to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return canvas.div_(255.0) if images.dtype == torch.uint8 else canvas

    @torch.no_grad()
    def forward(self, images: torch.Tensor, rows: tuple[int, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The views of ``images``. ``rows`` (total, index): these images are the rows ``index`` of a batch of
        ``total`` (one rank's share of a data-parallel global batch): the random numbers are drawn for all
        ``total`` rows and this batch takes its own, so every image gets the crops it would get in the global
        batch on one process (ranks seeded alike stay in step: each draws the same amounts)."""
        canvas = self.to_float_nchw(images)
        if rows is not None:
            total, index = rows
            if len(index) != len(canvas) or (len(index) and int(index.max()) >= total):
                raise ValueError(f"rows: {len(index)} indices below {total} for a batch of {len(canvas)}")
            rows = (int(total), index.to(canvas.device))
        batch, _, height, width = canvas.shape
        device = canvas.device
        generator = self.generator(device)
        if self.record is not None:
            self.record = AugmentRecord()
        outputs = []
        for index, group in enumerate(self.groups):
            if group.count == 0:
                continue
            views = self._group(canvas, index, group, batch, height, width, generator, rows)
            views = views.view(group.count, batch, 3, group.size, group.size)
            outputs.append(views)
        if self.stack_groups:
            return outputs
        return [view for group_views in outputs for view in group_views.unbind(0)]

    # Columns of the one uniform draw per group and call (view-major rows: index = view * B + sample).
    _AREA = slice(0, BOX_ATTEMPTS)
    _ASPECT = slice(BOX_ATTEMPTS, 2 * BOX_ATTEMPTS)
    _POSITION = slice(2 * BOX_ATTEMPTS, 2 * BOX_ATTEMPTS + 2)
    _DECISIONS = slice(2 * BOX_ATTEMPTS + 2, 2 * BOX_ATTEMPTS + 7)  # flip, jitter, grayscale, blur, solarize
    _JITTER = slice(2 * BOX_ATTEMPTS + 7, 2 * BOX_ATTEMPTS + 11)  # brightness, contrast, saturation, hue
    _SIGMA = 2 * BOX_ATTEMPTS + 11
    _COLUMNS = 2 * BOX_ATTEMPTS + 12

    def _group_constants(self, index: int, group: CropGroup, batch: int, height: int, width: int, device) -> dict:
        """Per-group tensors built once per (batch size, canvas size, device) instead of every call."""
        key = (index, batch, height, width, device)
        if key not in self._constants:
            area = float(height * width)
            log_lo, log_hi = math.log(group.ratio[0]), math.log(group.ratio[1])
            offset = [0.0] * self._COLUMNS
            scale = [1.0] * self._COLUMNS
            for column in range(BOX_ATTEMPTS):
                offset[column], scale[column] = area * group.scale[0], area * (group.scale[1] - group.scale[0])
                offset[BOX_ATTEMPTS + column], scale[BOX_ATTEMPTS + column] = log_lo, log_hi - log_lo
            for column, strength in enumerate(group.jitter):
                lo, hi = (max(0.0, 1.0 - strength), 1.0 + strength) if column < 3 else (-strength, strength)
                offset[self._JITTER.start + column], scale[self._JITTER.start + column] = lo, hi - lo
            offset[self._SIGMA], scale[self._SIGMA] = group.blur_sigma[0], group.blur_sigma[1] - group.blur_sigma[0]
            # decision thresholds: one probability per view, repeated over the batch
            per_view = [[group.flip_p] * group.count] + [list(group.per_view(name)) for name in
                                                         ("jitter_p", "grayscale_p", "blur_p", "solarize_p")]
            thresholds = torch.tensor(per_view, dtype=torch.float32).t().repeat_interleave(batch, dim=0)
            n = group.count * batch
            self._constants[key] = dict(
                offset=torch.tensor(offset, device=device), scale=torch.tensor(scale, device=device),
                thresholds=thresholds.to(device),
                neutral_jitter=torch.tensor([1.0, 1.0, 1.0, 0.0], device=device),
                limits=torch.tensor([float(width), float(height)], device=device),
                fallback=torch.tensor(central_crop_size(height, width, group.ratio), device=device),
                sample_index=torch.arange(batch, dtype=torch.float32).repeat(group.count).view(n, 1).to(device),
                jitter=any(st > 0 for st in group.jitter) and max(group.per_view("jitter_p")) > 0,
                blur=max(group.per_view("blur_p")) > 0, solarize=max(group.per_view("solarize_p")) > 0,
                grayscale=max(group.per_view("grayscale_p")) > 0, flip=group.flip_p > 0)
        return self._constants[key]

    def _group(self, canvas, index: int, group: CropGroup, batch, height, width, generator, rows=None) -> torch.Tensor:
        n = group.count * batch
        device = canvas.device
        const = self._group_constants(index, group, batch, height, width, device)
        # one draw for every random number of the group: box candidates, decisions, strengths
        if rows is None:
            uniform = torch.rand((n, self._COLUMNS), generator=generator, device=device)
        else:  # drawn for the global batch; this batch's rows of each view (view-major: view * total + row)
            total, own = rows
            mine = (torch.arange(group.count, device=device).view(-1, 1) * total + own.view(1, -1)).view(-1)
            uniform = torch.rand((group.count * total, self._COLUMNS), generator=generator, device=device)[mine]
        values = torch.addcmul(const["offset"], uniform, const["scale"])
        decisions = uniform[:, self._DECISIONS] < const["thresholds"]
        flips, jitter_on, gray_on, blur_on, solarize_on = decisions.unbind(1)

        boxes = crop_boxes(values[:, self._AREA], values[:, self._ASPECT], values[:, self._POSITION], const["limits"],
                           const["fallback"])
        rois = torch.cat([const["sample_index"], boxes], dim=1)
        out = roi_align(canvas, rois, output_size=(group.size, group.size), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        ops = self._ops
        if const["flip"]:
            out = ops["flip"](out, flips)

        factors = None
        if const["jitter"]:
            factors = torch.where(jitter_on.unsqueeze(1), values[:, self._JITTER], const["neutral_jitter"])
            # the order is drawn on the host generator: no device sync in the hot path
            if group.jitter_order == "batch":
                order = torch.randperm(4, generator=self._order_generator)
                for op in order.tolist():  # brightness, contrast, saturation, hue
                    if group.jitter[op] != 0:
                        out = ops["jitter"][op](out, factors[:, op].reshape(-1, 1, 1, 1), self.gray_weights)
                order = order.expand(n, 4)
            else:
                if rows is None:
                    order = torch.rand((n, 4), generator=self._order_generator).argsort(dim=1)
                else:
                    order = torch.rand((group.count * rows[0], 4), generator=self._order_generator).argsort(dim=1)
                    order = order[mine.cpu()]
                chosen = order.to(device, non_blocking=True)
                for position in range(4):
                    for op in range(4):
                        if group.jitter[op] != 0:  # neutral factor (exact identity) where another op is due
                            factor = torch.where(chosen[:, position] == op, factors[:, op], const["neutral_jitter"][op])
                            out = ops["jitter"][op](out, factor.reshape(-1, 1, 1, 1), self.gray_weights)
            if self.record is not None:
                self.record.jitter_order.append(order)

        if const["grayscale"]:
            out = ops["grayscale"](out, gray_on, self.gray_weights)

        sigma = torch.where(blur_on, values[:, self._SIGMA], 0.0)
        if const["blur"]:
            out = _gaussian_blur(out, sigma, group.blur_sigma[1])

        if self.record is not None:
            self.record.boxes.append(boxes)
            self.record.flips.append(flips)
            self.record.grayscale.append(gray_on)
            self.record.solarize.append(solarize_on)
            self.record.blur_sigma.append(sigma)
            self.record.jitter.append(factors if factors is not None else const["neutral_jitter"].expand(n, 4))
        return ops["finish"](out, solarize_on if const["solarize"] else None, group.solarize_threshold,
                             self.norm_scale, self.norm_bias, self.dtype, self.channels_last)

    def extra_repr(self) -> str:
        return (f"crops={crop_spec_string(self.groups)}, seed={self.seed}, dtype={self.dtype}"
                + (", compiled pixel ops" if self.compile_ops else ""))

