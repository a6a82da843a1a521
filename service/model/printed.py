"""Printed characters rendered from the fonts on this machine, as ink on a page (``dress`` makes pictures).

Fonts are found through fontconfig (``fc-list``). GNU FreeFont and the URW base35 fonts (and the TeX
Gyre fonts derived from them) are never used: held-out checks use them, so training on them would
measure nothing. Fonts are grouped by family, and whole groups are split three ways (``partition``):

- ``train``: what training renders digits, letters and symbols from;
- ``calibration``: never trained on, never evaluated on; only the typicality reference's printed digits
  (``reference``), so that the reference holds printed digits in fonts the model has not seen, as the
  service is sent;
- ``heldout``: evaluation's (``bench.evaluate``'s ``-heldout`` kinds), never trained or calibrated on.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Held out by the checks this model is measured on: never trained or tuned on.
EXCLUDED = re.compile(r"free ?(sans|serif|mono)|freefont|urw|nimbus|gyre|gsfonts|base35|p052|c059|d050000l|z003"
                      r"|standard symbols", re.IGNORECASE)
# Not text faces (ornaments, initials, keyboard keys, music) or scripts whose Latin digits repeat Noto Sans.
_NOT_TEXT = re.compile(r"initials|keyboard|music|symbols|math|emoji|^noto (sans|serif|kufi|looped|naskh|nastaliq"
                       r"|rashi|traditional) (?!display|mono)", re.IGNORECASE)
DIGITS = "0123456789"
# About a fifth of the groups, of every kind (sans, serif, mono, rounded, script, Computer Modern).
HELD_OUT_GROUPS = frozenset({"berenis", "cantarell", "cmu", "comfortaa", "courier", "femkeklaver", "gillius", "hack",
                             "inconsolata", "junicode", "kristi", "quicksand"})
# About a fifth of the rest, of every kind: mono (Anonymous Pro), humanist sans (Cabin), serif (Charis SIL),
# script (Dancing Script), didone (GFS Didot), sans with its mono (Go), condensed display (Yanone Kaffeesatz).
CALIBRATION_GROUPS = frozenset({"anonymous", "cabin", "charis", "dancing", "gfs", "go", "yanone"})
Partition = Literal["train", "calibration", "heldout"]
PARTITIONS: tuple[Partition, ...] = ("train", "calibration", "heldout")
_SAME_DESIGN = {"arimo": "liberation", "tinos": "liberation", "cousine": "liberation"}  # Croscore = Liberation 2


@dataclass(frozen=True)
class Font:
    family: str
    style: str
    path: str


@cache
def fonts() -> tuple[Font, ...]:
    """Every allowed text font on this machine that draws all ten digits, sorted by family and style."""
    try:
        listing = subprocess.run(["fc-list", "--format", "%{family[0]}\t%{style[0]}\t%{file}\n"],
                                 capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise RuntimeError("fc-list not found: printed digits and letters need fontconfig and fonts "
                           "(make system-deps), or train without them: --printed 0 --negatives 0 "
                           "--reference mnist,canvas,dressed") from None
    found: dict[str, Font] = {}
    for line in listing.splitlines():
        family, style, path = [*line.split("\t"), "", ""][:3]
        if not path.endswith((".ttf", ".otf")) or EXCLUDED.search(f"{family} {path}") or _NOT_TEXT.search(family):
            continue
        if all(_draws(path, ch) for ch in DIGITS):
            found.setdefault(path, Font(family, style, path))
    return tuple(sorted(found.values(), key=lambda f: (f.family, f.style, f.path)))


def group(family: str) -> str:
    """A family's group: its first word ("Noto Sans Mono" -> "noto"), so related families go together."""
    first = re.split(r"[^a-z0-9]", family.lower())[0]
    return _SAME_DESIGN.get(first, first)


def partition(family: str) -> Partition:
    """Which of training, the reference (``calibration``) or evaluation (``heldout``) a family's group is for."""
    name = group(family)
    return "heldout" if name in HELD_OUT_GROUPS else "calibration" if name in CALIBRATION_GROUPS else "train"


def fonts_in(part: Partition) -> tuple[Font, ...]:
    """The fonts of one partition, in ``fonts()``'s order."""
    return tuple(f for f in fonts() if partition(f.family) == part)


def summary() -> dict[str, dict[str, object]]:
    """Each partition's groups and counts of families and font files on this machine (a version's metadata)."""
    made: dict[str, dict[str, object]] = {}
    for part in PARTITIONS:
        found = fonts_in(part)
        made[part] = {"groups": sorted({group(f.family) for f in found}), "families": len({f.family for f in found}),
                      "fonts": len(found)}
    return made


@cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _draws(path: str, ch: str) -> bool:
    """Whether the font has a glyph for ``ch`` (a missing one renders as the .notdef box)."""
    font = _font(path, 32)
    return font.getmask(ch).getbbox() is not None and bytes(font.getmask(ch)) != bytes(font.getmask("\U0010fffd"))


def render(text: str, font: Font, rng: np.random.Generator, size: int | None = None) -> np.ndarray | None:
    """``draw`` at a random size, now and then with a heavier stroke, mostly turned and sheared a little,
    as printing and photographing give. None if the font lacks a glyph."""
    size = size or int(rng.integers(22, 120))
    left, top, right, bottom = _font(font.path, size).getbbox(text)
    if right <= left or bottom <= top:  # before drawing the rest: the same stream of draws as ever
        return None
    stroke = int(rng.integers(1, max(2, size // 14))) if rng.random() < 0.25 else 0
    angle, shear = rng.uniform(-6, 6), rng.uniform(-0.15, 0.15)
    return draw(text, font, size, stroke, (shear, angle) if rng.random() < 0.8 else None)


def draw(text: str, font: Font, size: int, stroke: int = 0,
         turn: tuple[float, float] | None = None) -> np.ndarray | None:
    """float32 ink (1 = ink) of ``text`` in ``font`` at ``size`` pixels, its strokes ``stroke`` pixels
    heavier, sheared and then rotated by ``turn`` (shear, degrees), cropped to its strokes (a tenth of full
    ink). None if the font lacks a glyph."""
    pil_font = _font(font.path, size)
    left, top, right, bottom = pil_font.getbbox(text)
    if right <= left or bottom <= top:
        return None
    pad = size // 2 + 4
    image = Image.new("L", (int(right - left) + 2 * pad, int(bottom - top) + 2 * pad), 0)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=255, font=pil_font,
                               stroke_width=stroke, stroke_fill=255)
    if turn is not None:
        shear, angle = turn
        image = sheared(image, shear).rotate(angle, resample=Image.Resampling.BILINEAR)
    ink = np.asarray(image, dtype=np.float32) / 255
    return cropped(ink, 0.1) if ink.max() > 0.1 else None


def sheared(image: Image.Image, shear: float) -> Image.Image:
    """``image`` sheared about its middle row: a positive ``shear`` leans it right, as italics."""
    return image.transform(image.size, Image.Transform.AFFINE, (1, shear, -shear * image.size[1] / 2, 0, 1, 0),
                           resample=Image.Resampling.BILINEAR)


def cropped(ink: np.ndarray, level: float) -> np.ndarray:
    """``ink`` cropped to the rows and columns that reach ``level`` (some must)."""
    rows, cols = np.flatnonzero(ink.max(1) > level), np.flatnonzero(ink.max(0) > level)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
