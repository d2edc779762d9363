"""Intra-batch image mixing for SDMP: Mixup, CutMix, ResizeMix with a per-sample weight.

Every function takes the images [B, C, H, W], their partners [B, C, H, W] (for SDMP the flip
partners of the global batch) and lam [B] (the share of the image itself), and returns the mixed
images and the lam that is actually visible (box mixes round to whole pixels). All are pure,
batched and stay on the images' device; randomness (box places) comes from ``generator`` or
torch's default generator. SDMP picks one of the three per batch (``MIX_MODES``, its default
choice set). The pixels are really pasted: SDMP's released code at its last commit
(OliverRensu/SDMP 8615686, moco/moco/builder.py ``datamixing``) builds the mixed batch but never
writes it, a bug we do not reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.errors import ConfigError

MIX_MODES = ("mixup", "cutmix", "resizemix")  # SDMP picks one uniformly per batch


def mixup(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor):
    """Zhang et al., 2018: lam * x + (1 - lam) * partner."""
    weight = lam.to(images.dtype).view(-1, 1, 1, 1)
    return images * weight + partners * (1 - weight), lam


def _box_masks(x0, y0, x1, y1, height: int, width: int) -> torch.Tensor:
    """[B, 1, H, W] bool masks of the half-open pixel boxes [x0, x1) x [y0, y1)."""
    ys = torch.arange(height, device=x0.device).view(1, height, 1)
    xs = torch.arange(width, device=x0.device).view(1, 1, width)
    inside = (ys >= y0.view(-1, 1, 1)) & (ys < y1.view(-1, 1, 1)) & (xs >= x0.view(-1, 1, 1)) & (xs < x1.view(-1, 1, 1))
    return inside.unsqueeze(1)


def _random_boxes(box_h: torch.Tensor, box_w: torch.Tensor, height: int, width: int, inside: bool,
                  generator=None):
    """Integer boxes of the given sizes. ``inside``: placed wholly inside the image (ResizeMix);
    otherwise centred uniformly and clipped at the borders (CutMix)."""
    device = box_h.device
    u = torch.rand(2, box_h.shape[0], device=device, generator=generator)
    if inside:
        y0 = (u[0] * (height - box_h + 1)).floor().long()
        x0 = (u[1] * (width - box_w + 1)).floor().long()
        return x0, y0, x0 + box_w, y0 + box_h
    cy, cx = (u[0] * height).floor().long(), (u[1] * width).floor().long()
    y0, y1 = (cy - box_h // 2).clamp(0, height), (cy + box_h - box_h // 2).clamp(0, height)
    x0, x1 = (cx - box_w // 2).clamp(0, width), (cx + box_w - box_w // 2).clamp(0, width)
    return x0, y0, x1, y1


def cutmix(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, generator=None):
    """Yun et al., 2019: a box with (1 - lam) of the area, cut from the partner at the same place."""
    _, _, height, width = images.shape
    side = (1 - lam.float()).clamp(0, 1).sqrt()
    box_h, box_w = (side * height).round().long(), (side * width).round().long()
    x0, y0, x1, y1 = _random_boxes(box_h, box_w, height, width, inside=False, generator=generator)
    mask = _box_masks(x0, y0, x1, y1, height, width)
    visible = 1 - mask.float().mean(dim=(1, 2, 3))
    return torch.where(mask, partners, images), visible.to(lam.dtype)


def resizemix(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, lam_range=(0.1, 0.9),
              generator=None):
    """ResizeMix (Qin et al., 2020) as SDMP's released code does it (OliverRensu/SDMP,
    moco/moco/builder.py ``datamixing``/``rand_bbox``, commits cd26a51 and 8615686): lam is first
    mapped linearly onto ``lam_range`` (SDMP: 0.1 + 0.8 * lam), the whole partner is shrunk
    (bilinear) to a box of floor(side * sqrt(1 - lam)) pixels per side, placed wholly inside the
    image at a random place. Returns the mixed images and the visible share of the image itself,
    1 - box area / image area."""
    lo, hi = lam_range
    batch, _, height, width = images.shape
    ratio = (1 - (lo + (hi - lo) * lam.float())).clamp(0, 1).sqrt()
    # int() of the reference, with a hair of slack so that e.g. 16 * 0.5 stays 8 in float32
    box_h = (ratio * height + 1e-4).floor().long().clamp(0, height)
    box_w = (ratio * width + 1e-4).floor().long().clamp(0, width)
    x0, y0, x1, y1 = _random_boxes(box_h, box_w, height, width, inside=True, generator=generator)
    # an affine grid per sample maps the box onto the partner's full extent (align_corners=False)
    sx, sy = box_w.clamp(min=1).float() / width, box_h.clamp(min=1).float() / height
    cx = (x0.float() + x0.float() + box_w.clamp(min=1).float()) / width - 1  # box centre in [-1, 1]
    cy = (y0.float() + y0.float() + box_h.clamp(min=1).float()) / height - 1
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = 1 / sx, -cx / sx
    theta[:, 1, 1], theta[:, 1, 2] = 1 / sy, -cy / sy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # plain bilinear sampling, as the reference's F.interpolate(mode="bilinear")
    shrunk = F.grid_sample(partners.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    mask = _box_masks(x0, y0, x1, y1, height, width)
    visible = 1 - (box_h * box_w).float() / (height * width)
    return torch.where(mask, shrunk.to(images.dtype), images), visible.to(lam.dtype)


def mix(images: torch.Tensor, partners: torch.Tensor, lam: torch.Tensor, mode: str, resizemix_lam=(0.1, 0.9),
        generator=None):
    """One of ``MIX_MODES`` on the whole batch; see the functions above."""
    if images.shape != partners.shape or lam.shape != images.shape[:1]:
        raise ValueError(f"mix: images {tuple(images.shape)}, partners {tuple(partners.shape)} and lam "
                         f"{tuple(lam.shape)} do not match")
    if mode == "mixup":
        return mixup(images, partners, lam)
    if mode == "cutmix":
        return cutmix(images, partners, lam, generator)
    if mode == "resizemix":
        return resizemix(images, partners, lam, resizemix_lam, generator)
    raise ConfigError(f"unknown mix mode '{mode}': use {', '.join(MIX_MODES)}")
