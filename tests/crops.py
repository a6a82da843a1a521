"""Tight crops, seeded: digits that fill their picture, as people crop them (issue #30).

A *kind* of picture, each cropped to the digit's ink box (no margin, or one of a few pixels):

- ``printed``: a digit in a DejaVu font (any weight, slant, width), dark or light, on a paper of
  one grey or colour, at a height from ``SIDES``;
- ``bold``: the same with a stroke added around the glyph (a marker, a bold stencil): strokes a
  quarter to a third of the digit's width, wider than any fixed background window;
- ``edge``: a printed digit cut by one or two of the picture's edges (a crop a few pixels too tight);
- ``mnist``: an MNIST digit cropped to its ink, upscaled, in colours;
- ``photo``: a photo-like MNIST digit (``tests.photos.render``) cropped to its ink box.

Only DejaVu fonts: never GNU FreeFont or URW base35 (held-out checks use them).

    python -m tests.crops [--seed 0] [--count 500]   # share read correctly, by kind
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tests import photos

KINDS = ("printed", "bold", "edge", "mnist", "photo")
SIDES = (20, 1000)  # the crop's longer side, pixels
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")


def fonts() -> list[Path]:
    """Every DejaVu face on this machine but the maths one (its design comes from TeX Gyre, i.e. URW)."""
    return sorted(p for p in FONT_DIR.glob("DejaVu*.ttf") if "Math" not in p.name)


def crops(digits: np.ndarray, labels: np.ndarray, count: int, seed: int,
          kinds: tuple[str, ...] = KINDS) -> Iterator[photos.Photo]:
    """``count`` tight crops, the kinds in turn; MNIST kinds draw from ``digits``."""
    faces = fonts()
    rng = np.random.default_rng(seed)
    for i in range(count):
        kind = kinds[i % len(kinds)]
        one = np.random.default_rng([seed, i])
        if kind in ("mnist", "photo"):
            pick = int(rng.integers(len(digits)))
            yield (_mnist if kind == "mnist" else _photo)(digits[pick], int(labels[pick]), one)
        else:
            yield printed(int(rng.integers(10)), faces[int(rng.integers(len(faces)))], kind, one)


def printed(label: int, face: Path, kind: str, rng: np.random.Generator) -> photos.Photo:
    """One printed digit cropped tight (``printed``, ``bold`` or ``edge``)."""
    font = ImageFont.truetype(str(face), 200)
    stroke = int(rng.integers(10, 22)) if kind == "bold" else int(rng.integers(0, 3))
    left, top, right, bottom = font.getbbox(str(label), stroke_width=stroke)
    mask = Image.new("L", (right - left + 40, bottom - top + 40), 0)
    ImageDraw.Draw(mask).text((20 - left, 20 - top), str(label), fill=255, font=font, stroke_width=stroke,
                              stroke_fill=255)
    coverage = np.asarray(mask, np.float32) / 255
    if kind == "edge":  # cut by one or two edges, by up to an eighth of the digit
        rows, cols = _ink_span(coverage)
        cut = [int(rng.integers(0, max(2, len(s) // 8))) if rng.random() < 0.6 else 0 for s in (rows, rows, cols, cols)]
        if not any(cut):
            cut[int(rng.integers(4))] = max(1, len(rows) // 10)
        coverage = coverage[rows[0] + cut[0]: rows[-1] + 1 - cut[1], cols[0] + cut[2]: cols[-1] + 1 - cut[3]]
    return _dress(coverage, label, kind, rng)


def _mnist(digit: np.ndarray, label: int, rng: np.random.Generator) -> photos.Photo:
    return _dress(digit.astype(np.float32) / 255, label, "mnist", rng)


def _photo(digit: np.ndarray, label: int, rng: np.random.Generator) -> photos.Photo:
    """A photo-like digit (one variation of ``tests.photos``, not at phone size) cropped to its box."""
    kind = str(rng.choice([k for k in photos.KINDS if k not in ("phone", "combined")]))
    shot = photos.render(digit, label, kind, rng)
    x, y, w, h = shot.box
    with Image.open(io.BytesIO(shot.data)) as image:
        cropped = image.convert("RGB").crop((x, y, x + w, y + h))
    return photos.Photo(_png(cropped), label, "photo", cropped.size, (0, 0, w, h))


def _dress(coverage: np.ndarray, label: int, kind: str, rng: np.random.Generator) -> photos.Photo:
    """Ink coverage (0..1) cropped to its ink (plus 0-2 pixels), sized, coloured and saved as PNG."""
    if kind != "edge":
        rows, cols = _ink_span(coverage)
        margin = int(rng.integers(0, 3))
        coverage = np.pad(coverage[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1], margin)
    height, width = coverage.shape
    side = float(np.exp(rng.uniform(np.log(SIDES[0]), np.log(SIDES[1]))))
    scale = side / max(height, width)
    size = (max(4, round(width * scale)), max(4, round(height * scale)))
    coverage = np.clip(np.asarray(Image.fromarray(coverage, "F").resize(size, Image.Resampling.BICUBIC)), 0, 1)
    paper, ink = _colours(rng)
    picture = paper * (1 - coverage[..., None]) + ink * coverage[..., None]
    image = Image.fromarray(np.clip(picture * 255 + 0.5, 0, 255).astype(np.uint8), "RGB")
    return photos.Photo(_png(image), label, kind, image.size, (0, 0, *image.size))


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(paper, ink) RGB in 0..1: mostly dark ink on light paper (white, grey, tinted), a third the other way."""
    light = rng.uniform(0.6, 1.0) * rng.uniform(0.85, 1.0, 3)
    dark = rng.uniform(0.0, 0.35) * rng.uniform(0.5, 1.0, 3)
    return (dark, light) if rng.random() < 0.3 else (light, dark)


def _ink_span(coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.flatnonzero(coverage.max(1) > 0.1), np.flatnonzero(coverage.max(0) > 0.1)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _main() -> None:
    photos.report_by_kind("share of tight crops the committed model reads, by kind", crops)


if __name__ == "__main__":
    _main()
