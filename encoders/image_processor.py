"""Turns user images (paths, PIL images, numpy arrays, tensors) into the normalised pixel batch an ImageEncoder reads.

Loading converts every input to an 8-bit PIL image in RGB (or L for one-channel models); resizing, cropping and
normalising are timm's own eval transform, built from the encoder's `data_config`.

Images larger than `ImageProcessor.max_pixels` are refused, files and PIL images before they are decoded
(decompression bombs: a 17 KB PNG can hold 12000x12000 pixels), and images much larger than the transform needs
are shrunk while decoding (JPEG's DCT scaling) or right after (a box reduction), as PIL's `thumbnail` does.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor

from mmfm.errors import ConfigError, InputError

ImageInput = str | Path | Image.Image | np.ndarray | Tensor

# Modes that carry an alpha channel; PIL converts each of them to RGBA.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)
# What PIL raises on a damaged file, opening or decoding it.
_PIL_PARSE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# PIL's own limit (Image.MAX_IMAGE_PIXELS: about 9459 x 9459); PIL warns above it and refuses above twice it.
DEFAULT_MAX_PIXELS = 89_478_485
# An image is shrunk before the transform only to at least this many times the size the transform resizes it to,
# so the transform's antialiased resize still does the final reduction (PIL's `reducing_gap`).
_REDUCING_GAP = 2
# Modes `Image.reduce` handles and for which box-averaging commutes with `_to_mode` (alpha is premultiplied).
_REDUCIBLE_MODES = ("L", "RGB", "RGBA", "LA")
# EXIF orientation -> the transpose that makes the image upright (ImageOps.exif_transpose's table).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageProcessor:
    """Loads images and applies timm's eval transform (resize, centre crop, normalise) to make a pixel batch.

    Attributes:
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        in_chans: 3 (images become RGB) or 1 (images become L).
        transform: timm's eval transform, PIL image -> (in_chans, H, W) float32 tensor.
        max_pixels: the largest width x height of an image that is loaded (default
            89,478,485, PIL's `Image.MAX_IMAGE_PIXELS`); None lifts the limit. Set it on the class
            (`ImageProcessor.max_pixels = 200_000_000`) or on one processor (`model.processors["image"]`). PIL
            itself refuses images above twice `PIL.Image.MAX_IMAGE_PIXELS`: raise that too for larger images.
    """

    max_pixels: int | None = DEFAULT_MAX_PIXELS

    @classmethod
    def for_encoder(cls, encoder: Any, config: Any) -> ImageProcessor:
        """The processor of an `ImageEncoder` built from `config` (an `ImageEncoderConfig`)."""
        return cls(encoder.data_config, config.in_chans)

    def __init__(self, data_config: dict[str, Any], in_chans: int = 3) -> None:
        """Builds timm's eval transform for `data_config`.

        Args:
            data_config: an ImageEncoder's `data_config`, or one from timm's `resolve_data_config`.
            in_chans: channels the encoder takes: 3 or 1.

        Raises:
            ConfigError: `in_chans` is not 1 or 3, or mean/std do not have `in_chans` values.
        """
        from timm.data import create_transform  # imported here: timm takes a second to import

        if in_chans not in (1, 3):
            raise ConfigError(f"image.in_chans: images can be loaded as RGB (3) or L (1), not {in_chans} channels")
        for key in ("mean", "std"):
            # Normalize would broadcast 3 statistics over a 1-channel image into 3 channels without complaint.
            if len(data_config[key]) != in_chans:
                raise ConfigError(f"image.{key} has {len(data_config[key])} values for in_chans={in_chans}")
        self.data_config = data_config
        self.in_chans = in_chans
        self.transform = create_transform(**data_config, is_training=False)
        self._shrink_to = _transform_resize_bound(data_config)

    def __call__(self, images: ImageInput | list[ImageInput] | tuple[ImageInput, ...]) -> Tensor:
        """Loads and transforms a batch of images.

        Args:
            images: a list (or tuple) of images, or a single image; see `load` for what an image may be.

        Returns:
            (B, in_chans, H, W) float32 pixels, H and W from `data_config["input_size"]`.

        Raises:
            InputError: an image cannot be loaded; the message gives its index in the batch.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InputError("no images given: expected a non-empty list of images")
        pixels = [self.transform(self.load(item, index=i)) for i, item in enumerate(images)]  # B x (C, H, W)
        return torch.stack(pixels)  # (B, C, H, W)

    def load(self, item: ImageInput, index: int | None = None) -> Image.Image:
        """Loads one image as an 8-bit PIL image in RGB, or in L when `in_chans` is 1.

        Inputs:
            - a path (str or Path) to any image file PIL reads; the file is fully decoded here.
            - a PIL image.
            - a numpy array: HxW, HxWx1 (grey), HxWx3 (RGB) or HxWx4 (RGBA); uint8 in 0..255, uint16 in 0..65535
              (divided by 257 to 8 bit) or float in [0, 1].
            - a torch tensor: CxHxW with C in 1, 3, 4, or HxW; uint8, or float in [0, 1].

        Floats are rounded to 8 bit. Files and PIL images are turned upright by their EXIF orientation tag. Images
        with more than `max_pixels` pixels are refused (files and PIL images before decoding). A file or PIL image whose
        sides are both at least twice what the transform resizes them to is shrunk first, keeping each side at
        least twice that: JPEG files decode at 1/2, 1/4 or 1/8 scale, and L/RGB/RGBA/LA images are then
        box-reduced by an integer factor (the transform's result differs from the full-size one by a few levels).
        Modes:
            - L, LA, 1 (greyscale): replicated over R, G and B.
            - RGBA, LA, PA and images with a transparency key (P, L or RGB): composited over a white background.
            - P (palette): expanded through its palette.
            - I;16 (16-bit greyscale): divided by 257, then treated as L.
            - I (32-bit integer greyscale): clipped to 0..65535, divided by 257, then treated as L.
            - F (32-bit float greyscale): taken to lie in [0, 1], clipped to it and scaled to 0..255, then as L;
              NaN or infinite pixels are an error.
            - CMYK, YCbCr, LAB, HSV: PIL's own conversion.
            For in_chans == 1, colour images are reduced to L with PIL's ITU-R 601-2 luma transform.

        Args:
            item: the image.
            index: its position in a batch, for error messages.

        Returns:
            A new PIL image in mode RGB or L.

        Raises:
            InputError: the file is missing or is not a readable image, it has more than `max_pixels` pixels, a
                mode-F image has NaN or infinite pixels, or the array has an unsupported dtype, shape or value
                range; the message names the input.
        """
        name = _describe(item, index)
        if isinstance(item, (str, Path)):
            img = self._open(Path(item), name)
        elif isinstance(item, Image.Image):
            self._check_size(item, name)
            _decode(item, name)  # the caller's image: decoded at full size, never drafted
            img = self._shrink_upright(item)
        elif isinstance(item, np.ndarray):
            if item.ndim in (2, 3):
                self._check_pixels(item.shape[1], item.shape[0], name)
            img = _from_numpy(item, name)
        elif isinstance(item, Tensor):
            if item.ndim in (2, 3):
                self._check_pixels(item.shape[-1], item.shape[-2], name)
            img = _from_numpy(_tensor_to_hwc(item, name), name)
        else:
            raise InputError(f"{name}: expected a path, PIL image, numpy array or torch tensor")
        return _to_mode(img, "RGB" if self.in_chans == 3 else "L", name)

    def _open(self, path: Path, name: str) -> Image.Image:
        """Opens, checks the size of, decodes (shrunk where the transform allows) and turns upright an image file."""
        if not path.exists():
            raise InputError(f"{name}: file not found")
        if not path.is_file():
            raise InputError(f"{name}: not a file")
        try:
            with warnings.catch_warnings():
                # PIL warns above its MAX_IMAGE_PIXELS; max_pixels decides, and PIL's error above twice it is caught.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    self._check_size(img, name)
                    if img.format == "JPEG" and self._shrink_to is not None:
                        bound = _REDUCING_GAP * self._shrink_to  # DCT scaling keeps both sides >= bound
                        img.draft(None, (bound, bound))
                    _decode(img, name)
                    # a new image, which outlives the file that `with` closes
                    return self._shrink_upright(img)
        except InputError:
            raise
        except Image.DecompressionBombError as e:
            raise InputError(f"{name}: {e} (PIL's own limit, twice PIL.Image.MAX_IMAGE_PIXELS)") from None
        except _PIL_PARSE_ERRORS as e:  # PIL's header parsers raise these on a damaged file (a PPM header: ValueError)
            raise InputError(f"{name}: not a readable image file ({e})") from e

    def _check_size(self, img: Image.Image, name: str) -> None:
        """Refuses a PIL image of more than `max_pixels` pixels, before anything decodes it."""
        self._check_pixels(img.width, img.height, name)

    def _check_pixels(self, width: int, height: int, name: str) -> None:
        """Refuses an image of more than `max_pixels` pixels, as it is or once the transform resizes it.

        The transform scales the short side to its resize size, so a thin strip (1 x 200,000 pixels) grows by
        that factor squared: such a strip is refused by the size it would reach.
        """
        if self.max_pixels is None:
            return
        pixels = width * height
        if pixels > self.max_pixels:
            raise InputError(
                f"{name}: the image is {width}x{height} = {pixels:,} pixels, more than the limit of "
                f"{self.max_pixels:,} (a decompression bomb?); ImageProcessor.max_pixels sets the limit"
            )
        scale = (self._shrink_to or 0) / max(min(width, height), 1)
        if scale > 1 and pixels * scale * scale > self.max_pixels:
            raise InputError(
                f"{name}: the image is {width}x{height} pixels, so thin that resizing its short side to "
                f"{self._shrink_to} would make {int(pixels * scale * scale):,} pixels, more than the limit of "
                f"{self.max_pixels:,}; ImageProcessor.max_pixels sets the limit"
            )

    def _shrink_upright(self, img: Image.Image) -> Image.Image:
        """A new image: the decoded `img` box-reduced when the transform allows, turned upright by its EXIF tag.

        The reduction factor is the largest integer keeping both sides >= the gap bound; images with a colour
        key (which averaging would break) and modes `Image.reduce` cannot average are not reduced.
        """
        bound = None if self._shrink_to is None else _REDUCING_GAP * self._shrink_to
        factor = 1 if bound is None else min(img.size) // bound
        if factor < 2 or img.mode not in _REDUCIBLE_MODES or "transparency" in img.info:
            return ImageOps.exif_transpose(img)
        orientation = img.getexif().get(ExifTags.Base.Orientation)  # read before `reduce` drops the metadata
        reduced = img.reduce(factor)
        method = _EXIF_TRANSPOSE.get(orientation)
        return reduced if method is None else reduced.transpose(method)


def _transform_resize_bound(data_config: dict[str, Any]) -> int | None:
    """The longest side timm's eval transform resizes an image to, or None when shrinking first is not safe.

    Every crop mode (center, squash, border) resizes to at most floor(side / crop_pct) pixels per side, and the
    crop that follows takes at most `input_size`; other options (a trimmed border, NaFlex) are left alone.
    """
    known = {"input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"}
    if set(data_config) - known or data_config.get("crop_mode") not in (None, "center", "squash", "border"):
        return None
    _, height, width = data_config["input_size"]
    crop_pct = data_config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    return max(height, width, math.floor(max(height, width) / crop_pct))


def _describe(item: object, index: int | None) -> str:
    """How error messages name an input: its path, or its type and shape, prefixed by its batch index."""
    if isinstance(item, (str, Path)):
        what = repr(str(item))
    elif isinstance(item, Image.Image):
        what = f"PIL image of mode {item.mode} and size {item.width}x{item.height}"
    elif isinstance(item, np.ndarray):
        what = f"numpy array of shape {item.shape} and dtype {item.dtype}"
    elif isinstance(item, Tensor):
        what = f"torch tensor of shape {tuple(item.shape)} and dtype {item.dtype}"
    else:
        what = f"object of type {type(item).__name__}"
    return what if index is None else f"image {index} ({what})"


def _decode(img: Image.Image, name: str) -> None:
    """Decodes the whole image now, so a truncated or corrupt file fails here rather than mid-transform."""
    try:
        img.load()
    except Image.DecompressionBombError as e:  # a GIF frame or TIFF tile larger than PIL allows
        raise InputError(f"{name}: {e} (PIL's own limit, twice PIL.Image.MAX_IMAGE_PIXELS)") from None
    except _PIL_PARSE_ERRORS as e:
        raise InputError(f"{name}: corrupt or truncated image ({e})") from e


def _tensor_to_hwc(tensor: Tensor, name: str) -> np.ndarray:
    """A CxHxW or HxW tensor as an HxWxC or HxW numpy array."""
    if tensor.ndim not in (2, 3) or tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4):
        raise InputError(f"{name}: expected a CxHxW tensor with C in 1, 3, 4, or an HxW tensor")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise InputError(f"{name}: expected dtype uint8 (0..255) or a float dtype (0..1)")
    if tensor.is_meta:
        raise InputError(f"{name}: a meta tensor holds no pixels")
    if tensor.layout != torch.strided:
        raise InputError(f"{name}: a {tensor.layout} tensor; pass a dense one")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()  # numpy has no bfloat16
    if tensor.ndim == 3:
        tensor = tensor.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return tensor.numpy()


def _from_numpy(array: np.ndarray, name: str) -> Image.Image:
    """An HxW, HxWx1, HxWx3 or HxWx4 array as an L, RGB or RGBA image."""
    if array.size == 0:
        raise InputError(f"{name}: the image is empty")
    if array.ndim not in (2, 3) or array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise InputError(
            f"{name}: expected an HxW, HxWx1, HxWx3 or HxWx4 array (numpy arrays are channels-last; "
            "pass a CxHxW image as a torch tensor)"
        )
    if array.dtype == np.uint16:
        array = _uint16_to_uint8(array)
    elif array.dtype in _FLOAT_DTYPES:
        if not np.isfinite(array).all():
            raise InputError(f"{name}: float images must not contain NaN or infinity")
        low, high = array.min(), array.max()
        if low < 0 or high > 1:
            raise InputError(f"{name}: float images must lie in [0, 1], got values in [{low:g}, {high:g}]")
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise InputError(f"{name}: expected dtype uint8 (0..255), uint16 (0..65535) or float (0..1)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # (H, W, 1) -> (H, W)
    return Image.fromarray(np.ascontiguousarray(array))


def _uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    """Rounds 0..65535 to 0..255; 257 * v maps 8-bit v to 16 bits exactly, so this inverts it."""
    return ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)


def _to_mode(img: Image.Image, mode: str, name: str) -> Image.Image:
    """Converts any PIL image to a new 8-bit RGB or L image, as `ImageProcessor.load` documents."""
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray(_uint16_to_uint8(np.clip(np.asarray(img).astype(np.int64), 0, 65535)))
    elif img.mode == "F":
        values = np.asarray(img)
        if not np.isfinite(values).all():
            raise InputError(f"{name}: the mode-F (float) image contains NaN or infinite pixels")
        img = Image.fromarray(np.round(np.clip(values, 0, 1) * 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)
