"""Every PIL mode an image file can open in becomes the right RGB pixels, in the registry and in a .beton.

Each case saves a known source array in one mode and format, checks that PIL really opens the file
in that mode, and compares what ``load_split("imagefolder:...")`` and a .beton written by the real
CLI give back against values computed here from the source: exactly for lossless formats, within a
small tolerance for JPEG. Transparent pixels go over white (datasets.ALPHA_BACKGROUND).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from sslab.cli import main
from trainers.data.beton import FfcvCanvasLoader, PrepareSettings, beton_path
from trainers.data.datasets import ALPHA_BACKGROUND, load_split
from trainers.errors import DataError

SIDE = 16
WHITE = 255
assert ALPHA_BACKGROUND == WHITE  # the documented background these expectations use


def _source():
    """A smooth RGB image (JPEG keeps it close), its gray version (mean 130), an alpha ramp, 16-bit gray."""
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float64)
    rgb = np.stack([40 + 12 * x, 30 + 13 * y, 200 - 6 * (x + y)], axis=2).round().astype(np.uint8)
    gray = (130 + 50 * np.sin(x * np.pi / 8) * np.cos(y * np.pi / 8)).round().astype(np.uint8)
    alpha = ((x + y) * 255 / (2 * SIDE - 2)).round().astype(np.uint8)  # 0 (transparent) .. 255 (opaque)
    gray16 = (gray.astype(np.uint32) * 257 + (x * 97 + y * 13).astype(np.uint32) % 257).astype(np.uint16)
    return rgb, gray, alpha, gray16


def _over_white(rgb, alpha):
    a = alpha.astype(np.int64)[..., None]
    return ((rgb.astype(np.int64) * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)


def _gray3(gray):
    return np.repeat(gray[..., None], 3, axis=2)


def _scale16(values):
    return np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)


PALETTE = np.array([[(17 * i) % 256, (53 * i + 7) % 256, (255 - 11 * i) % 256] for i in range(16)], np.uint8)


def _palette_image(index):
    image = Image.fromarray(index.astype(np.uint8), "P")
    image.putpalette(PALETTE.reshape(-1).tolist() + [0] * (768 - PALETTE.size))
    return image


def _build_cases(root):
    """{case: (file, mode PIL must open it in, expected HxWx3 uint8, max abs error allowed)}."""
    rgb, gray, alpha, gray16 = _source()
    index = (np.add.outer(np.arange(SIDE), np.arange(SIDE)) % 16).astype(np.uint8)
    cases = {}

    def save(case, image, ext, mode, expected, tolerance=0, **options):
        folder = root / "train" / case
        folder.mkdir(parents=True)
        path = folder / f"image.{ext}"
        image.save(path, **options)
        cases[case] = (path, mode, expected, tolerance)

    save("rgb-png", Image.fromarray(rgb), "png", "RGB", rgb)
    save("rgb-jpeg", Image.fromarray(rgb), "jpg", "RGB", rgb, tolerance=16, quality=95)
    save("l-png", Image.fromarray(gray), "png", "L", _gray3(gray))
    save("l-jpeg", Image.fromarray(gray), "jpg", "L", _gray3(gray), tolerance=16, quality=95)
    bits = gray > 130
    save("bilevel-png", Image.fromarray(bits), "png", "1", _gray3(np.where(bits, 255, 0).astype(np.uint8)))
    save("la-png", Image.fromarray(np.stack([gray, alpha], 2), "LA"), "png", "LA", _over_white(_gray3(gray), alpha))
    save("rgba-png", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), "png", "RGBA", _over_white(rgb, alpha))
    # a colour key (PNG tRNS on gray or RGB): pixels of exactly that value are transparent
    key = int(gray[0, 0])
    save("l-key-png", Image.fromarray(gray), "png", "L", _gray3(np.where(gray == key, WHITE, gray).astype(np.uint8)),
         transparency=key)
    rgb_key = tuple(int(v) for v in rgb[5, 7])
    keyed = np.where((rgb == rgb_key).all(2, keepdims=True), WHITE, rgb).astype(np.uint8)
    assert 0 < (keyed != rgb).any(2).sum() < SIDE * SIDE
    save("rgb-key-png", Image.fromarray(rgb), "png", "RGB", keyed, transparency=rgb_key)
    save("p-png", _palette_image(index), "png", "P", PALETTE[index])
    # palette with one transparent entry (index 3), and with an alpha for every entry (PNG tRNS)
    one_key = PALETTE[index].copy()
    one_key[index == 3] = WHITE
    save("p-key-png", _palette_image(index), "png", "P", one_key, transparency=3)
    entry_alpha = np.array([(i * 37) % 256 for i in range(16)], np.uint8)
    save("p-alpha-png", _palette_image(index), "png", "P", _over_white(PALETTE[index], entry_alpha[index]),
         transparency=bytes(entry_alpha.tolist()))
    pa = Image.merge("PA", (_palette_image(index), Image.fromarray(alpha)))
    save("pa-tiff", pa, "tif", "PA", _over_white(PALETTE[index], alpha))
    # CMYK: from RGB with K = 0 (C = 255 - R, ...) as JPEG; arbitrary C, M, Y, K as TIFF
    cmyk_from_rgb = np.dstack([255 - rgb, np.zeros((SIDE, SIDE), np.uint8)])
    save("cmyk-jpeg", Image.fromarray(cmyk_from_rgb, "CMYK"), "jpg", "CMYK", rgb, tolerance=16, quality=95)
    k = (np.arange(SIDE * SIDE).reshape(SIDE, SIDE) % 200).astype(np.uint8)
    cmyk = np.dstack([rgb[..., 0], 255 - rgb[..., 1], rgb[..., 2] // 2 + 60, k])
    cmyk_expected = (((255 - cmyk[..., :3].astype(np.int64)) * (255 - cmyk[..., 3:].astype(np.int64)) + 127)
                     // 255).astype(np.uint8)
    pillow = np.asarray(Image.fromarray(cmyk, "CMYK").convert("RGB")).astype(int)
    assert np.abs(pillow - cmyk_expected).max() <= 1  # the formula is PIL's own, up to rounding
    save("cmyk-tiff", Image.fromarray(cmyk, "CMYK"), "tif", "CMYK", cmyk_expected)
    ycbcr = np.asarray(Image.fromarray(rgb).convert("YCbCr")).astype(np.float64)
    luma, cb, cr = ycbcr[..., 0], ycbcr[..., 1] - 128, ycbcr[..., 2] - 128
    jfif = np.stack([luma + 1.402 * cr, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.772 * cb], 2)
    save("ycbcr-tiff", Image.fromarray(rgb).convert("YCbCr"), "tif", "YCbCr",
         np.clip(np.rint(jfif), 0, 255).astype(np.uint8), tolerance=1)
    # 16-bit gray in PNG and TIFF (both byte orders), and 32-bit integers holding 16-bit values
    save("i16-png", Image.fromarray(gray16), "png", "I;16", _gray3(_scale16(gray16)))
    save("i16-tiff", Image.fromarray(gray16), "tif", "I;16", _gray3(_scale16(gray16)))
    save("i16b-tiff", Image.frombytes("I;16B", (SIDE, SIDE), gray16.astype(">u2").tobytes()), "tif", "I;16B",
         _gray3(_scale16(gray16)))
    save("i32-tiff", Image.fromarray(gray16.astype(np.int32)), "tif", "I", _gray3(_scale16(gray16)))
    unit = gray.astype(np.float32) / 255  # 32-bit float, intensity 0..1
    save("float-tiff", Image.fromarray(unit), "tif", "F", _gray3(np.rint(unit.astype(np.float64) * 255).astype(np.uint8)))
    return cases


@pytest.fixture
def mode_folder(tmp_path):
    cases = _build_cases(tmp_path / "modes")
    for case, (path, mode, _, _) in cases.items():
        with Image.open(path) as image:
            assert image.mode == mode, f"{case}: PIL opens {path.name} as {image.mode}, the test meant {mode}"
    return tmp_path / "modes", cases


def _check(images, data, cases):
    for i, label in enumerate(data.labels):
        case = data.classes[label]
        _, mode, expected, tolerance = cases[case]
        got = np.asarray(images[i])
        assert got.shape == (SIDE, SIDE, 3) and got.dtype == np.uint8, case
        error = np.abs(got.astype(int) - expected.astype(int))
        assert error.max() <= tolerance, f"{case} ({mode}): max error {error.max()}, allowed {tolerance}"
        if tolerance:
            assert error.mean() < 2.0, f"{case} ({mode}): mean error {error.mean():.2f}"


def test_every_mode_through_the_registry(mode_folder):
    root, cases = mode_folder
    data = load_split(f"imagefolder:{root}", "train")
    assert sorted(data.classes) == sorted(cases) and len(data) == len(cases)
    _check(data.images, data, cases)


def test_every_mode_through_a_beton_written_by_the_cli(mode_folder, tmp_path):
    root, cases = mode_folder
    out = tmp_path / "out"
    assert main(["data", "prepare", "--dataset", f"imagefolder:{root}", "--split", "train", "--out", str(out),
                 "--writers", "1", "--quiet"]) == 0
    path = beton_path(out, f"imagefolder:{root}", "train", PrepareSettings())
    loader = FfcvCanvasLoader(path, 64, shuffle=False, drop_last=False, num_workers=1)
    images, labels = zip(*((x.clone(), y.clone()) for x, y in loader))
    images, labels = torch.cat(images).numpy(), torch.cat(labels).numpy()
    data = load_split(f"imagefolder:{root}", "train")
    assert (labels == data.labels).all()
    _check(images, data, cases)
    # raw pixels: the file holds exactly what the registry decodes
    assert np.array_equal(images, np.stack([data.images[i] for i in range(len(data))]))


def test_sixteen_bit_gray_keeps_its_brightness(mode_folder):
    """The reported case: 16-bit gray of mean 130 (in 8-bit terms) came out at about 253."""
    root, cases = mode_folder
    _, gray, _, gray16 = _source()
    assert abs(gray.mean() - 130) < 0.5
    data = load_split(f"imagefolder:{root}", "train")
    for case in ("i16-png", "i16-tiff", "i16b-tiff", "i32-tiff"):
        index = data.classes.index(case)
        image = data.images[int(np.flatnonzero(data.labels == index)[0])]
        assert abs(image.mean() - 130) < 1.0, f"{case}: mean {image.mean():.1f}"
        assert abs(image.mean() - gray16.mean() / 257) < 0.05


def test_values_outside_the_range_a_mode_is_read_in_are_refused(tmp_path, capsys):
    folder = tmp_path / "bad"
    (folder / "train" / "hdr").mkdir(parents=True)
    (folder / "train" / "big").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 2.5, np.float32)).save(folder / "train" / "hdr" / "a.tif")
    Image.fromarray(np.full((8, 8), 70_000, np.int32)).save(folder / "train" / "big" / "b.tif")
    data = load_split(f"imagefolder:{folder}", "train")
    with pytest.raises(DataError, match=r"b\.tif.*70000.*outside the 16-bit range"):
        data.images[0]
    with pytest.raises(DataError, match=r"a\.tif.*2\.5.*outside 0\.\.1"):
        data.images[1]
    out = tmp_path / "out"
    code = main(["data", "prepare", "--dataset", f"imagefolder:{folder}", "--split", "train", "--out", str(out),
                 "--writers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and err[0].startswith("error: 2 image(s) could not be read")
    assert not list(out.glob("*.beton")) and not list(out.glob(".*tmp-*"))


def test_a_mode_without_a_defined_conversion_is_refused_by_name(tmp_path, capsys):
    folder = tmp_path / "lab"
    (folder / "train" / "a").mkdir(parents=True)
    Image.new("LAB", (8, 8), (50, 10, 10)).save(folder / "train" / "a" / "x.tif")
    with Image.open(folder / "train" / "a" / "x.tif") as opened:
        assert opened.mode == "LAB"
    out = tmp_path / "out"
    code = main(["data", "prepare", "--dataset", f"imagefolder:{folder}", "--split", "train", "--out", str(out),
                 "--writers", "1", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "PIL mode LAB is not supported" in err[0], err
    assert not list(out.glob("*.beton"))
