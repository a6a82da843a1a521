"""MNIST's own recipe, applied to the ink found (``ink.py``): crop to the strokes, fit them in a 20x20 box
keeping their aspect ratio, and place that box in 28x28 so that the centre of mass is at the centre."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage  # type: ignore[import-untyped]
from skimage.morphology import convex_hull_image, skeletonize

from service.errors import InputError
from service.imaging import ink, margin, photo, ruled
from service.model.fnn import IMAGE_SIDE

BOX = 20  # MNIST fits each digit in a 20x20 box
AGREES = 0.1  # strokes found this share of the border's ink contrast beyond its paper are ink
FILLS = 0.75  # ink that touches the picture's edge and spans this share of it: the picture may be cropped tight
SOLID_RING = 0.9  # ink along this share of its box's border, ...
ENCLOSES = 0.005  # ... round holes (paper, or a digit) that are this share of the box: a frame (``_inside``)
UNDERLINE_GAP = 0.05  # a line under the digit stands this share of the digit's height below it ...
UNDERLINE_FLAT = 0.25  # ... is at most this share as tall as it is wide ...
UNDERLINE_SPAN = 0.8  # ... and at least this share as wide as the digit (``_underlined``)
RING_HOLDS = 0.3  # a ring round ink at least this share of its height: a circled digit ...
SURROUNDS = 0.8  # ... that it surrounds: a line from the digit's centre meets it in this share of directions ...
RING_INK = 6.0  # ... and that holds at least a sixth as much ink as it does (a pen's ring round a digit) ...
RING_TALL = 1.4  # ... and is round: at most this many times as tall as wide (a dotted or outlined zero is taller)
FRINGE = 1 / 16  # share of a frame box's rows or columns, mostly paper, its ring test looks past (``_trimmed``)
CUT_OUT_TALL = 0.3  # paper holes at least this share of a solid shape's height, ...
CUT_OUT_WHOLE = 0.6  # ... most of them (this share) in one part, ...
CUT_OUT_THIN = 0.35  # ... as thin as strokes: at most this share of their height across ...
CUT_OUT_LONG = 3.5  # ... long: at least this many times their width squared in area, ...
CUT_OUT_BENT = 0.83  # ... and bent: at most this share of their convex hull (``_cut_out``)
BRACKET_TALL = 1.05  # ink at each side at least this share of the rest's height (taller), ...
BRACKET_THIN = 0.25  # ... one stroke: its rows at most this share of its height wide on average, ...
BRACKET_RUNS = 0.9  # ... and this share of them crossing it once, ...
BRACKET_HOLDS = 0.35  # ... round a rest at least this share of its height: brackets (``_bracketed``)
PEELS = 3  # frames within frames read through: a box drawn on paper, inside a picture's dark border
STROKE = 1.3  # strokes this wide or less in the 20x20 box (under all but 0.3% of MNIST's) are drawn thicker ...
STROKE_WIDTH = 2.2  # ... to about this width (MNIST's median is 2.6)


class BlankImage(InputError):
    """An image in which no stroke stands out; ``position`` is its place in the list given to ``to_mnist``.
    (A request's pictures are answered ``no_digit`` instead: ``service.imaging.prepare``.)"""

    def __init__(self, position: int):
        super().__init__(422, "no digit found: the image is blank (no stroke stands out from the background)")
        self.position = position


def to_mnist(grays: Sequence[np.ndarray]) -> np.ndarray:
    """float32 (H, W) images in 0..255, any background -> float32 (N, 28, 28) in 0..1, white digits on black,
    MNIST-centred. Raises ``BlankImage`` for the first image without a stroke."""
    frames, found = to_mnist_with_ink(grays)
    blank = next((position for position, digit in enumerate(found) if digit is None), None)
    if blank is not None:
        raise BlankImage(blank)
    return frames


def to_mnist_with_ink(grays: Sequence[np.ndarray]) -> tuple[np.ndarray, list[ink.Ink | None]]:
    """``to_mnist``, and each image's ink (its box in the image and its flags), or None where no stroke
    stands out (its frame is left black).

    Images of one size go through the whole-image steps together: numpy's per-call overhead, not
    arithmetic, is what a small image costs, so a request's 32 digits cost little more than one.
    """
    sizes: dict[tuple[int, ...], list[int]] = {}
    for position, gray in enumerate(grays):
        sizes.setdefault(gray.shape, []).append(position)
    frames = np.zeros((len(grays), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    found: list[ink.Ink | None] = []
    for positions in sizes.values():
        # np.array stacks same-size arrays in one C copy, faster than np.stack (docs/performance.md)
        stack = np.array(grays) if len(sizes) == 1 else np.array([grays[p] for p in positions])
        digits = _inks(stack)
        for position, digit in zip(positions, digits):
            if digit is not None:
                _place(frames[position], digit)
        found += digits
    if len(sizes) > 1:  # back in the order given
        order = [position for positions in sizes.values() for position in positions]
        found = [digit for _, digit in sorted(zip(order, found), key=lambda pair: pair[0])]
    return frames, found


def _inks(stack: np.ndarray) -> list[ink.Ink | None]:
    """The digit of each image of one size (None where there is none): inside a frame, the ink within it
    (``_inside``), without a ring drawn round it (``_encircled``), brackets round it (``_bracketed``) or a
    line drawn under it (``_underlined``)."""
    return [None if found is None else _underlined(_bracketed(_encircled(_inside(stack[position], found, PEELS))))
            for position, found in enumerate(_found(stack))]


def _encircled(found: ink.Ink) -> ink.Ink:
    """The digit without a ring drawn round it (people circle an answer on a form, closed or not quite):
    a part of the ink of its own that spans the whole box and surrounds all the rest (``SURROUNDS`` of
    the directions from the rest's centre meet it), which is a digit's size within it (``RING_HOLDS``
    of its height) and not a small part of the ink (``RING_INK``); round (``RING_TALL``), where a zero
    with a dot or an outline's inner line in it is tall."""
    if max(found.strokes.shape) <= BOX:  # as small as MNIST's digits: no ring drawn round one is looked for
        return found
    strokes = found.strokes > 0.5
    across, down = _runs(strokes[len(strokes) // 2]), _runs(strokes[:, strokes.shape[1] // 2])
    if min(across, down) < 2 or max(across, down) < 3:  # ring, digit, ring on the middle row or column
        return found
    labels, count = ndimage.label(strokes, ink.EIGHT)
    if count < 2:
        return found
    spans = [label for label, (rows, cols) in enumerate(ndimage.find_objects(labels), 1)
             if rows.stop - rows.start == strokes.shape[0] and cols.stop - cols.start == strokes.shape[1]]
    if len(spans) != 1:
        return found
    ring = labels == spans[0]
    rest = strokes & ~ring
    x, y, w, h = ink.box_of(rest)
    tall, wide = strokes.shape
    if (h < RING_HOLDS * tall or ring.sum() > RING_INK * rest.sum() or tall > RING_TALL * wide
            or _surrounded(ring, (y + h / 2, x + w / 2)) < SURROUNDS):
        return found
    kept = ~ndimage.binary_dilation(ring, ink.EIGHT, 2)  # the digit's faint fringe too, not the ring's
    return ink.cropped(np.where(kept, found.strokes, 0), found.box[:2], found.flags)


def _runs(lines: np.ndarray) -> np.ndarray:
    """How many runs of ink each row (or one row or column) of the strokes crosses."""
    return lines[..., 0] + np.count_nonzero(lines[..., 1:] & ~lines[..., :-1], axis=-1)


def _surrounded(ring: np.ndarray, centre: tuple[float, float], rays: int = 16) -> float:
    """The share of ``rays`` directions from ``centre`` in which a straight line meets ``ring``."""
    angles = np.linspace(0, 2 * np.pi, rays, endpoint=False)
    steps = np.arange(max(ring.shape))
    rows = np.rint(centre[0] + np.sin(angles)[:, None] * steps).astype(int)
    cols = np.rint(centre[1] + np.cos(angles)[:, None] * steps).astype(int)
    within = (rows >= 0) & (rows < ring.shape[0]) & (cols >= 0) & (cols < ring.shape[1])
    hits = np.zeros_like(within)
    hits[within] = ring[rows[within], cols[within]]
    return float(hits.any(1).mean())


def _found(stack: np.ndarray) -> list[ink.Ink | None]:
    """The ink of each image of one size: pictures on one exact paper grey together, the others alone,
    without the lines of ruled or squared paper (``ruled``: a page whose lines were erased, however
    clean, is read as a picture)."""
    paper, flat = ink.paper_grey(stack)
    grays = {position: stack[position] for position in np.flatnonzero(~flat | ruled.crossed(stack, paper)).tolist()}
    unruled = {position: ruled.unruled(gray) for position, gray in grays.items()}
    flat[[position for position, gray in grays.items() if unruled[position] is not gray]] = False  # lines were erased
    if flat.all():
        return _flat_together(stack, paper)
    flats = iter(_flat_together(stack[flat], paper[flat]) if flat.any() else [])
    return [next(flats) if is_flat else _picture_ink(unruled[position])
            for position, is_flat in enumerate(flat.tolist())]


def _bracketed(found: ink.Ink) -> ink.Ink:
    """The digit without brackets round it (a list's "(3)", a form's "[7]", a table's rules either side):
    the parts of the ink reaching furthest left and right, each of its own, taller than the rest
    (``BRACKET_TALL``: stripes are alike) and one thin stroke (``BRACKET_THIN``: its rows' mean width
    against its height, as an italic one leans; ``BRACKET_RUNS``: where an H or a D is two), the rest
    between their middles, level with them and a digit's size within them (``BRACKET_HOLDS``), where a
    0 broken in three keeps only a short arc between its sides."""
    strokes = found.strokes > 0.5
    if _runs(strokes[len(strokes) // 2]) < 3:  # bracket, digit, bracket across the middle row
        return found
    labels, count = ndimage.label(strokes, ink.EIGHT)
    if count < 3:
        return found
    parts = ndimage.find_objects(labels)
    sides = [1 + min(range(count), key=lambda i: parts[i][1].start),
             1 + max(range(count), key=lambda i: parts[i][1].stop)]
    if sides[0] == sides[1]:
        return found
    brackets = np.isin(labels, sides)
    x, y, w, h = ink.box_of(strokes & ~brackets)
    middles = []
    for side in sides:
        rows, cols = parts[side - 1]
        height = rows.stop - rows.start
        bracket = labels[rows, cols] == side
        once = np.count_nonzero(_runs(bracket) == 1)
        if (height < BRACKET_TALL * h or np.count_nonzero(bracket) > BRACKET_THIN * height ** 2
                or once < BRACKET_RUNS * height or h < BRACKET_HOLDS * height
                or not rows.start <= y + h / 2 <= rows.stop):
            return found
        middles.append((cols.start + cols.stop) / 2)
    if not middles[0] < x < x + w < middles[1]:  # the rest is not between them
        return found
    kept = ~ndimage.binary_dilation(brackets, ink.EIGHT, 2)  # the digit's faint fringe too, not the brackets'
    digit = np.where(kept, found.strokes, 0)
    flags = [flag for flag in found.flags if flag != ink.MULTIPLE]  # the brackets were the other "digits"
    if ink.several(digit, ink.STRONG_SHARE):
        flags.insert(0, ink.MULTIPLE)
    return ink.cropped(digit, found.box[:2], flags)


def _underlined(found: ink.Ink) -> ink.Ink:
    """The digit without a line drawn under it (people underline a 6 or a 9; a form's field has one):
    a part of the ink of its own along the box's last row, below the rest with a gap (``UNDERLINE_GAP``
    of the rest's height), flat (``UNDERLINE_FLAT``) and about as wide as the rest (``UNDERLINE_SPAN``),
    and no heavier than it."""
    if found.strokes.shape[0] < 8 or (found.strokes[-1] > 0.5).mean() < 0.5:  # no line across the last row
        return found
    strokes = found.strokes > 0.5
    labels, _ = ndimage.label(strokes, ink.EIGHT)
    line = labels == labels[-1][strokes[-1]][0]
    rest = strokes & ~line
    if not rest.any():
        return found
    _, line_top, line_width, line_height = ink.box_of(line)
    _, rest_top, rest_width, rest_height = ink.box_of(rest)
    if (rest.sum() < line.sum() or line_height > UNDERLINE_FLAT * line_width or line_width < UNDERLINE_SPAN * rest_width
            or line_top - (rest_top + rest_height) < UNDERLINE_GAP * rest_height):
        return found
    kept = ~ndimage.binary_dilation(line, ink.EIGHT, 2)  # the digit's faint fringe too, not the line's
    return ink.cropped(np.where(kept, found.strokes, 0), found.box[:2], found.flags)


def _inside(gray: np.ndarray, found: ink.Ink, peels: int) -> ink.Ink:
    """Where what was found is a frame, not a digit, the ink within it, read as a picture of its own (its
    box given in ``gray``'s pixels), up to ``peels`` frames deep; else, or where the frame holds nothing
    (a 0 drawn square), ``found``.

    A frame is ink all round its box (``SOLID_RING`` of the box's border, past a fringe: ``_trimmed``)
    round holes (``ENCLOSES`` of the box). A box drawn round a digit is one: what is inside its line is
    read. So is the paper inside a dark border (a scan's dark margin, a picture with a border, a sticky
    note on a desk), where the border's grey is taken for the paper and the paper, with the digit as
    its hole, for ink: that paper is read. A digit is not."""
    strokes = found.strokes > 0.5
    if not peels or min(strokes.shape) < 3:
        return found
    x, y, w, h = found.box
    rows, cols = _trimmed(strokes)
    if ink.ring(strokes[rows, cols]).mean() < SOLID_RING:
        cut = _cut_out(strokes) if strokes.shape == (h, w) else None  # not a tight crop's padded strokes
        if cut is None:
            return found
        (top, bottom), (left, right) = ((part.start, part.stop) for part in cut)
        crop = np.array(gray[y + top: y + bottom, x + left: x + right])
        outside = ~ndimage.binary_fill_holes(strokes)[cut]  # the paper round the shape takes the shape's grey
        crop[outside] = np.median(gray[y: y + h, x: x + w][strokes])
        x, y = x + left, y + top
    elif (holes := ndimage.binary_fill_holes(strokes) & ~strokes).mean() < ENCLOSES:
        return found
    else:
        if strokes.mean() < 0.5:  # a line drawn round the digit: inside the line
            left, top, w, h = ink.box_of(holes)
            x, y = x + left, y + top
        else:  # the paper inside a border: all of it, not the fringe
            x, y, w, h = x + cols.start, y + rows.start, cols.stop - cols.start, rows.stop - rows.start
        crop = np.ascontiguousarray(gray[y: y + h, x: x + w])
    inner = _found(crop[None])[0]
    if inner is None:
        return found
    inner = _inside(crop, inner, peels - 1)
    ix, iy, iw, ih = inner.box
    inner.box = (ix + x, iy + y, iw, ih)
    return inner


def _cut_out(strokes: np.ndarray) -> tuple[slice, slice] | None:
    """Where the ink is a solid shape with a digit cut out of it (a light digit on a dark disc, badge,
    label or sign's panel, the picture's paper round it): the rows and columns round the cut-out, a
    quarter of its size wider each way, within the shape's box; else None. The cut-out is the shape's
    paper holes: most in one part (``CUT_OUT_WHOLE``), where a decorated face's or a symbol's are a
    pattern; a digit's size within the shape (``CUT_OUT_TALL``); strokes (``CUT_OUT_THIN``,
    ``CUT_OUT_LONG``) with a bend (``CUT_OUT_BENT``), where a bold digit's counters, its own holes, are
    round, short or a straight lens (a heavy 0's). A straight bar cut out (a 1 without a foot) is such
    a lens to this test, and the shape is read as it is."""
    if min(strokes.shape) <= BOX or np.count_nonzero(strokes) < 0.5 * strokes.size:
        return None
    holes = ndimage.binary_fill_holes(strokes) & ~strokes
    if not holes.any():
        return None
    labels, count = ndimage.label(holes)  # paper joins along edges where ink joins at corners too
    areas = ndimage.sum_labels(holes, labels, np.arange(1, count + 1))
    kept = areas >= 0.1 * areas.max()  # not the specks of a shape's noise
    if areas.max() < CUT_OUT_WHOLE * areas[kept].sum():  # a pattern of holes: a decorated face's, a symbol's
        return None
    cut = np.isin(labels, 1 + np.flatnonzero(kept))
    left, top, w, h = ink.box_of(cut)
    across = 2 * float(ndimage.distance_transform_edt(cut).max())
    if (h < CUT_OUT_TALL * len(strokes) or across > CUT_OUT_THIN * h or cut.sum() < CUT_OUT_LONG * across ** 2
            or cut.sum() > CUT_OUT_BENT * convex_hull_image(cut).sum()):
        return None
    pad = max(w, h) // 4
    return (slice(max(0, top - pad), min(len(strokes), top + h + pad)),
            slice(max(0, left - pad), min(strokes.shape[1], left + w + pad)))


def _trimmed(solid: np.ndarray) -> tuple[slice, slice]:
    """The box's rows and columns without those at each edge that are mostly paper, where one beyond
    them is mostly ink (``FRINGE``): read at the picture's resolution from a smaller copy, a frame's
    box may take in a fringe of what surrounds it (a sticky note's, a few pixels of the desk)."""
    rows, cols = solid.mean(1) >= 0.5, solid.mean(0) >= 0.5
    top, bottom = _dense_from(rows), len(rows) - _dense_from(rows[::-1])
    left, right = _dense_from(cols), len(cols) - _dense_from(cols[::-1])
    if top >= bottom or left >= right:
        return slice(0, len(rows)), slice(0, len(cols))
    return slice(top, bottom), slice(left, right)


def _dense_from(dense: np.ndarray) -> int:
    """How many of the first lines to skip to reach a dense one, up to ``FRINGE`` of them (a small
    digit's box has no fringe to look past); none if none is dense."""
    first = np.flatnonzero(dense[:int(FRINGE * len(dense)) + 1])
    return int(first[0]) if len(first) else 0


def _flat_together(stack: np.ndarray, paper: np.ndarray) -> list[ink.Ink | None]:
    try:
        return list(ink.flat_inks(stack, paper))
    except ink.Blank:  # rare: one by one, so that only the blank ones have none
        return [_flat_ink(stack[i: i + 1], paper[i: i + 1]) for i in range(len(stack))]


def _flat_ink(one: np.ndarray, paper: np.ndarray) -> ink.Ink | None:
    try:
        return ink.flat_inks(one, paper)[0]
    except ink.Blank:
        return None


def _picture_ink(gray: np.ndarray) -> ink.Ink | None:
    """A picture whose border is not one grey: a photo, or a digit cropped tight. Where the border holds
    ink and the photo steps find nothing, or ink that spans the picture from its edge, or "ink" at the
    level of the border's paper, or its strokes are too wide for them (``photo.crowded``), the picture
    is read again with a margin of its own paper (``margin``), and may then be on one grey after all.
    (Only then: along the border of a photo, the edge of a shadow is not ink, and the photo steps know
    it better than a margin does.)"""
    flattened = photo.flatten(gray)
    try:
        found = photo.photo_ink(gray, flattened)
    except ink.Blank:
        found = None
    noise = margin.noise(gray)
    border = margin.levels(gray, noise)
    if border is None and found is None:  # faint ink along the border (a blurred stroke cut by the crop)
        border = margin.paper_only(gray)
    if border is None or (found is not None and not _fills(found.box, gray.shape) and not photo.crowded(flattened)
                          and _agrees(found, gray, *border)):
        return found
    padded, width = margin.pad(gray, *border, noise)
    try:
        paper, flat = ink.paper_grey(padded[None])
        again = ink.flat_inks(padded[None], paper)[0] if flat[0] else photo.photo_ink(padded)
    except ink.Blank:
        return found
    again.box = margin.unpad(again.box, width, gray.shape)
    return again


def _agrees(found: ink.Ink, gray: np.ndarray, paper: float, border_ink: float) -> bool:
    """Whether the strokes found stand out from the border's paper (on either side: the border's other
    level may be a shadow's, or its lit side): not the paper between bold strokes, taken for ink."""
    x, y, w, h = found.box
    strokes = gray[y: y + h, x: x + w][found.strokes > 0.5]
    return not len(strokes) or abs(float(np.median(strokes)) - paper) >= AGREES * abs(border_ink - paper)


def _fills(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    """Whether ink in ``box`` touches the picture's edge and spans most of its width or height."""
    x, y, w, h = box
    touches = x <= 0 or y <= 0 or x + w >= shape[1] or y + h >= shape[0]
    return touches and (w >= FILLS * shape[1] or h >= FILLS * shape[0])


def _place(out: np.ndarray, digit: ink.Ink) -> None:
    """The strokes resized to fit 20x20 unless they already do (every MNIST-sized input), and placed in
    ``out`` (28x28) by their centre of mass."""
    box = digit.strokes
    h, w = box.shape
    if max(h, w) != BOX:
        box, cy, cx = _fit(box)
        h, w = box.shape
    elif digit.centre is not None:
        cy, cx = digit.centre
    else:
        (cy,), (cx,) = _centres(box.sum(1)[None]).tolist(), _centres(box.sum(0)[None]).tolist()
    y, x = _corner(cy, h), _corner(cx, w)
    out[y: y + h, x: x + w] = box


def _fit(box: np.ndarray) -> tuple[np.ndarray, float, float]:
    """A digit's box resized so that its longer side fits the 20x20 box, brightest at 1; and its centre of
    mass. Strokes far thinner there than MNIST's (a fine pen on a big canvas: ``STROKE``) are first
    drawn thicker, to about MNIST's width (``STROKE_WIDTH``): the model has seen no hairline digits."""
    fitted = _resized(box)
    thin = _stroke_width(fitted)
    reach = round((STROKE_WIDTH - thin) * max(box.shape) / BOX / 2) if thin < STROKE else 0
    if reach >= 1:
        fitted = _resized(ndimage.maximum_filter(np.pad(box, reach), size=2 * reach + 1))
    (cy,), (cx,) = _centres(fitted.sum(1)[None]).tolist(), _centres(fitted.sum(0)[None]).tolist()
    return fitted, cy, cx


def _resized(box: np.ndarray) -> np.ndarray:
    h, w = box.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    box = np.array(Image.fromarray(box, mode="F").resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
    box *= np.float32(1 / max(float(box.max()), 1e-6))
    return box


def _stroke_width(box: np.ndarray) -> float:
    """How wide the strokes are, in pixels: their ink over the length of their skeleton."""
    return float(box.sum()) / max(int(skeletonize(box > 0.3).sum()), 1)


_centres = ink.centres


def _corner(centre: float, extent: int) -> int:
    """Where a box of ``extent`` pixels starts so that its centre of mass lands on the frame's centre."""
    return min(max(round(IMAGE_SIDE / 2 - centre - 0.5), 0), IMAGE_SIDE - extent)
