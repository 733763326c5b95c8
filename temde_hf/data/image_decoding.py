"""Decode any image file or byte string to the RGB picture a model should see.

This module imports only the standard library and Pillow: `temde-hf publish` ships it beside the
Inference Endpoints ``handler.py``, which must not import temde_hf. Everything else reaches it through
`temde_hf.data.common.open_image`, which adds the file name to the error.

What "the picture a model should see" means here:
- EXIF orientation is applied (a phone photo stored sideways is shown upright).
- 16-bit and 32-bit grey images are scaled to 8 bits (a plain ``convert("RGB")`` clips them to white).
- Transparency (RGBA, LA, PA, palette or grey with a transparent colour) is composited on white, the
  way a viewer shows it, instead of exposing whatever colour the transparent pixels happen to hold.
- CMYK, palette, 1-bit and other modes become RGB.
- More than `max_pixels` pixels is refused from the header alone, before any decoding (a 200 KB PNG
  can declare 12000 x 12000 pixels: a decompression bomb).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, ImageOps, UnidentifiedImageError

# Every failure a decoder of an untrusted file can raise for bad data (not for bugs).
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError)
_WHITE = (255, 255, 255, 255)


class ImageDecodeError(ValueError):
    """The data is not a usable image; the message says why (the caller adds which file)."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares more pixels than allowed (a possible decompression bomb)."""


def default_max_pixels() -> int:
    """The pixel limit used when none is given: Pillow's own bomb threshold, read at call time.

    Pillow only warns between this and twice this; here it is a clear error, so a caller who really
    needs bigger images raises ``PIL.Image.MAX_IMAGE_PIXELS`` (or passes `max_pixels`).
    """
    return int(Image.MAX_IMAGE_PIXELS or 2**62)


def _check_size(image: Image.Image, limit: int) -> None:
    n_pixels = image.width * image.height
    if n_pixels > limit:
        raise ImageTooLargeError(
            f"image has {n_pixels:,} pixels ({image.width} x {image.height}), more than the limit of "
            f"{limit:,} (a possible decompression bomb); downscale it, or raise the limit if it is genuine"
        )


_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a named pipe (FIFO)",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}


def _require_regular_file(path: str | Path) -> None:
    """Refuse a path that is not a regular file before opening it: reading a FIFO or a device blocks
    forever (or never ends), and a directory is no image. `os.stat` follows a link to its target and
    never blocks."""
    mode = os.stat(path).st_mode  # FileNotFoundError for a missing path, as before
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")
        raise ImageDecodeError(f"is {kind}, not an image file")


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    """Grey images with more than 8 bits per pixel (``I;16*``, ``I``, ``F``) -> ``L``, range kept."""
    if image.mode.startswith("I;16"):
        image, top = image.convert("I"), 65535.0
    else:  # "I" (32-bit int) or "F" (float): the range is not fixed by the mode, so use the data's
        low, high = image.getextrema()
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            top = 1.0  # float images in [0, 1]
        elif high <= 255:
            top = 255.0
        elif high <= 65535:
            top = 65535.0  # 16-bit values stored in a 32-bit mode (PNG, TIFF)
        else:
            top = float(high)
    # point() on I/F images supports exactly this affine map; the result is rounded by convert("L").
    return image.point(lambda value: value * (255.0 / top)).convert("L")


def to_rgb(image: Image.Image) -> Image.Image:
    """An already opened image as 8-bit RGB (see the module docstring for what changes)."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8_bits(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(
    source: bytes | bytearray | str | Path | BinaryIO | Image.Image, max_pixels: int | None = None
) -> Image.Image:
    """Decode `source` fully and return it upright, as 8-bit RGB.

    Args:
        source: A file path, an open binary file, the encoded bytes, or a PIL image (only converted).
        max_pixels: Refuse images with more pixels (checked from the header, before decoding);
            default: `default_max_pixels`.

    Returns:
        A fully loaded ``RGB`` image, independent of `source` (the file is closed).

    Raises:
        FileNotFoundError: `source` is a path that does not exist.
        ImageTooLargeError: More than `max_pixels` pixels.
        ImageDecodeError: Not an image, truncated, or damaged (a full decode is done, so a JPEG cut
            short is caught here and not later); or the path is no regular file (a directory, a FIFO,
            a device), refused before it is opened.
    """
    limit = default_max_pixels() if max_pixels is None else int(max_pixels)
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    if isinstance(source, str | Path):
        _require_regular_file(source)
    try:
        if isinstance(source, Image.Image):
            _check_size(source, limit)
            return to_rgb(ImageOps.exif_transpose(source))
        with warnings.catch_warnings():
            # The limit is enforced by _check_size; Pillow's warning for the same thing is only noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_size(image, limit)  # from the header, before anything is decoded
                image.load()  # the full decode: truncated or damaged data fails here
                return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:  # beyond twice Pillow's limit, refused by Pillow itself
        reason = str(exc).rstrip(".")
        raise ImageTooLargeError(f"{reason}; downscale it, or raise the limit if it is genuine") from exc
    except (FileNotFoundError, ImageDecodeError):
        raise
    except DECODE_ERRORS as exc:
        raise ImageDecodeError(f"image cannot be decoded ({type(exc).__name__}: {exc})") from exc
