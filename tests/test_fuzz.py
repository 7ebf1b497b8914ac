"""Property-based fuzzing of hostile and careless input (issue 11).

Every property has one shape: whatever the input, the call ends in a result (which must make sense: the right
shape, finite numbers) or an `mmfm.errors.MMFMError`, within a time and memory bound, never another exception.
Covered: the image processor (bytes as a file, arrays, tensors, PIL images), the audio processor (arrays and sample
rates, bytes as a file), the tokenizers (arbitrary unicode, ids to decode), manifest lines and files, config YAML,
training overrides and recipes, and the `mmfm` command line.

Each call runs in a forked child (`_bounded`) under RLIMIT_AS, with its peak resident memory measured and a
wall-clock limit enforced by the parent, so a call that would take gigabytes or minutes fails its property
quickly instead of stalling the machine, and no call can touch the test process's state.

Runs are deterministic (`derandomize=True`, no example database). `MMFM_FUZZ_PROFILE=long` runs about 25 times
as many examples from a random seed; `MMFM_FUZZ_TIME_SCALE=3` multiplies every time bound on a slow machine;
`MMFM_FUZZ_SHRINK=0` reports failures as found, unshrunk (shrinking an input that hits a time bound reruns it
until the bound, many times). `MMFM_FUZZ_SURVEY=FILE` records every failing call as a JSON line in FILE and
carries on, so one run lists every kind of failure and shows what a passing run costs.
"""

from __future__ import annotations

import gc
import io
import json
import math
import os
import pickle
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.extra import numpy as hnp

from mmfm.errors import MMFMError

if not sys.platform.startswith("linux"):
    pytest.skip("the fuzz suite bounds each call in a forked child (Linux only)", allow_module_level=True)

PROFILE = os.environ.get("MMFM_FUZZ_PROFILE", "default")
if PROFILE not in ("default", "long"):
    raise ValueError(f"MMFM_FUZZ_PROFILE must be 'default' or 'long', got {PROFILE!r}")
TIME_SCALE = float(os.environ.get("MMFM_FUZZ_TIME_SCALE", "1"))
SHRINK = os.environ.get("MMFM_FUZZ_SHRINK", "1") != "0"
SURVEY = os.environ.get("MMFM_FUZZ_SURVEY")
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    # Hypothesis caches what it learns under ./.hypothesis; keep the checkout clean.
    set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "mmfm-fuzz-hypothesis")
MIB = 1 << 20


def fuzz(examples: int) -> settings:
    """Settings of one property: `examples` by default, 25 times more (randomly seeded) with the long profile."""
    long = PROFILE == "long"
    return settings(
        max_examples=examples * 25 if long else examples,
        derandomize=not long,
        database=None,
        deadline=None,  # the time bound is enforced per call by `_bounded`
        print_blob=True,
        phases=list(Phase) if SHRINK else [p for p in Phase if p is not Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


# ---- running one call under bounds ----


class PropertyFailure(AssertionError):
    """A fuzzed call broke its property; subclasses per kind of failure let Hypothesis report each bug apart."""


_FAILURE_KINDS: dict[str, type[PropertyFailure]] = {}


def _failure(kind: str) -> type[PropertyFailure]:
    """The PropertyFailure subclass of `kind` (one class per kind, reused, so shrinking keeps tracking it)."""
    if kind not in _FAILURE_KINDS:
        name = "".join(c if c.isalnum() else "_" for c in kind)
        _FAILURE_KINDS[kind] = type(f"Fuzz_{name}", (PropertyFailure,), {})
    return _FAILURE_KINDS[kind]


def _fail(kind: str, message: str) -> None:
    """Raises the failure; in a survey, records it and lets the run go on."""
    if SURVEY:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(SURVEY, "a") as f:
            f.write(json.dumps({"test": test, "kind": kind, "message": message[:3000]}) + "\n")
        return
    raise _failure(kind)(message)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _is_allocation_failure(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or isinstance(e, RuntimeError) and "allocate" in str(e)


def _child(fn: Callable[[], Any], memory: int, write_fd: int) -> None:
    """Runs in the forked child: fn() under RLIMIT_AS, its outcome and peak memory pickled into write_fd."""
    gc.disable()  # a collection would touch every inherited object and copy the parent's memory page by page
    try:
        open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current RSS
    except OSError:
        pass
    start_rss = _status_kib("VmRSS") * 1024
    limit = _status_kib("VmSize") * 1024 + 2 * memory + 512 * MIB  # a safety net; the bound is the peak below
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    try:
        fn()
        outcome: tuple[str, ...] = ("ok",)
    except MMFMError as e:
        outcome = ("mmfm", f"{type(e).__name__}: {e}"[:500])
    except BaseException as e:  # noqa: BLE001 - every other exception is what the property forbids
        kind = "memory" if _is_allocation_failure(e) else "raised"
        tb = traceback.format_exc()
        outcome = (kind, type(e).__name__, str(e)[:1000], tb[-4000:])
    peak = _status_kib("VmHWM") * 1024 - start_rss
    os.write(write_fd, pickle.dumps((outcome, peak)))


def _bounded(fn: Callable[[], Any], seconds: float, memory: int = 512 * MIB) -> str:
    """Runs fn() in a forked child; raises a PropertyFailure unless it returns or raises an MMFMError within
    `seconds` and with at most `memory` bytes of new resident memory at its peak. Returns the MMFMError's text
    ("" when fn returned), for properties that look at the message.

    fn checks its own result (raising AssertionError when it makes no sense); it must not return a value.
    """
    seconds *= TIME_SCALE
    read_fd, write_fd = os.pipe()
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_fd)
            _child(fn, memory, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    data, timed_out = b"", False
    try:
        while True:
            remaining = started + seconds - time.monotonic()
            if remaining <= 0:
                timed_out = True
                os.kill(pid, signal.SIGKILL)
                break
            if select.select([read_fd], [], [], remaining)[0]:
                chunk = os.read(read_fd, 1 << 16)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if timed_out:
        _fail("time", f"still running after {seconds:.1f} s (time bound)")
        return "(timed out)"
    if not data:
        _fail("crash", f"the call killed its process (wait status {status})")
        return "(crashed)"
    outcome, peak = pickle.loads(data)
    if outcome[0] == "memory":
        _fail("memory", f"allocation refused past the memory bound ({outcome[1]}: {outcome[2][:300]})\n{outcome[3]}")
    elif outcome[0] == "raised":
        name, message, tb = outcome[1:]
        _fail(name, f"raised {name}: {message}\n--- child traceback ---\n{tb}")
    elif peak > memory:
        _fail("memory", f"peak memory grew by {peak / MIB:.0f} MiB (bound {memory / MIB:.0f} MiB)")
    return outcome[1] if outcome[0] == "mmfm" else ""


def _finite(tensor: torch.Tensor, what: str) -> None:
    assert torch.isfinite(tensor).all(), f"{what}: non-finite values in the result (a silent wrong answer)"


# ---- shared strategies ----

# Characters that trip text handling: line separators JSON keeps, NUL, BOM, U+FFFD, combining marks, CJK, emoji.
_AWKWARD = "\u2028\u2029\x85\x00\x1f\x7f\ufeff\ufffd\u0301\u4e00\U0001f600\u200b\t\r\n \xa0"
CHARS = st.one_of(
    st.characters(),
    st.characters(categories=["Cs"]),  # lone surrogates: valid str, not encodable as UTF-8
    st.sampled_from(_AWKWARD),
)
TEXT = st.text(CHARS, max_size=40)
HOSTILE_NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 1e30, -1e30, 1e-320, float("nan"), float("inf")]),
)


def _nested(depth: int, opener: str = "[", closer: str = "]") -> str:
    return opener * depth + closer * depth


# ---- image processor ----


@pytest.fixture(scope="module")
def image_processors():
    """The RGB processor of mmfm-test (32 px) and a one-channel one with the same transform."""
    from mmfm.encoders.image_processor import ImageProcessor
    from mmfm.loader import create_model

    rgb = create_model("mmfm-test").processors["image"]
    grey_config = {**rgb.data_config, "mean": rgb.data_config["mean"][:1], "std": rgb.data_config["std"][:1]}
    return {"rgb": rgb, "grey": ImageProcessor(grey_config, in_chans=1)}


def _check_pixels(pixels: torch.Tensor, processor: Any, batch: int) -> None:
    _, height, width = processor.data_config["input_size"]
    assert pixels.shape == (batch, processor.in_chans, height, width), f"pixel batch of shape {tuple(pixels.shape)}"
    assert pixels.dtype == torch.float32
    _finite(pixels, "pixels")


def _seed_images() -> dict[str, bytes]:
    """Small valid image files in many formats and modes (name -> bytes), the starting points of mutation."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    images = {
        "1": rgb.convert("1"),
        "L": rgb.convert("L"),
        "LA": rgb.convert("LA"),
        "P": rgb.convert("P"),
        "RGB": rgb,
        "RGBA": rgb.convert("RGBA"),
        "CMYK": rgb.convert("CMYK"),
        "I;16": Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16)),
        "I": rgb.convert("I"),
        "F": Image.fromarray(rng.random((5, 7), dtype=np.float32)),
    }
    seeds = {}
    for fmt, ext in (
        ("PNG", "png"),
        ("JPEG", "jpg"),
        ("GIF", "gif"),
        ("BMP", "bmp"),
        ("TIFF", "tif"),
        ("WEBP", "webp"),
    ):
        for mode, img in images.items():
            buffer = io.BytesIO()
            try:
                img.save(buffer, fmt)
            except (OSError, ValueError, KeyError):
                continue  # this format cannot hold this mode
            seeds[f"{mode}.{ext}"] = buffer.getvalue()
    # EXIF orientation, transparency key, animation.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", exif=exif)
    seeds["exif6.jpg"] = buffer.getvalue()
    buffer = io.BytesIO()
    rgb.convert("P").save(buffer, "PNG", transparency=0)
    seeds["trns.png"] = buffer.getvalue()
    buffer = io.BytesIO()
    rgb.save(buffer, "GIF", save_all=True, append_images=[rgb.convert("L").convert("RGB")])
    seeds["anim.gif"] = buffer.getvalue()
    return seeds


SEED_IMAGES = _seed_images()


def _png_with_size(data: bytes, width: int, height: int) -> bytes:
    """A PNG's bytes with the IHDR's width and height replaced (and its CRC fixed), the pixel data unchanged."""
    if not data.startswith(b"\x89PNG") or data[12:16] != b"IHDR":
        return data
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    return data[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of `width` x `height` zeros: a few KB that decode to width * height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    payload = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", payload) + chunk(b"IEND", b"")


def _bmp_with_size(data: bytes, width: int, height: int) -> bytes:
    if not data.startswith(b"BM") or len(data) < 26:
        return data
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def _gif_with_size(data: bytes, width: int, height: int) -> bytes:
    if not data.startswith(b"GIF") or len(data) < 10:
        return data
    return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]


_MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.binary(min_size=1, max_size=16)),
    st.tuples(
        st.just("size"),
        st.one_of(st.integers(0, 70000), st.sampled_from([1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1])),
        st.one_of(st.integers(0, 70000), st.sampled_from([1, 2**15, 2**16 - 1, 2**31 - 1, 2**32 - 1])),
    ),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    for mutation in mutations:
        kind = mutation[0]
        if kind == "flip" and data:
            position = mutation[1] % len(data)
            data = data[:position] + bytes([mutation[2]]) + data[position + 1 :]
        elif kind == "truncate" and data:
            data = data[: mutation[1] % len(data)]
        elif kind == "insert":
            position = mutation[1] % (len(data) + 1)
            data = data[:position] + mutation[2] + data[position:]
        elif kind == "size":
            width, height = mutation[1], mutation[2]
            data = _png_with_size(data, width, height)
            data = _bmp_with_size(data, min(width, 2**31 - 1), min(height, 2**31 - 1))
            data = _gif_with_size(data, width, height)
    return data


_EXTENSIONS = ("png", "jpg", "gif", "bmp", "tif", "webp", "jpeg", "tiff", "PNG", "txt", "")

IMAGE_FILES = st.one_of(
    st.tuples(
        st.sampled_from(sorted(SEED_IMAGES)),
        st.lists(_MUTATION, max_size=4),
        st.sampled_from(("same", *_EXTENSIONS)),
    ).map(
        lambda t: (
            _mutate(SEED_IMAGES[t[0]], t[1]),
            t[0].rsplit(".", 1)[1] if t[2] == "same" else t[2],
        )
    ),
    st.tuples(st.binary(max_size=512), st.sampled_from(_EXTENSIONS)),
)


# The inputs first: a 12000x12000 PNG bomb (+700 MB), and a header past PIL's bomb limit (raw error).
@example(file=(_png_bomb(12000, 12000), "png"), channels="rgb")
@example(file=(_png_with_size(SEED_IMAGES["RGB.png"], 30000, 30000), "png"), channels="rgb")
@fuzz(80)
@given(file=IMAGE_FILES, channels=st.sampled_from(["rgb", "grey"]))
def test_image_files_end_in_pixels_or_input_error(image_processors, tmp_path_factory, file, channels):
    data, ext = file
    path = tmp_path_factory.getbasetemp() / f"fuzz_image.{ext}" if ext else tmp_path_factory.getbasetemp() / "img"
    path.write_bytes(data)
    processor = image_processors[channels]

    def call():
        _check_pixels(processor([str(path)]), processor, 1)

    _bounded(call, seconds=5)


_IMAGE_DTYPES = st.sampled_from(
    ["uint8", "uint16", "int8", "int16", "int32", "int64", "uint32", "float16", "float32", "float64", "bool"]
)
_IMAGE_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    # extreme aspect ratios: a thin strip is cheap to hand in, and resizing its short side up is not
    st.tuples(st.integers(1, 3), st.integers(1, 200_000) | st.sampled_from([20_000, 200_000])),
    st.tuples(
        st.integers(1, 200_000) | st.sampled_from([20_000, 200_000]), st.integers(1, 3), st.sampled_from([1, 3, 4])
    ),
)


@st.composite
def image_arrays(draw):
    dtype = np.dtype(draw(_IMAGE_DTYPES))
    shape = draw(_IMAGE_SHAPES)
    elements = (
        hnp.from_dtype(dtype, allow_nan=True, allow_infinity=True) if dtype.kind == "f" else hnp.from_dtype(dtype)
    )
    if math.prod(shape) > 64:  # large arrays get one drawn value and a few drawn positions
        array = np.full(shape, draw(elements), dtype=dtype)
        flat = array.reshape(-1)
        for _ in range(draw(st.integers(0, 3))):
            flat[draw(st.integers(0, flat.size - 1))] = draw(elements)
        return array
    return draw(hnp.arrays(dtype, shape, elements=elements))


def _as_kind(array: np.ndarray, kind: str) -> Any:
    """The array handed in as itself, as a tensor (channels first when 3-D) or as a PIL image."""
    from PIL import Image

    if kind == "numpy":
        return array
    if kind == "tensor":
        tensor = torch.from_numpy(array.copy())
        return tensor.permute(2, 0, 1) if tensor.ndim == 3 else tensor
    try:
        return Image.fromarray(array)
    except Exception:  # noqa: BLE001 - PIL has no image for this array: hand in the array itself
        return array


@example(array=np.zeros((1, 200_000), np.uint8), kind="numpy", channels="rgb")  # a thin strip resized up
@fuzz(80)
@given(
    array=image_arrays(), kind=st.sampled_from(["numpy", "tensor", "pil"]), channels=st.sampled_from(["rgb", "grey"])
)
def test_image_arrays_end_in_pixels_or_input_error(image_processors, array, kind, channels):
    processor = image_processors[channels]
    item = _as_kind(array, kind)

    def call():
        _check_pixels(processor([item]), processor, 1)

    _bounded(call, seconds=5)


@example(values=np.array([[np.nan, 0.5]], np.float32))
@fuzz(20)
@given(values=hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6)), elements=st.floats(width=32)))
def test_float_images_with_nan_or_inf_are_refused(image_processors, tmp_path_factory, values):
    """A mode-F image (PIL image or TIFF file) with NaN or infinity is an InputError, not a black picture."""
    from PIL import Image

    path = tmp_path_factory.getbasetemp() / "fuzz_float.tif"
    Image.fromarray(values).save(path)
    processor = image_processors["rgb"]
    for item in (Image.fromarray(values), str(path)):

        def call(item=item):
            _check_pixels(processor([item]), processor, 1)

        message = _bounded(call, seconds=5)
        if not np.isfinite(values).all():
            if not message.startswith("InputError"):
                _fail("nan_image_accepted", f"{type(item).__name__} with NaN/Inf pixels was accepted")


# ---- audio processor ----


@pytest.fixture(scope="module")
def audio_processor():
    from mmfm.encoders.audio_processor import AudioProcessor
    from mmfm.registry import get_config

    return AudioProcessor(get_config("mmfm-test").audio)


_AUDIO_DTYPES = st.sampled_from(
    ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool", "complex64"]
)
_AUDIO_SHAPES = st.one_of(
    hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=12),
    st.tuples(st.integers(0, 48_000)),
    st.tuples(st.integers(1, 3), st.integers(0, 16_000)),
)
_FLOAT_SAMPLES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([1e25, -1e25, 1e38, 3e38, 1e300, 5e-324, 0.5, -1.0]),
)


@st.composite
def waveforms(draw):
    dtype = np.dtype(draw(_AUDIO_DTYPES))
    shape = draw(_AUDIO_SHAPES)
    if dtype.kind == "f":
        elements = _FLOAT_SAMPLES.map(lambda v: np.array(v).astype(dtype)[()])
    else:
        elements = hnp.from_dtype(dtype)
    if math.prod(shape) > 64:
        with np.errstate(over="ignore", invalid="ignore"):
            wave = np.full(shape, draw(elements), dtype=dtype)
            scale = draw(st.sampled_from([0.0, 0.1, 1.0]))
            if dtype.kind == "f" and scale:  # a tone, so resampling and the fbank see a signal
                wave = (wave + scale * np.sin(np.arange(shape[-1]) * 0.3)).astype(dtype)
        return wave
    return draw(hnp.arrays(dtype, shape, elements=elements))


SAMPLE_RATES = st.one_of(
    st.integers(-10, 400_000),
    st.sampled_from([8000, 11025, 16000, 16001, 22050, 22051, 32000, 44100, 48000, 48001, 96000, 384000]),
    st.sampled_from([0, 999, 384_001, 10**7, 2**31, 2**63 - 1, 10**30]),
    st.integers(1, 400_000).map(np.int64),
    st.integers(1, 60_000).map(np.uint16),
    st.sampled_from([16000.0, 44100.5, float("nan"), True, None, "16000"]),
)


@st.composite
def audio_items(draw):
    wave = draw(waveforms())
    if draw(st.booleans()) and wave.dtype not in (np.uint16,):
        wave = torch.from_numpy(np.ascontiguousarray(wave))
    return draw(st.sampled_from(["pair", "pair", "pair", "list", "triple", "bare"])), wave, draw(SAMPLE_RATES)


def _make_audio_item(kind: str, wave: Any, rate: Any) -> Any:
    return {"pair": (wave, rate), "list": [wave, rate], "triple": (wave, rate, rate), "bare": wave}[kind]


def _check_features(features: torch.Tensor, processor: Any, batch: int) -> None:
    config = processor.config
    assert features.shape == (batch, config.target_frames, config.num_mel_bins), f"shape {tuple(features.shape)}"
    _finite(features, "audio features")


@example(items=[("pair", np.full(1600, 1e25, np.float32), 16000)])  # NaN features
@example(items=[("pair", np.zeros(1600, np.float32), 16001)])  # 8.5 s and +4.1 GB
@fuzz(60)
@given(items=st.lists(audio_items(), min_size=1, max_size=2))
def test_audio_arrays_end_in_features_or_input_error(audio_processor, items):
    batch = [_make_audio_item(*item) for item in items]

    def call():
        _check_features(audio_processor(batch), audio_processor, len(batch))

    _bounded(call, seconds=5, memory=256 * MIB)


@example(rate=22051, seconds=0.1, amplitude=0.5)
@example(rate=48001, seconds=0.1, amplitude=0.5)
@fuzz(20)
@given(
    rate=st.integers(1000, 384_000),
    seconds=st.sampled_from([0.01, 0.1, 0.5]),
    amplitude=st.sampled_from([0.5, 1.0, 1e3]),
)
def test_any_rate_from_1khz_to_384khz_resamples_within_bounds(audio_processor, rate, seconds, amplitude):
    """Rates sharing almost no factor with 16 kHz (16001, 22051, 48001) took seconds and gigabytes."""
    t = np.arange(int(rate * seconds)) / rate
    wave = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)

    def call():
        _check_features(audio_processor([(wave, rate)]), audio_processor, 1)

    message = _bounded(call, seconds=3, memory=256 * MIB)
    if message:
        _fail("rate_refused", f"a {rate} Hz clip was refused: {message}")


@st.composite
def audio_files(draw):
    import soundfile

    rate = draw(st.sampled_from([8000, 16000, 22050, 44100, 48000]))
    samples = draw(st.integers(0, 4000))
    channels = draw(st.integers(1, 3))
    fmt, ext = draw(st.sampled_from([("WAV", "wav"), ("FLAC", "flac"), ("OGG", "ogg"), ("AIFF", "aiff")]))
    buffer = io.BytesIO()
    wave = np.sin(np.arange(samples * channels).reshape(samples, channels) * 0.1) * 0.5
    soundfile.write(buffer, wave, rate, format=fmt)
    data = _mutate(buffer.getvalue(), draw(st.lists(_MUTATION.filter(lambda m: m[0] != "size"), max_size=3)))
    return (data, ext) if draw(st.integers(0, 4)) else (draw(st.binary(max_size=256)), ext)


@fuzz(30)
@given(file=audio_files())
def test_audio_files_end_in_features_or_input_error(audio_processor, tmp_path_factory, file):
    data, ext = file
    path = tmp_path_factory.getbasetemp() / f"fuzz_audio.{ext}"
    path.write_bytes(data)

    def call():
        _check_features(audio_processor([str(path)]), audio_processor, 1)

    _bounded(call, seconds=5, memory=256 * MIB)


# ---- tokenizers ----


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The byte, CLIP and a small WordPiece tokenizer, their tables built here, before any fork."""
    from mmfm.encoders.tokenizers import ByteTokenizer, ClipTokenizer, WordPieceTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789.,!?'"]
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["the", "cat", "##s", "\u4e00", "é"]
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n", encoding="utf-8")
    found = {"byte": ByteTokenizer(), "clip": ClipTokenizer(), "wordpiece": WordPieceTokenizer(path)}
    for tokenizer in found.values():
        tokenizer(["warm up the tables"], max_length=16)
    return found


def _letters(seed: int, count: int) -> str:
    """`count` pseudo-random lowercase letters: one long word no BPE merge shortens much."""
    import random

    generator = random.Random(seed)
    return "".join(generator.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


# Long unspaced text (CLIP's BPE was quadratic on it: 16k chars 3.5 s, 32k chars 9 s).
LONG_TEXT = st.one_of(
    st.builds(
        lambda unit, count: (unit * count)[:32_768], st.text(CHARS, min_size=1, max_size=4), st.integers(1, 32_768)
    ),
    st.builds(_letters, st.integers(0, 2**32), st.integers(1, 32_768) | st.sampled_from([16_384, 32_768])),
)
TEXTS = st.lists(
    st.one_of(TEXT, LONG_TEXT, st.sampled_from(["[CLS]", "[SEP][PAD]x", "<start_of_text>", "&amp;", "\ud800"])),
    min_size=1,
    max_size=3,
)


@example(name="clip", texts=[_letters(0, 16_384)], max_length=77, add_eos=True, padding_side="right")  # quadratic
@example(name="byte", texts=["\ud800"], max_length=32, add_eos=True, padding_side="right")
@fuzz(60)
@given(
    name=st.sampled_from(["byte", "clip", "wordpiece"]),
    texts=TEXTS,
    max_length=st.sampled_from([2, 3, 8, 32, 77, 512]),
    add_eos=st.booleans(),
    padding_side=st.sampled_from(["right", "left"]),
)
def test_tokenizers_take_any_unicode(tokenizers, name, texts, max_length, add_eos, padding_side):
    tokenizer = tokenizers[name]

    def call():
        ids, mask = tokenizer(texts, max_length=max_length, add_eos=add_eos, padding_side=padding_side)
        assert ids.shape == mask.shape and ids.shape[0] == len(texts) and ids.shape[1] <= max_length
        assert ((0 <= ids) & (ids < tokenizer.vocab_size)).all(), "ids outside the vocabulary"
        assert (mask.sum(dim=1) >= 1 + add_eos).all()
        for row, row_mask in zip(ids, mask):
            real = row[row_mask].tolist()
            assert real[0] == tokenizer.bos_id, "a row does not start with BOS"
            if add_eos:
                assert real[-1] == tokenizer.eos_id, "a row does not end with EOS"
            assert isinstance(tokenizer.decode(row[row_mask]), str)

    _bounded(call, seconds=2, memory=256 * MIB)


@example(name="wordpiece", ids=[-1], as_tensor=False)  # wraps around to the last token
@fuzz(40)
@given(
    name=st.sampled_from(["byte", "clip", "wordpiece"]),
    ids=st.lists(st.integers(-300, 50_000) | st.sampled_from([-1, 0, 1, 2, 3, 258, 259, 49_407, 49_408]), max_size=12),
    as_tensor=st.booleans(),
)
def test_decode_takes_any_ids(tokenizers, name, ids, as_tensor):
    """Ids outside the vocabulary are an InputError, never an IndexError/KeyError/ValueError or a wrapped-around id."""
    tokenizer = tokenizers[name]
    handed = torch.tensor(ids, dtype=torch.long) if as_tensor else ids

    read = ids[: ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids  # decode stops at EOS

    def call():
        text = tokenizer.decode(handed)
        assert isinstance(text, str)
        assert all(0 <= i < tokenizer.vocab_size for i in read), f"decoded ids outside 0..{tokenizer.vocab_size - 1}"

    _bounded(call, seconds=2, memory=128 * MIB)


@fuzz(40)
@given(text=st.text(st.characters(exclude_categories=["Cs"]), max_size=60))
def test_byte_tokenizer_round_trips_text(tokenizers, text):
    tokenizer = tokenizers["byte"]
    ids, mask = tokenizer([text], max_length=4 * len(text) + 2)
    assert tokenizer.decode(ids[0][mask[0]]) == text


# ---- manifests ----


@pytest.fixture(scope="module")
def manifest_root(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("manifest")
    Image.new("RGB", (4, 4)).save(root / "a.png")
    (root / "folder.png").mkdir()
    return root


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), TEXT)
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=8
)
MANIFEST_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from(["a.png", "folder.png", "missing.png", "", ".", "a.png\x00"]),
    st.lists(TEXT, max_size=3),
)
MANIFEST_OBJECTS = st.dictionaries(
    st.sampled_from(["image", "audio", "text", "caption", "label", "id"]) | TEXT, MANIFEST_VALUES, max_size=4
)


def _json_line(value: Any, ensure_ascii: bool) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii)


MANIFEST_LINES = st.one_of(
    st.builds(_json_line, MANIFEST_OBJECTS, st.booleans()),
    st.builds(_json_line, JSON_VALUES, st.booleans()),
    TEXT,
    # deep nesting: json.loads raises RecursionError
    st.builds(
        lambda depth, key: '{"caption": ' * key + _nested(depth) + "}" * key, st.integers(1, 200_000), st.integers(0, 1)
    ),
    st.builds(lambda depth: _nested(depth, '{"a":', "}").replace("}", "1}", 1), st.integers(1, 200_000)),
)


def _check_trainable(record: dict[str, Any]) -> None:
    """What validation accepted, training can use: every text and caption encodes as UTF-8 and tokenizes."""
    from mmfm.encoders.tokenizers import ByteTokenizer

    texts = [record["text"]] if "text" in record else []
    texts += record.get("captions", record.get("caption", []))  # a dataset item, or a parsed record
    if texts:
        try:
            ByteTokenizer()(texts, max_length=32)
        except Exception as e:
            raise AssertionError(f"validation accepted a record training cannot tokenize ({e!r})") from None


@example(line='{"caption": "\\ud800"}')  # passes validation, crashes the collator
@example(line=_nested(100_000))  # RecursionError
@fuzz(80)
@given(line=MANIFEST_LINES)
def test_manifest_lines_end_in_a_record_or_input_error(manifest_root, line):
    from mmfm.data.manifest import parse_record

    def call():
        record = parse_record(line, manifest_root)
        assert isinstance(record, dict)
        _check_trainable(record)

    _bounded(call, seconds=5, memory=256 * MIB)


# Valid text: no lone surrogates, something besides whitespace; line separators JSON keeps inside strings.
VALID_TEXT = st.text(st.characters(exclude_categories=["Cs"]) | st.sampled_from(_AWKWARD), min_size=1).filter(
    lambda s: s.strip() and "\ufffd" not in s
)
VALID_RECORDS = st.fixed_dictionaries(
    {},
    optional={
        "text": VALID_TEXT,
        "caption": st.lists(VALID_TEXT, min_size=1, max_size=2),
        "label": VALID_TEXT | st.integers(0, 9),
        "id": st.integers(0, 100) | st.text(max_size=5),
    },
).filter(lambda r: "text" in r or "caption" in r)


@example(records=[{"caption": ["a\u2028b"]}, {"text": "c\x85d"}], ensure_ascii=False, crlf=False)
@fuzz(40)
@given(records=st.lists(VALID_RECORDS, min_size=1, max_size=4), ensure_ascii=st.booleans(), crlf=st.booleans())
def test_valid_manifests_load_every_line(manifest_root, records, ensure_ascii, crlf):
    """One valid JSON object per line, as `json.dumps` writes it (U+2028, U+0085 inside strings), loads whole."""
    from mmfm.data.manifest import ManifestDataset

    path = manifest_root / "valid.jsonl"
    newline = "\r\n" if crlf else "\n"
    path.write_text("".join(_json_line(r, ensure_ascii) + newline for r in records), encoding="utf-8", newline="")

    def call():
        for on_error in ("raise", "skip"):
            dataset = ManifestDataset(path, on_error=on_error)
            assert len(dataset) == len(records) and not dataset.skipped, f"{len(dataset)} of {len(records)} loaded"
            for i, record in enumerate(records):
                item = dataset[i]
                if "caption" in record:
                    assert item["captions"] == record["caption"]
                if "text" in record:
                    assert item["text"] == record["text"]
                if "label" in record:
                    assert item["label"] == str(record["label"])

    message = _bounded(call, seconds=5, memory=256 * MIB)
    if message:
        _fail("valid_manifest_refused", f"a valid manifest was refused: {message}")


@example(data=b'{"caption": "x"}\n' + _nested(100_000).encode(), on_error="skip")
@fuzz(30)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.lists(MANIFEST_LINES, max_size=4).map(lambda lines: "\n".join(lines).encode("utf-8", "surrogatepass")),
    ),
    on_error=st.sampled_from(["raise", "skip"]),
)
def test_manifest_files_end_in_a_dataset_or_input_error(manifest_root, data, on_error):
    import warnings

    from mmfm.data.manifest import ManifestDataset

    path = manifest_root / "any.jsonl"
    path.write_bytes(data)

    def call():
        warnings.simplefilter("ignore")
        dataset = ManifestDataset(path, on_error=on_error)
        for i in range(len(dataset)):
            _check_trainable(dataset[i])

    _bounded(call, seconds=5, memory=256 * MIB)


# ---- model configs ----


def _leaf_paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += _leaf_paths(value, (*prefix, key))
    return paths


def _base_config() -> dict[str, Any]:
    from mmfm.registry import get_config

    base = get_config("mmfm-test").to_dict()
    return base


BASE_CONFIG = _base_config()
CONFIG_PATHS = _leaf_paths(BASE_CONFIG)
CONFIG_VALUES = st.one_of(
    HOSTILE_NUMBERS,
    st.none(),
    st.booleans(),
    TEXT,
    st.lists(HOSTILE_NUMBERS, max_size=3),
    st.dictionaries(TEXT, HOSTILE_NUMBERS, max_size=2),
    st.integers(0, 5000),
    st.sampled_from(["mmfm-test", "linear", "byte", "clip", "wordpiece", "/dev/zero", ".", "vocab.txt"]),
)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    node = tree
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value
    return tree


@st.composite
def config_documents(draw):
    """(YAML text, whether it came from a mutated preset): full configs and recipes with a few hostile values."""
    kind = draw(st.sampled_from(["full", "recipe", "preset_value", "text", "bomb", "yaml"]))
    if kind in ("full", "recipe"):
        tree = json.loads(json.dumps(BASE_CONFIG)) if kind == "full" else {"preset": "mmfm-test"}
        for _ in range(draw(st.integers(1, 3))):
            path = draw(st.sampled_from(CONFIG_PATHS) | st.lists(TEXT, min_size=1, max_size=2).map(tuple))
            _set(tree, path, draw(CONFIG_VALUES))
        return _dump(tree, draw(st.booleans()))
    if kind == "preset_value":
        return _dump({"preset": draw(CONFIG_VALUES | st.sampled_from(["mmfm-tes", "hf-hub:x/y"]))})
    if kind == "text":
        return draw(TEXT | st.sampled_from(["!!python/object:os.system {}", "a: &a [*a]", "- 1", "", "~", "{"]))
    if kind == "bomb":  # a billion laughs: each level a list of `fanout` references to the one before
        key = draw(st.sampled_from(["name", "backbone", "unknown_key", "text", "preset"]))
        return _alias_bomb(draw(st.integers(1, 9)), draw(st.integers(2, 9)), key)
    return _dump(draw(JSON_VALUES))


def _dump(tree: Any, allow_unicode: bool = False) -> str:
    try:
        return yaml.safe_dump(tree, allow_unicode=allow_unicode)
    except (yaml.YAMLError, UnicodeError):  # what PyYAML cannot write is not the fuzzed code's problem
        return json.dumps(tree)  # JSON is YAML too


@pytest.fixture(scope="module")
def warm_configs():
    """Reads and builds one config before any fork, so each child finds timm and the heads imported."""
    from mmfm.registry import get_config

    _check_config(get_config("mmfm-test"))


def _alias_bomb(levels: int, fanout: int, key: str) -> str:
    """`key:` holding a list of `levels + 1` anchored lists, each `fanout` references to the one before."""
    lines = [f"{key}:", f"  - &l0 [{', '.join(['lol'] * fanout)}]"]
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * fanout)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def _check_config(config: Any) -> None:
    """An accepted config holds finite numbers and builds (on the meta device, as `mmfm info` does)."""
    from mmfm.model import MultimodalModel

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, float):
            assert math.isfinite(value), f"config accepted a non-finite {key}: {value}"

    walk(config.to_dict(), "")
    with torch.device("meta"):
        MultimodalModel(config)


@example(document="preset: null\n", binary=False)
@example(document="preset: [mmfm-test]\n", binary=False)
@example(document="preset: mmfm-test\nbackbone:\n  rope_theta: .nan\n", binary=False)
@example(document="preset: mmfm-test\nbackbone:\n  norm_eps: .nan\n", binary=False)
@example(document=_alias_bomb(9, 9, "name"), binary=False)  # 1 KB, 33 s building the error message
@fuzz(60)
@given(document=config_documents(), binary=st.booleans())
def test_config_files_end_in_a_config_or_config_error(warm_configs, tmp_path_factory, document, binary):
    from mmfm.registry import read_config

    path = tmp_path_factory.getbasetemp() / "fuzz_config.yaml"
    data = document.encode("utf-8", "surrogatepass")
    path.write_bytes(data.replace(b" ", b"\xff", 1) if binary else data)

    def call():
        _check_config(read_config(path))

    _bounded(call, seconds=5)


def test_config_paths_that_are_not_regular_files_end_in_config_error(tmp_path):
    from mmfm.registry import read_config

    (tmp_path / "folder.yaml").mkdir()
    for path in (tmp_path / "folder.yaml", Path("/dev/null")):
        _bounded(lambda path=path: _check_config(read_config(path)), seconds=5)


# ---- training recipes and overrides ----

BASE_RECIPE = {
    "model": "mmfm-test",
    "data": {"train": "train.jsonl"},
    "tasks": [{"name": "caption", "objective": "caption", "inputs": ["image"]}],
    "steps": 4,
    "batch_size": 2,
}
FLOAT_KEYS = [
    "optim.lr",
    "optim.min_lr_ratio",
    "optim.weight_decay",
    "optim.eps",
    "optim.grad_clip",
    "finetune.lora.alpha",
]
OVERRIDE_KEYS = [
    *FLOAT_KEYS,
    "steps",
    "batch_size",
    "grad_accum",
    "seed",
    "resume",
    "out_dir",
    "model",
    "data.train",
    "data.on_error",
    "tasks",
    "optim.betas",
    "model_overrides.backbone.rope_theta",
    "optim",
    "optim.lr.x",
    "",
    " ",
    "steps.",
    ".steps",
]
OVERRIDE_VALUES = st.one_of(
    TEXT,
    st.sampled_from([".nan", ".inf", "-.inf", "nan", "3e-4", "1e400", "[", "{", "]", "!!python/name:os.system", "*a"]),
    st.sampled_from(["&a 1", "'", '"', "a: b: c", "- -", "@", "`", "%YAML 1.1", "---\n...", "\t", "1_000", "0x10"]),
    HOSTILE_NUMBERS.map(str),
)
OVERRIDES = st.lists(
    st.one_of(
        st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OVERRIDE_KEYS) | TEXT, OVERRIDE_VALUES),
        TEXT,
    ),
    max_size=3,
)


@pytest.fixture(scope="module")
def warm_recipes():
    """Validates one recipe before any fork, so each child finds the objectives imported."""
    from mmfm.train.config import TrainConfig

    TrainConfig.from_dict(dict(BASE_RECIPE))


def _check_recipe(config: Any) -> None:
    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        elif isinstance(value, float):
            assert math.isfinite(value), f"recipe accepted a non-finite {key}: {value}"

    walk(config.to_dict(), "")


@example(pairs=["optim.lr=.nan"])
@example(pairs=["steps=["])
@example(pairs=["optim.lr"])
@fuzz(80)
@given(pairs=OVERRIDES)
def test_override_strings_end_in_a_recipe_or_config_error(warm_recipes, pairs):
    from mmfm.train.config import TrainConfig, parse_overrides

    def call():
        _check_recipe(TrainConfig.from_dict(dict(BASE_RECIPE), "recipe.yaml", parse_overrides(pairs)))

    _bounded(call, seconds=5, memory=256 * MIB)


# Numbers as people write them: 3e-4, 1E-3, 1.5e+2, .5, 0.001, 2.5e-05.
_FORMATS = (repr, "{:e}".format, "{:E}".format, "{:g}".format, "{:.3g}".format, "{:.0e}".format)


def _short(value: float) -> str:
    """3e-4 rather than 3e-04; .5 rather than 0.5."""
    text = f"{value:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return text if float(text) else repr(value)


def number_literals(low: float, high: float) -> st.SearchStrategy[str]:
    """Positive floats in [low, high] written in the ways people write them (each literal's value also in range)."""
    value = st.floats(min_value=low, max_value=high)
    literal = st.one_of(
        st.builds(lambda v, f: f(v), value, st.sampled_from(_FORMATS)),
        value.map(_short),
        value.filter(lambda v: 0.001 <= v < 1).map(lambda v: f"{v:.3f}"[1:]),
    )
    return literal.filter(lambda text: low <= float(text) <= high)


@example(key_literal=("optim.lr", "3e-4"))
@fuzz(30)
@given(
    key_literal=st.one_of(
        st.tuples(st.just("optim.lr"), number_literals(1e-7, 1.0)),
        st.tuples(st.just("optim.eps"), number_literals(1e-12, 1e-3)),
        st.tuples(st.just("finetune.lora.alpha"), number_literals(0.5, 64.0)),
    )
)
def test_numbers_written_as_people_write_them_are_numbers(warm_recipes, tmp_path_factory, key_literal):
    """`optim.lr=3e-4` on the command line and `lr: 1e-3` in a recipe are the float 3e-4 and 1e-3."""
    key, literal = key_literal
    from mmfm.train.config import TrainConfig, parse_overrides

    section, *rest = key.split(".")
    recipe = tmp_path_factory.getbasetemp() / "fuzz_recipe.yaml"
    text = (
        yaml.safe_dump(BASE_RECIPE)
        + f"{section}:\n"
        + "".join(
            f"{'  ' * (i + 1)}{part}:" + ("\n" if i < len(rest) - 1 else f" {literal}\n") for i, part in enumerate(rest)
        )
    )
    recipe.write_text(text)

    def value_of(config: Any) -> Any:
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        return node

    def from_command_line():
        value = value_of(TrainConfig.from_dict(dict(BASE_RECIPE), "recipe.yaml", parse_overrides([f"{key}={literal}"])))
        assert value == float(literal) and isinstance(value, float), f"{key}={literal} gave {value!r}"

    def from_file():
        value = value_of(TrainConfig.from_file(recipe))
        assert value == float(literal) and isinstance(value, float), f"'{rest[-1]}: {literal}' gave {value!r}"

    for call in (from_command_line, from_file):
        message = _bounded(call, seconds=5, memory=256 * MIB)
        if message:
            _fail("number_refused", f"{key} written as {literal!r} was refused: {message}")


@example(key_literal=("norm_eps", "1e-5"))
@fuzz(15)
@given(
    key_literal=st.one_of(
        st.tuples(st.just("rope_theta"), number_literals(100.0, 1e6)),
        st.tuples(st.just("norm_eps"), number_literals(1e-12, 1e-3)),
    )
)
def test_model_config_numbers_written_as_people_write_them(warm_configs, tmp_path_factory, key_literal):
    key, literal = key_literal
    from mmfm.registry import read_config

    path = tmp_path_factory.getbasetemp() / "fuzz_numbers.yaml"
    path.write_text(f"preset: mmfm-test\nbackbone:\n  {key}: {literal}\n")

    def call():
        value = getattr(read_config(path).backbone, key)
        assert value == float(literal), f"backbone.{key}: {literal} gave {value!r}"

    message = _bounded(call, seconds=5, memory=256 * MIB)
    if message:
        _fail("number_refused", f"backbone.{key} written as {literal!r} was refused: {message}")


# ---- the command line ----


@pytest.fixture(scope="module")
def cli_scene(tmp_path_factory):
    """A folder of inputs for the command line, and the CLI warmed up (imports done before any fork)."""
    import soundfile
    from PIL import Image

    from mmfm.cli import main

    scene = tmp_path_factory.mktemp("cli")
    Image.new("RGB", (8, 8), "red").save(scene / "good.png")
    (scene / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    soundfile.write(scene / "tone.wav", np.sin(np.arange(1600) * 0.3) * 0.5, 16000)
    (scene / "labels.txt").write_bytes(b"\xff\xfe\x00cat\ndog\x00\n")
    (scene / "labels_dir").mkdir()
    (scene / "imgs").mkdir()
    shutil.copy(scene / "good.png", scene / "imgs" / "one.png")
    (scene / "binary.yaml").write_bytes(b"\xff\xfe\x00\x01 not yaml")
    (scene / "recipe.yaml").write_text(yaml.safe_dump({**BASE_RECIPE, "out_dir": "run"}))
    (scene / "bad.jsonl").write_text('{"image": "good.png", "caption": "\\ud800"}\n' + "[" * 100_000 + "\n")
    os.makedirs(scene / "out_is_file_parent")
    (scene / "file_not_folder").write_text("x")
    try:
        with open(os.path.join(os.fsencode(scene), b"\xff.png"), "wb") as f:  # "\udcff.png" in Python
            f.write((scene / "good.png").read_bytes())
    except OSError:
        pass  # a filesystem that refuses non-UTF-8 names
    with open(os.devnull, "w") as devnull:
        stdout, stderr = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = devnull
        try:
            cwd = os.getcwd()
            os.chdir(scene)
            main(["caption", "--model", "mmfm-test", "good.png", "tone.wav"])
            main(["classify", "--model", "mmfm-test", "good.png", "--labels", "a,b"])
            main(
                [
                    "generate-image",
                    "--model",
                    "mmfm-test",
                    "--text",
                    "a",
                    "--out",
                    "x.png",
                    "--num-inference-steps",
                    "1",
                ]
            )
        finally:
            os.chdir(cwd)
            sys.stdout, sys.stderr = stdout, stderr
    return scene


_CLI_OPTIONS = {
    "info": ["--model", "--list"],
    "caption": ["--model", "--device", "--dtype", "--batch-size", "--json", "--prompt", "--max-new-tokens"]
    + ["--num-beams", "--do-sample", "--temperature", "--top-k", "--top-p", "--seed"],
    "classify": ["--model", "--device", "--dtype", "--batch-size", "--json", "--labels", "--labels-file", "--top"],
    "embed": ["--model", "--device", "--dtype", "--batch-size", "--json", "--text", "--out"],
    "generate-image": ["--model", "--device", "--dtype", "--batch-size", "--json", "--text", "--audio", "--image"]
    + ["--out", "--num-images", "--num-inference-steps", "--guidance-scale", "--scheduler", "--seed"],
    "train": [],
    "eval": ["--model", "--data", "--samples", "--batch-size", "--out"],
    "convert": ["--from", "--model-name", "--base", "--overwrite"],
}
_CLI_WORDS = st.sampled_from(
    ["mmfm-test", "good.png", "bad.png", "tone.wav", "labels.txt", "labels_dir", "imgs", "binary.yaml"]
    + [
        "recipe.yaml",
        "bad.jsonl",
        "missing.png",
        "file_not_folder",
        "file_not_folder/x.json",
        "new/out.json",
        "\udcff.png",
    ]
    + ["a,a,b", "cat,dog", ",", "x.png", "x.npy", "timm", "ast", "open_clip", "cpu", "cuda", "meta", "bfloat16"]
    + ["nan", "inf", "-inf", "0", "-1", "1", "2", "2.5", "1e30", "1e400", "99999999999999999999999", "-99999999999"]
    + ["steps=2", "optim.lr=3e-4", "optim.lr=.nan", "out_dir=file_not_folder", "resume=true", "steps=", "=1", "a.b"]
    + ["runs/final", "hf-hub:", "-", "--", "--help", "--version", "-h", "\udcff", "ddim"]
)
_CLI_TEXT = TEXT.filter(lambda s: not s.startswith(("/", "~")) and ".." not in s and "\x00" not in s)


@st.composite
def cli_argvs(draw):
    command = draw(st.sampled_from([*_CLI_OPTIONS, "generate", "data", "nonsense"]))
    options = _CLI_OPTIONS.get(command, [])
    token = st.sampled_from(options) | _CLI_WORDS | _CLI_TEXT if options else _CLI_WORDS | _CLI_TEXT
    argv = [command, *draw(st.lists(token, max_size=8))]
    if command in ("caption", "classify", "embed", "generate-image", "eval") and draw(st.integers(0, 3)):
        argv += ["--model", "mmfm-test"]  # mostly a model that opens, so the checks after opening are reached
    if command in ("generate-image", "generate") and "--num-inference-steps" not in argv:
        argv += ["--num-inference-steps", "2"]
    if command == "data":  # `data digits` writes 1,797 images: only its argument checks are fuzzed
        argv = ["data", *draw(st.lists(_CLI_WORDS | _CLI_TEXT, max_size=3)), "--help"]
    return argv


def _run_cli(argv: list[str], folder: Path) -> None:
    """main(argv) in `folder` with a UTF-8 stdout (strict) and stderr (backslashreplace), as a terminal has."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # a hub request must fail at once here, never reach out
    try:
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    os.chdir(folder)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    stderr = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="backslashreplace")
    sys.stdout, sys.stderr = stdout, stderr
    from mmfm.cli import main

    try:
        code = main(argv)
    except SystemExit as e:  # argparse: usage errors (2), --help and --version (0)
        code = e.code
    finally:
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    stderr.flush()
    errors = stderr.buffer.getvalue().decode("utf-8", "replace")
    assert "Traceback" not in errors, f"a traceback on stderr:\n{errors[-2000:]}"
    assert code in (0, 2, None), f"exit code {code!r}; stderr: {errors[-500:]}"


@example(argv=["caption", "--model", "mmfm-test", "good.png", "--do-sample", "--temperature", "nan"])
@example(argv=["caption", "--model", "mmfm-test", "good.png", "--seed", "99999999999999999999999"])
@example(argv=["classify", "--model", "mmfm-test", "good.png", "--labels-file", "labels.txt"])
@example(argv=["classify", "--model", "mmfm-test", "good.png", "--labels-file", "labels_dir"])
@example(argv=["caption", "--model", "mmfm-test", "\udcff.png"])
@example(argv=["train", "binary.yaml"])
@example(argv=["train", "recipe.yaml", "optim.lr=.nan"])
@example(argv=["train", "recipe.yaml", "steps=["])
@example(argv=["train", "recipe.yaml", "data.train=bad.jsonl", "out_dir=file_not_folder"])
@example(argv=["eval", "--model", "mmfm-test", "--data", "bad.jsonl", "--out", "new/out.json"])
@example(argv=["info", "--model", "runs/final"])
@example(argv=["generate-image", "--model", "mmfm-test", "--text", "a", "--out", "x.png", "--seed", "-1"])
@fuzz(50)
@given(argv=cli_argvs())
def test_cli_ends_in_a_result_or_one_error_line(cli_scene, argv):
    folder = Path(tempfile.mkdtemp(prefix="fuzz_cli_", dir=cli_scene.parent))
    try:
        shutil.copytree(cli_scene, folder, dirs_exist_ok=True)
        _bounded(lambda: _run_cli(argv, folder), seconds=20, memory=1024 * MIB)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
