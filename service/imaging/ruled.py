"""Ruled and squared paper: the printed lines of a notebook's or a graph paper's page are paper, not ink.

A digit written on lined paper crosses the lines, and the steps after this one would take every
line for ink: the digit then reads as part of a grid, or not at all. A ruling is told from a digit's
strokes by what a digit never is: at least ``LINES`` thin lines (``THIN`` of the picture's side at
most), alike, that run across most of the picture (``ACROSS`` of its strips) at a regular pitch, or
two that run across all of it (``WHOLE``: a digit written between two lines, cropped with them), or
one alone from side to side, fainter than the ink (``FAINT``: a notebook's margin, the line a digit
was written on), never the picture's own first and last rows (a thin "3" of three bars, cropped
tight). Each line is followed strip by strip, so a page photographed slightly turned or bowed is
ruled too; a line that a big digit hides in most strips is erased where it falls on the ruling's
pitch. Each line's pixels take the values just above and below the line: the paper's where the line
crossed paper, the ink's where it crossed a stroke; a pixel far darker than the line is a stroke
running along it, and is kept. Then the same across the other axis (squared paper).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from service.imaging import ink

STRIP = 32  # pixels per strip: lines are followed across the picture a strip at a time
SAMPLES = 11  # columns of a strip that its median profile is taken over (odd: one middle value)
THIN = 0.012  # a line is at most this share of the picture's side thick (and at least 3 pixels may be)
DEPTH = 6.0  # a line stands this many deviations of the strips' profiles from the paper either side of it
MIN_DEPTH = 4.0  # ... and at least this many grey levels
ACROSS = 0.6  # a line is found in this share of the strips
LINES = 3  # lines at a regular pitch make a ruling ...
WHOLE = 0.9  # ... or two lines, found in this share of the strips (a digit written between two lines)
PITCH = 0.25  # their gaps are whole numbers of pitches to within this share of one
ALIKE = 2.0  # dips within this factor of the usual depth are lines; a pixel darker than that, a stroke
MOST = 0.5  # a ruling's lines are this share of the dips at least (a digit's strokes and noise the rest)
FAINT = 0.7  # a line alone is at most this share of the ink's contrast (a printed ruling under a pen's digit)
DRIFT = 0.06  # a line moves at most this share of a strip's width from one strip to the next (about 3.5 degrees)


def unruled(gray: np.ndarray) -> np.ndarray:
    """``gray`` without its ruling's lines, horizontal then vertical; ``gray`` itself where it has none."""
    rows = _erased(gray)
    turned = rows.T
    columns = _erased(turned)
    return rows if columns is turned else columns.T


def crossed(grays: np.ndarray, paper: np.ndarray) -> np.ndarray:
    """Which of pictures of one size, each on one exact paper grey (``paper``), may be ruled: big enough,
    and off that grey somewhere along both side edges, or along both the top and bottom edges (a line
    crosses the picture; few digits on a canvas touch two opposite edges). The cheap test that spares
    most canvases ``unruled``."""
    count, height, width = grays.shape
    if min(height, width) < 3 * STRIP:
        return np.zeros(count, bool)
    off = ink.borders(grays) != paper[:, None]
    top, bottom, left, right = np.split(off, [width, 2 * width, 2 * width + height], axis=1)
    return np.asarray((left.any(1) & right.any(1)) | (top.any(1) & bottom.any(1)))


def _erased(gray: np.ndarray) -> np.ndarray:
    """``gray`` with its ruling of (nearly) horizontal lines, dark or light, erased. The first and last
    strips are looked at first: a ruling's lines cross both, and most pictures have none."""
    height, width = gray.shape
    strips = width // STRIP
    if strips < 3 or height < 16:
        return gray
    size = width // strips
    reach = max(1, round(THIN * max(height, width)))
    probe = _profiles(gray, [0, strips - 1], size)
    least = max(MIN_DEPTH, DEPTH * 1.4826 * float(np.median(np.abs(np.diff(probe, axis=1)))) / np.sqrt(2))
    both = _runs(np.concatenate([probe, -probe]), reach, least)  # dark lines, then light ones
    signs = [sign for sign, found in zip((1.0, -1.0), (both[:2], both[2:])) if min(map(len, found)) >= 1]
    if not signs:
        return gray
    profiles = _profiles(gray, range(strips), size)
    for sign in signs:
        runs = _runs(sign * profiles, reach, least)
        lines = _lines(runs, DRIFT * size + 1)
        ruling = _ruled(lines, strips, reach, height)
        if ruling and sum(map(len, ruling)) < MOST * sum(map(len, runs)):  # a texture's dips, some of them in line
            ruling = []
        ruling = ruling or _alone(lines, strips, reach, gray, sign)
        if ruling:
            edges = np.append(np.arange(strips) * size, width)  # the last strip takes the remainder
            return _erase(gray, ruling, edges, sign, least)
    return gray


def _profiles(gray: np.ndarray, strips: Iterable[int], size: int) -> np.ndarray:
    """The median of ``SAMPLES`` columns of each of ``strips`` (``size`` pixels wide), row by row: (strips, height)."""
    columns = np.asarray(list(strips))[:, None] * size + np.linspace(0, size - 1, SAMPLES).astype(int)
    samples = gray[:, columns.ravel()].reshape(len(gray), len(columns), SAMPLES)
    return np.partition(samples, SAMPLES // 2, axis=2)[..., SAMPLES // 2].T


class Dip(NamedTuple):
    """A line where one strip crosses it: its rows [top, bottom) and how much darker than the paper it is."""

    top: int
    bottom: int
    depth: float

    @property
    def centre(self) -> float:
        return (self.top + self.bottom) / 2


Line = dict[int, Dip]  # by strip


def _runs(profiles: np.ndarray, reach: int, least: float) -> list[list[Dip]]:
    """Each strip's dips: runs of rows at least ``least`` darker than the profile within ``reach`` on both sides."""
    size = 2 * reach + 3
    depth = ndimage.minimum_filter1d(ndimage.maximum_filter1d(profiles, size, axis=1), size, axis=1) - profiles
    shut = np.zeros((len(profiles), 1), np.int8)
    edges = np.diff(np.concatenate([shut, (depth > least).view(np.int8), shut], axis=1), axis=1)
    starts, stops = np.argwhere(edges == 1), np.argwhere(edges == -1)
    runs: list[list[Dip]] = [[] for _ in profiles]
    if not len(starts):
        return runs
    deepest = np.maximum.reduceat(depth.ravel(), starts[:, 0] * depth.shape[1] + starts[:, 1])  # of each run
    for (strip, top), bottom, most in zip(starts.tolist(), stops[:, 1].tolist(), deepest.tolist()):
        runs[strip].append(Dip(top, bottom, most))
    return runs


def _lines(runs: list[list[Dip]], drift: float) -> list[Line]:
    """Dips followed from strip to strip, each line taking the nearest dip within ``drift`` per strip of
    its last. Only dips about as thin and as deep as most in the first and last strips are followed
    (the lines cross those; a digit seldom reaches them, and its strokes' dips would outnumber one
    line's): where a stroke runs along a line, or crosses it wide, the line is not seen there (the
    strips beside it say where it is)."""
    edges = runs[0] + runs[-1]
    if not edges:
        return []
    thick = float(np.median([dip.bottom - dip.top for dip in edges]))
    depth = float(np.median([dip.depth for dip in edges]))
    lines: list[Line] = []
    where = np.zeros((0, 2))  # each line's last strip and centre
    for strip, found in enumerate(runs):
        found = [dip for dip in found
                 if dip.bottom - dip.top <= thick + max(1.0, thick / 2) and depth / ALIKE <= dip.depth <= depth * ALIKE]
        centres = np.array([dip.centre for dip in found])
        distance = np.abs(where[:, 1, None] - centres[None, :])
        near = np.argwhere(distance <= drift * (strip - where[:, 0, None]))
        taken_lines, taken_dips = set(), set()
        for n, d in near[np.argsort(distance[near[:, 0], near[:, 1]], kind="stable")].tolist():
            if n not in taken_lines and d not in taken_dips:
                lines[n][strip] = found[d]
                where[n] = strip, found[d].centre
                taken_lines.add(n)
                taken_dips.add(d)
        fresh = [d for d in range(len(found)) if d not in taken_dips]
        lines += [{strip: found[d]} for d in fresh]
        where = np.concatenate([where, [(strip, centres[d]) for d in fresh]]) if fresh else where
    return lines


def _ruled(lines: list[Line], strips: int, reach: int, height: int) -> list[Line]:
    """A ruling's lines (``_ruling``), with those that strokes hid in most strips; else none."""
    across = [line for line in lines if len(line) >= ACROSS * strips]
    if len(across) < LINES and min(map(len, across), default=0) < WHOLE * strips:
        return []
    grid = _ruling(across, reach, height)
    if grid is None:
        return []
    return across + [line for line in lines if 2 <= len(line) < ACROSS * strips and _on(grid, line)]


def _alone(lines: list[Line], strips: int, reach: int, gray: np.ndarray, sign: float) -> list[Line]:
    """One line across the picture (a notebook's margin, the line a digit was written on, its base along
    the line): seen in the first and last strips and in half of all, three at least (a digit's strokes
    that meet the sides of a tight crop at one height are seen in two), thin, off the picture's edges,
    and fainter than the ink (``FAINT`` of ``_contrast``: a digit's own bar, cropped tight, is as dark as
    its other strokes); else none."""
    across = [line for line in lines if len(line) >= max(3, strips / 2) and {0, strips - 1} <= line.keys()]
    if len(across) != 1 or _bar(across[0], reach, len(gray)):
        return []
    return across if _depth(across[0]) <= FAINT * _contrast(gray, sign) else []


def _contrast(gray: np.ndarray, sign: float) -> float:
    """How much darker (``sign`` 1) or lighter (-1) than the paper (the median of a sample) the ink is at most."""
    paper = float(np.median(gray[::4, ::4]))
    return sign * (paper - float(gray.min() if sign > 0 else gray.max()))


def _bar(line: Line, reach: int, height: int) -> bool:
    """Whether a line is too thick for a ruling's, or at the picture's first or last rows (a digit's own
    bar where the picture is cropped tight: a 7's top, a 2's base)."""
    thick = _thickness(line)
    edge = 2 * thick + 2
    return thick > 2 * reach + 1 or not edge < _centre(line) < height - 1 - edge


def _ruling(lines: list[Line], reach: int, height: int) -> tuple[float, float] | None:
    """Where the lines are a ruling, its first line and pitch: two or more, thin, at a regular pitch (a
    line may be missing, where a stroke hid it: a gap is a whole number of pitches), and not a digit's
    own bars cropped tight (a thin "3" of three bars: its first and last at the picture's edges; of two
    lines, either at an edge: a "2" with a flat base)."""
    if len(lines) < 2:
        return None
    centres = sorted(_centre(line) for line in lines)
    span = centres[-1] - centres[0]
    pitch = span / max(1, round(span / float(np.median(np.diff(centres)))))  # the mean of the whole pitches
    thick = max(map(_thickness, lines))
    edge = 2 * thick + 2
    at_edges = [centres[0] <= edge, centres[-1] >= height - 1 - edge]
    if (thick > 2 * reach + 1 or pitch <= 2 * thick or not _on((centres[0], pitch), *centres)
            or (any(at_edges) if len(lines) == 2 else all(at_edges))):
        return None
    return centres[0], pitch


def _on(grid: tuple[float, float], *lines: float | Line) -> bool:
    """Whether every line (or centre) is a whole number of pitches from the grid's first line."""
    first, pitch = grid
    steps = np.array([line if isinstance(line, float) else _centre(line) for line in lines]) - first
    return bool(np.all(np.abs(steps / pitch - np.round(steps / pitch)) <= PITCH))


def _centre(line: Line) -> float:
    return float(np.median([dip.centre for dip in line.values()]))


def _thickness(line: Line) -> float:
    return float(np.median([dip.bottom - dip.top for dip in line.values()]))


def _depth(line: Line) -> float:
    return float(np.median([dip.depth for dip in line.values()]))


def _erase(gray: np.ndarray, lines: list[Line], edges: np.ndarray, sign: float, least: float) -> np.ndarray:
    """Each line's pixels, strip by strip, given the values interpolated between the rows just above and
    below it (the row on one side only, at the picture's edge): paper where the line crossed paper, ink
    where it crossed a stroke. A pixel darker than that by far more than the line usually is (``ALIKE``)
    is a stroke running along the line, and is kept. In a strip where a stroke hid the line, the line is
    taken where it was in the nearest strip."""
    out = gray.copy()
    height = len(gray)
    for line in lines:
        depth = ALIKE * _depth(line) + least
        for strip in range(len(edges) - 1):
            dip = line.get(strip) or line[min(line, key=lambda found: abs(found - strip))]
            above, below = dip.top - 2, dip.bottom + 1
            columns = slice(edges[strip], edges[strip + 1])
            rows = slice(max(above + 1, 0), min(below, height))
            if above < 0 or below >= height:  # at the edge: the paper on the other side
                paper = gray[below if above < 0 else above, columns][None]
            else:
                share = ((np.arange(above + 1, below) - above) / (below - above))[:, None]
                paper = (1 - share) * gray[above, columns] + share * gray[below, columns]
            part = out[rows, columns]
            line_like = sign * (paper - part) <= depth
            part[line_like] = np.broadcast_to(paper, part.shape)[line_like]
    return out
