"""Dress a drawing as a picture a person sends: paper, ink, uneven light, blur, camera noise, colour, JPEG.

The training sets are made of such pictures and then framed by the service's own preprocessing
(``service.imaging.prepare``), so the model learns on the 28x28 frames it will be served. Reflectance
(paper x ink) and light compose in linear light, then the camera: blur, gamma, noise, encoding.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage  # type: ignore[import-untyped]

from service.config import Limits
from service.errors import InputError
from service.imaging import NO_DIGIT, prepare

_LIMITS = Limits()  # type: ignore[call-arg]  # the defaults, as the service has them


def dress(ink: np.ndarray, rng: np.random.Generator, plain: float = 0.15) -> bytes:
    """float (H, W) ink coverage in 0..1 (1 = full ink) -> an encoded picture of it (PNG or JPEG).

    With probability ``plain`` the picture is clean (dark ink on even white paper, PNG), as a scan is."""
    h, w = ink.shape
    if rng.random() < plain:
        return scan(ink) if rng.random() < 0.7 else _encode(np.repeat((255 * (1 - 0.9 * ink))[..., None], 3, 2),
                                                             rng, jpeg=False)
    paper = rng.uniform(0.55, 0.95)
    pen = rng.uniform(0.0, 0.4) * paper
    if rng.random() < 0.3:  # pencil or a fading marker: a lighter, uneven stroke
        pen = paper * rng.uniform(0.35, 0.65)
        ink = ink * rng.uniform(0.7, 1.0, ink.shape)
    reflect = paper - (paper - pen) * ink
    if rng.random() < 0.6:
        grain = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), rng.uniform(0.5, 2.5))
        reflect = reflect * (1 + rng.uniform(0.01, 0.08) * grain / (grain.std() + 1e-6))
    light = _light(h, w, rng)
    linear = np.clip(reflect * light * rng.uniform(0.7, 1.0), 0, 1)
    side = min(h, w)
    if rng.random() < 0.7:
        linear = ndimage.gaussian_filter(linear, rng.uniform(0.3, 1.6) * side / 200)
    gray = 255 * linear ** (1 / 2.2)
    if rng.random() < 0.2:  # light ink on a dark ground: a screen, a chalkboard, an inverted scan
        gray = 255 - gray
    if rng.random() < 0.3:  # colour: tinted paper and coloured ink, each channel its own
        tint = rng.uniform(0.6, 1.0, 3)
        gray = gray[..., None] * tint
    if rng.random() < 0.7:
        gray = gray + rng.normal(0, rng.uniform(1, 10), gray.shape)
    return _encode(gray, rng, jpeg=rng.random() < 0.6)


def scan(ink: np.ndarray) -> bytes:
    """The ink as a clean scan: dark on even white paper, PNG."""
    out = io.BytesIO()
    Image.fromarray((255 * (1 - 0.9 * np.clip(ink, 0, 1))).astype(np.uint8)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _light(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Illumination over the page: even, a gradient, or a shadow with a soft edge."""
    kind = rng.integers(3)
    if kind == 0:
        return np.ones((h, w))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w]
    ramp = ((xx - w / 2) * np.cos(angle) + (yy - h / 2) * np.sin(angle)) / max(h, w)  # about -0.7..0.7
    if kind == 1:
        low = rng.uniform(0.35, 0.8)
        return low + (1 - low) * np.clip(ramp + 0.5, 0, 1)
    edge = rng.uniform(0.005, 0.08)
    offset = rng.uniform(-0.4, 0.4)
    dark = rng.uniform(0.3, 0.7)
    return dark + (1 - dark) / (1 + np.exp(-(ramp - offset) / edge))


def _encode(gray: np.ndarray, rng: np.random.Generator, jpeg: bool) -> bytes:
    image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    if jpeg:
        image.save(out, format="JPEG", quality=int(rng.integers(20, 95)))
    else:
        image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def frame(picture: bytes) -> np.ndarray | None:
    """The service's 28x28 frame of a picture (float32 in 0..1), or None where it finds no digit (refused, or
    answered ``no_digit``: the service's black frame is no picture to learn or measure on)."""
    try:
        prepared = prepare([picture], _LIMITS)
    except InputError:
        return None
    return None if NO_DIGIT in prepared.notes[0]["flags"] else np.asarray(prepared)[0]


def canvas(glyph: np.ndarray, rng: np.random.Generator, margin: tuple[float, float] = (0.15, 1.2),
           largest: int = 240) -> np.ndarray:
    """Place ink on a larger page at a random spot with a random margin (pictures are rarely cropped tight);
    the page is at most ``largest`` pixels a side (larger ones cost time and the framing looks the same)."""
    side = max(glyph.shape)
    most = largest / (side * (1 + 2 * margin[1]) + 4)
    if most < 1:
        image = Image.fromarray(glyph)
        glyph = np.asarray(image.resize((max(1, int(glyph.shape[1] * most)), max(1, int(glyph.shape[0] * most))),
                                        Image.Resampling.BILINEAR))
    h, w = glyph.shape
    side = max(h, w)
    top, bottom, left, right = (int(side * rng.uniform(*margin)) + 2 for _ in range(4))
    page = np.zeros((h + top + bottom, w + left + right), dtype=np.float32)
    page[top:top + h, left:left + w] = glyph
    return page
