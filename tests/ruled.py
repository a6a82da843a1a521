"""Digits written on ruled and squared paper, seeded: a notebook's lines or a graph paper's squares
across the digit, scanned flat or photographed (issue #30: read every digit a person can read).

A *kind* of page, half of them with an MNIST digit (the held-out training digits of ``tests.photos``),
half with a printed one (DejaVu, as ``tests.crops``; never GNU FreeFont or URW base35):

- ``ruled``: lines every 10-25% of the page, 1-3 pixels thick, lighter than the ink, crossing the digit;
- ``squared``: graph paper, squares of 5-15% of the page;
- ``between``: a digit written between two lines, cropped with the line above and the line below;
- ``pencil``: ruled, the digit in pencil, hardly darker than the lines;
- ``photo``: any of those photographed: turned by up to 2.5 degrees, uneven light, grain, blur, JPEG.

    python -m tests.ruled [--seed 0] [--count 500]   # share read correctly, by kind
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from tests import crops, photos

KINDS = ("ruled", "squared", "between", "pencil", "photo")


def pages(digits: np.ndarray, labels: np.ndarray, count: int, seed: int) -> Iterator[photos.Photo]:
    """``count`` pages, the kinds in turn."""
    faces = crops.fonts()
    for i in range(count):
        rng = np.random.default_rng([seed, i])
        kind = KINDS[i % len(KINDS)]
        paper = kind if kind != "photo" else str(rng.choice(KINDS[:-1]))
        side = int(rng.integers(160, 700))
        pitch = side * (rng.uniform(0.1, 0.25) if paper != "squared" else rng.uniform(0.05, 0.15))
        height = int(pitch * (0.8 if paper == "between" else rng.uniform(1.5, 3.0)))
        if i % 2:
            pick = int(rng.integers(len(digits)))
            label, digit = int(labels[pick]), _handwritten(digits[pick], height)
        else:
            label = int(rng.integers(10))
            digit = _printed(label, faces[int(rng.integers(len(faces)))], height)
        yield _page(digit, label, kind, paper, side, pitch, rng)


def _handwritten(digit: np.ndarray, height: int) -> np.ndarray:
    rows, cols = np.flatnonzero(digit.max(1) > 30), np.flatnonzero(digit.max(0) > 30)
    ink = Image.fromarray(digit[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1])
    size = (max(1, round(ink.width * height / ink.height)), height)
    return np.clip(np.asarray(ink.resize(size, Image.Resampling.BICUBIC), np.float32) / 255, 0, 1)


def _printed(label: int, face: Path, height: int) -> np.ndarray:
    font = ImageFont.truetype(str(face), 200)
    left, top, right, bottom = font.getbbox(str(label))
    ink = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(ink).text((-left, -top), str(label), fill=255, font=font)
    size = (max(1, round(ink.width * height / ink.height)), height)
    return np.asarray(ink.resize(size, Image.Resampling.LANCZOS), np.float32) / 255


def _page(digit: np.ndarray, label: int, kind: str, paper: str, side: int, pitch: float,
          rng: np.random.Generator) -> photos.Photo:
    """The digit on a page of ``side`` pixels with its lines (1.6 times bigger, so that turning it leaves
    no corner bare), in colours, then saved as a scan (PNG) or a photo (JPEG)."""
    big = int(side * 1.6)
    lines = np.zeros((big, big), np.float32)
    thick = int(rng.integers(1, 4))
    for at in np.arange(rng.uniform(0, pitch), big, pitch).astype(int):
        lines[at: at + thick] = 1
        if paper == "squared":
            lines[:, at: at + thick] = 1
    turn = rng.uniform(-2.5, 2.5) if kind == "photo" else 0.0
    lines = np.asarray(Image.fromarray(lines).rotate(turn, Image.Resampling.BILINEAR), np.float32)
    corner = (big - side) // 2
    lines = lines[corner: corner + side, corner: corner + side]
    height, width = digit.shape
    if paper == "between":  # just below a line, clear of it
        below = np.flatnonzero(lines[: side - height - 2, side // 2] > 0.5)
        top = int(below[len(below) // 2]) + thick + 2 if len(below) else (side - height) // 2
    else:
        top = (side - height) // 2
    left = int(rng.integers(0, max(1, side - width)))
    coverage = np.zeros((side, side), np.float32)
    coverage[top: top + height, left: left + width] = digit[: side - top, : side - left]
    line_grey = rng.uniform(0.45, 0.8)
    line_colour = np.array([line_grey, min(1, line_grey + 0.1), min(1, line_grey + 0.3)], np.float32)
    dark = rng.uniform(0.45, 0.6) if paper == "pencil" else rng.uniform(0.0, 0.25)
    ink = np.array([dark, dark, min(1, dark + 0.25 * rng.random())], np.float32)
    page = np.full((side, side, 3), rng.uniform(0.85, 1.0), np.float32)
    page = page * (1 - lines[..., None]) + line_colour * lines[..., None]
    page = page * (1 - coverage[..., None]) + ink * coverage[..., None]
    box = (left, top, width, height)
    if kind != "photo":
        return photos.Photo(_save(page, "PNG"), label, kind, (side, side), box)
    across = np.linspace(0, 1, side, dtype=np.float32)
    slope = rng.uniform(-1, 1, 2)
    light = 1 - rng.uniform(0.1, 0.4) * (slope[0] * across[None, :] + slope[1] * across[:, None] + 1) / 2
    page = page * light[..., None] + rng.normal(0, rng.uniform(0.01, 0.04), page.shape).astype(np.float32)
    blur = ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))
    return photos.Photo(_save(page, "JPEG", blur, quality=int(rng.integers(50, 90))), label, kind, (side, side), box)


def _save(page: np.ndarray, fmt: str, blur: ImageFilter.Filter | None = None, **options: int) -> bytes:
    image = Image.fromarray(np.clip(page * 255 + 0.5, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    (image.filter(blur) if blur else image).save(buffer, fmt, **options)
    return buffer.getvalue()


def _main() -> None:
    photos.report_by_kind("share of digits on ruled and squared paper the committed model reads", pages)


if __name__ == "__main__":
    _main()
