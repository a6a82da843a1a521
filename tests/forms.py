"""A real digit on paper as forms and scans have it: in a box drawn round it (a form's field), inside a
dark border (a scan's margin), with a line or a comb drawn under it, circled, on ruled or squared paper,
across one printed line or beside a notebook's margin, in brackets; on a grey board photographed with
a flash; strewn with specks; on a sticky note on a desk; and cut out of a badge. And a digit on a
seven-segment display. Both test tiers draw from here."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from service.model import segments

DIGIT = (slice(64, 176), slice(44, 156))  # where the digit is written on the 240x200 page (rows, columns)


def page(digit: np.ndarray, *marks: str) -> np.ndarray:
    """A 28x28 MNIST digit, 4x, dark (its darkest 35) on paper of grey 235, with ``marks`` (box, border,
    underline, comb, circle, ruled, squared, line: one ruled line through the digit's lower strokes,
    margin: a notebook's margin line left of it); uint8."""
    paper = np.full((240, 200), 235, np.uint8)
    if "ruled" in marks or "squared" in marks:  # a notebook's lines, 2 pixels every 24, fainter than the ink
        for at in range(10, 240, 24):
            paper[at: at + 2] = 175
    if "squared" in marks:
        for at in range(8, 200, 24):
            paper[:, at: at + 2] = 175
    if "line" in marks:
        paper[148:150] = 175
    if "margin" in marks:
        paper[:, 30:32] = 175
    big = np.asarray(Image.fromarray(np.asarray(digit, np.uint8)).resize((112, 112), Image.Resampling.BILINEAR))
    paper[DIGIT] = np.minimum(paper[DIGIT], 235 - (big * (200 / 255)).astype(np.uint8))
    if "box" in marks:
        paper[30:210, 20:180][[0, 1, 2, -3, -2, -1], :] = 50
        paper[30:210, 20:180][:, [0, 1, 2, -3, -2, -1]] = 50
    if "border" in marks:
        paper[:8], paper[-8:], paper[:, :8], paper[:, -8:] = 10, 10, 10, 10
    if "underline" in marks or "comb" in marks:
        paper[195:199, 30:170] = 35  # as dark as the digit's darkest: the same threshold for ink
    if "circle" in marks:  # a pen's ring round the digit, not quite closed
        circle = Image.fromarray(np.zeros((240, 200), np.uint8))
        ImageDraw.Draw(circle).arc((22, 42, 178, 198), 100, 430, fill=200, width=4)
        paper = np.minimum(paper, 235 - np.asarray(circle))
    if "comb" in marks:
        paper[187:199, 30:33], paper[187:199, 167:170] = 35, 35
    return paper


def enlarged(digit: np.ndarray, side: int) -> np.ndarray:
    """A 28x28 MNIST digit enlarged to ``side`` pixels a side (bicubic), light on black; uint8."""
    return np.asarray(Image.fromarray(np.asarray(digit, np.uint8)).resize((side, side), Image.Resampling.BICUBIC))


def note_corner(index: int) -> tuple[int, int]:
    """Where ``sticky_note``'s note lies in the picture (row, column), varied by ``index``: every corner
    of the analysis copy's pixel grid, odd and even."""
    return 21 + 7 * (index % 8), 23 + 13 * (index % 7)


def board(digit: np.ndarray, glare: tuple[float, float] | None = None, side: int = 180) -> np.ndarray:
    """A 28x28 MNIST digit, 100 pixels tall, dark (40) on a grey board (190); with ``glare`` (its centre,
    as shares of the height and width), photographed with a flash: a round glare wider than the strokes,
    brighter than the board and white in its middle. float32."""
    ink = np.zeros((side, side), np.float32)
    at = (side - 100) // 2
    ink[at: at + 100, at: at + 100] = enlarged(digit, 100) / np.float32(255)
    picture = 190 * (1 - ink) + 40 * ink
    if glare is not None:
        rows, cols = np.mgrid[:side, :side]
        spread = 2 * (side / 7) ** 2
        picture += 180 * np.exp(-((rows - glare[0] * side) ** 2 + (cols - glare[1] * side) ** 2) / spread)
    return np.clip(picture, 0, 255).round().astype(np.float32)


def speckled(picture: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``picture`` (uint8) with ``share`` of its pixels turned black and as many white: salt and pepper,
    as dust on a scanner or a sensor's dead pixels make it."""
    out = np.array(picture, np.uint8)
    spots = np.random.default_rng(seed).random(out.shape)
    out[spots < share], out[spots > 1 - share] = 0, 255
    return out


def sticky_note(digit: np.ndarray, at: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A 28x28 MNIST digit, 70 pixels tall, dark on a light sticky note 130 pixels a side whose top left
    corner is ``at`` (row, column), on a dark desk with a grain, 240x300. float32."""
    grain = np.asarray(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 38), np.uint8)).resize(
        (300, 240), Image.Resampling.BICUBIC), np.float32)
    picture = 60 + 0.1 * grain
    note = np.full((130, 130), 235, np.float32)
    note[30:100, 30:100] -= enlarged(digit, 70) * np.float32(200 / 255)
    picture[at[0]: at[0] + 130, at[1]: at[1] + 130] = note
    return picture


def bracketed(digit: np.ndarray, square: bool = False) -> np.ndarray:
    """``page``'s digit between brackets 130 pixels tall, as a list's "(3)" or a form's "[3]" has it, dark
    as the digit; uint8."""
    paper = Image.fromarray(page(digit))
    draw = ImageDraw.Draw(paper)
    for edge, foot, start in ((28, 16, 125), (172, -16, 305)):  # each bracket's outer edge, its feet's way
        if square:
            draw.line([(edge + foot, 55), (edge, 55), (edge, 185), (edge + foot, 185)], fill=35, width=5)
        else:  # an arc of an ellipse 56 wide, its outer side at the edge
            left = edge - 20 if foot > 0 else edge - 36
            draw.arc((left, 55, left + 56, 185), start, start + 110, fill=35, width=5)
    return np.asarray(paper)


def badge(digit: np.ndarray, shape: str, colour: tuple[int, int, int]) -> np.ndarray:
    """A 28x28 MNIST digit, 80 pixels tall, cut out (white) of a filled ``shape`` of ``colour`` on white
    paper, 180x180: a "disc" 140 pixels across (a map marker, a notification's badge) or a "label" (a
    rounded rectangle 120 wide and 150 tall). uint8 RGB."""
    cover = Image.new("L", (180, 180), 0)
    box = (20, 20, 160, 160) if shape == "disc" else (30, 15, 150, 165)
    if shape == "disc":
        ImageDraw.Draw(cover).ellipse(box, fill=255)
    else:
        ImageDraw.Draw(cover).rounded_rectangle(box, 18, fill=255)
    shape_share = np.asarray(cover, np.float32)[..., None] / 255
    cut = np.zeros((180, 180), np.float32)
    cut[50:130, 50:130] = enlarged(digit, 80) / np.float32(255)
    picture = 255 * (1 - shape_share) + np.asarray(colour, np.float32) * shape_share
    picture = picture * (1 - cut[..., None]) + 255 * cut[..., None]
    return picture.round().astype(np.uint8)


def display(label: int, lcd: bool) -> np.ndarray:
    """``label`` on a seven-segment display, 100 pixels tall, leaning a little, 160x150: an ``lcd``'s dark
    segments on grey-green glass with its unlit ones faintly there, or an LED's red ones on black: plain
    bars lighting ``segments.LIT``'s first spelling, not drawn as training draws them. uint8 RGB."""
    width, height, bar, left, top = 56, 100, 12, 47, 25
    half = height // 2
    inner, low = width - bar, height - bar  # bars meet at their corners with a gap of 2 pixels
    bars = {"a": (bar + 2, 0, inner - 2, bar), "g": (bar + 2, half - bar // 2, inner - 2, half + bar // 2),
            "d": (bar + 2, low, inner - 2, height), "f": (0, bar // 2 + 2, bar, half - 2),
            "b": (inner, bar // 2 + 2, width, half - 2), "e": (0, half + 2, bar, low + bar // 2 - 2),
            "c": (inner, half + 2, width, low + bar // 2 - 2)}
    lit = Image.new("L", (150, 160), 0)
    pen = ImageDraw.Draw(lit)
    for name, (x0, y0, x1, y1) in bars.items():
        shade = 255 if name in segments.LIT[label][0] else 30 if lcd else 0
        pen.rectangle((left + x0, top + y0, left + x1, top + y1), fill=shade)
    lit = lit.transform(lit.size, Image.Transform.AFFINE, (1, 0.12, -10, 0, 1, 0), resample=Image.Resampling.BILINEAR)
    share = np.asarray(lit, np.float32)[..., None] / 255
    glass, ink = ((150, 165, 140), (30, 35, 30)) if lcd else ((10, 10, 10), (235, 40, 30))
    picture = np.asarray(glass, np.float32) * (1 - share) + np.asarray(ink, np.float32) * share
    return picture.round().astype(np.uint8)
