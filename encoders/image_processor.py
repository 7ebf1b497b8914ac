"""Turns user images (paths, PIL images, numpy arrays, tensors) into the normalised pixel batch an ImageEncoder reads.

Loading converts every input to an 8-bit PIL image in RGB (or L for one-channel models); resizing, cropping and
normalising are timm's own eval transform, built from the encoder's `data_config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from mmfm.errors import ConfigError, InputError

ImageInput = str | Path | Image.Image | np.ndarray | Tensor

# Modes that carry an alpha channel; PIL converts each of them to RGBA.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
_FLOAT_DTYPES = (np.float16, np.float32, np.float64)


class ImageProcessor:
    """Loads images and applies timm's eval transform (resize, centre crop, normalise) to make a pixel batch.

    Attributes:
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        in_chans: 3 (images become RGB) or 1 (images become L).
        transform: timm's eval transform, PIL image -> (in_chans, H, W) float32 tensor.
    """

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

        Floats are rounded to 8 bit. Files and PIL images are turned upright by their EXIF orientation tag. Modes:
            - L, LA, 1 (greyscale): replicated over R, G and B.
            - RGBA, LA, PA and images with a transparency key (P, L or RGB): composited over a white background.
            - P (palette): expanded through its palette.
            - I;16 (16-bit greyscale): divided by 257, then treated as L.
            - I (32-bit integer greyscale): clipped to 0..65535, divided by 257, then treated as L.
            - F (32-bit float greyscale): taken to lie in [0, 1], clipped to it and scaled to 0..255, then as L.
            - CMYK, YCbCr, LAB, HSV: PIL's own conversion.
            For in_chans == 1, colour images are reduced to L with PIL's ITU-R 601-2 luma transform.

        Args:
            item: the image.
            index: its position in a batch, for error messages.

        Returns:
            A new PIL image in mode RGB or L.

        Raises:
            InputError: the file is missing or is not a readable image, or the array has an unsupported dtype,
                shape or value range; the message names the input.
        """
        name = _describe(item, index)
        if isinstance(item, (str, Path)):
            img = _open(Path(item), name)
        elif isinstance(item, Image.Image):
            _decode(item, name)
            img = ImageOps.exif_transpose(item)
        elif isinstance(item, np.ndarray):
            img = _from_numpy(item, name)
        elif isinstance(item, Tensor):
            img = _from_numpy(_tensor_to_hwc(item, name), name)
        else:
            raise InputError(f"{name}: expected a path, PIL image, numpy array or torch tensor")
        return _to_mode(img, "RGB" if self.in_chans == 3 else "L")


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


def _open(path: Path, name: str) -> Image.Image:
    if not path.exists():
        raise InputError(f"{name}: file not found")
    if not path.is_file():
        raise InputError(f"{name}: not a file")
    try:
        with Image.open(path) as img:
            _decode(img, name)
            # exif_transpose returns a new image, which outlives the file that `with` closes.
            return ImageOps.exif_transpose(img)
    except OSError as e:
        raise InputError(f"{name}: not a readable image file ({e})") from e


def _decode(img: Image.Image, name: str) -> None:
    """Decodes the whole image now, so a truncated or corrupt file fails here rather than mid-transform."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{name}: corrupt or truncated image ({e})") from e


def _tensor_to_hwc(tensor: Tensor, name: str) -> np.ndarray:
    """A CxHxW or HxW tensor as an HxWxC or HxW numpy array."""
    if tensor.ndim not in (2, 3) or tensor.ndim == 3 and tensor.shape[0] not in (1, 3, 4):
        raise InputError(f"{name}: expected a CxHxW tensor with C in 1, 3, 4, or an HxW tensor")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise InputError(f"{name}: expected dtype uint8 (0..255) or a float dtype (0..1)")
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


def _to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Converts any PIL image to a new 8-bit RGB or L image, as `ImageProcessor.load` documents."""
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray(_uint16_to_uint8(np.clip(np.asarray(img).astype(np.int64), 0, 65535)))
    elif img.mode == "F":
        img = Image.fromarray(np.round(np.clip(np.asarray(img), 0, 1) * 255).astype(np.uint8))
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert(mode)
