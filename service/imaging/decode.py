"""Encoded bytes -> a grey picture (float32 0..255), checked against the limits before any pixel is decoded.

8-bit PNGs (MNIST files, canvases, screenshots) go through libspng, everything else through Pillow.
A picture far bigger than framing needs (a phone photo, a 4000x4000 canvas) is made smaller while
it is decoded: a JPEG at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (``Image.draft``), which
costs a fraction of a full decode; any other by an integer factor (the mean of each block of
pixels), a strip of rows at a time, so that no full-size float copy of it is ever held. A digit a
tenth of such a picture's side still spans 64 pixels. ``Picture.size`` keeps the client's size so
that boxes found in the smaller copy can be given in the client's pixels.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyspng
from PIL import Image, ImageOps

from service.config import Limits
from service.errors import InputError
from service.imaging.ink import ring

# A picture whose longer side is at least twice this is decoded smaller, down to no less than this: a digit
# a tenth of the picture's side still spans 64 pixels, three times the 20 of MNIST's box.
DRAFT_SIDE = 640
STRIP_ROWS = 64  # rows of the smaller picture made at a time from the full-size pixels

_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
_PNG = b"\x89PNG\r\n\x1a\n"
_SPNG_FORMATS = {0: "L", 2: "RGB", 4: "RGBA", 6: "RGBA"}  # by PNG colour type; libspng has no gray+alpha output
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's convert("L")
ISOLUMINANT = 0.1  # a picture whose luminance changes (neighbour to neighbour) under this share of its colours' ...
ISOLUMINANT_SPREAD = 8.0  # ... which change by this many levels at least (root mean square) is read by its colours
Axis = tuple[np.ndarray, np.float32]  # a grey from colours: weights per channel, offset
_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, from the header, with our own limits
# Pillow warns about oddities in client files (corrupt EXIF, malformed MPO...): what matters is
# whether the pixels decode, and a warning per request would only fill the log.
warnings.filterwarnings("ignore", module=r"PIL\.|service\.imaging")


@dataclass(slots=True)
class Picture:
    """A decoded picture: its grey pixels, and its size as the client sees it (width, height), which is
    ``gray``'s unless the decoder shrank it."""

    gray: np.ndarray
    size: tuple[int, int]


def claimed_size(data: bytes) -> tuple[int, int]:
    """The (width, height) an encoded picture claims in its header ((0, 0) when it cannot be read:
    decoding it will say what is wrong)."""
    if data.startswith(_PNG) and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width, height
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return 0, 0


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Encoded bytes -> float32 (H, W) grayscale in 0..255. Rejects from the header before decoding pixels."""
    return decode_picture(data, limits).gray


def decode_picture(data: bytes, limits: Limits) -> Picture:
    """``decode_image``, with the client's size kept beside pixels that may be a JPEG's reduced decode."""
    if not data:
        raise InputError(400, "image is empty (0 bytes)")
    if (picture := _plain_png(data, limits)) is not None:
        return picture
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Exception:
        kind = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
        if kind:
            raise InputError(400, f"image data is truncated or corrupt (it starts like a {kind} file)") from None
        raise InputError(400, "bytes are not an image in a format we can read "
                              "(PNG, JPEG, GIF, BMP, WebP, TIFF...)") from None
    check_size(*image.size, limits)
    size = image.size
    try:
        _draft(image)
        if "exif" in image.info:  # a phone photo's orientation flag: turn the pixels the way it was shot
            if image.getexif().get(0x0112) in _TURNED:
                size = size[::-1]
            image = ImageOps.exif_transpose(image)
        return Picture(_shrunk_gray(image), size)
    except InputError:
        raise
    except Exception as e:  # truncated or corrupt data surfaces as many exception types in Pillow
        raise InputError(400, f"image data is truncated or corrupt ({type(e).__name__})") from None


def _draft(image: Image.Image) -> None:
    """A big JPEG decoded at the smallest of 1/2, 1/4, 1/8 scale that keeps DRAFT_SIDE on its longer side,
    in gray: libjpeg then skips most of the inverse DCT and all of the colour conversion."""
    longest = max(image.size)
    if image.format != "JPEG" or longest < 2 * DRAFT_SIDE or image.mode not in ("RGB", "L"):
        return
    width, height = image.size
    image.draft("L", (math.ceil(width * DRAFT_SIDE / longest), math.ceil(height * DRAFT_SIDE / longest)))


def check_size(width: int, height: int, limits: Limits) -> None:
    """The size limits, applied to what the header claims, before a single pixel is decoded."""
    if width < 1 or height < 1:
        raise InputError(400, f"image has zero size ({width}x{height})")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise InputError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limits are {limits.max_image_side} pixels "
            f"per side and {limits.max_image_pixels} pixels in all",
        )


def _plain_png(data: bytes, limits: Limits) -> Picture | None:
    """An 8-bit gray, gray+alpha, RGB or RGBA PNG with no transparency key and no EXIF, decoded by libspng.

    That is what MNIST files, canvases and screenshots are, and libspng decodes them several times
    faster than Pillow's Python-level chunk reader (docs/performance.md). The result is Pillow's
    (``_to_gray``) to within one grey level, and corrupt files are refused as Pillow refuses them;
    every other PNG (palette, 1-16 bit, tRNS, eXIf) returns None and goes to Pillow.
    """
    if not data.startswith(_PNG) or data[12:16] != b"IHDR" or len(data) < 26:
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in _SPNG_FORMATS:
        return None
    if {b"tRNS", b"eXIf"} & _checked_chunks(data):
        return None
    check_size(width, height, limits)
    try:
        pixels = pyspng.load(data, _SPNG_FORMATS[colour])
    except RuntimeError:  # truncated data, a broken zlib stream or filter byte...
        raise InputError(400, "image data is truncated or corrupt (it starts like a PNG file)") from None
    backdrop = _backdrop(pixels) if pixels.ndim == 3 and pixels.shape[2] == 4 else 255.0
    axis = _colour_axis(pixels, backdrop) if pixels.ndim == 3 else None
    return Picture(_in_strips(pixels, shrink_factor(width, height), lambda rows: _spng_gray(rows, backdrop, axis)),
                   (width, height))


def shrink_factor(width: int, height: int) -> int:
    """By how much a picture of this size is made smaller before framing (1: not at all): the largest
    integer that keeps DRAFT_SIDE pixels on its longer side."""
    longest = max(width, height)
    return longest // DRAFT_SIDE if longest >= 2 * DRAFT_SIDE else 1


def _in_strips(pixels: np.ndarray, factor: int, gray: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``gray(pixels)`` made ``factor`` times smaller (each block's mean, partial blocks at the edges
    included), a strip of rows at a time: only a strip is ever held as floats."""
    if factor == 1:
        return gray(pixels)
    step = factor * STRIP_ROWS
    return np.concatenate([_block_means(gray(pixels[top: top + step]), factor)
                           for top in range(0, len(pixels), step)])


def _block_means(plane: np.ndarray, factor: int) -> np.ndarray:
    height, width = plane.shape
    rows, cols = np.arange(0, height, factor), np.arange(0, width, factor)
    sums = np.add.reduceat(np.add.reduceat(plane, rows, axis=0), cols, axis=1)
    counts = np.minimum(factor, height - rows)[:, None] * np.minimum(factor, width - cols)[None, :]
    return (sums / counts).astype(np.float32)


def _spng_gray(pixels: np.ndarray, backdrop: float, axis: Axis | None = None) -> np.ndarray:
    """libspng's L, RGB or RGBA pixels -> float32 luminance (or the grey along ``axis``), transparency on
    ``backdrop`` (``_to_gray``'s)."""
    if pixels.ndim == 2:
        return pixels.astype(np.float32)
    weights, offset = (_LUMA, np.float32(0)) if axis is None else axis
    # Channel by channel and in place: a big canvas needs a few float planes, not float RGBA copies.
    gray = pixels[..., 0] * weights[0] + pixels[..., 1] * weights[1] + pixels[..., 2] * weights[2]
    if axis is not None:
        gray += offset
    if pixels.shape[2] == 4:
        shown = backdrop * float(weights.sum()) + float(offset)  # the backdrop's grey along the same axis
        gray -= shown
        gray *= pixels[..., 3] * np.float32(1 / 255)
        gray += shown
    return gray


def _colour_axis(pixels: np.ndarray, backdrop: float = 255.0) -> Axis | None:
    """Where a colour picture's luminance hardly changes from pixel to pixel but its colours do (red ink on
    green paper of the same lightness), the grey to read it by instead: the axis along which its colours
    change most (weights, offset), mapping the picture into 0..255 with its most common colour light.
    Changes, not values: a gradient of light is smooth. None for every other picture (their luminance is
    what a person reads): measured on at most about 2^10 pixels, shown on ``backdrop`` where transparent."""
    step = _sample_step(pixels.shape[1], pixels.shape[0])
    sample = pixels[::step, ::step, :3].astype(np.float32)
    if pixels.shape[2] == 4:
        sample = backdrop + (sample - backdrop) * pixels[::step, ::step, 3:].astype(np.float32) * np.float32(1 / 255)
    if min(sample.shape[:2]) < 4:
        return None
    changes = np.concatenate([np.diff(sample, axis=0).reshape(-1, 3), np.diff(sample, axis=1).reshape(-1, 3)])
    colours = changes.T @ changes / len(changes)  # luminance's share is _LUMA's quadratic form
    total, luminance = float(np.trace(colours)), float(_LUMA @ colours @ _LUMA)
    if total < ISOLUMINANT_SPREAD ** 2 or luminance > ISOLUMINANT * total:
        return None  # every ordinary picture stops here
    spread, axes = np.linalg.eigh(colours)
    if luminance > ISOLUMINANT * float(spread[-1]):
        return None
    rgb = sample.reshape(-1, 3)
    mean = rgb.mean(0)
    principal = axes[:, -1].astype(np.float32)
    along = (rgb - mean) @ principal
    if np.median(along) < 0:  # the most common colour (the paper) light
        principal, along = -principal, -along
    weights = (principal * np.float32(127 / max(float(np.abs(along).max()), 1e-6))).astype(np.float32)
    return weights, np.float32(128 - float(mean @ weights))


def _sample_step(width: int, height: int) -> int:
    """Every how many pixels, each way, ``_colour_axis`` samples a picture: about 2^10 pixels in all."""
    return max(1, math.isqrt((width * height) >> 10))


def _backdrop(rgba: np.ndarray) -> float:
    """The grey that transparency is shown on: white, unless the picture's background is transparent (most
    of its border) and what is drawn on it is light (a canvas drawn in white on a dark page): then black,
    so that the drawing stands out as it did where it was drawn. Measured on at most about 2^14 pixels."""
    alpha = rgba[..., 3]
    border = ring(alpha)
    if np.count_nonzero(border < 128) * 2 < border.size:
        return 255.0
    step = max(1, math.isqrt(alpha.size >> 14))
    sample = rgba[::step, ::step]
    weight = sample[..., 3].astype(np.float32)
    drawn = float(weight.sum())
    if drawn == 0:
        return 255.0
    luminance = sample[..., :3].astype(np.float32) @ _LUMA
    return 0.0 if float((luminance * weight).sum()) > 127.5 * drawn else 255.0


def _checked_chunks(png: bytes) -> set[bytes]:
    """The kinds of chunk in a PNG, each checked against its CRC as Pillow does (pyspng has libspng
    skip that check, and half of all one-bit errors in pixel data would then decode as noise)."""
    kinds, at, view = set(), len(_PNG), memoryview(png)
    while at + 12 <= len(png):
        length, kind = struct.unpack_from(">I4s", png, at)
        end = at + 8 + length
        if end + 4 > len(png):
            break
        if zlib.crc32(view[at + 4: end]) != int.from_bytes(png[end: end + 4], "big"):
            chunk = kind.decode("latin-1")
            raise InputError(400, f"image data is corrupt (the PNG's {chunk!r} chunk fails its checksum)")
        kinds.add(kind)
        if kind == b"IEND":
            return kinds
        at = end + 4
    raise InputError(400, "image data is truncated or corrupt (it starts like a PNG file)")


def _shrunk_gray(image: Image.Image) -> np.ndarray:
    """``_to_gray``, made ``shrink_factor`` times smaller first where the picture is big: by Pillow's
    ``reduce`` (which weighs colours by their alpha), or in strips for 16-bit grey, which it cannot reduce."""
    factor = shrink_factor(*image.size)
    if factor == 1:
        return _to_gray(image)
    if image.mode.startswith("I;16"):
        return _in_strips(np.asarray(image), factor, lambda rows: rows.astype(np.float32) * np.float32(255 / 65535))
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    elif image.mode == "1":
        image = image.convert("L")
    try:
        return _to_gray(image.reduce(factor))
    except ValueError:  # a mode reduce does not take (HSV, LAB...): by way of RGBA
        return _to_gray(image.convert("RGBA").reduce(factor))


def _to_gray(image: Image.Image) -> np.ndarray:
    """Any mode (1, L, P, RGB, RGBA, LA, I;16, I, F, CMYK...) -> float32 luminance 0..255, transparency on
    ``_backdrop``."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise InputError(400, "image has non-finite pixel values (NaN or infinity)")
        top = 65535.0 if image.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return np.clip(arr * (255.0 / top), 0, 255)
    if image.mode == "P" or "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        grey = round(_backdrop(np.asarray(rgba)))
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (grey, grey, grey, 255)), rgba)
    if image.mode in ("L", "1", "LA", "La"):
        return np.array(image.convert("L"), dtype=np.float32)
    step = _sample_step(image.width, image.height)
    sample = image.resize((max(1, image.width // step), max(1, image.height // step)), Image.Resampling.NEAREST)
    axis = _colour_axis(np.asarray(sample.convert("RGB")))
    if axis is None:
        return np.array(image.convert("L"), dtype=np.float32)
    return _spng_gray(np.asarray(image.convert("RGB")), 255.0, axis)
