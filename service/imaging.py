"""Turn any digit picture into what the model was trained on: MNIST's 28x28 frame.

MNIST was made by fitting each digit into a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing that box in a 28x28 image so that the centre of mass of the ink
lies at the centre. We do the same to whatever a client sends: composite transparency on
white, grayscale, make the background dark, crop to the ink, fit in 20x20, centre by mass.
The worker then applies the model's mean/std (``normalize``). This module is the only place
that knows these steps; ``prepare`` runs them for the API server.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import pyspng
from PIL import Image, ImageOps

from service.config import Limits
from service.errors import InputError
from service.model.fnn import IMAGE_SIDE, MNIST_MEAN, MNIST_STD

BOX = 20  # MNIST fits each digit in a 20x20 box ...
INK_THRESHOLD = 0.1  # ... of pixels brighter than this share of the brightest, after background removal

_SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8": "JPEG", b"GIF8": "GIF", b"BM": "BMP", b"RIFF": "WebP",
               b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
_PNG = b"\x89PNG\r\n\x1a\n"
_SPNG_FORMATS = {0: "L", 2: "RGB", 4: "RGBA", 6: "RGBA"}  # by PNG colour type; libspng has no gray+alpha output
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's convert("L")
Image.MAX_IMAGE_PIXELS = None  # we check dimensions ourselves, from the header, with our own limits
# Pillow warns about oddities in client files (corrupt EXIF, malformed MPO...): what matters is
# whether the pixels decode, and a warning per request would only fill the log.
warnings.filterwarnings("ignore", module=r"PIL\.|service\.imaging$")
Raw: TypeAlias = "bytes | list[list[float]]"  # one instance as a client sends it: an encoded picture, or pixels


@dataclass
class _Decoded:
    """A request's instances decoded, not yet framed: the pixel arrays already in ``frames``, the
    pictures' grayscale by instance index."""

    frames: np.ndarray
    pictures: dict[int, np.ndarray]

    def framed(self, pictures: np.ndarray) -> np.ndarray:
        self.frames[list(self.pictures)] = pictures
        return self.frames


def prepare(instances: Sequence[Raw], limits: Limits) -> np.ndarray:
    """One request's instances -> float32 (n, 28, 28) in 0..1, MNIST-framed; the first bad one raises
    an ``InputError`` naming its instance."""
    (outcome,) = prepare_many([instances], limits)
    if isinstance(outcome, InputError):
        raise outcome
    return outcome


def prepare_many(requests: Sequence[Sequence[Raw]], limits: Limits) -> list[np.ndarray | InputError]:
    """Several requests' instances at once, each request's frames or its ``InputError``.

    Framing costs per numpy call, not per pixel, so the pictures of all the requests are framed
    together: a handful of single-image requests cost about what one does. A bad or blank
    picture fails only its own request (its request is then framed alone).
    """
    outcomes: list[_Decoded | np.ndarray | InputError] = []
    for instances in requests:
        try:
            outcomes.append(_decode(instances, limits))
        except InputError as e:
            outcomes.append(e)
    decoded = [d for d in outcomes if isinstance(d, _Decoded)]
    try:
        frames, start = to_mnist([gray for d in decoded for gray in d.pictures.values()]), 0
        for d in decoded:
            d.framed(frames[start: start + len(d.pictures)])
            start += len(d.pictures)
    except BlankImage:  # rare: request by request, so that only the blank picture's request fails
        return [_frame_alone(d) if isinstance(d, _Decoded) else d for d in outcomes]
    return [d.frames if isinstance(d, _Decoded) else d for d in outcomes]


def _frame_alone(decoded: _Decoded) -> np.ndarray | InputError:
    try:
        return decoded.framed(to_mnist(list(decoded.pictures.values())))
    except BlankImage as blank:
        return blank.at(f"instance {list(decoded.pictures)[blank.position]}")


def _decode(instances: Sequence[Raw], limits: Limits) -> _Decoded:
    """Every instance checked: pixels validated into their frames, pictures decoded one by one."""
    frames = np.empty((len(instances), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    pictures: dict[int, np.ndarray] = {}
    for index, item in enumerate(instances):
        try:
            if isinstance(item, bytes):
                pictures[index] = decode_image(item, limits)
            else:
                frames[index] = validate_pixels(item)
        except InputError as e:
            raise e.at(f"instance {index}") from None
    return _Decoded(frames, pictures)


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """Encoded bytes -> float32 (H, W) grayscale in 0..255. Rejects from the header before decoding pixels."""
    if not data:
        raise InputError(400, "image is empty (0 bytes)")
    if (pixels := _plain_png(data, limits)) is not None:
        return pixels
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Exception:
        kind = next((name for magic, name in _SIGNATURES.items() if data.startswith(magic)), None)
        if kind:
            raise InputError(400, f"image data is truncated or corrupt (it starts like a {kind} file)") from None
        raise InputError(400, "bytes are not an image in a format we can read "
                              "(PNG, JPEG, GIF, BMP, WebP, TIFF...)") from None
    _check_size(*image.size, limits)
    try:
        if "exif" in image.info:  # a phone photo's orientation flag: turn the pixels the way it was shot
            image = ImageOps.exif_transpose(image)
        return _to_gray(image)
    except InputError:
        raise
    except Exception as e:  # truncated or corrupt data surfaces as many exception types in Pillow
        raise InputError(400, f"image data is truncated or corrupt ({type(e).__name__})") from None


def _check_size(width: int, height: int, limits: Limits) -> None:
    """The size limits, applied to what the header claims, before a single pixel is decoded."""
    if width < 1 or height < 1:
        raise InputError(400, f"image has zero size ({width}x{height})")
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise InputError(
            413,
            f"image is {width}x{height} = {width * height} pixels; the limits are {limits.max_image_side} pixels "
            f"per side and {limits.max_image_pixels} pixels in all",
        )


def _plain_png(data: bytes, limits: Limits) -> np.ndarray | None:
    """An 8-bit gray, gray+alpha, RGB or RGBA PNG with no transparency key and no EXIF, decoded by libspng.

    That is what MNIST files, canvases and screenshots are, and libspng decodes them 5x faster than
    Pillow's Python-level chunk reader. The result is Pillow's (``_to_gray``) to within one grey level,
    and corrupt files are refused as Pillow refuses them; every other PNG (palette, 1-16 bit, tRNS,
    eXIf) returns None and goes to Pillow.
    """
    if not data.startswith(_PNG) or data[12:16] != b"IHDR" or len(data) < 26:
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    if depth != 8 or colour not in _SPNG_FORMATS:
        return None
    if {b"tRNS", b"eXIf"} & _checked_chunks(data):
        return None
    _check_size(width, height, limits)
    try:
        pixels = pyspng.load(data, _SPNG_FORMATS[colour])
    except RuntimeError:  # truncated data, a broken zlib stream or filter byte...
        raise InputError(400, "image data is truncated or corrupt (it starts like a PNG file)") from None
    if pixels.ndim == 2:
        return pixels.astype(np.float32)
    # Channel by channel and in place: a 16-megapixel canvas needs a few float planes, not float RGBA copies.
    gray = pixels[..., 0] * _LUMA[0] + pixels[..., 1] * _LUMA[1] + pixels[..., 2] * _LUMA[2]
    if pixels.shape[2] == 4:  # transparency on white, as _to_gray does
        gray -= 255
        gray *= pixels[..., 3] * np.float32(1 / 255)
        gray += 255
    return gray


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


class BlankImage(InputError):
    """An image in which no stroke stands out; ``position`` is its place in the list given to ``to_mnist``."""

    def __init__(self, position: int):
        super().__init__(422, "no digit found: the image is blank (no stroke stands out from the background)")
        self.position = position


def to_mnist(grays: Sequence[np.ndarray]) -> np.ndarray:
    """float32 (H, W) images in 0..255, any background -> float32 (N, 28, 28) in 0..1, white digits on black,
    MNIST-centred. Raises ``BlankImage`` for the first image without a stroke.

    Images of one size go through the whole-image steps together: numpy's per-call overhead, not
    arithmetic, is what a small image costs, so a request's 32 digits cost little more than one.
    """
    sizes: dict[tuple[int, ...], list[int]] = {}
    for position, gray in enumerate(grays):
        sizes.setdefault(gray.shape, []).append(position)
    if len(sizes) == 1:  # np.array stacks same-size arrays in C, 2-4x faster than np.stack
        return _frame(np.array(grays))
    frames = np.empty((len(grays), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    for positions in sizes.values():
        try:
            frames[positions] = _frame(np.array([grays[p] for p in positions]))
        except BlankImage as blank:
            raise BlankImage(positions[blank.position]) from None
    return frames


def _frame(grays: np.ndarray) -> np.ndarray:
    """(N, H, W) of one size -> (N, 28, 28): whole-image steps for all N at once, then each digit's box
    (from its row/column masses) resized to fit 20x20 unless it already does (every MNIST-sized
    input), and placed by its centre of mass."""
    n, height, width = grays.shape
    border = np.concatenate([grays[:, 0], grays[:, -1], grays[:, :, 0], grays[:, :, -1]], axis=1)
    middle = border.shape[1] // 2
    # the median: robust to a digit touching an edge
    background = np.partition(border, middle, axis=1)[:, middle, None, None]
    ink = grays - background
    np.negative(ink, out=ink, where=background >= 128)  # dark strokes on light paper: make them light on dark
    peak = ink.reshape(n, -1).max(1)
    if peak[dimmest := int(peak.argmin())] < 16:  # under ~6% contrast anywhere: nothing we could call a digit
        raise BlankImage(dimmest)
    peak = peak[:, None, None]
    strokes = ink >= INK_THRESHOLD * peak
    ink *= strokes
    ink *= 1 / peak  # only the strokes, the brightest at 1
    row_mass, col_mass = ink.sum(2), ink.sum(1)
    # each digit's box, from its first and last rows and columns with ink, and where it goes: one numpy
    # call each for all N, then one slice copy per digit (per-digit Python bookkeeping cost more)
    rows, cols = row_mass > 0, col_mass > 0
    tops, lefts = rows.argmax(1), cols.argmax(1)
    heights, widths = height - rows[:, ::-1].argmax(1) - tops, width - cols[:, ::-1].argmax(1) - lefts
    cys, cxs = (_centres(row_mass) - tops).tolist(), (_centres(col_mass) - lefts).tolist()

    frames = np.zeros((n, IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    places = zip(tops.tolist(), lefts.tolist(), heights.tolist(), widths.tolist(), cys, cxs)
    for i, (top, left, h, w, cy, cx) in enumerate(places):
        box = ink[i, top: top + h, left: left + w]
        if max(h, w) != BOX:  # a digit whose longer side is already the box's (every MNIST-sized input) stays as it is
            box, cy, cx = _fit(box)
            h, w = box.shape
        y, x = _corner(cy, h), _corner(cx, w)
        frames[i, y: y + h, x: x + w] = box
    return frames


def _fit(box: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A digit's box resized so that its longer side fits the 20x20 box, brightest at 1; and its centre of mass."""
    h, w = box.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    box = np.array(Image.fromarray(box, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    box *= np.float32(1 / max(float(box.max()), 1e-6))
    (cy,), (cx,) = _centres(box.sum(1)[None]).tolist(), _centres(box.sum(0)[None]).tolist()
    return box, cy, cx


def _centres(marginals: np.ndarray) -> np.ndarray:
    """Each row of ``marginals`` (an image's mass per row, or per column): its centre of mass."""
    return marginals @ np.arange(marginals.shape[1], dtype=np.float32) / marginals.sum(1)


def _corner(centre: float, extent: int) -> int:
    """Where a box of ``extent`` pixels starts so that its centre of mass lands on the frame's centre."""
    return min(max(round(IMAGE_SIDE / 2 - centre - 0.5), 0), IMAGE_SIDE - extent)


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
