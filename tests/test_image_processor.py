"""ImageProcessor: every input kind loads to the same picture, modes convert as documented, bad inputs say which."""

from __future__ import annotations

import resource
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps
from timm.data import create_transform

from mmfm.encoders.image_processor import ImageProcessor
from mmfm.errors import ConfigError, InputError

# Not timm's defaults anywhere: non-square crop fraction, own statistics, bilinear.
DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bilinear",
    "mean": (0.3, 0.4, 0.5),
    "std": (0.2, 0.25, 0.3),
    "crop_pct": 0.8,
    "crop_mode": "center",
}
GREY_CONFIG = {**DATA_CONFIG, "input_size": (1, 32, 32), "mean": (0.4,), "std": (0.25,)}


@pytest.fixture
def processor() -> ImageProcessor:
    return ImageProcessor(DATA_CONFIG)


def picture(height: int = 40, width: int = 56) -> np.ndarray:
    """A non-square random RGB picture, (H, W, 3) uint8."""
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_png(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def test_output_equals_timm_transform(processor):
    img = Image.fromarray(picture())
    reference = create_transform(**DATA_CONFIG, is_training=False)(img)

    out = processor([img])

    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[0], reference)


def test_normalises_with_config_statistics(processor):
    img = Image.new("RGB", (50, 30), (51, 102, 153))

    out = processor(img)

    mean, std = torch.tensor(DATA_CONFIG["mean"]), torch.tensor(DATA_CONFIG["std"])
    expected = (torch.tensor([51, 102, 153]) / 255 - mean) / std
    torch.testing.assert_close(out[0], expected[:, None, None].expand(3, 32, 32))


@pytest.mark.parametrize(
    "convert",
    [
        pytest.param(lambda a, tmp: a, id="numpy-uint8-hwc"),
        pytest.param(lambda a, tmp: a.astype(np.float32) / 255, id="numpy-float32-hwc"),
        pytest.param(lambda a, tmp: a.astype(np.float64) / 255, id="numpy-float64-hwc"),
        pytest.param(lambda a, tmp: a.astype(np.uint16) * 257, id="numpy-uint16-hwc"),
        pytest.param(lambda a, tmp: torch.from_numpy(a).permute(2, 0, 1), id="torch-uint8-chw"),
        pytest.param(lambda a, tmp: torch.from_numpy(a).permute(2, 0, 1).float() / 255, id="torch-float-chw"),
        pytest.param(lambda a, tmp: save_png(Image.fromarray(a), tmp / "x.png"), id="pathlib-path"),
        pytest.param(lambda a, tmp: str(save_png(Image.fromarray(a), tmp / "x.png")), id="str-path"),
    ],
)
def test_input_kinds_give_the_pil_result(processor, tmp_path, convert):
    array = picture()
    expected = processor([Image.fromarray(array)])

    assert torch.equal(processor([convert(array, tmp_path)]), expected)


def test_batch_of_mixed_kinds(processor):
    array = picture()

    out = processor([Image.fromarray(array), array, torch.from_numpy(array).permute(2, 0, 1)])

    assert out.shape == (3, 3, 32, 32)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_grey_is_replicated_to_rgb(processor):
    grey = picture()[:, :, 0]

    for item in (Image.fromarray(grey), grey, grey[:, :, None], torch.from_numpy(grey)[None]):
        loaded = processor.load(item)
        assert loaded.mode == "RGB"
        assert np.array_equal(np.asarray(loaded), np.repeat(grey[:, :, None], 3, axis=2))


def test_one_channel_model_loads_grey():
    grey_processor = ImageProcessor(GREY_CONFIG, in_chans=1)
    rgb = picture()

    loaded = grey_processor.load(rgb)

    assert loaded.mode == "L"
    assert np.array_equal(np.asarray(loaded), np.asarray(Image.fromarray(rgb).convert("L")))
    assert grey_processor([rgb, rgb[:, :, 0]]).shape == (2, 1, 32, 32)


def test_rgba_is_composited_on_white(processor):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 0)  # fully transparent
    rgba[0, 1] = (10, 20, 30, 255)  # opaque
    rgba[0, 2] = (0, 0, 0, 128)  # half-transparent black

    for item in (Image.fromarray(rgba), rgba, torch.from_numpy(rgba).permute(2, 0, 1)):
        loaded = np.asarray(processor.load(item)).astype(int)
        assert loaded[0, 0].tolist() == [255, 255, 255]
        assert loaded[0, 1].tolist() == [10, 20, 30]
        assert np.abs(loaded[0, 2] - 127).max() <= 1


def test_grey_alpha_is_composited_on_white(processor):
    grey = Image.new("L", (2, 1), 40)
    alpha = Image.fromarray(np.array([[0, 255]], dtype=np.uint8))
    la = Image.merge("LA", (grey, alpha))

    loaded = np.asarray(processor.load(la))

    assert loaded[0].tolist() == [[255, 255, 255], [40, 40, 40]]


def test_palette_is_expanded(processor):
    pal = Image.fromarray(picture()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)

    loaded = processor.load(pal)

    assert loaded.mode == "RGB"
    assert np.array_equal(np.asarray(loaded), np.asarray(pal.convert("RGB")))


def test_palette_transparency_becomes_white(processor, tmp_path):
    pal = Image.new("P", (3, 1))
    pal.putpalette([200, 10, 10, 10, 200, 10])
    pal.putpixel((1, 0), 1)
    path = tmp_path / "p.png"
    pal.save(path, transparency=1)

    loaded = np.asarray(processor.load(path))

    assert loaded[0].tolist() == [[200, 10, 10], [255, 255, 255], [200, 10, 10]]


def test_16_bit_png_is_scaled_to_8_bit(processor, tmp_path):
    values = np.array([[0, 257, 1000, 65535]], dtype=np.uint16)
    path = save_png(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as reopened:
        assert reopened.mode == "I;16"

    loaded = np.asarray(processor.load(path))

    assert loaded[..., 0].tolist() == [[0, 1, 4, 255]]  # 1000 / 257 = 3.89
    assert np.array_equal(loaded[..., 0], loaded[..., 2])


def test_32_bit_integer_and_float_grey(processor):
    ints = Image.fromarray(np.array([[-5, 514, 70000]], dtype=np.int32))
    floats = Image.fromarray(np.array([[-0.5, 0.2, 1.5]], dtype=np.float32))
    assert (ints.mode, floats.mode) == ("I", "F")

    assert np.asarray(processor.load(ints))[..., 0].tolist() == [[0, 2, 255]]
    assert np.asarray(processor.load(floats))[..., 0].tolist() == [[0, 51, 255]]


def test_cmyk_uses_pil_conversion(processor):
    cmyk = Image.fromarray(picture()).convert("CMYK")

    assert np.array_equal(np.asarray(processor.load(cmyk)), np.asarray(cmyk.convert("RGB")))


def test_result_is_independent_of_the_input(processor):
    img = Image.fromarray(picture())

    assert processor.load(img) is not img


def write_text_png(tmp_path: Path) -> Path:
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    return path


def write_truncated_png(tmp_path: Path) -> Path:
    path = save_png(Image.fromarray(picture(200, 200)), tmp_path / "cut.png")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        pytest.param(lambda tmp: tmp / "missing.png", "not found", id="missing-file"),
        pytest.param(lambda tmp: tmp, "not a file", id="directory"),
        pytest.param(write_text_png, "not a readable image", id="text-file"),
        pytest.param(write_truncated_png, "truncated", id="truncated-png"),
    ],
)
def test_bad_file_names_path_and_index(processor, tmp_path, make, reason):
    path = make(tmp_path)

    with pytest.raises(InputError, match=reason) as info:
        processor([picture(), path])

    assert f"image 1 ('{path}')" in str(info.value)
    with pytest.raises(InputError, match=reason) as info:
        processor.load(str(path))
    assert str(path) in str(info.value)


def nan_array() -> np.ndarray:
    array = picture().astype(np.float32) / 255
    array[3, 4, 1] = np.nan
    return array


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        pytest.param(nan_array(), "NaN", id="nan"),
        pytest.param(np.full((5, 5, 3), 1.5, dtype=np.float32), r"\[0, 1\]", id="float-above-1"),
        pytest.param(np.full((5, 5), -0.1), r"\[0, 1\]", id="float-below-0"),
        pytest.param(np.zeros((2, 5, 5, 3), dtype=np.uint8), "HxWx3", id="4d-array"),
        pytest.param(np.zeros((0, 5, 3), dtype=np.uint8), "empty", id="zero-size"),
        pytest.param(np.zeros((5, 5, 7), dtype=np.uint8), "HxWx3", id="seven-channels"),
        pytest.param(np.zeros((3, 5, 6), dtype=np.uint8), "channels-last", id="chw-numpy"),
        pytest.param(np.zeros((5, 5, 3), dtype=np.int64), "dtype", id="int64"),
        pytest.param(torch.zeros(5, 5, 3), "CxHxW", id="hwc-tensor"),
        pytest.param(torch.zeros(3, 5, 5, dtype=torch.int32), "dtype", id="int32-tensor"),
        pytest.param(torch.full((3, 5, 5), 2.0), r"\[0, 1\]", id="tensor-above-1"),
        pytest.param(42, "expected a path", id="int"),
    ],
)
def test_bad_array_names_index_and_shape(processor, bad, reason):
    with pytest.raises(InputError, match=reason) as info:
        processor([picture(), picture(), picture(), bad])

    message = str(info.value)
    assert message.startswith("image 3 (")
    if hasattr(bad, "shape"):
        assert str(tuple(bad.shape)) in message


def test_empty_batch_is_an_error(processor):
    with pytest.raises(InputError, match="no images"):
        processor([])


@pytest.mark.parametrize("in_chans", [1, 4])
def test_statistics_must_match_channels(in_chans):
    with pytest.raises(ConfigError, match="in_chans"):
        ImageProcessor(DATA_CONFIG, in_chans=in_chans)


# ---- hostile and careless input (issue 11): decompression bombs, shrinking while decoding, float NaN ----


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(path: Path, side: int) -> Path:
    """A valid all-black side x side greyscale PNG of about side * 12 bytes (12000 x 12000: 140 KB, 144 MB decoded).

    The zlib stream repeats one compressed block of 1000 rows: a full flush makes each block independent.
    """
    assert side % 1000 == 0
    rows = b"\x00" * ((side + 1) * 1000)  # 1000 rows, each a filter byte and `side` pixels
    compressor = zlib.compressobj(9)
    first = compressor.compress(rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    repeat = compressor.compress(rows) + compressor.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(side // 1000):
        checksum = zlib.adler32(rows, checksum)
    stream = first + repeat * (side // 1000 - 1) + b"\x03\x00" + struct.pack(">I", checksum)  # final empty block
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    png = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")
    path.write_bytes(png)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def test_decompression_bomb_is_refused_by_name_before_decoding(processor, tmp_path):
    bomb = bomb_png(tmp_path / "bomb.png", 12000)  # was +700 MB and PIL's DecompressionBombWarning
    assert bomb.stat().st_size < 200_000
    rss_before = peak_rss_mb()
    start = time.perf_counter()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even PIL's DecompressionBombWarning
        with pytest.raises(InputError, match=r"12000x12000 = 144,000,000 pixels, more than the limit of 89,478,485"):
            processor([picture(), bomb])
        with pytest.raises(InputError, match=r"^image 1 \('.*bomb\.png'\): .*ImageProcessor\.max_pixels"):
            processor([picture(), str(bomb)])
    with pytest.warns(Image.DecompressionBombWarning):
        lazy = Image.open(bomb)  # a PIL image not yet decoded is checked too
    with lazy, pytest.raises(InputError, match=r"PIL image of mode L and size 12000x12000"):
        processor.load(lazy)

    assert time.perf_counter() - start < 1.0
    assert peak_rss_mb() - rss_before < 100


def test_pixel_limit_is_configurable(processor, tmp_path, monkeypatch):
    path = save_png(Image.fromarray(picture(40, 56)), tmp_path / "small.png")

    processor.max_pixels = 40 * 56 - 1
    with pytest.raises(InputError, match=r"small\.png': the image is 56x40 = 2,240 pixels, more than the limit of"):
        processor.load(path)
    processor.max_pixels = 40 * 56
    assert processor.load(path).size == (56, 40)

    monkeypatch.setattr(ImageProcessor, "max_pixels", 100)
    with pytest.raises(InputError, match="more than the limit of 100"):
        ImageProcessor(DATA_CONFIG).load(Image.fromarray(picture()))


def test_pil_own_bomb_error_is_an_input_error(processor, tmp_path, monkeypatch):
    # PIL refuses images above twice Image.MAX_IMAGE_PIXELS whatever max_pixels says; that is an InputError too.
    path = save_png(Image.fromarray(picture(40, 56)), tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    processor.max_pixels = None

    with pytest.raises(InputError, match=r"small\.png'\): .*PIL.Image.MAX_IMAGE_PIXELS"):
        processor([path])


def smooth_picture(height: int, width: int) -> np.ndarray:
    """A smooth, asymmetric RGB picture, (H, W, 3) uint8: shrinking it first changes little."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rgb = np.stack([np.sin(6 * x) * 0.5 + 0.5, np.cos(5 * y) * 0.5 + 0.5, (x + y) / 2], axis=2)
    return (rgb * 255).round().astype(np.uint8)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_large_files_are_shrunk_while_decoding(processor, tmp_path, suffix):
    # The transform resizes to 40 px (32 / crop_pct 0.8): an 800x640 file is decoded (JPEG at 1/8 scale) or
    # box-reduced (PNG, by 8) to 100x80, at least twice 40 on each side, and gives the full-size result to a level.
    path = tmp_path / f"big.{suffix}"
    Image.fromarray(smooth_picture(640, 800)).save(path, quality=95)
    with Image.open(path) as img:
        full_size = processor.transform(img.convert("RGB"))

    loaded = processor.load(path)
    out = processor([path])[0]

    assert loaded.size == (100, 80)
    std = torch.tensor(DATA_CONFIG["std"])[:, None, None]
    assert ((out - full_size) * std * 255).abs().max() <= 1.5


def test_shrinking_keeps_exif_orientation(processor, tmp_path):
    array = smooth_picture(800, 1600)
    array[:400, :800] = (255, 0, 0)  # a red top-left quarter
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # stored rotated: upright is 800 wide, 1600 high
    path = tmp_path / "rotated.png"
    Image.fromarray(array).save(path, exif=exif)
    with Image.open(path) as img:
        upright = np.asarray(ImageOps.exif_transpose(img).convert("RGB").reduce(10))

    loaded = processor.load(path)

    assert loaded.size == (80, 160)
    assert np.abs(np.asarray(loaded).astype(int) - upright).max() <= 1


def test_colour_keyed_image_is_not_box_reduced(processor, tmp_path):
    array = smooth_picture(400, 500)  # 5 times the 80 px kept
    array[::2, ::2] = (1, 2, 3)  # the transparent colour
    path = tmp_path / "keyed.png"
    Image.fromarray(array).save(path, transparency=(1, 2, 3))

    loaded = processor.load(path)

    assert loaded.size == (500, 400)
    assert np.asarray(loaded)[0, 0].tolist() == [255, 255, 255]


def test_pil_image_of_the_caller_is_not_drafted(processor, tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(smooth_picture(400, 500)).save(path)

    with Image.open(path) as img:
        loaded = processor.load(img)
        assert img.size == (500, 400)  # decoded at full size, then a reduced copy made
    assert loaded.size == (100, 80)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_float_image_with_nan_or_inf_is_refused(processor, tmp_path, bad):
    values = np.full((4, 5), 0.5, dtype=np.float32)
    values[1, 2] = bad
    img = Image.fromarray(values)
    assert img.mode == "F"
    path = tmp_path / "float.tiff"
    img.save(path)

    with pytest.raises(InputError, match=r"^image 1 \(PIL image of mode F.*NaN or infinite"):
        processor([picture(), img])
    with pytest.raises(InputError, match=r"float\.tiff': the mode-F .*NaN or infinite"):
        processor.load(path)


def test_arrays_and_tensors_over_the_pixel_limit_are_refused(processor):
    view = np.lib.stride_tricks.as_strided(np.zeros(3, np.uint8), (20000, 20000, 3), (0, 0, 1))  # no memory

    with pytest.raises(InputError, match=r"^image 1 \(numpy array .* 20000x20000 = 400,000,000 pixels, more than"):
        processor([picture(), view])
    processor.max_pixels = 100
    with pytest.raises(InputError, match=r"torch tensor .* 11x10 = 110 pixels, more than the limit of 100"):
        processor.load(torch.zeros(3, 10, 11))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [(torch.zeros(3, 4, 4, device="meta"), "meta tensor"), (torch.zeros(3, 4, 4).to_sparse(), "sparse")],
)
def test_tensors_without_pixels_are_refused(processor, tensor, message):
    with pytest.raises(InputError, match=rf"^image 0 \(torch tensor .*{message}"):
        processor([tensor])


def test_damaged_header_that_pil_parses_with_value_error_names_the_file(processor, tmp_path):
    path = tmp_path / "broken.ppm"
    path.write_bytes(b"P6\n20 24\n25a\n" + bytes(20 * 24 * 3))  # PIL: invalid literal for int() (a ValueError)

    with pytest.raises(InputError, match=r"^image 1 \('.*broken\.ppm'\): not a readable image file"):
        processor([picture(), path])


def test_a_thin_strip_is_refused_by_the_size_resizing_would_give_it(processor):
    strip = np.zeros((1, 200_000, 3), np.uint8)  # 600 KB that the short-side resize would blow up a thousandfold
    with pytest.raises(InputError, match=r"^image 0 \(numpy array.*200000x1 pixels, so thin that resizing its short"):
        processor([strip])
    assert processor([np.zeros((8, 400, 3), np.uint8)]).shape[0] == 1  # a merely wide image is fine
