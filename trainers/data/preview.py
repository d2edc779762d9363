"""``sslab data preview``: a PNG grid of a few images and all their views, plus tensor facts as JSON."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainers.data.multicrop import MultiCropBatch, MultiCropLoader
from trainers.errors import ConfigError, UserError

MAX_IMAGES = 256  # rows of one grid: beyond this the PNG is hundreds of MB, not a preview
# what --out may end with, and the format PIL writes for it (the bytes match the name)
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def check_num_images(num_images, available: int | None = None, where: str = "") -> int:
    """``num_images`` rows: 1..MAX_IMAGES, and no more than the ``available`` images (when known)."""
    if isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES:
        raise ConfigError(f"--num-images {num_images} must be a whole number in 1..{MAX_IMAGES} (rows of the grid)")
    if available is not None and num_images > available:
        raise ConfigError(f"--num-images {num_images} is more than the {available:,} image(s) {where or 'available'}: "
                          f"pass --num-images {max(1, min(available, MAX_IMAGES))} or fewer")
    return num_images


def check_output(out) -> tuple[Path, str]:
    """The absolute path and the PIL format of ``--out``; refuses, before any work, a name that could not be
    written: empty, a folder, an unknown extension, below a file, or in a folder that is not writable."""
    from trainers.checkpoint import StorageError

    text = str(out) if out is not None else ""
    if not text.strip():
        raise UserError("--out is empty: name the image to write, e.g. --out preview.png")
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise UserError(f"--out {text} is a folder: name an image file in it, e.g. --out {path / 'preview.png'}")
    image_format = IMAGE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        names = ", ".join(sorted(IMAGE_FORMATS))
        what = f"'{path.suffix}'" if path.suffix else "no extension"
        raise UserError(f"--out {text} has {what}, which names no image format this command writes: end the name "
                        f"with one of {names}, e.g. --out {path.with_suffix('.png').name}")
    path = path.resolve()
    if path.exists() and not path.is_file():
        raise UserError(f"--out {path} exists and is not a regular file: choose another --out")
    folder = next(p for p in path.parents if p.exists())
    if not folder.is_dir():
        raise UserError(f"--out {path}: {folder} is a file, not a folder: choose another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise StorageError(f"cannot write --out {path}: {folder} is not writable; choose a writable location")
    return path, image_format


def write_image(image: Image.Image, out: str | Path) -> tuple[Path, str]:
    """Writes ``image`` in the format ``out``'s extension names, under a temporary name renamed when complete;
    a failed write leaves neither the temporary file nor the folders it made."""
    path, image_format = check_output(out)
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(tmp, format=image_format, **({"quality": 95} if image_format in ("JPEG", "WEBP") else {}))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for folder in missing:  # innermost first; only the empty folders this call made
            try:
                folder.rmdir()
            except OSError:
                break
        raise
    return path, image_format


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
    check_num_images(num_images)
    check_output(out)  # before any work
    batch_of = next(iter(loader.canvases), None)
    if batch_of is None:
        raise ConfigError(f"the loader gave no batch (batch size {getattr(loader.canvases, 'batch_size', '?')} "
                          f"for {loader.num_samples:,} image(s)): pass a smaller --num-images")
    canvases, labels = batch_of
    canvases, labels = canvases.clone(), labels.clone()  # ffcv reuses its buffers
    views = loader.augment(canvases)
    batch = MultiCropBatch(views, labels)
    check_num_images(num_images, len(labels), "in the first batch")
    count = num_images
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
    out, image_format = write_image(grid, out)
    return {"png": str(out), "format": image_format, "loader": loader.kind, "canvas": _describe(canvases),
            "views": [dict(view=i, kind=k, **_describe(v)) for i, (k, v) in enumerate(zip(kinds, batch.views))],
            "labels": {**_describe(labels), "dtype": str(labels.dtype).replace("torch.", ""),
                       "first": [int(x) for x in labels[:count]]}}
