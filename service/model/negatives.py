"""Pictures that are not digits, made here, for outlier exposure (trained towards a uniform answer).

Kinds: letters and symbols from the allowed fonts (``printed``; letters a person would read as a digit,
such as O, l and I, are left out), shapes, scribbles, textures, crops of scikit-image's bundled
photographs, and the faces it bundles. Each is drawn as ink (photographs: their grey levels) for ``dress``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage  # type: ignore[import-untyped]

from service.model import printed

# Letters and symbols that are not digits to a reader (no O/o/0, I/l/1, |, /, S/s like 5, Z/z like 2, B like 8,
# g/q like 9, b/G like 6, T/J/t/y like 7 or 1 when written.
LETTERS = "ACDEFHKLMNPRUVWXYacdefhkmnpruvwx"
SYMBOLS = "+=#%&@$?*<>{}[]~^()§¶€£¥©®±×÷√∞≈≠≤≥←→↑↓★☆♠♣♥♦✓✗▲■●◆♪"
PHOTOS = ("astronaut", "camera", "coffee", "coins", "moon", "page", "hubble_deep_field", "immunohistochemistry",
          "text", "brick", "grass", "retina", "colorwheel", "logo")
HELD_OUT_PHOTOS = ("chelsea", "rocket", "clock", "gravel")  # for evaluation only
KINDS = ("letters", "symbols", "shapes", "scribbles", "textures", "photos", "faces")
FACES, HELD_OUT_FACES = range(0, 80), range(80, 100)  # of scikit-image's lfw_subset (its first 100 are faces)


@dataclass(frozen=True)
class Sources:
    """What pictures are drawn from: a font partition (``printed.partition``) and its bundled photographs and
    faces (the calibration partition has fonts only: it makes the reference's printed digits, no non-digits)."""

    fonts: tuple[printed.Font, ...]
    photos: tuple[str, ...]
    faces: range

    @classmethod
    def of(cls, part: printed.Partition) -> Sources:
        fonts = printed.fonts_in(part)
        if part == "calibration":
            return cls(fonts, (), range(0))
        held = part == "heldout"
        return cls(fonts, HELD_OUT_PHOTOS if held else PHOTOS, HELD_OUT_FACES if held else FACES)


def _text(chars: str, sources: Sources, rng: np.random.Generator) -> np.ndarray | None:
    count = 1 if rng.random() < 0.8 else int(rng.integers(2, 4))
    text = "".join(chars[int(rng.integers(len(chars)))] for _ in range(count))
    return printed.render(text, sources.fonts[int(rng.integers(len(sources.fonts)))], rng)


def letters(sources: Sources, rng: np.random.Generator) -> np.ndarray | None:
    return _text(LETTERS, sources, rng)


def symbols(sources: Sources, rng: np.random.Generator) -> np.ndarray | None:
    return _text(SYMBOLS, sources, rng)


def shapes(sources: Sources, rng: np.random.Generator) -> np.ndarray:
    """Squares, triangles, stars, crosses, arrows, filled discs: outlined or filled, at any stroke width."""
    side = int(rng.integers(40, 160))
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(2, max(3, side // 8)))
    m = side * 0.1
    fill = 255 if rng.random() < 0.5 else None
    kind = rng.integers(6)
    if kind == 0:  # rectangle
        w, h = rng.uniform(0.5, 1.0, 2) * (side - 2 * m)
        draw.rectangle([m, m, m + w, m + h], outline=255, width=width, fill=fill)
    elif kind in (1, 2):  # polygon: triangle .. hexagon, or a star
        n = int(rng.integers(3, 7))
        angles = np.linspace(0, 2 * np.pi, n * (2 if kind == 2 else 1), endpoint=False) + rng.uniform(0, np.pi)
        radius = np.where(np.arange(len(angles)) % 2 == 1, rng.uniform(0.35, 0.6), 1.0) if kind == 2 else 1.0
        r = (side / 2 - m) * radius
        points = list(zip(side / 2 + r * np.cos(angles), side / 2 + r * np.sin(angles)))
        draw.polygon(points, outline=255, width=width, fill=fill)
    elif kind == 3:  # a filled disc or ellipse (an outlined one would be a 0)
        w, h = rng.uniform(0.5, 1.0, 2) * (side - 2 * m)
        draw.ellipse([m, m, m + w, m + h], fill=255)
    elif kind == 4:  # a cross
        c = side / 2
        draw.line([m, m, side - m, side - m], fill=255, width=width)
        draw.line([m, side - m, side - m, m], fill=255, width=width)
        if rng.random() < 0.5:
            draw.line([c, m, c, side - m], fill=255, width=width)
            draw.line([m, c, side - m, c], fill=255, width=width)
    else:  # an arrow
        c = side / 2
        draw.line([m, c, side - m, c], fill=255, width=width)
        draw.line([side - m, c, side - 3 * m, c - 2 * m], fill=255, width=width)
        draw.line([side - m, c, side - 3 * m, c + 2 * m], fill=255, width=width)
        image = image.rotate(rng.uniform(0, 360))
    return np.asarray(image, dtype=np.float32) / 255


def scribbles(sources: Sources, rng: np.random.Generator) -> np.ndarray:
    """Several random strokes crossing each other: what a hand does that is not writing a digit."""
    side = int(rng.integers(60, 160))
    image = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(image)
    width = int(rng.integers(2, max(3, side // 12)))
    for _ in range(int(rng.integers(3, 8))):
        points = rng.uniform(0.05, 0.95, (int(rng.integers(3, 7)), 2)) * side
        draw.line([tuple(p) for p in points], fill=255, width=width, joint="curve")
    return np.asarray(image, dtype=np.float32) / 255


def textures(sources: Sources, rng: np.random.Generator) -> np.ndarray:
    """Stripes, checks, dots, grids and smoothed noise filling the picture."""
    side = int(rng.integers(40, 200))
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(4, side / 3)
    u = (xx * np.cos(angle) + yy * np.sin(angle)) / period
    v = (-xx * np.sin(angle) + yy * np.cos(angle)) / period
    kind = rng.integers(4)
    if kind == 0:
        ink = (np.sin(2 * np.pi * u) > rng.uniform(-0.5, 0.5)).astype(np.float32)
    elif kind == 1:
        ink = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    elif kind == 2:
        ink = ((np.abs(np.sin(np.pi * u)) < 0.2) | (np.abs(np.sin(np.pi * v)) < 0.2)).astype(np.float32)
    else:
        noise = ndimage.gaussian_filter(rng.normal(0, 1, (side, side)), rng.uniform(1, side / 8))
        ink = (noise > rng.uniform(-0.3, 0.3) * noise.std()).astype(np.float32)
    return ink


@cache
def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = np.asarray(getattr(skimage.data, name)())
    if name == "lfw_subset":
        return (image * 255).astype(np.float32)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 3:
        image = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return image.astype(np.float32)


def photos(sources: Sources, rng: np.random.Generator) -> np.ndarray:
    """A crop of a bundled photograph, as ink: dark is ink (``dress`` lays it on paper, or inverts it)."""
    image = _photo(sources.photos[int(rng.integers(len(sources.photos)))])
    h, w = image.shape
    side = int(rng.integers(min(h, w) // 6, min(h, w)))
    top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(image[top:top + side, left:left + side])
    small = int(rng.integers(32, 160))
    return 1 - np.asarray(crop.resize((small, small), Image.Resampling.BILINEAR), dtype=np.float32) / 255


def faces(sources: Sources, rng: np.random.Generator) -> np.ndarray:
    """A face (Labeled Faces in the Wild, as scikit-image bundles it), cropped a little and enlarged."""
    face = _photo("lfw_subset")[sources.faces[int(rng.integers(len(sources.faces)))]]
    top, left = rng.integers(0, 4, 2)
    crop = Image.fromarray(face[top:top + 21, left:left + 21])
    side = int(rng.integers(40, 160))
    return 1 - np.asarray(crop.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32) / 255


MAKERS: dict[str, Callable[[Sources, np.random.Generator], np.ndarray | None]] = {
    "letters": letters, "symbols": symbols, "shapes": shapes, "scribbles": scribbles, "textures": textures,
    "photos": photos, "faces": faces,
}
