"""Where the digit's ink is in a photo: a paper that is not one grey, found the way a document scanner finds it.

A lamp to one side makes a gradient, a hand or a phone casts a shadow with a sharp edge, paper has
grain and the sensor adds noise, so no one grey is the paper. On a copy of the picture at most
``ANALYSIS_SIDE`` a side (block means: cheap, and they average the noise away):

1. noise: measured from differences of neighbours (along the border too: a digit cropped tight is
   mostly edges, its border mostly paper); where there is any, or specks (``_speckled``), a 3x3
   median first;
2. polarity: dark ink on light paper or light on dark (``_polarity``), and the strokes' width;
3. background: a morphological opening of the picture turned so that ink is bright, four strokes
   wide: it removes the strokes and keeps the paper's gradients and the edges of shadows. Picture
   minus background, divided by the paper's brightness for dark ink (light and shadow multiply
   paper and ink alike), is the *flattened* picture: ink contrast over a paper at zero;
4. threshold: averaged across a stroke's width, ink stands ``NOISE_MARGIN`` deviations of the
   paper's noise above it, and a tenth of the strongest contrast (as MNIST's recipe);
5. components: the digit is the heaviest connected ink clear of the picture's edge, and what lies
   near it (``ink.choose``); grain, specks and far marks are dropped.

The box found there is then read at the picture's own resolution: background and gain
interpolated up, the strokes of the kept components only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage  # type: ignore[import-untyped]

from service.imaging.ink import (
    EIGHT,
    FAINT,
    INK_SHARE,
    LOW_CONTRAST,
    LOW_SNR,
    MULTIPLE,
    STRONG_SHARE,
    Blank,
    Ink,
    border_noise,
    choose,
    cropped,
)

MIN_PHOTO_CONTRAST = 8.0  # grey levels: under this nothing stands out of a photo's flattened paper ...
NOISE_MARGIN = 3.0  # ... nor under this many deviations of its noise: ink stands this far above the paper
BLANK_SNR = 3.0  # a photo whose strongest ink (averaged across a stroke) stands less far is blank
MEDIAN_NOISE = 0.5  # what a 3x3 median leaves of Gaussian noise (0.42 in theory; its output is smoother)
MAX_GAIN = 4.0  # dark ink in a shadow is divided by its paper's brightness, relative to the lit paper, up to this
GLARE = 1.3  # light beyond a one-grey border, soft-edged, is glare where dark strokes keep this much more contrast ...
SOFT = 0.6  # ... soft-edged: under this share of it reaches half its strongest contrast (a stroke's edge is sharp)
SPECKLED = 0.025  # specks: separate changes by a 3x3 median, at least this share of the pixels' count
SMALL_SIDE = 32  # pixels: a picture whose longer side is under this is too small for these steps (``crowded``)
ANALYSIS_SIDE = 160  # longer side of the copy the whole-image steps run on


@dataclass
class Flattened:
    """A photo's analysis copy flattened: ``flat`` is ink contrast over a paper at zero, ``factor``
    the copy's shrink factor; ``sign``, ``background``, ``gain`` and ``offset`` make the same
    flattening at the picture's own resolution; ``noise`` is what is left of the paper's spread;
    ``width`` the strokes' width, as measured; ``specks`` whether the picture is speckled (``_speckled``)."""

    flat: np.ndarray
    factor: int
    sign: float
    background: np.ndarray
    gain: np.ndarray | float
    offset: float
    noise: float
    width: float
    specks: bool


def flatten(gray: np.ndarray) -> Flattened:
    """Steps 1-3 of the module docstring, on the analysis copy."""
    small, factor = _analysis_copy(gray)
    noise = min(_noise(small), border_noise(small))  # a digit cropped tight is mostly edges: its border tells
    specks = noise < 0.5 and _speckled(small)  # specks leave most neighbours equal: the noise misses them
    clean = noise < 0.5 and not specks  # a render, a screenshot, a clean scan
    if not clean:  # sensor noise or grain: a 3x3 median before anything is thresholded
        small = ndimage.median_filter(small, size=3, mode="nearest")
        noise *= MEDIAN_NOISE
    sign, width = _polarity(small, noise)
    size = _opening_size(width, small.shape)
    # on a clean picture, what runs along the edge only a stroke deep is a stroke, not a shadow
    background = _background(small * np.float32(sign), size, max(2, size // 4 + 1) if clean else 1)
    flat, gain, offset = _flatten(small, sign, background)
    # the paper's spread, not the ink's: in a digit cropped tight, ink is much of the picture
    noise = max(noise * float(np.median(gain)), _spread(flat[flat <= INK_SHARE * float(flat.max())]))
    return Flattened(flat, factor, sign, background, gain, offset, noise, width, specks)


def photo_ink(gray: np.ndarray, found: Flattened | None = None) -> Ink:
    """One picture whose paper is not one grey: the steps of the module docstring (``found``: its
    ``flatten``, where the caller has it). Raises ``Blank(0)``."""
    found = flatten(gray) if found is None else found
    flat, seen, noise = found.flat, found.flat, found.noise
    if noise > 0:  # averaged across a stroke's width, a stroke keeps its contrast and noise loses it
        seen = ndimage.gaussian_filter(flat, min(max(found.width / 3, 0.7), 3.0), mode="nearest")
        noise = _spread(seen)
    peak = float(seen.max())
    if peak < max(MIN_PHOTO_CONTRAST, BLANK_SNR * noise):
        raise Blank(0)
    low = max(INK_SHARE * peak, NOISE_MARGIN * noise)
    labels, count = ndimage.label(seen >= low, EIGHT)
    keep, several = choose(labels, count, np.maximum(seen, 0), min(peak, max(STRONG_SHARE * peak, 1.5 * low)))
    kept = keep[labels]
    flags = [MULTIPLE] if several else []
    if peak < max(LOW_CONTRAST, LOW_SNR * noise):
        flags.append(FAINT)
    if found.factor == 1:
        return cropped(np.where(kept, flat, 0), (0, 0), flags)
    region = _region(kept, found.factor, gray.shape)
    ink = _full_resolution(gray, region, found)
    ink *= _upsample_mask(ndimage.binary_dilation(kept, EIGHT), found.factor, region)
    return cropped(ink, (region[1].start, region[0].start), flags)


def crowded(found: Flattened) -> bool:
    """Whether the picture is too small for these steps to tell its background from its strokes: the
    background's window, four strokes wide, would reach half of its longer side (where
    ``_opening_size`` caps it), or that side is under ``SMALL_SIDE``, where their whole-pixel windows
    and a stroke's anti-aliased fringe are as wide as the strokes. There a stroke along the edge is
    taken for a shadow's edge: a small digit cropped tight."""
    side = max(found.flat.shape)
    return 4 * found.width >= side / 2 or side < SMALL_SIDE


def _analysis_copy(gray: np.ndarray) -> tuple[np.ndarray, int]:
    """The picture shrunk by a whole factor to at most ANALYSIS_SIDE a side, by block means (which also
    average the noise away), and that factor."""
    factor = max(1, math.ceil(max(gray.shape) / ANALYSIS_SIDE))
    if factor == 1:
        return gray, 1
    h, w = gray.shape[0] // factor, gray.shape[1] // factor
    blocks = gray[: h * factor, : w * factor].reshape(h, factor, w, factor)
    return blocks.mean((1, 3), dtype=np.float32), factor


def _polarity(small: np.ndarray, noise: float) -> tuple[float, float]:
    """+1 for light ink on a darker background, -1 for dark ink on lighter paper; and the strokes' width.

    Where the picture's border is nearly one grey, as for a paper of one grey: the side of that grey
    with more contrast mass beyond the noise; but light that fades out gradually (``_soft``) and,
    without its wide parts, keeps clearly less contrast than the dark side (``GLARE``) is a flash's
    glare on a board, and the dark strokes in it are the ink. Otherwise the paper's level varies
    (light, shadow) and morphology tells (``_ink_side``).
    """
    size = max(3, int(max(small.shape) / 4) | 1)
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    low, paper, high = np.percentile(border, (10, 50, 90))
    margin = NOISE_MARGIN * noise + 1
    if high - low <= max(MIN_PHOTO_CONTRAST, 2 * margin):
        light = np.maximum(small - (paper + margin), 0).sum() >= np.maximum((paper - margin) - small, 0).sum()
        sign = 1.0 if light else -1.0
        residual = _flatten(small, sign, _reconstructed(small * np.float32(sign), size))[0]
        if light and _soft(small - np.float32(paper), margin):  # a glare, or light strokes?
            dark = _flatten(small, -1.0, _reconstructed(-small, size))[0]
            if float(dark.max()) > GLARE * float(residual.max()):
                sign, residual = -1.0, dark
        peak = float(residual.max())
        return sign, _main_shape(residual, residual >= max(MIN_PHOTO_CONTRAST, NOISE_MARGIN * noise, peak / 4))[1]
    return _ink_side(small, noise, size)


def _soft(lit: np.ndarray, margin: float) -> bool:
    """Whether what stands above the paper (``lit``: the picture minus the paper's grey) fades out
    gradually, as a glare does: under ``SOFT`` of it reaches half its strongest contrast. Strokes,
    even blurred ones, are mostly as bright as their middle, and only their edges are fainter."""
    above = int(np.count_nonzero(lit > margin))
    return above > 0 and int(np.count_nonzero(lit > 0.5 * float(lit.max()))) < SOFT * above


def _ink_side(small: np.ndarray, noise: float, size: int) -> tuple[float, float]:
    """``_polarity`` where the paper's level varies. Either way round, the background
    (``_reconstructed``) keeps what is wide or joined to something wide (paper, light, shadow), so
    what is left is narrower: the strokes, or the paper the strokes enclose (the inside of a 0), or
    weaker remains of grain and lighting. The ink is the side with clearly more contrast; when both
    have as much (strokes and their holes), the side whose main part is not inside the other's
    holes; when neither is, dark ink: a photo is of ink on paper.
    """
    found = {sign: _flatten(small, sign, _reconstructed(small * np.float32(sign), size))[0] for sign in (-1.0, 1.0)}
    peak = {sign: float(residual.max()) for sign, residual in found.items()}
    low = max(MIN_PHOTO_CONTRAST, NOISE_MARGIN * noise, 0.25 * max(peak.values()))
    shapes = {sign: _main_shape(residual, residual >= low) for sign, residual in found.items()}
    if max(peak.values()) > 1.3 * min(peak.values()):
        light = peak[1.0] > peak[-1.0]
    else:  # as much contrast either way: strokes enclose their holes; else, a photo is of ink on paper
        light = _inside(shapes[-1.0][0], shapes[1.0][0]) and not _inside(shapes[1.0][0], shapes[-1.0][0])
    return (1.0, shapes[1.0][1]) if light else (-1.0, shapes[-1.0][1])


def _inside(part: np.ndarray, other: np.ndarray) -> bool:
    """Whether ``part`` (not empty) lies within the holes of ``other``."""
    return bool(part.any()) and not (part & ~ndimage.binary_fill_holes(other)).any()


def _main_shape(residual: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """The heaviest connected part of ``mask`` (clear of the picture's edge, if any is) and its width
    (2 x area / perimeter: a ribbon's width)."""
    labels, count = ndimage.label(mask, EIGHT)
    if not count:
        return mask, 1.0
    mass = ndimage.sum_labels(residual, labels, np.arange(1, count + 1))
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = mass.copy()
    inside[edge[edge > 0] - 1] = 0
    part = labels == int(np.argmax(inside if inside.max() > 0 else mass)) + 1
    perimeter = float((part & ~ndimage.binary_erosion(part, EIGHT)).sum())
    return part, max(1.0, 2 * float(part.sum()) / max(perimeter, 1.0))


def _reconstructed(turned: np.ndarray, size: int, levels: int = 16) -> np.ndarray:
    """The background of a picture whose ink is bright, as an opening by reconstruction: every bright
    part lowered to its surroundings unless it is ``size`` wide somewhere, or joined at its level to a
    part that is (by threshold decomposition over ``levels`` greys). Unlike a plain opening, the
    narrow end of a shadow or of a lit patch stays with the rest of it, and so does the paper that
    strokes nearly enclose; but so may a stroke that runs into a shadow: good for telling what is
    ink, not for measuring it."""
    marker = _wide(turned, size)
    opened = np.minimum(ndimage.grey_dilation(marker, size=(size, size), mode="nearest"), turned)
    low, high = float(turned.min()), float(turned.max())
    step = (high - low) / levels
    reached = np.full(turned.shape, -np.inf, np.float32)
    for level in (low + step * np.arange(1, levels)).astype(np.float32).tolist():
        labels, count = ndimage.label(turned >= level, EIGHT)
        seeded = np.zeros(count + 1, bool)
        seeded[labels[marker >= level]] = True
        seeded[0] = False
        joined = seeded[labels]
        if not joined.any():
            break
        reached[joined] = level
    whole = reached > turned - np.float32(step)  # reached at its own level: all of it is background
    return np.where(whole, turned, np.maximum(opened, reached))


def _opening_size(width: float, shape: tuple[int, ...]) -> int:
    """Four strokes wide: wider than any stroke and than where strokes meet, narrow enough that little of
    a shadow's corner or of the paper between strokes is narrower; between an eighth and a half of the
    picture (the width measured may be a faint stroke's, too thin)."""
    return max(3, int(min(max(4 * width, max(shape) / 8), max(shape) / 2)) | 1)


def _background(turned: np.ndarray, size: int, depth: int = 1) -> np.ndarray:
    """The background of a picture whose ink is bright: a morphological opening (every bright part
    narrower than ``size`` lowered to its surroundings; gradients and the edges of shadows stay)."""
    return np.minimum(ndimage.grey_dilation(_wide(turned, size, depth), size=(size, size), mode="nearest"), turned)


def _wide(turned: np.ndarray, size: int, depth: int = 1) -> np.ndarray:
    """Where the picture is at least ``size`` wide at its level (a grey erosion). Where light or shadow
    is cut by the picture's edge it may be narrow, but it runs along the edge, where a stroke only
    crosses it: along the edge, a run of ``size`` pixels, ``depth`` deep, is wide enough. (In a digit
    cropped tight a stroke does run along the edge, but only a stroke's width deep.)"""
    marker = ndimage.grey_erosion(turned, size=(size, size), mode="nearest")
    bands = ((np.s_[0, :], turned[:depth].min(0)), (np.s_[-1, :], turned[-depth:].min(0)),
             (np.s_[:, 0], turned[:, :depth].min(1)), (np.s_[:, -1], turned[:, -depth:].min(1)))
    for edge, band in bands:
        marker[edge] = np.maximum(marker[edge], ndimage.minimum_filter1d(band, size, mode="nearest"))
    return marker


def _flatten(small: np.ndarray, sign: float, background: np.ndarray) -> tuple[np.ndarray, np.ndarray | float, float]:
    """The flattened picture (ink contrast, paper at 0) from the background of the turned picture, and
    what makes it at any resolution: the gain (1 / paper brightness, for dark ink) and the paper's offset."""
    contrast = small * np.float32(sign) - background
    gain: np.ndarray | float = 1.0
    if sign < 0:  # dark ink: light and shadow multiply the paper and the ink alike
        paper = -background
        brightest = max(float(np.percentile(paper, 95)), 1.0)
        gain = np.clip(np.float32(brightest) / np.maximum(paper, np.float32(1)), 1, MAX_GAIN).astype(np.float32)
        contrast *= gain
    offset = float(np.median(contrast))
    contrast -= np.float32(offset)
    return contrast, gain, offset


def _spread(values: np.ndarray) -> float:
    """Robust standard deviation (1.4826 median absolute deviation around the median)."""
    return float(1.4826 * np.median(np.abs(values - np.median(values))))


def _noise(small: np.ndarray) -> float:
    """The picture's noise (standard deviation), from differences of neighbours: robust to the digit's
    and the shadows' edges, which are a minority of the pixels, and blind to gradients."""
    across, down = np.diff(small, axis=1), np.diff(small, axis=0)
    spread = np.median(np.abs(np.concatenate([across.ravel(), down.ravel()])))
    return float(1.4826 * spread / math.sqrt(2))


def _region(kept: np.ndarray, factor: int, shape: tuple[int, ...]) -> tuple[slice, slice]:
    """The kept components' box in the analysis copy, in the picture's pixels, one analysis pixel wider."""
    rows, cols = np.flatnonzero(kept.any(1)), np.flatnonzero(kept.any(0))
    top, bottom = max(0, (rows[0] - 1) * factor), min(shape[0], (rows[-1] + 2) * factor)
    left, right = max(0, (cols[0] - 1) * factor), min(shape[1], (cols[-1] + 2) * factor)
    return slice(top, bottom), slice(left, right)


def _full_resolution(gray: np.ndarray, region: tuple[slice, slice], found: Flattened) -> np.ndarray:
    """The flattened picture in ``region`` at the picture's resolution: the analysis copy's background and
    gain interpolated up to it; of a speckled picture, its 3x3 median (``_median3``), as for the analysis
    copy: each speck would read as a touch of ink, all over the digit's box."""
    picture = _median3(gray[region]) if found.specks else gray[region]
    contrast = picture * np.float32(found.sign) - _upsample(found.background, found.factor, region)
    if not isinstance(found.gain, float):
        contrast *= _upsample(found.gain, found.factor, region)
    contrast -= np.float32(found.offset)
    return contrast


def _speckled(small: np.ndarray) -> bool:
    """Whether the picture is strewn with specks (dust, dead pixels, salt and pepper): many separate
    pixels or clusters that a 3x3 median changes by more than ``MIN_PHOTO_CONTRAST`` (at least
    ``SPECKLED`` of the pixels' count), where a thin stroke, which the median also removes, is a few."""
    changed = np.abs(small - _median3(small)) > MIN_PHOTO_CONTRAST
    if np.count_nonzero(changed) < SPECKLED * changed.size:
        return False
    return ndimage.label(changed, EIGHT)[1] >= SPECKLED * changed.size


def _median3(picture: np.ndarray) -> np.ndarray:
    """A 3x3 median taken as the median of 3 along rows, then along columns (cheap at any size): a speck
    or a pair of them is gone, a stroke two pixels wide stays."""
    p = np.pad(picture, 1, mode="edge")
    rows = _median_of(p[:, :-2], p[:, 1:-1], p[:, 2:])
    return _median_of(rows[:-2], rows[1:-1], rows[2:])


def _median_of(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def _upsample(small: np.ndarray, factor: int, region: tuple[slice, slice]) -> np.ndarray:
    """Bilinear interpolation of an analysis-copy plane at the picture pixels of ``region`` (exact where
    the plane is constant: a + (b - a) t)."""
    ys = _source(region[0], factor, small.shape[0])
    xs = _source(region[1], factor, small.shape[1])
    (y0, y1, ty), (x0, x1, tx) = ys, xs
    rows = small[y0] + (small[y1] - small[y0]) * ty[:, None]
    return rows[:, x0] + (rows[:, x1] - rows[:, x0]) * tx[None, :]


def _source(span: slice, factor: int, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For picture pixels ``span``: the two analysis pixels around each, and the weight of the second."""
    at = np.clip((np.arange(span.start, span.stop, dtype=np.float32) - (factor - 1) / 2) / factor, 0, length - 1)
    low = np.floor(at).astype(np.intp)
    return low, np.minimum(low + 1, length - 1), (at - low).astype(np.float32)


def _upsample_mask(mask: np.ndarray, factor: int, region: tuple[slice, slice]) -> np.ndarray:
    """Nearest-neighbour: each picture pixel of ``region`` takes its analysis pixel's value."""
    ys = np.minimum(np.arange(region[0].start, region[0].stop) // factor, mask.shape[0] - 1)
    xs = np.minimum(np.arange(region[1].start, region[1].stop) // factor, mask.shape[1] - 1)
    return mask[np.ix_(ys, xs)]
