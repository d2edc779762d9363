"""``sslab data preview``: a PNG grid of a few images and all their views, plus tensor facts as JSON."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainers.data.multicrop import MultiCropBatch, MultiCropLoader


def _describe(tensor: torch.Tensor) -> dict:
    values = tensor.float()
    return {"shape": list(tensor.shape), "dtype": str(tensor.dtype).replace("torch.", ""),
            "min": round(float(values.min()), 4), "max": round(float(values.max()), 4),
            "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4)}


def _to_pixels(view: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """A normalized [3, s, s] view back to HxWx3 uint8 for display."""
    image = (view.float().cpu() * std.cpu().view(3, 1, 1) + mean.cpu().view(3, 1, 1)).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def preview(loader: MultiCropLoader, out: str | Path, num_images: int = 6, classes=None, cell: int = 96) -> dict:
    """Draws one batch's first ``num_images`` canvases and their views; returns the tensor facts."""
    canvases, labels = next(iter(loader.canvases))
    canvases, labels = canvases.clone(), labels.clone()  # ffcv reuses its buffers
    views = loader.augment(canvases)
    batch = MultiCropBatch(views, labels)
    count = min(num_images, len(labels))
    mean, std = loader.augment.mean.view(3), loader.augment.std.view(3)
    sizes = [f"{g.size}px" for g in loader.augment.groups for _ in range(g.count)]
    kinds = [("global" if gi == 0 else "local") for gi, g in enumerate(loader.augment.groups) for _ in range(g.count)]
    titles = ["canvas"] + [f"{k} {i + 1} {s}" for i, (k, s) in enumerate(zip(kinds, sizes))]
    pad, header, label_width = 4, 18, 90
    width = label_width + len(titles) * (cell + pad) + pad
    height = header + count * (cell + pad) + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for column, title in enumerate(titles):
        draw.text((label_width + pad + column * (cell + pad), 3), title, fill=(0, 0, 0))
    canvas_nchw = canvases if canvases.shape[1] == 3 else canvases.permute(0, 3, 1, 2)
    for row in range(count):
        top = header + pad + row * (cell + pad)
        name = str(int(labels[row]))
        if classes is not None:
            name = f"{name}: {classes[int(labels[row])]}"
        draw.text((4, top + cell // 2 - 6), name[:14], fill=(0, 0, 0))
        tiles = [canvas_nchw[row].permute(1, 2, 0).cpu().numpy()] + [_to_pixels(v[row], mean, std) for v in batch.views]
        for column, tile in enumerate(tiles):
            # nearest-neighbour: small crops stay visibly pixelated instead of being smoothed
            image = Image.fromarray(np.ascontiguousarray(tile)).resize((cell, cell), Image.NEAREST)
            grid.paste(image, (label_width + pad + column * (cell + pad), top))
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    grid.save(tmp)
    os.replace(tmp, out)
    return {"png": str(out), "loader": loader.kind, "canvas": _describe(canvases),
            "views": [dict(view=i, kind=k, **_describe(v)) for i, (k, v) in enumerate(zip(kinds, batch.views))],
            "labels": {**_describe(labels), "dtype": str(labels.dtype).replace("torch.", ""),
                       "first": [int(x) for x in labels[:count]]}}
