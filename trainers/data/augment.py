"""Multi-crop augmentation in batch on the device (CUDA or CPU), from decoded uint8 canvases.

Each image is decoded once by the loader; this module cuts every view from that canvas:
per crop group (count, output size, scale range, ratio range) a random-resized crop with a box per
sample (``torchvision.ops.roi_align``: bilinear, averaging over the box so large boxes shrink
without aliasing), horizontal flip, colour jitter, grayscale, Gaussian blur, solarization and
normalization. Probabilities can differ per view inside a group (DINO blurs its first global view
always, its second rarely, and solarizes only the second).

Randomness comes from one ``torch.Generator`` on the device, so a seeded module on the same device
makes the same views from the same canvases. Colour-jitter order is drawn once per group and call
(as Kornia does) rather than once per image: per-image orders would cost a pass per permutation.
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
        slo, shi = self.blur_sigma
        if not (0 < slo <= shi):
            raise ConfigError(f"{where}: blur sigma range {self.blur_sigma} must satisfy 0 < min <= max")
        return self


# --------------------------------------------------------------------------- crop specs and presets
_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(-?\d+)\s*$")


def parse_crop_spec(spec: str) -> list[tuple[int, int]]:
    """``"2x32+6x16"`` -> ``[(2, 32), (6, 16)]``: the first group is the global crops."""
    groups = []
    for part in str(spec).split("+"):
        match = _SPEC.match(part)
        if not match:
            raise ConfigError(f"cannot read crop spec '{spec}': write COUNTxSIZE groups joined by '+', "
                              "e.g. 2x224+6x96")
        count, size = int(match.group(1)), int(match.group(2))
        if size <= 0:
            raise ConfigError(f"crop spec '{spec}': size {size} must be a positive number of pixels")
        groups.append((count, size))
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


def method_crop_groups(method: str, spec: str, **overrides) -> list[CropGroup]:
    """Crop groups for ``method`` with the paper's defaults, sizes from ``spec`` ("2x32+6x16").

    ``overrides`` may hold ``global_scale``/``local_scale`` or any CropGroup field (applied to all groups).
    """
    if method not in METHOD_PRESETS:
        raise ConfigError(f"unknown method '{method}' for crop defaults: use one of {', '.join(METHOD_PRESETS)}")
    preset = METHOD_PRESETS[method]
    global_scale = overrides.pop("global_scale", None)
    local_scale = overrides.pop("local_scale", None)
    groups = []
    for index, (count, size) in enumerate(parse_crop_spec(spec)):
        kwargs = dict(preset["global_" if index == 0 else "local"])
        for name, value in list(kwargs.items()):
            # per-view tuples sized for 2 globals: repeat the last value for extra views, cut for fewer
            if isinstance(value, tuple) and name.endswith("_p"):
                kwargs[name] = tuple(value[min(i, len(value) - 1)] for i in range(count))
        scale = global_scale if index == 0 else local_scale
        if scale is not None:
            kwargs["scale"] = tuple(scale)
        kwargs.update(overrides)
        groups.append(CropGroup(count=count, size=size, **kwargs).validate())
    return groups


# --------------------------------------------------------------------------- random geometry
def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator, device, attempts: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes [n, 4] as (x0, y0, x1, y1) in pixels, continuous coordinates.

    As torchvision: area fraction ~ U(scale), log aspect ratio ~ U(log ratio); the first of
    ``attempts`` draws that fits wins, else a central crop with the ratio clamped into range.
    """
    area = float(height * width)
    shape = (n, attempts)
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(shape, generator=generator, device=device))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(shape, generator=generator, device=device))
    w = torch.sqrt(target * aspect)
    h = torch.sqrt(target / aspect)
    fits = (w <= width) & (h <= height)
    first = torch.argmax(fits.to(torch.uint8), dim=1, keepdim=True)  # first fitting attempt (0 if none)
    any_fit = fits.any(dim=1)
    w = torch.gather(w, 1, first).squeeze(1)
    h = torch.gather(h, 1, first).squeeze(1)
    # fallback: central crop of the whole image with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fw, fh = height * ratio[1], float(height)
    else:
        fw, fh = float(width), float(height)
    w = torch.where(any_fit, w, torch.full_like(w, fw))
    h = torch.where(any_fit, h, torch.full_like(h, fh))
    u = torch.rand((n, 2), generator=generator, device=device)
    x0 = torch.where(any_fit, u[:, 0] * (width - w), (width - w) / 2)
    y0 = torch.where(any_fit, u[:, 1] * (height - h), (height - h) / 2)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


# --------------------------------------------------------------------------- colour operations
def _gray(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # factor * image + (1 - factor) * other, clamped: brightness, contrast and saturation alike
    factor = factor.view(-1, 1, 1, 1)
    return (other + factor * (images - other)).clamp_(0.0, 1.0)


def _shift_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn) in HSV space, per sample."""
    maxc, _ = images.max(dim=1)
    minc, _ = images.min(dim=1)
    delta = maxc - minc
    r, g, b = images.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    hue = torch.where(maxc == r, (g - b) / safe,
                      torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB: channel n in (5, 3, 1) is v - v*s*clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    offsets = torch.tensor([5.0, 3.0, 1.0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    value = maxc.unsqueeze(1)
    return value - value * sat.unsqueeze(1) * ramp


def _uniform(n: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample; sigma 0 leaves a sample untouched.

    The kernel reaches 3 * ``max_sigma`` (capped by the image size, as reflect padding needs).
    """
    n, c, h, w = images.shape
    radius = max(1, min(math.ceil(3.0 * max_sigma), h - 1, w - 1))
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    safe_sigma = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(images.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / safe_sigma.view(-1, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    delta = (taps == 0).to(images.dtype).expand_as(kernel)
    kernel = torch.where((sigma > 0).view(-1, 1), kernel, delta)
    kernel = kernel.repeat_interleave(c, dim=0)  # [n*c, taps]
    flat = images.reshape(1, n * c, h, w)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return flat.view(n, c, h, w)


# --------------------------------------------------------------------------- the module
@dataclass
class AugmentRecord:
    """What the last call drew (for tests and previews): per group, boxes and per-view decisions."""

    boxes: list[torch.Tensor] = field(default_factory=list)
    flips: list[torch.Tensor] = field(default_factory=list)
    grayscale: list[torch.Tensor] = field(default_factory=list)
    solarize: list[torch.Tensor] = field(default_factory=list)
    blur_sigma: list[torch.Tensor] = field(default_factory=list)


class MultiCropAugment(torch.nn.Module):
    """uint8 canvases [B, H, W, 3] (or [B, 3, H, W]) -> a list of normalized views [B, 3, s, s].

    With ``stack_groups=True`` the result is one tensor [count, B, 3, s, s] per crop group instead.
    """

    def __init__(self, groups: Sequence[CropGroup], mean=IMAGENET_MEAN, std=IMAGENET_STD, seed: int | None = None,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, stack_groups: bool = False,
                 record: bool = False):
        super().__init__()
        groups = [g.validate() for g in groups]
        if not groups or sum(g.count for g in groups) == 0:
            raise ConfigError("no crops requested: give at least one crop group with count >= 1")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ConfigError(f"normalization needs 3 means and 3 positive stds, got mean={mean} std={std}")
        self.groups = list(groups)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
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
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        return images.float()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        canvas = self.to_float_nchw(images).contiguous()
        batch, _, height, width = canvas.shape
        device = canvas.device
        generator = self.generator(device)
        if self.record is not None:
            self.record = AugmentRecord()
        outputs = []
        for group in self.groups:
            if group.count == 0:
                continue
            views = self._group(canvas, group, batch, height, width, generator)
            views = views.view(group.count, batch, 3, group.size, group.size)
            outputs.append(views)
        if self.stack_groups:
            return outputs
        return [view for group_views in outputs for view in group_views.unbind(0)]

    def _group(self, canvas, group: CropGroup, batch, height, width, generator) -> torch.Tensor:
        n = group.count * batch
        device = canvas.device

        def view_probability(name: str) -> torch.Tensor:
            values = torch.tensor(group.per_view(name), device=device)
            return values.repeat_interleave(batch)  # views are view-major: index = view * B + sample

        def draw(probability: torch.Tensor) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=device) < probability

        boxes = sample_crop_boxes(n, height, width, group.scale, group.ratio, generator, device)
        sample_index = torch.arange(batch, device=device, dtype=boxes.dtype).repeat(group.count)
        rois = torch.cat([sample_index.unsqueeze(1), boxes], dim=1)
        out = roi_align(canvas, rois, output_size=(group.size, group.size), spatial_scale=1.0,
                        sampling_ratio=-1, aligned=True)
        flips = torch.rand(n, generator=generator, device=device) < group.flip_p
        out = torch.where(flips.view(-1, 1, 1, 1), out.flip(3), out)

        jitter_on = draw(view_probability("jitter_p"))
        strengths = group.jitter
        if any(s > 0 for s in strengths) and max(group.per_view("jitter_p")) > 0:
            # the order is drawn on the host generator: no device sync in the hot path
            order = torch.randperm(4, generator=self._order_generator).tolist()
            factors = []
            for op, strength in enumerate(strengths):
                if op < 3:
                    value = _uniform(n, max(0.0, 1.0 - strength), 1.0 + strength, generator, device)
                    factors.append(torch.where(jitter_on, value, torch.ones_like(value)))
                else:
                    value = _uniform(n, -strength, strength, generator, device)
                    factors.append(torch.where(jitter_on, value, torch.zeros_like(value)))
            for op in order:
                if strengths[op] == 0:
                    continue
                if op == 0:  # brightness: blend with black
                    out = _blend(out, torch.zeros_like(out[:, :1]), factors[0])
                elif op == 1:  # contrast: blend with the mean gray level of each image
                    out = _blend(out, _gray(out).mean(dim=(2, 3), keepdim=True), factors[1])
                elif op == 2:  # saturation: blend with the grayscale image
                    out = _blend(out, _gray(out), factors[2])
                else:
                    shifted = _shift_hue(out, factors[3])
                    out = torch.where((factors[3] != 0).view(-1, 1, 1, 1), shifted, out)

        gray_on = draw(view_probability("grayscale_p"))
        out = torch.where(gray_on.view(-1, 1, 1, 1), _gray(out).expand_as(out), out)

        blur_on = draw(view_probability("blur_p"))
        sigma = _uniform(n, group.blur_sigma[0], group.blur_sigma[1], generator, device)
        sigma = torch.where(blur_on, sigma, torch.zeros_like(sigma))
        if max(group.per_view("blur_p")) > 0:
            out = _gaussian_blur(out, sigma, group.blur_sigma[1])

        solarize_on = draw(view_probability("solarize_p"))
        out = torch.where(solarize_on.view(-1, 1, 1, 1) & (out >= group.solarize_threshold), 1.0 - out, out)

        out = (out - self.mean) / self.std
        if self.record is not None:
            self.record.boxes.append(boxes)
            self.record.flips.append(flips)
            self.record.grayscale.append(gray_on)
            self.record.solarize.append(solarize_on)
            self.record.blur_sigma.append(sigma)
        out = out.to(self.dtype)
        if self.channels_last:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def extra_repr(self) -> str:
        return f"crops={crop_spec_string(self.groups)}, seed={self.seed}, dtype={self.dtype}"

