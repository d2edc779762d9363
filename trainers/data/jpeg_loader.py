"""A canvas loader without ffcv: file bytes read in DataLoader workers, JPEGs decoded in batches.

Why: ffcv (last release 1.0.2, built from source against OpenCV) is not installable everywhere, and
the PIL fallback (torch_loader.py) decodes one image at a time in Python. This loader reads the same
registry images, but hands whole batches of encoded JPEGs to ``torchvision.io.decode_jpeg``:

- ``device`` CUDA: the workers only read bytes; the main process decodes the batch with nvjpeg on
  the GPU (and square-resizes there, antialiased bilinear).
- ``device`` CPU: each worker decodes its batch with libjpeg (torchvision) and square-resizes with PIL.

Anything that is not a plain 8-bit gray or YCbCr JPEG (PNG, CMYK, 12-bit, lossless or arithmetic
JPEG, images the registry holds decoded) takes the PIL path of ``CanvasDataset`` (``datasets.to_rgb``),
and so does a batch that torchvision refuses to decode (PIL then names the broken file). Sample order
comes from ``sharding.shard_indices`` and the canvas rule from ``CanvasDataset``, so with the same
seed this loader yields the same labels and, on the CPU, the same uint8 canvases as the torch path
(tests/test_loaders.py). nvjpeg's IDCT and chroma upsampling are not libjpeg's: on the GPU pixels
may differ from the CPU paths by a few levels.
"""

from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset

from trainers.data.beton import square_resize
from trainers.data.datasets import DatasetSplit, EncodedImages, FileImages
from trainers.data.torch_loader import CanvasDataset, TorchCanvasLoader

# start-of-frame markers torchvision and PIL both decode through libjpeg: baseline, extended, progressive
_HUFFMAN_SOF = (0xC0, 0xC1, 0xC2)
_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)


def plain_jpeg(data: bytes) -> bool:
    """True for an 8-bit, 1- or 3-component Huffman JPEG (what decode_jpeg and PIL read alike)."""
    if data[:2] != b"\xff\xd8":
        return False
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return False
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        if marker in _HUFFMAN_SOF:
            if at + 10 > len(data):
                return False
            precision, height, components = data[at + 4], int.from_bytes(data[at + 5:at + 7], "big"), data[at + 9]
            return precision == 8 and height > 0 and components in (1, 3)
        if marker in _OTHER_SOF or marker in (0xDA, 0xD9):  # another coding, or scan / end before any frame
            return False
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return False


def _encoded(images, index: int) -> bytes | None:
    """The file's bytes when the source keeps images encoded, else None (already decoded arrays)."""
    if isinstance(images, EncodedImages):
        return images.blobs[index]
    if isinstance(images, FileImages):
        with open(images.paths[index], "rb") as handle:
            return handle.read()
    return None


def decode_jpegs(encoded: list[torch.Tensor], device) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call: [3, H, W] uint8 RGB tensors on ``device`` (gray expanded)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


class _BatchReader(Dataset):
    """``reader[list of indices]``: one batch, read (and on the CPU decoded) inside a worker.

    Returns ``(canvases, labels)`` when ``decode`` is set, else ``(encoded, jpeg_rows, canvases,
    labels, indices)`` where ``canvases`` holds the PIL-path rows and ``encoded`` the JPEGs of ``jpeg_rows``."""

    def __init__(self, canvases: CanvasDataset, decode: bool):
        self.canvases, self.decode = canvases, decode

    def __len__(self) -> int:
        return len(self.canvases)

    def __getitem__(self, indices):
        split, (height, width) = self.canvases.split, self.canvases.canvas
        out = torch.empty((len(indices), height, width, 3), dtype=torch.uint8)
        encoded, rows = [], []
        for row, index in enumerate(indices):
            data = _encoded(split.images, index)
            if data is not None and plain_jpeg(data):
                encoded.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                rows.append(row)
            else:
                out[row] = self.canvases[index][0]
        labels = torch.as_tensor(np.asarray(split.labels)[list(indices)], dtype=torch.int64)
        if not self.decode:
            return encoded, torch.as_tensor(rows, dtype=torch.int64), out, labels, torch.as_tensor(indices)
        if encoded:
            try:
                decoded = decode_jpegs(encoded, "cpu")
            except RuntimeError:  # torchvision refused one: PIL reads them (or names the broken file)
                decoded = None
            for slot, row in enumerate(rows):
                if decoded is None:
                    out[row] = self.canvases[indices[row]][0]
                    continue
                image = decoded[slot].permute(1, 2, 0)
                if tuple(image.shape[:2]) != (height, width):
                    image = torch.from_numpy(np.array(square_resize(image.numpy(), height)))  # PIL's is read-only
                out[row] = image
        return out, labels


def _square_resize_on_device(image: torch.Tensor, side: int) -> torch.Tensor:
    """[3, H, W] uint8 -> [side, side, 3]: ``square_resize``'s centre crop, resize antialiased on the device."""
    from torchvision.transforms.v2.functional import InterpolationMode, resize

    height, width = image.shape[1:]
    short = min(height, width)
    top, left = (height - short) // 2, (width - short) // 2
    image = image[:, top:top + short, left:left + short]
    if short != side:
        image = resize(image, [side, side], interpolation=InterpolationMode.BILINEAR, antialias=True)
    return image.permute(1, 2, 0)


class JpegCanvasLoader(TorchCanvasLoader):
    """Yields (uint8 [B, H, W, 3], int64 [B]) on ``device``, like ``TorchCanvasLoader`` and ``FfcvCanvasLoader``."""

    def __init__(self, split: DatasetSplit, batch_size: int, device="cpu", **kwargs):
        self.on_device = torch.device(device).type == "cuda"  # nvjpeg in this process; else libjpeg in the workers
        super().__init__(split, batch_size, device, **kwargs)  # the same canvas rule (and errors) and sample order

    def _data_loader(self, batch_size: int, drop_last: bool, workers: dict) -> DataLoader:
        """One whole batch per DataLoader item (``_BatchReader``), so that its JPEGs decode in one call."""
        return DataLoader(_BatchReader(self.dataset, decode=not self.on_device), batch_size=None,
                          sampler=BatchSampler(self.sampler, batch_size, drop_last), pin_memory=self.on_device,
                          **workers)

    def _to_device(self, batch):
        if not self.on_device:
            images, labels = batch
            return images.to(self.device), labels.to(self.device)
        encoded, rows, images, labels, indices = batch
        images = images.to(self.device, non_blocking=True)
        if encoded:
            self._decode_into(images, encoded, rows.tolist(), indices.tolist())
        return images, labels.to(self.device, non_blocking=True)

    def _decode_into(self, images: torch.Tensor, encoded: list, rows: list[int], indices: list[int]) -> None:
        side = self.canvas[0]
        try:
            decoded = decode_jpegs(encoded, self.device)
        except RuntimeError:  # nvjpeg refused one: decode those rows on the CPU with PIL
            for row in rows:
                images[row] = self.dataset[indices[row]][0].to(self.device)
            return
        for image, row in zip(decoded, rows):
            if tuple(image.shape[1:]) == tuple(self.canvas):
                images[row] = image.permute(1, 2, 0)
            else:
                images[row] = _square_resize_on_device(image, side)
