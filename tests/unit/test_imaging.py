"""In-process preprocessing: the two PNG decoders agree, and framing images together (a request's,
or all requests' of one event-loop iteration) gives each the frame it would get alone, placed as
MNIST places digits; pictures on a paper of one grey keep the frames MNIST's recipe gave them; each
instance's note (box, flags); ``pixels`` checked like pictures. Photos: tests/e2e/test_photos.py."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import orjson
import pytest
import torch
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage.morphology import skeletonize

from harness.server import encode
from service import imaging
from service.config import Limits
from service.errors import InputError
from service.http.prepare import Preparer
from service.imaging import (
    BlankImage,
    check_frames,
    decode_image,
    ink,
    normalize,
    photo,
    prepare,
    ruled,
    to_mnist,
    validate_pixels,
)
from service.imaging import frame as framing
from service.imaging.decode import decode_picture
from tests import forms


def digits(mnist_test, count: int) -> list[np.ndarray]:
    return list(mnist_test[0][:count].numpy())


def on_canvas(digit: np.ndarray, size: tuple[int, int], at: tuple[int, int], scale: int = 1) -> np.ndarray:
    """A real digit, optionally enlarged, pasted light-on-dark onto a bigger canvas at (row, column)."""
    picture = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC))
    canvas = np.zeros(size, np.uint8)
    canvas[at[0]: at[0] + picture.shape[0], at[1]: at[1] + picture.shape[1]] = picture
    return canvas


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
def test_plain_png_decodes_like_pillow(mode):
    """8-bit PNGs go through libspng, other formats through Pillow: the same picture as PNG and as a
    lossless TIFF must give the same gray to within one level (random colours and transparency)."""
    rng = np.random.default_rng(3)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    pixels = rng.integers(0, 256, size=(37, 45, channels), dtype=np.uint8)
    picture = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    from_png = decode_image(encode(picture, "PNG"), Limits())
    from_tiff = decode_image(encode(picture, "TIFF"), Limits())
    assert from_png.shape == (37, 45) and from_png.dtype == np.float32
    np.testing.assert_allclose(from_png, from_tiff, atol=1.0)
    assert np.ptp(from_png) > 100  # the picture survived: not flattened to one colour


@pytest.mark.parametrize(("mode", "fmt", "scale"), [("RGBA", "PNG", 1), ("LA", "PNG", 1), ("RGBA", "WEBP", 1),
                                                    ("RGBA", "TIFF", 1), ("RGBA", "PNG", 50), ("RGBA", "WEBP", 50)])
def test_a_light_drawing_on_transparency_is_shown_on_black(mnist_test, mode, fmt, scale):
    """A canvas drawn in white on a dark page, exported with a transparent background, is that drawing:
    on white it would vanish. Every decoder, the big pictures' too, shows it as the same digit opaque."""
    seven = digits(mnist_test, 1)[0]
    if scale > 1:
        seven = np.asarray(Image.fromarray(seven).resize((28 * scale, 28 * scale), Image.Resampling.BILINEAR))
    white = np.full_like(seven, 255)
    drawn = np.dstack([white, seven]) if mode == "LA" else np.dstack([white, white, white, seven])
    transparent = decode_image(encode(Image.fromarray(drawn, mode), fmt, lossless=True), Limits())
    opaque = decode_image(encode(Image.fromarray(seven), "PNG"), Limits())
    np.testing.assert_allclose(transparent, opaque, atol=1.0)
    assert np.ptp(transparent) > 200


def test_dark_drawings_and_opaque_pictures_keep_transparency_on_white(mnist_test):
    """The usual case is unchanged: dark ink on a transparent background, and a picture whose border is
    opaque (a photo with a transparent corner), show their transparency as white paper."""
    seven = digits(mnist_test, 1)[0]
    black = np.zeros_like(seven)
    dark = decode_image(encode(Image.fromarray(np.dstack([black, black, black, seven]), "RGBA"), "PNG"), Limits())
    np.testing.assert_allclose(dark, 255 - seven.astype(np.float32), atol=1.0)
    photo = np.dstack([np.full((28, 28, 3), 200, np.uint8), np.full((28, 28), 255, np.uint8)])
    photo[:6, :6, 3] = 0  # a transparent corner in an opaque, light picture
    corner = decode_image(encode(Image.fromarray(photo, "RGBA"), "PNG"), Limits())
    assert corner[0, 0] == 255 and corner[20, 20] == 200


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_a_digit_in_colours_of_one_lightness_is_read_by_its_colours(mnist_test, fmt):
    """Red ink on green paper of the same luminance is blank in luminance, and plain to a person: such a
    picture is read along its colours, in every decoder, as the same digit in grey is. Colour pictures
    whose luminance varies keep their luminance, to the grey level."""
    digit = np.asarray(Image.fromarray(digits(mnist_test, 1)[0]).resize((112, 112), Image.Resampling.BICUBIC))
    ink = (digit.astype(np.float32) / 255)[..., None]
    paper, red = np.array([50, 140, 50], np.float32), np.array([217, 51, 51], np.float32)  # luma 107 and 100
    coloured = encode(Image.fromarray((paper * (1 - ink) + red * ink).astype(np.uint8)), fmt, quality=95)
    gray = decode_image(coloured, Limits())
    assert np.ptp(gray) > 100
    grey_frame, colour_frame = to_mnist([255 - digit.astype(np.float32), gray])
    assert np.corrcoef(grey_frame.ravel(), colour_frame.ravel())[0, 1] > 0.95
    lit = encode(Image.fromarray((paper * (1 - ink) + np.float32(20) * ink).astype(np.uint8)), "PNG")
    luminance = np.asarray(Image.open(io.BytesIO(lit)).convert("L"), np.float32)
    np.testing.assert_allclose(decode_image(lit, Limits()), luminance, atol=1)
    if fmt != "JPEG":  # red strokes on a transparent canvas, its hidden colour black: red on white
        drawn = np.zeros((112, 112, 4), np.uint8)
        drawn[..., 0], drawn[..., 3] = 255, digit
        canvas = decode_image(encode(Image.fromarray(drawn, "RGBA"), fmt, lossless=True), Limits())
        np.testing.assert_allclose(canvas, 255 - digit * np.float32((255 - 76.245) / 255), atol=2)


def test_a_flashs_glare_on_a_board_is_light_not_ink(mnist_test, default_model):
    """A glare is lighter than the board and outweighs dark strokes in contrast mass, but it fades out
    and is wide: the dark digit in it is the ink (before, the glare was taken for it: 7 of 40 read)."""
    rng = np.random.default_rng(3)
    images, labels = mnist_test[0][:40].numpy(), mnist_test[1][:40].numpy()
    frames = to_mnist([forms.board(digit, tuple(rng.uniform(0.3, 0.7, 2))) for digit in images])
    plain = to_mnist([forms.board(digit) for digit in images])
    assert frames.sum() < 1.2 * plain.sum()  # strokes (fainter in the glare), not the glare's disc
    assert (predictions(default_model, frames) == labels).mean() >= 0.85


@pytest.mark.parametrize("side", [100, 170, 400])
def test_a_picture_strewn_with_specks_is_read_as_without_them(mnist_test, default_model, side):
    """Salt and pepper (5% of the pixels each way) leave the border's paper one grey by its percentiles
    and the noise of neighbours' differences at zero, and each speck near the digit was read as ink
    (1 of 40 read and not flagged over HTTP, at 170 px): such a picture is median-filtered as a noisy
    photo is, and framed as the clean one."""
    images, labels = mnist_test[0][:40].numpy(), mnist_test[1][:40].numpy()
    clean = [255 - forms.enlarged(digit, side) for digit in images]
    frames = to_mnist([forms.speckled(picture, 0.05, seed).astype(np.float32) for seed, picture in enumerate(clean)])
    plain = to_mnist([picture.astype(np.float32) for picture in clean])
    alike = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(frames, plain)]
    assert np.median(alike) > 0.9, alike
    assert (predictions(default_model, frames) == labels).mean() >= 0.9


def test_specks_along_the_border_make_a_paper_not_one_grey():
    """A border of one grey but for single specks of another is not one grey (``ink.paper_grey``); a few
    specks, or a stroke that crosses the border, leave it one grey."""
    paper = np.full((3, 60, 60), 255, np.float32)
    paper[0, 0, 5:50:4] = 0  # 12 specks along the top row
    paper[1, 0, 5:20:4] = 0  # 4
    paper[2, 0, 20:24] = 0  # a stroke 4 pixels wide crossing the top edge
    assert ink.paper_grey(paper)[1].tolist() == [False, True, True]


def test_a_digit_on_a_sticky_note_on_a_desk_is_read_not_the_note(mnist_test, default_model):
    """A light note on a dark desk is a frame: the paper inside a border, read as a picture of its own.
    Read at full resolution from a copy at half of it, the note's box may take in a row or two of the
    desk (JPEG's ringing at its edge), and its ring was not solid: the note itself was framed (a grey
    square holding the digit)."""
    images, labels = mnist_test[0][:40].numpy(), mnist_test[1][:40].numpy()
    photos = [encode(forms.sticky_note(digit, forms.note_corner(i), i).astype(np.uint8),
                     "JPEG", quality=85) for i, digit in enumerate(images)]
    frames = to_mnist([decode_image(photo, Limits()) for photo in photos])
    inked = (frames > 0.3).mean((1, 2))
    assert inked.max() < 0.4, inked  # strokes, not a square note
    assert (predictions(default_model, frames) == labels).mean() >= 0.95


@pytest.mark.parametrize(("shape", "colour"), [("disc", (200, 40, 40)), ("label", (35, 35, 50))])
def test_a_light_digit_cut_out_of_a_dark_badge_is_read_not_the_badge(mnist_test, default_model, shape, colour):
    """A white digit cut out of a filled disc or label on white paper: the dark shape was taken for the
    ink and its holes for paper (3 of 40 discs and 2 of 40 labels read). The digit is read as light ink
    on the shape's colour."""
    images, labels = mnist_test[0][:40].numpy(), mnist_test[1][:40].numpy()
    frames = to_mnist([decode_image(encode(forms.badge(digit, shape, colour), "PNG"), Limits()) for digit in images])
    plain = to_mnist([forms.enlarged(digit, 80).astype(np.float32) for digit in images])  # on black paper
    alike = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(frames, plain)]
    assert np.median(alike) > 0.9, alike  # the digit's strokes, not a filled shape
    # a straight 1 cut out is a heavy 0's counter to the framing (``_cut_out``): the shape is read
    assert (predictions(default_model, frames) == labels).mean() >= 0.9


def test_a_bold_digits_counters_are_not_a_cut_out():
    """``_cut_out`` reads a solid shape's holes as a digit only when they are strokes with a bend, most in
    one part: not a heavy 0's lens of a counter, an 8's two round ones or a pattern of dots in a
    decorated face; a 7 cut out of a disc is one."""
    def shape(draw_holes) -> np.ndarray:
        picture = Image.new("L", (120, 160), 0)
        draw = ImageDraw.Draw(picture)
        draw.ellipse((0, 0, 119, 159), fill=255)
        draw_holes(draw)
        return np.asarray(picture) > 127

    heavy_zero = shape(lambda draw: draw.polygon([(60, 25), (72, 80), (60, 135), (48, 80)], fill=0))
    eight = shape(lambda draw: (draw.ellipse((40, 25, 80, 70), fill=0), draw.ellipse((35, 85, 85, 135), fill=0)))
    seven = shape(lambda draw: draw.line([(35, 40), (85, 40), (55, 125)], fill=0, width=10))
    assert framing._cut_out(heavy_zero) is None
    assert framing._cut_out(eight) is None
    dotted = shape(lambda draw: [draw.ellipse((x, y, x + 14, y + 14), fill=0)
                                 for x in (30, 55, 80) for y in (30, 70, 110)])
    assert framing._cut_out(dotted) is None
    rows, cols = framing._cut_out(seven)
    assert rows.start < 40 and rows.stop > 125 and cols.start < 35 and cols.stop > 85


@pytest.mark.parametrize("square", [False, True])
def test_brackets_round_a_digit_are_not_read_with_it(mnist_test, default_model, square):
    """A list's "(3)" or a form's "[3]": the brackets were framed with the digit (10 of 40 printed "(d)"
    read, all flagged). They are tall, thin and either side of it: the digit is framed as on bare paper."""
    images, labels = mnist_test[0][:40].numpy(), mnist_test[1][:40].numpy()
    frames = to_mnist([forms.bracketed(digit, square).astype(np.float32) for digit in images])
    plain = to_mnist([forms.page(digit).astype(np.float32) for digit in images])
    alike = [float(np.corrcoef(a.ravel(), b.ravel())[0, 1]) for a, b in zip(frames, plain)]
    assert min(alike) > 0.9, alike
    assert (predictions(default_model, frames) == labels).mean() >= 0.95


def test_stripes_and_a_broken_zero_keep_their_sides():
    """``_bracketed`` takes away sides only taller than a digit's size of ink between them: a 0 drawn in
    three strokes (two sides and a short arc at its top) and a texture's stripes are kept whole."""
    stripes = np.zeros((90, 70), np.float32)
    stripes[:, 2:70:12] = stripes[:, 3:70:12] = stripes[:, 4:70:12] = 1
    striped = ink.cropped(stripes, (0, 0), [])
    assert framing._bracketed(striped) is striped
    picture = Image.new("L", (80, 110), 0)
    draw = ImageDraw.Draw(picture)
    draw.arc((2, 2, 78, 108), 100, 250, fill=255, width=6)
    draw.arc((2, 2, 78, 108), 290, 430, fill=255, width=6)
    draw.arc((2, 2, 78, 108), 255, 285, fill=255, width=6)
    zero = ink.cropped(np.asarray(picture, np.float32) / 255, (0, 0), [])
    assert framing._bracketed(zero) is zero


@pytest.mark.parametrize("marks", [("box",), ("border",), ("box", "border"), ("circle",), ("circle", "border")])
def test_a_digit_inside_a_frame_is_read_as_the_digit(mnist_test, marks):
    """A box or a ring drawn round the digit, or a dark border round the picture, is a frame, not the
    digit: the digit inside is framed as it is on bare paper, and its box is given in the picture's pixels."""
    for digit in digits(mnist_test, 6):
        plain = forms.page(digit).astype(np.float32)
        (alone, framed), found = framing.to_mnist_with_ink([plain, forms.page(digit, *marks).astype(np.float32)])
        assert np.corrcoef(alone.ravel(), framed.ravel())[0, 1] > 0.95
        assert found[1] is not None and found[1].box == found[0].box


@pytest.mark.parametrize("mark", ["underline", "comb"])
def test_a_line_drawn_under_the_digit_is_not_the_digit(mnist_test, mark):
    """People underline a 6 or a 9, and a form's field has a line (or a comb) under the digit: the digit
    is framed as it is alone, its box without the line."""
    for digit in digits(mnist_test, 6):
        plain, marked = forms.page(digit).astype(np.float32), forms.page(digit, mark).astype(np.float32)
        (alone, underlined), found = framing.to_mnist_with_ink([plain, marked])
        assert np.corrcoef(alone.ravel(), underlined.ravel())[0, 1] > 0.99
        assert found[1].box == found[0].box


def test_a_stroke_close_under_the_digit_stays_part_of_it(mnist_test):
    """A line just under the strokes, as a 2's base drawn apart, is part of the digit: it stays."""
    digit = digits(mnist_test, 1)[0]
    plain = forms.page(digit).astype(np.float32)
    (alone,) = framing.to_mnist_with_ink([plain])[1]
    _, top, _, height = alone.box
    marked = plain.copy()
    marked[top + height + 1: top + height + 4, 50:150] = 30
    (found,) = framing.to_mnist_with_ink([marked])[1]
    assert found.box[3] >= height + 3


@pytest.mark.parametrize("mark", ["ruled", "squared", "line", "margin"])
def test_ruled_and_squared_paper_is_paper(mnist_test, default_model, mark):
    """A digit written across a notebook's lines (or a graph paper's squares, or one line alone, or beside
    a notebook's margin) is read as on bare paper: the lines are gone, the strokes they crossed are kept,
    and the box is the digit's."""
    pages = [forms.page(digit) for digit in digits(mnist_test, 20)]
    plain, plain_inks = framing.to_mnist_with_ink([page.astype(np.float32) for page in pages])
    lined = [forms.page(digit, mark).astype(np.float32) for digit in digits(mnist_test, 20)]
    framed, inks = framing.to_mnist_with_ink(lined)
    labels = [default_model.model(torch.from_numpy(normalize(frames, 0.1307, 0.3081)).reshape(20, -1)).argmax(1)
              for frames in (plain, framed)]
    assert (labels[0] == labels[1]).sum() >= 19, labels
    assert all(max(abs(a - b) for a, b in zip(one.box, other.box)) <= 3 for one, other in zip(plain_inks, inks))
    assert np.median([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(plain, framed)]) > 0.98


def test_a_stroke_along_a_line_is_kept_and_the_line_beside_it_goes():
    """Where a stroke runs along a line it is darker than the line: it stays, and the rest of the line goes."""
    page = forms.page(np.zeros((28, 28), np.uint8), "ruled").astype(np.float32)
    page[129:133, 60:140] = 35  # a bar written on the line at rows 130-131
    cleaned = ruled.unruled(page)
    assert (cleaned[130:132, 62:138] <= 40).all()
    assert (cleaned[130:132, :55] == 235).all() and (cleaned[130:132, 145:] == 235).all()
    assert (cleaned[34:36] == 235).all()  # a line with nothing on it


def test_a_digits_own_bars_are_not_a_ruling():
    """Strokes a digit is made of are never taken for a ruling: a thin "3" of three bars cropped tight (its
    bars span the picture, evenly spaced), a thin "4" whose bar spans it (as dark as its other strokes: a
    line alone is fainter than the ink), pictures with no lines, a single line under a digit."""
    three = np.full((200, 120), 240, np.float32)
    three[np.r_[0:3, 99:102, 197:200]] = 20  # top, middle and bottom bars, edge to edge
    three[:, 117:] = 20
    four = np.full((200, 140), 240, np.float32)
    four[130:133] = 20  # the bar, edge to edge
    four[:, 100:103] = 20  # the stem
    four[np.arange(130), np.linspace(60, 0, 130).astype(int)] = 20  # the diagonal, to the bar's left end
    plain = forms.page(np.full((28, 28), 255, np.uint8)).astype(np.float32)
    underlined = forms.page(np.full((28, 28), 255, np.uint8), "underline").astype(np.float32)
    for picture in (three, four, plain, underlined, np.ascontiguousarray(three.T), np.ascontiguousarray(four.T)):
        assert ruled.unruled(picture) is picture  # untouched: framed on one exact grey, as before


def hairline(digit: np.ndarray, side: int = 280, pen: int = 1) -> np.ndarray:
    """A real digit redrawn with a fine pen on a big canvas: the skeleton of its strokes, ``pen`` px wide."""
    line = skeletonize(np.asarray(Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)) > 100)
    if pen > 1:
        line = ndimage.binary_dilation(line, iterations=pen // 2)
    return np.where(line, 255, 0).astype(np.float32)


def stroke_width(frame: np.ndarray) -> float:
    """Ink over the length of the skeleton: MNIST's strokes are about 2.5 px wide (1% of them under 1.5)."""
    return float(frame.sum()) / skeletonize(frame > 0.3).sum()


def test_a_digit_drawn_with_a_fine_pen_is_framed_with_mnists_strokes(mnist_test, monkeypatch):
    """A 1-3 px pen on a 280 or 600 px canvas leaves strokes a tenth of a pixel wide in the 20x20 box,
    which the model has never seen; they are framed about as wide as MNIST's. Strokes as wide as MNIST's
    (the same digits enlarged) are framed as they are without the step."""
    hairlines = [hairline(digit, side, pen) for digit in digits(mnist_test, 10) for side, pen in ((280, 1), (600, 3))]
    canvases = [np.asarray(Image.fromarray(digit).resize((280, 280), Image.Resampling.BICUBIC)).astype(np.float32)
                for digit in digits(mnist_test, 10)]
    framed = to_mnist(canvases)
    assert all(1.6 <= stroke_width(frame) <= 3.5 for frame in to_mnist(hairlines))
    monkeypatch.setattr(framing, "STROKE", 0.0)  # the step off
    assert all(stroke_width(frame) < 1.3 for frame in to_mnist(hairlines))
    np.testing.assert_array_equal(to_mnist(canvases), framed)


def test_a_zero_with_a_dot_or_an_outline_inside_is_not_a_ring_round_a_digit():
    """A dotted zero (monospace faces) or an outlined one holds ink inside a closed line, as a circled
    digit does; it is a zero: tall, and its ring's ink is most of the ink. Framed whole."""
    zero = np.full((200, 120), 240, np.float32)
    ys, xs = np.mgrid[:200, :120]
    outer = ((ys - 100) / 95) ** 2 + ((xs - 60) / 55) ** 2
    zero[(outer <= 1) & (outer >= 0.55)] = 20  # a bold zero
    for inside in (((ys - 100) / 40) ** 2 + ((xs - 60) / 14) ** 2 <= 1,  # a dot 40% of its height (Hack's)
                   (outer <= 0.45) & (outer >= 0.38)):  # an outline's inner line
        drawn = np.where(inside, 20, zero).astype(np.float32)
        _, (found,) = framing.to_mnist_with_ink([drawn])
        assert found.box[3] >= 190 and found.box[2] >= 110


def test_a_square_drawn_alone_is_still_what_there_is_to_read():
    """A frame round nothing is itself the drawing (a 0 drawn square, a shape): it is not peeled away."""
    square = np.full((100, 100), 240, np.float32)
    square[20:80, 30:70] = 20
    square[26:74, 36:64] = 240
    _, (found,) = framing.to_mnist_with_ink([square])
    assert found is not None and found.box == (30, 20, 40, 60)


def test_a_request_frames_each_image_as_if_alone(mnist_test):
    """Mixed sizes, contrasts, polarities and positions in one call: each frame equals that image framed alone."""
    seven, two, one, zero, four = digits(mnist_test, 5)
    grays = [
        seven, two * 0.4 + 90, 255 - one,  # 28x28: bright, faint on gray, dark-on-light
        on_canvas(zero, (90, 70), (5, 10), scale=2), on_canvas(seven, (90, 70), (30, 2), scale=2),  # resized
        on_canvas(four, (50, 60), (10, 20)),  # another size, only moved
    ]
    grays = [g.astype(np.float32) for g in grays]
    together = to_mnist(grays)
    alone = np.stack([to_mnist([g])[0] for g in grays])
    assert together.shape == (6, 28, 28) and together.dtype == np.float32
    np.testing.assert_array_equal(together, alone)
    assert len({frame.tobytes() for frame in together}) == 6  # no image got another's frame


def test_frames_follow_the_mnist_recipe(mnist_test):
    """White on black in 0..1, the digit within 20x20, its centre of mass within a pixel of the centre;
    where it sits on the canvas and which way round its colours are change nothing."""
    seven = digits(mnist_test, 1)[0]
    variants = [on_canvas(seven, (120, 100), at) for at in ((0, 0), (80, 60), (40, 13))]
    variants += [255 - v for v in variants]
    frames = to_mnist([v.astype(np.float32) for v in variants])
    for frame in frames[1:]:
        np.testing.assert_array_equal(frame, frames[0])
    frame = frames[0]
    assert frame.max() == pytest.approx(1.0) and frame.min() == 0.0
    rows, cols = np.flatnonzero(frame.any(1)), np.flatnonzero(frame.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 20
    cy, cx = ndimage.center_of_mass(frame)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1, (cy, cx)
    big = to_mnist([on_canvas(seven, (200, 200), (30, 50), scale=5).astype(np.float32)])[0]  # enlarged 5x
    assert max(np.ptp(np.flatnonzero(big.any(1))), np.ptp(np.flatnonzero(big.any(0)))) + 1 == 20
    assert np.abs(big - frame).mean() < 0.05  # close to the original after the round trip through 20x20


def test_blank_image_is_reported_by_its_position(mnist_test):
    seven = digits(mnist_test, 1)[0].astype(np.float32)
    blank = np.full((50, 50), 200, np.float32)
    with pytest.raises(BlankImage) as raised:
        to_mnist([seven, on_canvas(seven.astype(np.uint8), (50, 50), (3, 3)).astype(np.float32), blank, seven])
    assert raised.value.position == 2 and raised.value.status == 422


def test_a_flipped_bit_anywhere_in_a_png_is_refused(mnist_test):
    """libspng is told to skip chunk checksums; we check them, so a damaged file is a 400, as with Pillow,
    never a decoded picture of noise."""
    png = encode(digits(mnist_test, 1)[0])
    decode_image(png, Limits())  # intact, it decodes
    rng = np.random.default_rng(11)
    for position, bit in zip(rng.integers(0, len(png), 200), rng.integers(0, 8, 200)):
        damaged = bytearray(png)
        damaged[position] ^= 1 << int(bit)
        with pytest.raises(InputError) as refused:
            decode_image(bytes(damaged), Limits())
        assert refused.value.status == 400, (position, refused.value.detail)


def test_requests_of_one_iteration_are_framed_together_and_apart(mnist_test):
    """The API server prepares the pictures of all requests read in one event-loop iteration in one
    call: each request still gets exactly its own frames; a blank picture is noted no_digit and left out
    of the images a worker computes."""
    seven, two, one = (d.astype(np.float32) for d in digits(mnist_test, 3))
    blank = np.full((28, 28), 255, np.float32)
    canvas = on_canvas(one.astype(np.uint8), (60, 50), (9, 4)).astype(np.float32)
    good = [[seven], [two, canvas, one], [], [one, two]]  # uneven counts: a wrong split shows

    def frame_in_one_iteration(requests):
        async def frame_all():
            preparer = Preparer(Limits())
            pictures = [[encode(gray.astype(np.uint8)) for gray in grays] for grays in requests]
            return await asyncio.gather(*(preparer.prepare(p, {}, 0.0) for p in pictures), return_exceptions=True)
        return asyncio.run(frame_all())

    for requests in (good, [*good[:2], [one, blank], *good[2:]]):
        for grays, result in zip(requests, frame_in_one_iteration(requests)):
            if isinstance(result, BaseException):
                raise result
            work, notes = result
            if grays and grays[-1] is blank:
                assert notes[1] == {"box": None, "flags": ["no_digit"]}
                np.testing.assert_array_equal(work.images.reshape(-1, 28, 28), to_mnist(grays[:1]))
            else:
                assert work.images.shape == (len(grays), 28 * 28)
                np.testing.assert_array_equal(work.images.reshape(-1, 28, 28), to_mnist(grays))


# ---------------------------------------------------------------- what works stays as it was


def mnist_recipe(gray: np.ndarray) -> np.ndarray:
    """The frame MNIST's recipe gives a picture on a paper of one grey, as this service computed it
    before photos were handled: the border's median is the paper, the strokes are whatever stands a
    tenth of the strongest contrast from it (light ink if the paper is dark), cropped, fit in 20x20
    and centred by mass. The oracle for what must not change."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    paper = np.partition(border, len(border) // 2)[len(border) // 2]
    contrast = (paper - gray) if paper >= 128 else (gray - paper)
    peak = contrast.max()
    contrast = np.where(contrast >= 0.1 * peak, contrast, 0).astype(np.float32) * np.float32(1 / peak)
    rows, cols = np.flatnonzero(contrast.any(1)), np.flatnonzero(contrast.any(0))
    box = contrast[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    h, w = box.shape
    if max(h, w) != 20:
        size = (max(1, round(w * 20 / max(h, w))), max(1, round(h * 20 / max(h, w))))
        box = np.array(Image.fromarray(box, "F").resize(size, Image.Resampling.BILINEAR), np.float32)
        box *= np.float32(1 / max(float(box.max()), 1e-6))
        h, w = box.shape
    cy, cx = (box.sum(1) * np.arange(h)).sum() / box.sum(), (box.sum(0) * np.arange(w)).sum() / box.sum()
    frame = np.zeros((28, 28), np.float32)
    y, x = (min(max(round(14 - c - 0.5), 0), 28 - e) for c, e in ((cy, h), (cx, w)))
    frame[y: y + h, x: x + w] = box
    return frame


def predictions(model, frames: np.ndarray) -> np.ndarray:
    norm = model.metadata.normalization
    x = torch.from_numpy(imaging.normalize(np.asarray(frames), norm.mean, norm.std)).reshape(len(frames), -1)
    with torch.inference_mode():
        return model.model(x).argmax(1).numpy()


def assert_same_frames(new: np.ndarray, old: np.ndarray) -> None:
    worst = np.abs(np.asarray(new) - old).reshape(len(old), -1).max(1)
    assert worst.max() <= 1 / 255 + 1e-6, f"{int((worst > 1 / 255 + 1e-6).sum())} frames changed, at {worst.argmax()}"


def test_mnist_test_digits_keep_their_frames_and_accuracy(mnist_test, default_model):
    """The 1,000 first MNIST test digits as PNGs: the frames of MNIST's recipe (to one grey level),
    so the committed model's accuracy on them is what it was."""
    images, labels = mnist_test[0][:1000].numpy(), mnist_test[1][:1000].numpy()
    framed = prepare([encode(image) for image in images], Limits())
    expected = np.stack([mnist_recipe(image.astype(np.float32)) for image in images])
    assert_same_frames(framed, expected)
    accuracy = (predictions(default_model, framed) == labels).mean()
    assert accuracy >= (predictions(default_model, expected) == labels).mean() and accuracy >= 0.985  # v2 98.9%


def clean_canvases(mnist_test, count: int) -> tuple[list[bytes], np.ndarray, np.ndarray]:
    """Digits as canvases and screenshots send them: light on dark, dark on white, on grey, in colour,
    enlarged 1-7x, anywhere on a canvas of any size, one paper grey each; their PNGs, grey pictures, labels."""
    rng = np.random.default_rng(5)
    images, labels = mnist_test[0][1000: 1000 + count].numpy(), mnist_test[1][1000: 1000 + count].numpy()
    pngs, grays = [], []
    for i, digit in enumerate(images):
        scale = int(rng.integers(1, 8))
        size = (int(rng.integers(28 * scale, 28 * scale + 300)), int(rng.integers(28 * scale, 28 * scale + 300)))
        at = (int(rng.integers(0, size[0] - 28 * scale + 1)), int(rng.integers(0, size[1] - 28 * scale + 1)))
        canvas = on_canvas(digit, size, at, scale)
        canvas = [canvas, 255 - canvas, (canvas * 0.6 + 40).astype(np.uint8),
                  np.stack([canvas, canvas // 2, 255 - canvas], -1)][i % 4]
        pngs.append(encode(canvas))
        grays.append(decode_image(pngs[-1], Limits()))
    return pngs, grays, labels


def test_clean_canvases_keep_their_frames(mnist_test):
    pngs, grays, _ = clean_canvases(mnist_test, 120)
    framed = np.concatenate([prepare([png], Limits()) for png in pngs])
    assert_same_frames(framed, np.stack([mnist_recipe(gray) for gray in grays]))


def test_one_grey_paper_is_the_photo_steps_special_case(mnist_test, default_model):
    """Run through the steps for photos (local background, noise, components) instead of their special
    case, MNIST's digits come out as they do through it: the special case is a shortcut, not another
    preprocessing."""
    images, labels = mnist_test[0][:300].numpy(), mnist_test[1][:300].numpy()
    general = np.zeros((len(images), 28, 28), np.float32)
    for out, image in zip(general, images):
        framing._place(out, photo.photo_ink(image.astype(np.float32)))
    special = to_mnist([image.astype(np.float32) for image in images])
    same = (np.abs(general - special).reshape(len(images), -1).max(1) <= 1 / 255 + 1e-6).mean()
    assert same >= 0.98, same
    accuracy = {name: (predictions(default_model, frames) == labels).mean()
                for name, frames in (("general", general), ("special", special))}
    assert accuracy["general"] >= accuracy["special"] - 0.005, accuracy


# ---------------------------------------------------------------- notes: the box and the flags


def test_the_box_is_the_digit_in_the_clients_picture(mnist_test):
    """On a canvas, the box is the ink's; a phone-size JPEG is decoded at a quarter of its size and its
    box is given in its own pixels all the same."""
    seven = digits(mnist_test, 1)[0]
    canvas = on_canvas(seven, (90, 120), (30, 50), scale=2)
    rows, cols = np.flatnonzero(canvas.max(1) >= 25.5), np.flatnonzero(canvas.max(0) >= 25.5)  # a tenth of 255
    assert prepare([encode(canvas)], Limits()).notes == [
        {"box": [int(cols[0]), int(rows[0]), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1], "flags": []}]
    big = np.full((3000, 2400), 235, np.uint8)
    big[1200:1200 + 280, 900:900 + 280] = 255 - np.asarray(Image.fromarray(seven).resize((280, 280)))
    jpeg = encode(big, "JPEG", quality=90)
    picture = decode_picture(jpeg, Limits())
    assert picture.size == (2400, 3000) and picture.gray.shape == (750, 600)  # decoded at 1/4 scale
    (note,) = prepare([jpeg], Limits()).notes
    truth = np.argwhere(big < 235 - 0.1 * 235)
    (top, left), (bottom, right) = truth.min(0), truth.max(0)
    assert np.allclose(note["box"], [left, top, right - left + 1, bottom - top + 1], atol=8), note


def side_by_side(first: np.ndarray, second: np.ndarray, gap: float) -> np.ndarray:
    """Two digits' ink boxes next to each other, ``gap`` of the taller one's height apart, on a canvas."""
    def ink_box(d):
        rows, cols = np.flatnonzero(d.max(1) > 25), np.flatnonzero(d.max(0) > 25)
        return d[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    a, b = ink_box(first), ink_box(second)
    height = max(len(a), len(b))
    space = round(gap * height)
    canvas = np.zeros((height + 16, a.shape[1] + b.shape[1] + space + 16), np.uint8)
    canvas[8: 8 + len(a), 8: 8 + a.shape[1]] = a
    canvas[8: 8 + len(b), 8 + a.shape[1] + space: 8 + a.shape[1] + space + b.shape[1]] = b
    return canvas


def broken(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit with one stroke broken: a gap two pixels wide cut across it where a row crosses it."""
    digit = digit.copy()
    rows = np.flatnonzero(digit.max(1) > 25)
    row = int(rng.integers(rows[0] + 3, rows[-1] - 3))
    strokes = np.flatnonzero(digit[row] > 25)
    runs = np.split(strokes, np.flatnonzero(np.diff(strokes) > 1) + 1)
    run = runs[int(rng.integers(len(runs)))]
    digit[row - 1: row + 1, run[0]: run[-1] + 1] = 0
    return digit


def test_multiple_digits_are_flagged_side_by_side_and_only_there(mnist_test):
    images = mnist_test[0][:400].numpy()
    gaps = [0.3, 0.6] * 100
    pairs = [encode(255 - side_by_side(images[i], images[i + 1], gap)) for i, gap in zip(range(0, 400, 2), gaps)]
    flagged = [imaging.ink.MULTIPLE in note["flags"] for png in pairs for note in prepare([png], Limits()).notes]
    assert sum(flagged) >= 0.97 * len(pairs), sum(flagged)
    rng = np.random.default_rng(2)
    singles = [encode(broken(image, rng)) for image in images] + [encode(image) for image in images]
    flagged = [imaging.ink.MULTIPLE in note["flags"] for png in singles for note in prepare([png], Limits()).notes]
    assert sum(flagged) <= 0.005 * len(singles), sum(flagged)


def test_multiple_digits_are_flagged_in_photos_too(mnist_test):
    """The same pairs enlarged 6x, dark on paper under a lamp to one side, with sensor noise: the photo
    steps find the two digits as well."""
    images = mnist_test[0][:200].numpy()
    rng = np.random.default_rng(4)
    flagged = 0
    for i in range(0, 200, 2):
        pair = side_by_side(images[i], images[i + 1], 0.4)
        ink_cover = np.asarray(Image.fromarray(pair).resize((pair.shape[1] * 6, pair.shape[0] * 6),
                                                            Image.Resampling.BICUBIC), np.float32) / 255
        light = 0.55 + 0.45 * np.arange(ink_cover.shape[1]) / ink_cover.shape[1]
        photo = 255 * ((0.9 - 0.8 * ink_cover) * light) ** (1 / 2.2) + rng.normal(0, 4, ink_cover.shape)
        (note,) = prepare([encode(np.clip(photo, 0, 255).astype(np.uint8))], Limits()).notes
        flagged += ink.MULTIPLE in note["flags"]
    assert flagged >= 95, flagged


def test_low_contrast_is_flagged(mnist_test):
    """Ink a tenth of the way from the paper to black is barely told from it; MNIST's is not."""
    images = mnist_test[0][:50].numpy().astype(np.float32)
    faint = [encode((235 - image * 0.1).astype(np.uint8)) for image in images]
    assert all(note["flags"] == [ink.FAINT] for png in faint for note in prepare([png], Limits()).notes)
    clear = prepare([encode(image.astype(np.uint8)) for image in images], Limits())
    assert not any(note["flags"] for note in clear.notes)


def test_notes_are_plain_json_for_every_path(mnist_test):
    """Canvas, photo (paper under a lamp), phone-size JPEG decoded small, pixels: each note is the
    answer's JSON as it is (the worker adds it with orjson, which takes no numpy integers)."""
    seven = digits(mnist_test, 1)[0]
    lamp = (235 - 0.8 * seven.astype(np.float32)) * np.linspace(0.6, 1, 28)
    photo = np.asarray(Image.fromarray(lamp.astype(np.uint8)).resize((280, 280), Image.Resampling.BICUBIC))
    phone = np.full((3000, 2400), 235, np.uint8)
    phone[1200:1480, 900:1180] = 255 - np.asarray(Image.fromarray(seven).resize((280, 280)))
    sent = [encode(on_canvas(seven, (60, 80), (10, 20))), encode(photo, "JPEG"), encode(phone, "JPEG"), seven.tolist()]
    notes = prepare(sent, Limits()).notes
    assert [orjson.loads(orjson.dumps(note)) for note in notes] == notes
    assert all(type(v) is int for note in notes for v in note["box"]), notes


def test_a_request_mixes_pictures_and_pixels_and_notes_follow_instances(mnist_test):
    seven, two = digits(mnist_test, 2)
    prepared = prepare([encode(seven), two.tolist(), encode(on_canvas(two, (60, 60), (20, 25)))], Limits())
    assert prepared.shape == (3, 28, 28) and len(prepared.notes) == 3
    rows, cols = np.flatnonzero(two.max(1) >= 0.1 * two.max()), np.flatnonzero(two.max(0) >= 0.1 * two.max())
    assert prepared.notes[1] == {"box": [int(cols[0]), int(rows[0]), int(np.ptp(cols)) + 1, int(np.ptp(rows)) + 1],
                                 "flags": []}
    assert prepared.notes[2]["box"][:2] == [25 + int(cols[0]), 20 + int(rows[0])]
    assert prepared.reshape(3, 784).notes == prepared.notes  # the worker's shape keeps them
    np.testing.assert_array_equal(prepared[1], two / np.float32(255))


# ---------------------------------------------------------------- pixels, checked like pictures


def test_pixels_with_a_digit_are_taken_as_they_are(mnist_test):
    seven = digits(mnist_test, 1)[0]
    np.testing.assert_array_equal(validate_pixels(seven.tolist()), (seven / 255.0).astype(np.float32))


@pytest.mark.parametrize("pixels,words", [
    ([[0] * 28] * 28, "no digit found: the image is blank"),
    ([[200] * 28] * 28, "no digit found: the image is blank"),
    ("mnist / 255", "on the 0..255 scale"),
    ("255 - mnist", "look inverted"),
    ("flat", "28 rows of 28 numbers; got a flat list of 784"),
    ([[0] * 28] * 27, "28x28 (28 rows of 28 numbers), got shape 27x28"),
], ids=["zeros", "one grey", "0..1", "inverted", "flat 784", "27 rows"])
def test_pixels_that_are_no_mnist_frame_are_refused(mnist_test, pixels, words):
    seven = digits(mnist_test, 1)[0].astype(np.float64)
    pixels = {"mnist / 255": (seven / 255).tolist(), "255 - mnist": (255 - seven).tolist(),
              "flat": seven.ravel().tolist()}.get(pixels, pixels) if isinstance(pixels, str) else pixels
    with pytest.raises(InputError) as refused:
        validate_pixels(pixels)
    assert refused.value.status == 422 and words in refused.value.detail, refused.value.detail


def test_frames_from_tensors_are_checked_and_the_bad_instance_named(mnist_test):
    frames = (mnist_test[0][:4].numpy() / 255).astype(np.float32)
    check_frames(frames)
    for wrong, words in ((np.nan, "finite"), (0.0, "blank")):
        bad = frames.copy()
        bad[2] = wrong if np.isnan(wrong) else 0.0
        if np.isnan(wrong):
            bad[2, 3, 3] = np.nan
        with pytest.raises(InputError) as refused:
            check_frames(bad)
        detail = refused.value.detail
        assert refused.value.status == 422 and detail.startswith("instance 2: ") and words in detail, detail


def test_a_blank_pixels_frame_is_refused_through_prepare_naming_its_instance(mnist_test):
    seven = digits(mnist_test, 1)[0]
    with pytest.raises(InputError) as refused:
        prepare([encode(seven), [[0] * 28] * 28], Limits())
    assert refused.value.status == 422 and refused.value.detail.startswith("instance 1: no digit found")


# ---------------------------------------------------------------- tight crops (issue #30)


def printed_six(size: tuple[int, int], stroke: int, paper: int = 215, ink: int = 30) -> np.ndarray:
    """A bold DejaVu 6 cropped to its glyph box and resized to ``size`` (width, height)."""
    from PIL import ImageDraw, ImageFont

    from tests.crops import FONT_DIR

    font = ImageFont.truetype(str(FONT_DIR / "DejaVuSans-Bold.ttf"), 400)
    left, top, right, bottom = font.getbbox("6", stroke_width=stroke)
    big = Image.new("L", (right - left, bottom - top), paper)
    ImageDraw.Draw(big).text((-left, -top), "6", fill=ink, font=font, stroke_width=stroke, stroke_fill=ink)
    inked = np.abs(np.asarray(big, np.float32) - paper) > 0.5 * abs(ink - paper)
    rows, cols = np.flatnonzero(inked.any(1)), np.flatnonzero(inked.any(0))
    tight = big.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return np.asarray(tight.resize(size, Image.Resampling.LANCZOS), np.float32)


def read(model, grays: list[np.ndarray]) -> list[int]:
    frames = to_mnist(grays)
    norm = model.metadata.normalization
    with torch.inference_mode():
        return model.model(torch.from_numpy(normalize(frames, norm.mean, norm.std)).reshape(len(frames), -1)
                           ).argmax(1).tolist()


@pytest.mark.parametrize("stroke", [0, 6, 12, 24], ids=["regular", "bold", "bolder", "boldest"])
@pytest.mark.parametrize("size", [(42, 61), (69, 100), (690, 1000)], ids=["issue", "medium", "large"])
def test_a_printed_digit_cropped_tight_is_found(stroke, size):
    """Issue #30's bold 6, 42x61, dark on light grey, filling the picture, was 'blank': in any stroke
    width and size, either polarity, it is found, and its box is the picture (not the paper in its hole)."""
    for paper, ink_level in ((215, 30), (20, 230)):
        (digit,) = framing.to_mnist_with_ink([printed_six(size, stroke, paper, ink_level)])[1]
        assert digit is not None
        _, _, w, h = digit.box
        assert w >= 0.95 * size[0] and h >= 0.95 * size[1], (paper, digit.box)


@pytest.mark.parametrize("stroke,size", [(0, (20, 29)), (6, (20, 29)), (0, (42, 61)), (6, (42, 61)), (12, (42, 61)),
                                         (0, (690, 1000)), (6, (690, 1000))])
def test_a_printed_digit_cropped_tight_is_read(default_model, stroke, size):
    """Found and read, down to 20 pixels. (Strokes a third of the digit's width read as 0 with the
    committed model: docs/pictures.md.)"""
    for paper, ink_level in ((215, 30), (20, 230)):
        assert read(default_model, [printed_six(size, stroke, paper, ink_level)]) == [6], (paper, stroke, size)


def small_printed(digit: str, face: str, height: int) -> np.ndarray:
    """A DejaVu digit drawn at its own small size (anti-aliased, as a screenshot or a small render), dark on
    white, cropped to its ink."""
    from PIL import ImageDraw, ImageFont

    from tests.crops import FONT_DIR

    font = ImageFont.truetype(str(FONT_DIR / face), height)
    image = Image.new("L", (3 * height, 3 * height), 255)
    ImageDraw.Draw(image).text((height, height // 2), digit, fill=0, font=font)
    gray = np.asarray(image, np.float32)
    rows, cols = np.flatnonzero((gray < 200).any(1)), np.flatnonzero((gray < 200).any(0))
    return gray[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]


@pytest.mark.parametrize(("heights", "most_unlike"), [((22, 30, 40), 12), ((16, 18, 20), 30)])
def test_small_printed_digits_cropped_tight_are_framed_as_with_a_margin(heights, most_unlike):
    """A digit 11-30 px tall that fills its picture: its edges are most of the picture's differences (not
    noise), its ink much of the picture (not paper), its strokes run along the edges (not a shadow's),
    and it is too small for the photo steps' windows (``photo.crowded``). It is framed as the same digit
    with a margin of paper is, but for some of the smallest."""
    faces = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSansMono.ttf", "DejaVuSerifCondensed-Italic.ttf")
    unlike = []
    for face in faces:
        for height in heights:
            for digit in "0123456789":
                tight = small_printed(digit, face, height)
                margin = np.pad(tight, height // 2, constant_values=255)
                (framed, with_margin), found = framing.to_mnist_with_ink([tight, margin])
                if None in found or np.corrcoef(framed.ravel(), with_margin.ravel())[0, 1] < 0.8:
                    unlike.append((face, height, digit))
    # of 180; before photo.crowded and margin.noise 25 and 99 (docs/pictures.md), most of those left ~12 px tall
    assert len(unlike) <= most_unlike, unlike


def printed_turned(digit: str, face: str, size: int, angle: float, shear: float) -> np.ndarray:
    """A DejaVu digit sheared and turned a little (as printed and photographed), dark on white, cropped to
    its ink as the training renderer crops it: at a tenth of full ink, so that its border holds faint,
    graded ink."""
    from service.model import printed
    from tests.crops import FONT_DIR

    ink = printed.draw(digit, printed.Font(face, "", str(FONT_DIR / face)), size, turn=(shear, angle))
    assert ink is not None
    return np.round(255 * (1 - 0.9 * ink))


def test_turned_printed_digits_cropped_tight_are_framed_as_with_a_margin():
    """Bold printed digits cropped tight whose border's ink is graded (anti-aliased, turned): their border
    is not two clean levels (a gradient's test), but its paper is one exact grey, so it holds ink, and the
    picture gets its margin. Without, the photo steps took these for light ink on dark paper."""
    unlike = []
    for face in ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSans.ttf", "DejaVuSansMono-Bold.ttf"):
        for digit in "0123456789":
            for angle in (-5, 4):
                tight = printed_turned(digit, face, 60, angle, 0.1)
                margin = np.pad(tight, 30, constant_values=255)
                (framed, with_margin), found = framing.to_mnist_with_ink([tight, margin])
                if None in found or np.corrcoef(framed.ravel(), with_margin.ravel())[0, 1] < 0.8:
                    unlike.append((face, digit, angle))
    assert len(unlike) <= 1, unlike  # of 80; 8 before margin.levels took an exact paper for two levels


def test_the_noise_along_the_border_of_a_render_is_none_and_of_a_photo_is_measured():
    """A small render cropped tight: its border is mostly the strokes' anti-aliased edges, which are not
    noise (``margin.noise`` 0, where differences of neighbours measure several grey levels); the same
    picture with sensor noise keeps its measured noise."""
    from service.imaging import margin

    eight = small_printed("8", "DejaVuSans-Bold.ttf", 16)
    assert ink.border_noise(eight) > 2 and margin.noise(eight) == 0
    noisy = np.clip(eight + np.random.default_rng(0).normal(0, 4, eight.shape), 0, 255).round().astype(np.float32)
    assert margin.noise(noisy) == ink.border_noise(noisy) > 2


def test_a_digit_cut_by_the_edge_is_found(default_model, mnist_test):
    """A digit touching (cut by) the picture's edge, dark on a light paper: found, and read as alone."""
    seven = mnist_test[0][0].numpy()
    rows, cols = np.flatnonzero(seven.max(1) > 25), np.flatnonzero(seven.max(0) > 25)
    cut = 255 - seven[rows[0] + 2: rows[-1] + 1, cols[0]: cols[-1] + 1].astype(np.float32) * 0.8
    big = np.asarray(Image.fromarray(cut).resize((cut.shape[1] * 8, cut.shape[0] * 8), Image.Resampling.BICUBIC))
    found = framing.to_mnist_with_ink([big])[1][0]
    assert found is not None and read(default_model, [big]) == [7]


def test_a_margin_is_added_only_where_the_border_holds_ink(mnist_test):
    """Paper under a lamp (a gradient along the border) and a photo-like digit with a margin get none;
    a tight crop gets one, of its own paper grey."""
    from service.imaging import margin

    yy, xx = np.mgrid[0:120, 0:160]
    lamp = (200 - 60 * xx / 160 - 20 * yy / 120).astype(np.float32)
    assert margin.levels(lamp, ink.border_noise(lamp)) is None
    canvas = 255 - on_canvas(mnist_test[0][0].numpy(), (60, 60), (16, 16)).astype(np.float32)
    assert margin.levels(canvas, 0.0) is None
    six = printed_six((42, 61), 12)
    paper, ink_level = margin.levels(six, 0.0)
    assert paper > 200 and ink_level < 60
    padded, width = margin.pad(six, paper, ink_level, 0.0)
    assert width > 0 and padded.shape == (61 + 2 * width, 42 + 2 * width)
    np.testing.assert_array_equal(padded[width: width + 61, width: width + 42], six)
    assert np.abs(padded[:width] - 215).max() <= 4  # the margin is the paper's grey (Lanczos ringing aside)


def test_blank_pictures_are_noted_no_digit_not_refused():
    """A picture without a digit is an answer: its note says no_digit, its frame is black; pixels keep their 422."""
    blank = encode(np.full((40, 30), 180, np.uint8))
    prepared = prepare([blank, [[0.0] * 28] * 28 and blank], Limits())
    assert prepared.notes == [{"box": None, "flags": ["no_digit"]}] * 2 and not np.asarray(prepared).any()
    with pytest.raises(InputError, match="instance 0: no digit found"):
        prepare([[[0.0] * 28] * 28], Limits())
