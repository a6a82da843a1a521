"""Seven-segment digits (meters, clocks, calculators, LCDs), drawn as polygons, as ink on a page.

No font on the machine draws them, and a person reads them at once: without them in training the
model reads a segmented 6 as a 5 and flags a segmented 0 or 8 as not a digit. Each digit is drawn
with random proportions, stroke, gaps, bevels and slant, its unlit segments now and then faintly
visible, as on an LCD; ``dress`` then pictures it like any other ink.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from service.model import printed

# Segments lit per digit (a top, b top right, c bottom right, d bottom, e bottom left, f top left,
# g middle); the second spelling of 6, 7 and 9 is the one some displays use.
LIT = {0: ("abcdef",), 1: ("bc",), 2: ("abged",), 3: ("abgcd",), 4: ("fgbc",), 5: ("afgcd",),
       6: ("afgedc", "fgedc"), 7: ("abc", "abcf"), 8: ("abcdefg",), 9: ("abcdfg", "abcfg")}


def _segment(x0: float, y0: float, x1: float, y1: float, bevel: float) -> list[tuple[float, float]]:
    """A bar from (x0, y0) to (x1, y1), horizontal or vertical, its ends cut to points by ``bevel``."""
    if x1 - x0 >= y1 - y0:  # horizontal
        mid = (y0 + y1) / 2
        return [(x0, mid), (x0 + bevel, y0), (x1 - bevel, y0), (x1, mid), (x1 - bevel, y1), (x0 + bevel, y1)]
    mid = (x0 + x1) / 2
    return [(mid, y0), (x1, y0 + bevel), (x1, y1 - bevel), (mid, y1), (x0, y1 - bevel), (x0, y0 + bevel)]


def draw(label: int, rng: np.random.Generator) -> np.ndarray:
    """float32 ink (1 = ink) of one seven-segment digit, cropped to its box."""
    height = float(rng.integers(30, 140))
    width = height * rng.uniform(0.42, 0.65)
    stroke = height * rng.uniform(0.07, 0.16)
    gap = stroke * rng.uniform(0.05, 0.5)
    bevel = stroke / 2 * rng.uniform(0, 1)
    half, pad = height / 2, int(height * 0.15) + 4
    bars = {
        "a": (gap, 0, width - gap, stroke), "g": (gap, half - stroke / 2, width - gap, half + stroke / 2),
        "d": (gap, height - stroke, width - gap, height), "f": (0, gap, stroke, half - gap),
        "b": (width - stroke, gap, width, half - gap), "e": (0, half + gap, stroke, height - gap),
        "c": (width - stroke, half + gap, width, height - gap),
    }
    lit = LIT[label][int(rng.integers(len(LIT[label])))]
    ghost = rng.uniform(0.08, 0.25) if rng.random() < 0.3 else 0.0
    image = Image.new("L", (int(width) + 2 * pad, int(height) + 2 * pad), 0)
    pen = ImageDraw.Draw(image)
    for name, (x0, y0, x1, y1) in bars.items():
        shade = 255 if name in lit else round(255 * ghost)
        if shade:
            pen.polygon([(x + pad, y + pad) for x, y in _segment(x0, y0, x1, y1, bevel)], fill=shade)
    image = printed.sheared(image, rng.uniform(-0.05, 0.25))  # displays lean right, as italics do
    return printed.cropped(np.asarray(image, dtype=np.float32) / 255, 0.5)  # to the lit bars, not the faint ones
