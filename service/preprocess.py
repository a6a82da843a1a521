"""Turn any digit picture into what the model was trained on: MNIST's 28x28 frame.

MNIST was made by fitting each digit into a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing that box in a 28x28 image so that the centre of mass of the ink
lies at the centre. We do the same to whatever a client sends: composite transparency on
white, grayscale, make the background dark, crop to the ink, fit in 20x20, centre by mass,
then apply the training mean/std. This module is the only place that knows these steps.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

from service.config import Limits
from service.errors import InputError
from service.model import IMAGE_SIDE, MNIST_MEAN, MNIST_STD

BOX = 20  # MNIST fits each digit in a 20x20 box ...
INK_THRESHOLD = 0.1  # ... of pixels brighter than this share of the brightest, after background removal

_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, from the header, with our own limits
# Pillow warns about oddities in client files (corrupt EXIF, malformed MPO...): what matters is
# whether the pixels decode, and a warning per request would only fill the log.
warnings.filterwarnings("ignore", module=r"PIL\.|service\.preprocess$")


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Encoded bytes -> float32 (H, W) grayscale in 0..255. Rejects from the header before decoding pixels."""
    if not data:
        raise InputError(400, "image is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:
        kind = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
        if kind:
            raise InputError(400, f"image data is truncated or corrupt (it starts like a {kind} file)") from None
        raise InputError(400, "bytes are not an image in a format we can read (PNG, JPEG, GIF, BMP, WebP, TIFF...)") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(400, f"image has zero size ({width}x{height})")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise InputError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limits are {limits.max_image_side} pixels "
            f"per side and {limits.max_image_pixels} pixels in all",
        )
    try:
        if "exif" in image.info:  # a phone photo's orientation flag: turn the pixels the way it was shot
            image = ImageOps.exif_transpose(image)
        return _to_gray(image)
    except InputError:
        raise
    except Exception as e:  # truncated or corrupt data surfaces as many exception types in Pillow
        raise InputError(400, f"image data is truncated or corrupt ({type(e).__name__})") from None


def _to_gray(image: Image.Image) -> np.ndarray:
    """Any mode (1, L, P, RGB, RGBA, LA, I;16, I, F, CMYK...) -> float32 luminance 0..255, transparency on white."""
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
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return np.array(image if image.mode == "L" else image.convert("L"), dtype=np.float32)


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """float32 (H, W) 0..255, any background -> float32 (28, 28) in 0..1, white digit on black, MNIST-centred.

    Written for speed (it runs once per image on the request path): whole-array numpy steps,
    the bounding box from row/column projections, the centre of mass from the box's marginals.
    """
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    middle = len(border) // 2
    background = float(np.partition(border, middle)[middle])  # the median: robust to a digit touching an edge
    ink = gray - background if background < 128 else background - gray
    peak = float(ink.max())
    if peak < 16:  # less than ~6% contrast anywhere: nothing we could call a digit
        raise InputError(422, "no digit found: the image is blank (no stroke stands out from the background)")
    strokes = ink >= INK_THRESHOLD * peak
    rows, cols = np.flatnonzero(strokes.any(1)), np.flatnonzero(strokes.any(0))
    crop = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    ink = np.where(strokes[crop], ink[crop], 0).astype(np.float32) * np.float32(1 / peak)

    h, w = ink.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):  # already fits the box (MNIST-sized input): resizing would be the identity
        box = ink
    else:
        box = np.array(Image.fromarray(ink, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        box *= np.float32(1 / max(float(box.max()), 1e-6))

    mass = float(box.sum())
    cy = float(box.sum(1) @ np.arange(box.shape[0], dtype=np.float32)) / mass
    cx = float(box.sum(0) @ np.arange(box.shape[1], dtype=np.float32)) / mass
    top = min(max(round(IMAGE_SIDE / 2 - cy - 0.5), 0), IMAGE_SIDE - box.shape[0])
    left = min(max(round(IMAGE_SIDE / 2 - cx - 0.5), 0), IMAGE_SIDE - box.shape[1])
    canvas = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    canvas[top: top + box.shape[0], left: left + box.shape[1]] = box
    return canvas


def validate_pixels(pixels: object) -> np.ndarray:
    """A client's 28x28 array of 0..255 numbers -> float32 (28, 28) in 0..1, geometry untouched."""
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError(422, "pixels must be a 28x28 array of numbers (rows of equal length)") from None
    if arr.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise InputError(422, f"pixels must be 28x28, got shape {'x'.join(map(str, arr.shape)) or 'scalar'}")
    if not np.isfinite(arr).all():
        raise InputError(422, "pixels must be finite numbers (found NaN or infinity)")
    if arr.min() < 0 or arr.max() > 255:
        raise InputError(422, f"pixels must lie in 0..255 (found {arr.min():g}..{arr.max():g})")
    return (arr / 255.0).astype(np.float32)


def normalize(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """(N, 28, 28) in 0..1 -> the model's input, with the mean/std the model was trained with."""
    return (images - np.float32(mean)) / np.float32(std)
