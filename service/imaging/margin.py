"""A margin of paper around a picture cropped tight, so that its digit is found like any other.

People crop a digit to its box: the strokes touch the picture's edges, the paper is a minority of
the picture, and bold strokes are as wide as the paper between them. Every later step assumes
what MNIST's pictures and photos give: paper all around the digit. A stroke that runs along the
edge looks like the edge of a shadow, and a stroke wider than the background's window looks like
paper, so such a picture was found blank or read wrong.

So a picture whose border holds ink gets a margin of its own paper (``frame`` says when). Along
the border, the paper is the side of its two levels (Otsu's split; two levels, not a gradient)
that holds most of it, the lighter one when neither clearly does: a picture is more often dark ink
on light paper (``levels``); or, where the ink along the border is too faint to make two levels (a
blurred stroke cut by the crop), the border's median, if the picture's ink lies beyond every level
of the border (``paper_only``). The border pixels within the paper's noise of its level are kept,
the others take the level interpolated from their neighbours along the border, and the margin
repeats that outwards (a gradient along the edge goes on), with the picture's own noise. The steps
after it then see an ordinary picture: a paper of one grey (``ink.flat_inks``), or a photo
(``photo.photo_ink``).
"""

from __future__ import annotations

import numpy as np

from service.imaging import ink
from service.imaging.photo import NOISE_MARGIN

MARGIN_SHARE = 0.25  # the margin on each side, a share of the picture's longer side
MIN_INK_SHARE = 0.01  # the border holds ink if at least this share of it is on the ink's side ...
NOISE_SEPARATION = 6.0  # ... and its two levels stand this many noise deviations apart (and ink.MIN_CONTRAST)
AMBIGUOUS = 0.6  # the paper is the side with at least this share of the border; else the lighter side
PAPER_BAND = 0.02  # border pixels this share of the ink's contrast from the paper's level (or noise) are paper
EXACT = 0.8  # the border's commonest grey is exact if this share of what lies within 2 grey levels is it
TWO_LEVELS = 0.8  # share of the border's variance between its two sides: ink and paper (a gradient has 0.75)


def noise(gray: np.ndarray) -> float:
    """The picture's noise along its border (``ink.border_noise``), or none where the border's commonest
    grey is exact: four fifths of the border within 2 grey levels of it are that grey, which noise does
    not leave. (In a small digit cropped tight, a render or a screenshot, the strokes' anti-aliased edges
    are most of the border's differences: taken for noise, they hid the ink's level and made the margin
    noisy, and the picture was not read as on one grey.)"""
    ring = ink.ring(gray)
    values, counts = np.unique(ring, return_counts=True)
    common = values[int(np.argmax(counts))]
    if counts.max() >= EXACT * np.count_nonzero(np.abs(ring - common) <= 2):
        return 0.0
    return ink.border_noise(gray)


def levels(gray: np.ndarray, noise: float) -> tuple[float, float] | None:
    """The paper's and the ink's level along the border of a picture whose border holds ink, or None.
    Two levels, not a gradient (``TWO_LEVELS``), unless the border's paper is one exact grey (``noise``
    none): a gradient is not, and what differs from that grey is ink, graded as a turned stroke's
    anti-aliased edge is."""
    ring = ink.ring(gray)
    split = _otsu(ring)
    dark = ring < split
    share = float(dark.mean())
    if min(share, 1 - share) < MIN_INK_SHARE:
        return None
    low, high = float(np.median(ring[dark])), float(np.median(ring[~dark]))
    graded = noise > 0 and _between(ring, dark) < TWO_LEVELS
    if high - low < max(ink.MIN_CONTRAST, NOISE_SEPARATION * noise) or graded:
        return None
    return (low, high) if share >= AMBIGUOUS else (high, low)


def paper_only(gray: np.ndarray) -> tuple[float, float] | None:
    """Where the border is not two clear levels: its median as the paper, and the picture's ink level
    (its 1st or 99th percentile, the farther from the paper), or None unless that ink lies beyond
    every level of the border (as a gradient's or a shadow's ends do not: they reach the border)."""
    ring = ink.ring(gray)
    paper = float(np.median(ring))
    step = max(1, max(gray.shape) // 256)
    low, high = np.percentile(gray[::step, ::step], (1, 99))
    edge_low, edge_high = np.percentile(ring, (2, 98))
    if paper - low >= high - paper:
        return (paper, float(low)) if edge_low - low >= ink.MIN_CONTRAST else None
    return (paper, float(high)) if high - edge_high >= ink.MIN_CONTRAST else None


def pad(gray: np.ndarray, paper_level: float, ink_level: float, noise: float) -> tuple[np.ndarray, int]:
    """``gray`` with a margin of paper around it (``levels``), and the margin's width. ``noise``: the
    picture's noise (standard deviation)."""
    height, width = gray.shape
    ring = ink.ring(gray)
    # the paper's own pixels: as far from its level as its noise takes them, not a stroke's fringe
    paper = np.abs(ring - paper_level) <= max(NOISE_MARGIN * noise + 1, PAPER_BAND * abs(ink_level - paper_level))
    if not paper.any():  # no pixel that close (a median between two levels): the paper's side of the border
        paper = np.abs(ring - paper_level) <= np.abs(ring - ink_level)
    positions = np.arange(len(ring))
    filled = np.interp(positions, positions[paper], ring[paper], period=len(ring)).astype(np.float32)
    framed = gray.copy()
    top, right, bottom = width - 1, width + height - 2, 2 * width + height - 3  # where each side starts
    framed[0, :-1], framed[:-1, -1] = filled[:top], filled[top:right]
    framed[-1, :0:-1], framed[:0:-1, 0] = filled[right:bottom], filled[bottom:]
    margin = max(2, round(MARGIN_SHARE * max(height, width)))
    padded = np.pad(framed, margin, mode="edge")
    padded[margin: margin + height, margin: margin + width] = gray
    if noise >= 0.5:  # the paper's own noise, so that the margin does not read as a smooth paper
        rng = np.random.default_rng(0)
        outside = np.ones(padded.shape, bool)
        outside[margin: margin + height, margin: margin + width] = False
        padded[outside] += rng.standard_normal(int(outside.sum()), dtype=np.float32) * np.float32(noise)
    return padded, margin


def unpad(box: tuple[int, int, int, int], margin: int, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """A box (x, y, width, height) in the padded picture -> in the picture, clipped to it."""
    x, y, w, h = box
    left, top = min(max(x - margin, 0), shape[1] - 1), min(max(y - margin, 0), shape[0] - 1)
    right, bottom = max(min(x + w - margin, shape[1]), left + 1), max(min(y + h - margin, shape[0]), top + 1)
    return left, top, right - left, bottom - top


def _between(values: np.ndarray, side: np.ndarray) -> float:
    """The share of the variance of ``values`` that lies between the two sides (Otsu's effectiveness)."""
    total = float(values.var())
    share = float(side.mean())
    return share * (1 - share) * (float(values[side].mean()) - float(values[~side].mean())) ** 2 / max(total, 1e-9)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of ``values``: the split that maximises the variance between the two sides."""
    ranked = np.sort(values.astype(np.float64))
    n = len(ranked)
    below = np.cumsum(ranked)[:-1]
    count = np.arange(1, n)
    mean_low, mean_high = below / count, (ranked.sum() - below) / (n - count)
    between = count * (n - count) * (mean_high - mean_low) ** 2
    between[ranked[1:] == ranked[:-1]] = -1  # a split between equal values splits nothing
    best = int(np.argmax(between))
    return float((ranked[best] + ranked[best + 1]) / 2)
