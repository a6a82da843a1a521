"""Photo-like pictures and checked ``pixels`` through the real server: what a client sends and gets.

One server for the module. 500 photo-like pictures (tests/photos.py: MNIST digits the committed model
held out, written on paper and photographed under uneven light, shadows, grain, noise, blur, rotation,
JPEG, one in ten at phone resolution), one per ``/predict`` request as ``curl -F file=@photo.jpg``
sends them: the accuracy the issue asks for, by kind of variation, and the notes that say where the
digit is. Other seeds and a differently parameterised style: ``python -m tests.photos --seed 1
[--variant]``. Then JSON base64 with phone-size pictures in one request, and each ``pixels`` case with
its status and message.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.morphology import skeletonize

from harness.server import b64, encode, running
from service import imaging
from tests import forms, photos


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("photos")) as server:
        yield server


COUNT, SEED = 500, 0
ALONE = [kind for kind in photos.KINDS if kind != "combined"]


@pytest.fixture(scope="module")
def pictures(data_dir) -> list[photos.Photo]:
    digits, labels = photos.validation_digits(data_dir)
    return list(photos.photos(digits, labels, COUNT, SEED))


@pytest.fixture(scope="module")
def answers(server, pictures) -> list[tuple[photos.Photo, dict | None]]:
    """Each picture and the server's answer for it (None when refused with 422), one request each."""
    found = []
    with server.client() as client:
        for photo in pictures:
            response = client.post("/predict", files=[("file", ("photo", photo.data, "application/octet-stream"))])
            assert response.status_code in (200, 422), response.text
            found.append((photo, response.json()["predictions"][0] if response.status_code == 200 else None))
    return found


def accuracy(answers, kinds) -> float:
    right = [answer is not None and answer["label"] == photo.label for photo, answer in answers if photo.kind in kinds]
    return sum(right) / len(right)


def test_the_generator_makes_every_kind_and_phone_sizes(pictures):
    kinds = [photo.kind for photo in pictures]
    assert {kind: kinds.count(kind) for kind in photos.KINDS} == dict.fromkeys(photos.KINDS, COUNT // 10)
    phones = [photo for photo in pictures if min(photo.size) >= 2000]
    assert len(phones) >= COUNT // 10 and all(photo.data[:2] == b"\xff\xd8" for photo in phones)


def test_accuracy_on_photos(answers):
    assert accuracy(answers, photos.KINDS) >= 0.97


@pytest.mark.parametrize("kind", ALONE)
def test_accuracy_by_kind_of_variation(answers, kind):
    assert accuracy(answers, {kind}) >= 0.95


def test_accuracy_with_every_variation_at_once(answers):
    """All the variations on one picture, each at a random strength (the hardest: a faint pencil in a
    deep shadow on grainy paper, blurred and JPEG'd). Below the 95% asked for single variations; see
    docs/pictures.md for the figures on other seeds."""
    assert accuracy(answers, {"combined"}) >= 0.85


def test_boxes_cover_the_digit(answers):
    """The answer's box, in the picture's own pixels, overlaps the digit's true box by half or more on
    nine pictures in ten of every single variation (as the accuracy, a little less with all at once)."""
    def overlap(a, b) -> float:
        across = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
        down = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
        return across * down / (a[2] * a[3] + b[2] * b[3] - across * down)
    for kind in photos.KINDS:
        found = [answer is not None and overlap(answer["box"], photo.box) >= 0.5
                 for photo, answer in answers if photo.kind == kind]
        assert sum(found) >= (0.85 if kind == "combined" else 0.9) * len(found), kind


def test_single_digits_are_seldom_taken_for_several(answers):
    flagged = [imaging.ink.MULTIPLE in answer["flags"] for _, answer in answers if answer is not None]
    assert sum(flagged) <= 0.02 * len(flagged)


def mnist_seven(mnist_test) -> np.ndarray:
    images, labels = mnist_test
    return images[int(np.flatnonzero(labels.numpy() == 7)[0])].numpy().astype(np.float64)


PIXEL_CASES = {
    "an MNIST 7": (lambda seven: seven, 200, None),
    "all zeros": (lambda seven: np.zeros((28, 28)), 422, "instance 0: no digit found: the image is blank"),
    "0..1, as ToTensor gives": (lambda seven: seven / 255, 422, "on the 0..255 scale"),
    "inverted": (lambda seven: 255 - seven, 422, "look inverted"),
    "27 rows": (lambda seven: seven[:27], 422, "28x28"),
}


@pytest.mark.parametrize("case", PIXEL_CASES, ids=list(PIXEL_CASES))
def test_pixels_are_checked_like_pictures(server, mnist_test, case):
    make, status, words = PIXEL_CASES[case]
    with server.client() as client:
        response = client.post("/predict", json={"instances": [{"pixels": make(mnist_seven(mnist_test)).tolist()}]})
    assert response.status_code == status, response.text
    if words:
        assert words in response.json()["detail"], response.json()
    else:
        assert response.json()["predictions"][0]["label"] == 7


def test_a_flat_list_of_784_pixels_is_told_to_send_rows(server, mnist_test):
    with server.client() as client:
        response = client.post("/predict", json={"instances": [{"pixels": mnist_seven(mnist_test).ravel().tolist()}]})
    assert response.status_code == 422 and "28 rows of 28" in response.json()["detail"], response.text


def test_photos_in_one_json_request_answer_in_order(server, pictures):
    """Ordinary and phone-size pictures in one request: framed apart, answered in request order."""
    chosen = [photo for kind, count in {"shadow": 2, "phone": 1, "gradient": 2, "noise": 2}.items()
              for photo in [photo for photo in pictures if photo.kind == kind][:count]]
    assert any(min(photo.size) >= 2000 for photo in chosen)
    with server.client() as client:
        response = client.post("/predict", json={"instances": [{"image_b64": b64(photo.data)} for photo in chosen]})
    assert response.status_code == 200, response.text
    labels = [p["label"] for p in response.json()["predictions"]]
    assert sum(label == photo.label for label, photo in zip(labels, chosen)) >= len(chosen) - 1, labels


def test_a_photo_of_blank_paper_is_answered_no_digit(server):
    """Paper under a lamp, with grain and noise, and no digit: answered ``no_digit``, as any blank picture."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:400]
    paper = 200 - 60 * xx / 400 - 20 * yy / 300 + rng.normal(0, 3, (300, 400))
    with server.client() as client:
        response = client.post("/predict", json={"instances": [{"image_b64": b64(encode(paper.astype(np.uint8),
                                                                                          "JPEG"))}]})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["flags"] == ["no_digit"], response.text


def predictions_for(server, pictures: list[bytes]) -> list[dict]:
    """One JSON request of these pictures, its answers in order."""
    with server.client() as client:
        response = client.post("/predict", json={"instances": [{"image_b64": b64(p)} for p in pictures]})
    assert response.status_code == 200, response.text
    return response.json()["predictions"]


def test_canvases_exported_with_a_transparent_background_are_read(server, mnist_test):
    """A drawing app's export: strokes on transparent pixels, white strokes from a dark page and black ones
    from a light page, as PNG and WebP; every one is read as the digit drawn, none as blank paper."""
    digits, labels = mnist_test
    pictures = []
    for index in range(8):
        ink = np.asarray(digits[index]).repeat(10, 0).repeat(10, 1)  # a 280x280 canvas
        colour = np.full_like(ink, 255 if index % 2 else 0)
        pictures.append(encode(np.dstack([colour, colour, colour, ink]), "PNG" if index < 4 else "WEBP", lossless=True))
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[:8].tolist(), predictions
    assert not any("no_digit" in p.get("flags", []) for p in predictions), predictions


def test_digits_in_a_form_box_inside_a_dark_border_underlined_or_circled_are_read(server, mnist_test):
    """A form's field (a box drawn round the digit), a scan's dark margin, a line drawn under the digit and
    a ring drawn round it are not the digit: each is read as the digit written there, and the box given
    is the digit's."""
    digits, labels = mnist_test
    marks = ("box", "border", "underline", "circle")
    pictures = [encode(forms.page(digits[index].numpy(), marks[index % 4]), "PNG") for index in range(10, 19)]
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[10:19].tolist(), predictions
    for prediction in predictions:
        x, y, w, h = prediction["box"]
        assert 40 <= x <= x + w <= 160 and 60 <= y <= y + h <= 180, prediction["box"]


def ruled_pictures(digits, marks: tuple[str, ...]) -> list[bytes]:
    """Digits on paper with ``marks`` taken in turn (``forms.page``: a notebook's lines, graph paper, one
    line alone, a notebook's margin): flat scans (PNG), and photos turned by up to 2 degrees under uneven
    light (JPEG)."""
    pictures = []
    for index, digit in enumerate(digits):
        page = forms.page(digit, marks[index % len(marks)])
        if index % 3 == 0:
            pictures.append(encode(page, "PNG"))
            continue
        light = np.linspace(0.8, 1.0, page.shape[1], dtype=np.float32)[None, :]
        turned = Image.fromarray((page * light).astype(np.uint8)).rotate(
            2.0 if index % 3 == 1 else -1.5, Image.Resampling.BILINEAR, fillcolor=int(235 * 0.9))
        pictures.append(encode(turned, "JPEG", quality=85))
    return pictures


@pytest.mark.parametrize(("marks", "first"), [(("squared", "ruled"), 30), (("line", "margin"), 42)])
def test_digits_on_ruled_and_squared_paper_are_read(server, mnist_test, marks, first):
    """The lines of a notebook's page or a graph paper, or one line alone, are paper, not ink: each digit
    written across them is read as the digit, not flagged, and its box is the digit's, not the page's."""
    digits, labels = mnist_test
    predictions = predictions_for(server, ruled_pictures(digits[first:first + 12].numpy(), marks))
    assert [p["label"] for p in predictions] == labels[first:first + 12].tolist(), predictions
    assert not any("not_a_digit" in p["flags"] for p in predictions), predictions
    for prediction in predictions:
        x, y, w, h = prediction["box"]
        assert 30 <= x <= x + w <= 170 and 50 <= y <= y + h <= 190, prediction["box"]


def test_digits_drawn_with_a_fine_pen_are_read_and_not_flagged(server, mnist_test):
    """A canvas app's thin brush (2 px on a 280 px canvas, 4 px on a 600 px one) draws strokes far finer
    than MNIST's: each digit is read, and none is called "not a digit" for being drawn finely."""
    digits, labels = mnist_test
    pictures = []
    for index in range(50, 62):
        side, pen = (280, 2) if index % 2 else (600, 4)
        enlarged = Image.fromarray(digits[index].numpy()).resize((side, side), Image.Resampling.BICUBIC)
        line = ndimage.binary_dilation(skeletonize(np.asarray(enlarged) > 100), iterations=pen // 2)
        pictures.append(encode(np.where(line, 0, 255).astype(np.uint8), "PNG"))  # dark ink on white
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[50:62].tolist(), predictions
    assert not any("not_a_digit" in p["flags"] for p in predictions), predictions


def test_digits_on_a_board_photographed_with_a_flash_are_read(server, mnist_test):
    """A flash's glare on a grey board is lighter than the board and wider than a stroke: it is light,
    not ink, and the dark digit in it is read (JPEG, as a phone sends it)."""
    digits, labels = mnist_test
    glare = [(0.35, 0.4), (0.5, 0.5), (0.6, 0.35), (0.45, 0.65)]
    pictures = [encode(Image.fromarray(forms.board(digits[index].numpy(), glare[index % 4]).astype(np.uint8)),
                       "JPEG", quality=90) for index in range(62, 74)]
    predictions = predictions_for(server, pictures)
    read = sum(p["label"] == label for p, label in zip(predictions, labels[62:74].tolist()))
    assert read >= 9, predictions  # 10 of 12 (before: 2); where the glare is white, a stroke may be lost


def test_digits_strewn_with_specks_are_read_and_not_flagged(server, mnist_test):
    """Salt and pepper on a scan (5% of the pixels each way): the specks are noise, not ink; each digit is
    read and none is called "not a digit" for them."""
    digits, labels = mnist_test
    pictures = [encode(forms.speckled(255 - forms.enlarged(digits[index].numpy(), 170), 0.05, index), "PNG")
                for index in range(74, 86)]
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[74:86].tolist(), predictions
    assert sum("not_a_digit" in p["flags"] for p in predictions) <= 1, predictions


def test_a_digit_on_a_sticky_note_photographed_on_a_desk_is_read(server, mnist_test):
    """A light note on a dark desk is the paper inside a border: the digit written on it is read, and its
    box is the digit's, not the note's (JPEG, as a phone sends it)."""
    digits, labels = mnist_test
    pictures = [encode(forms.sticky_note(digits[index].numpy(), forms.note_corner(index), index).astype(np.uint8),
                       "JPEG", quality=85) for index in range(86, 98)]
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[86:98].tolist(), predictions
    for index, prediction in zip(range(86, 98), predictions):
        x, y, w, h = prediction["box"]
        top, left = forms.note_corner(index)
        assert w < 100 and h < 100 and left + 20 <= x and top + 20 <= y, prediction["box"]


def test_light_digits_cut_out_of_dark_badges_are_read(server, mnist_test):
    """A white digit in a red disc or on a dark label (a map marker, a badge, a tag), sent as JPEG: the
    digit is read, not the shape round it, and its box is the digit's."""
    digits, labels = mnist_test
    shapes = [("disc", (200, 40, 40)), ("label", (35, 35, 50)), ("disc", (30, 90, 200))]
    pictures = [encode(Image.fromarray(forms.badge(digits[index].numpy(), *shapes[index % 3])), "JPEG", quality=90)
                for index in range(98, 110)]
    predictions = predictions_for(server, pictures)
    read = sum(p["label"] == label for p, label in zip(predictions, labels[98:110].tolist()))
    assert read >= 11, predictions  # a straight 1 cut out reads as a heavy 0's counter (docs/pictures.md)
    for prediction in predictions:
        x, y, w, h = prediction["box"]
        assert x >= 40 and y >= 40 and w <= 100 and h <= 100, prediction["box"]  # within the cut-out's place


def test_digits_in_brackets_are_read_without_them(server, mnist_test):
    """"(7)" and "[7]" on paper: the brackets are not part of the digit, nor other digits; each is read,
    not flagged, and its box is the digit's, inside the brackets."""
    digits, labels = mnist_test
    pictures = [encode(forms.bracketed(digits[index].numpy(), square=index % 2 == 1), "PNG")
                for index in range(110, 122)]
    predictions = predictions_for(server, pictures)
    assert [p["label"] for p in predictions] == labels[110:122].tolist(), predictions
    assert sum("not_a_digit" in p["flags"] for p in predictions) <= 1, predictions
    assert not any("multiple_digits" in p["flags"] for p in predictions), predictions  # brackets are not digits
    for prediction in predictions:
        x, _, w, _ = prediction["box"]
        assert x > 32 and x + w < 168, prediction["box"]  # between the brackets' inner edges


def test_digits_on_seven_segment_displays_are_read(server):
    """An LCD's dark bars on grey-green glass, its unlit bars faintly there, and an LED's red bars on black:
    the bars do not touch, and are framed as one digit. Version 5 never trained on them: it reads the
    LCD's 2 as an 8 (the faint bars) and flags its 0 (docs/pictures.md, ``--segments``)."""
    pictures = [encode(Image.fromarray(forms.display(digit, lcd)), "PNG")
                for lcd in (True, False) for digit in range(10)]
    predictions = predictions_for(server, pictures)
    labels = [p["label"] for p in predictions]
    assert sum(label == digit for label, digit in zip(labels, list(range(10)) * 2)) >= 19, predictions
    assert labels[10:] == list(range(10)), predictions  # every LED digit
    assert sum("not_a_digit" in p["flags"] for p in predictions) <= 2, predictions
    assert not any("multiple_digits" in p["flags"] for p in predictions), predictions  # bars apart, one digit
