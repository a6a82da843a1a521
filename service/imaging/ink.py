"""Where a digit's ink is in a grey picture, and what makes that uncertain: what pictures of every kind share.

``Ink`` is what the framing (``frame.py``) needs of a picture: the strokes in their box, the box in
the picture's pixels, and flags. A picture whose paper is one exact grey (MNIST's files, canvases,
screenshots: ``paper_grey``) needs nothing more than MNIST's own recipe, for many pictures at once
(``flat_inks``): the paper is that grey, the strokes are whatever stands a tenth of the strongest
contrast from it. It is the special case of the photo steps (``photo.py``) in which they are
identities: the background is that one grey, there is no noise to suppress, no grain to drop.
Both choose the digit among connected components the same way (``choose``).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

INK_SHARE = 0.1  # ink: contrast of at least this share of the strongest (MNIST's digits are anti-aliased down to it)
STRONG_SHARE = 0.3  # a component is ink only if it reaches this share somewhere (weak blobs alone are grain)
MIN_CONTRAST = 16.0  # grey levels: under this nothing stands out of a paper of one grey
LOW_CONTRAST = 40.0  # grey levels of ink contrast under which ink and paper are barely told apart ...
LOW_SNR = 10.0  # ... or this many noise deviations (photo.py)
MULTIPLE = "multiple_digits"
FAINT = "low_contrast"  # flags are listed in this order: multiple_digits before low_contrast
SPECKS = 0.01  # a border with more than this share of specks (and ``SPECK_COUNT``) is not one grey
SPECK_COUNT = 4
EIGHT = np.ones((3, 3), bool)


class Blank(Exception):
    """No stroke stands out in the picture at ``position`` of a stack."""

    def __init__(self, position: int):
        super().__init__(position)
        self.position = position


@dataclass(slots=True)
class Ink:
    """One picture's digit: its strokes (float32, 0..1, the strongest at 1, zero off the ink) in ``box``
    (x, y, width, height in the grey picture's pixels), and what made it uncertain. ``centre`` is the
    strokes' centre of mass (row, column) when it was computed with the picture's (MNIST's order)."""

    strokes: np.ndarray
    box: tuple[int, int, int, int]
    flags: list[str]
    centre: tuple[float, float] | None = None


def border_median(grays: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N,): each picture's border median, its paper if the paper is one grey (robust to a
    digit touching an edge)."""
    border = borders(grays)
    middle = border.shape[1] // 2
    return np.partition(border, middle, axis=1)[:, middle]


def ring(gray: np.ndarray) -> np.ndarray:
    """The picture's border, clockwise from the top left corner, each pixel once."""
    return np.concatenate([gray[0, :-1], gray[:-1, -1], gray[-1, :0:-1], gray[:0:-1, 0]])


def box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The box (x, y, width, height) of a mask's true pixels (it has some)."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


def cropped(ink: np.ndarray, origin: tuple[int, int], flags: list[str]) -> Ink:
    """Ink contrast (zero off the kept components) -> the strokes in their box, the strongest at 1, the
    box offset by ``origin`` (x, y). Raises ``Blank(0)`` where there is none."""
    peak = float(ink.max())
    if peak <= 0:
        raise Blank(0)
    strokes = ink >= INK_SHARE * peak
    left, top, w, h = box_of(strokes)
    box = np.where(strokes, ink, 0)[top: top + h, left: left + w] * np.float32(1 / peak)
    return Ink(box.astype(np.float32), (origin[0] + left, origin[1] + top, w, h), flags)


def border_noise(gray: np.ndarray) -> float:
    """The picture's noise (standard deviation) at its own resolution, from differences of neighbours
    along its border: cheap at any size, and robust to the few strokes that cross it, also where the
    digit fills the picture (cropped tight) and its edges are most of the picture's differences."""
    steps = np.diff(ring(gray))
    return float(1.4826 * np.median(np.abs(steps)) / np.sqrt(2)) if len(steps) else 0.0


def borders(grays: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 2W + 2H): each picture's top row, bottom row, left column and right column."""
    return np.concatenate([grays[:, 0], grays[:, -1], grays[:, :, 0], grays[:, :, -1]], axis=1)


def paper_grey(grays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) -> each picture's border median (N,), and whether the paper is that one exact grey (N,
    bool): four fifths of the border are exactly that grey (its 10th and 90th percentiles are), which no
    gradient, shadow, grain or noise leaves, and no more than ``SPECKS`` of it are specks (single pixels
    of another grey between two of the paper's: dust, dead pixels, salt and pepper); what differs
    inside is the digit."""
    border = borders(grays)
    size = border.shape[1]
    low, middle, high = size // 10, size // 2, size - 1 - size // 10
    ranked = np.partition(border, (low, middle, high), axis=1)
    paper = ranked[:, middle]
    flat = ranked[:, low] == ranked[:, high]
    if flat.any():
        on = border == paper[:, None]
        specks = np.count_nonzero(~on[:, 1:-1] & on[:, :-2] & on[:, 2:], axis=1)
        flat &= specks <= max(SPECK_COUNT, SPECKS * size)
    return paper, flat


def flat_inks(grays: np.ndarray, paper: np.ndarray) -> list[Ink]:
    """The special case of one exact paper grey, for a stack of one size: flattening is subtracting it,
    the ink is darker than a light paper and lighter than a dark one (or, if nothing is, the other way
    round), and nothing is noise. Raises ``Blank``."""
    n = len(grays)
    ink = grays - paper[:, None, None]
    np.negative(ink, out=ink, where=(paper >= 128)[:, None, None])  # dark strokes on light paper: light on dark
    peak = ink.reshape(n, -1).max(1)
    if (faint := peak < MIN_CONTRAST).any():  # nothing that way: the ink is on the other side of the paper
        np.negative(ink, out=ink, where=faint[:, None, None])
        peak = np.where(faint, ink.reshape(n, -1).max(1), peak)
        if (faint := peak < MIN_CONTRAST).any():
            raise Blank(int(faint.argmax()))
    peak = peak[:, None, None]
    strokes = ink >= INK_SHARE * peak
    ink *= strokes
    ink *= 1 / peak  # only the strokes, the brightest at 1
    flags = [[FAINT] if p < LOW_CONTRAST else [] for p in peak.ravel().tolist()]
    places, gapped = _places(ink)
    if gapped.any():  # an empty row or column between strokes: two digits, or a stray mark
        for i in np.flatnonzero(gapped).tolist():
            _separate(ink[i], strokes[i], flags[i])
        places, _ = _places(ink)
    return [Ink(ink[i, top: top + h, left: left + w], (left, top, w, h), flag, (cy, cx))
            for i, ((top, left, h, w, cy, cx), flag) in enumerate(zip(places, flags))]


def _places(ink: np.ndarray) -> tuple[list[tuple[int, int, int, int, float, float]], np.ndarray]:
    """Each picture's box (top, left, height, width) and centre of mass in it, from its first and last
    rows and columns with ink (one numpy call each for all N); and which have an empty row or column
    in between. Ink without such a gap is one component or overlapping ones: one digit."""
    _, height, width = ink.shape
    row_mass, col_mass = ink.sum(2), ink.sum(1)
    rows, cols = row_mass > 0, col_mass > 0
    tops, lefts = rows.argmax(1), cols.argmax(1)
    heights, widths = height - rows[:, ::-1].argmax(1) - tops, width - cols[:, ::-1].argmax(1) - lefts
    spans = heights.tolist(), widths.tolist()
    if np.count_nonzero(rows) + np.count_nonzero(cols) == sum(spans[0]) + sum(spans[1]):
        gapped = np.zeros(len(ink), bool)  # the common case, told by two counts for the whole stack
    else:
        gapped = (np.count_nonzero(rows, axis=1) < heights) | (np.count_nonzero(cols, axis=1) < widths)
    cys, cxs = (centres(row_mass) - tops).tolist(), (centres(col_mass) - lefts).tolist()
    return list(zip(tops.tolist(), lefts.tolist(), *spans, cys, cxs)), gapped


def several(ink: np.ndarray, strong: float) -> bool:
    """Whether ``ink`` (contrast, zero off its strokes) is several digits side by side, as ``choose`` tells."""
    labels, count = ndimage.label(ink > 0, EIGHT)
    return count > 1 and choose(labels, count, ink, strong)[1]


def _separate(ink: np.ndarray, strokes: np.ndarray, flags: list[str]) -> None:
    """One picture's stroke components: stray ones erased from ``ink``, ``multiple_digits`` flagged."""
    labels, count = ndimage.label(strokes, EIGHT)
    if count < 2:
        return
    keep, several = choose(labels, count, ink, STRONG_SHARE)
    if not keep.all():
        ink *= keep[labels]
    if several:
        flags.insert(0, MULTIPLE)


def choose(labels: np.ndarray, count: int, ink: np.ndarray, strong: float) -> tuple[np.ndarray, bool]:
    """Which of ``count`` labelled components are the digit: (keep, by label 0..count, label 0 false), and
    whether there are several digits.

    The main component has the most ink among those reaching ``strong`` somewhere (and clear of the
    picture's edge, where shadows, page edges and fingers are, if any is); others stay if
    they carry a twentieth of its ink, or lie near it (broken strokes, a detached bar); then
    ``_side_by_side`` says whether they are several digits.
    """
    index = np.arange(1, count + 1)
    mass = ndimage.sum_labels(ink, labels, index)
    peak = ndimage.maximum(ink, labels, index)
    boxes = ndimage.find_objects(labels, count)
    inside = np.array([all(b.start > 0 and b.stop < n for b, n in zip(box, labels.shape)) for box in boxes])
    candidates = np.flatnonzero((peak >= strong) & inside)  # what touches the picture's edge is rarely the digit
    if not len(candidates):
        candidates = np.flatnonzero(peak >= strong)
    main = int(candidates[mass[candidates].argmax()])
    near = _near(boxes, boxes[main])
    keep = (peak >= strong) & ((mass >= 0.05 * mass[main]) | (near & (mass >= 0.005 * mass[main])))
    digits = [i for i in np.flatnonzero(keep).tolist() if mass[i] >= 0.2 * mass[main]]
    return np.concatenate([[False], keep]), _side_by_side([boxes[i] for i in digits], boxes[main])


def _side_by_side(boxes: list[tuple[slice, slice]], main: tuple[slice, slice]) -> bool:
    """Whether these components (each with a fifth of the main's ink) are digits side by side: as tall
    as the main within 30% and on its line (sharing 60% of their height with it), with gaps between
    them of a fifth of its height. The parts of one broken digit are unlike in height (the arm and
    the stem of a 4), or overlap, or nearly touch."""
    height = main[0].stop - main[0].start
    spans = sorted((box[1].start, box[1].stop) for box in boxes
                   if box[0].stop - box[0].start >= 0.7 * height
                   and min(box[0].stop, main[0].stop) - max(box[0].start, main[0].start) >= 0.6 * height)
    return any(right[0] - left[1] >= 0.2 * height for left, right in itertools.pairwise(spans))


def _near(boxes: list[tuple[slice, slice]], main: tuple[slice, slice]) -> np.ndarray:
    """Which boxes overlap the main one grown by a quarter of its longer side."""
    margin = 0.25 * max(main[0].stop - main[0].start, main[1].stop - main[1].start)
    return np.array([all(b.start < m.stop + margin and b.stop > m.start - margin for b, m in zip(box, main))
                     for box in boxes])


def centres(marginals: np.ndarray) -> np.ndarray:
    """Each row of ``marginals`` (an image's mass per row, or per column): its centre of mass."""
    return marginals @ _positions(marginals.shape[1]) / marginals.sum(1)


@functools.lru_cache(maxsize=64)
def _positions(length: int) -> np.ndarray:
    return np.arange(length, dtype=np.float32)
