"""Typicality and ``not_a_digit`` through the real server (DESIGN.md "Not a digit, and how sure").

The committed default version carries a calibration: a real digit gets a typicality well above the
threshold and no flag; a letter in a font family held out of training and a crop of a photograph
held out of training are flagged. A server on version 1, which has no calibration, answers
``typicality: null`` and never flags. /info, /explain and the metrics say the same.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from harness.server import encode, metric_samples, running
from service.model import printed
from tests.conftest import MODEL_STORE

FLAG = "not_a_digit"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running(tmp_path_factory.mktemp("typicality")) as server:
        yield server


def _page(ink: np.ndarray, margin: int = 40) -> bytes:
    """Dark ink on white paper, as a scan gives it."""
    page = np.pad(ink, margin)
    return encode((255 * (1 - 0.9 * page)).astype(np.uint8))


@pytest.fixture(scope="module")
def seven(mnist_test) -> bytes:
    images, labels = mnist_test
    index = int((labels == 7).nonzero()[0])
    digit = Image.fromarray(images[index].numpy()).resize((112, 112), Image.Resampling.BICUBIC)
    return _page(np.asarray(digit, dtype=np.float32) / 255)


def _letter(text: str) -> bytes:
    font = next(f for f in printed.fonts_in("heldout") if "Regular" in f.style)
    image = Image.new("L", (160, 160), 0)
    ImageDraw.Draw(image).text((80, 80), text, fill=255, font=printed._font(font.path, 100), anchor="mm")
    return _page(np.asarray(image, dtype=np.float32) / 255)


def _photograph() -> bytes:
    import skimage.data

    cat = np.asarray(Image.fromarray(skimage.data.chelsea()).convert("L"))
    return encode(cat[40:280, 100:340])


def _predict(server, picture: bytes, **params) -> dict:
    with server.client() as client:
        response = client.post("/predict", params=params, files=[("file", ("picture", picture, "image/png"))])
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]


def test_a_digit_is_typical_and_not_flagged(server, seven):
    answer = _predict(server, seven)
    assert answer["label"] == 7 and 0.01 <= answer["typicality"] <= 1
    assert FLAG not in answer["flags"]


@pytest.mark.parametrize("letter", ["K", "W", "x"])
def test_a_letter_is_not_a_digit(server, letter):
    answer = _predict(server, _letter(letter))
    assert answer["typicality"] < 0.01 and FLAG in answer["flags"], answer
    assert answer["label"] in range(10) and len(answer["probabilities"]) == 10  # the label is still given


def test_a_photograph_is_not_a_digit(server):
    answer = _predict(server, _photograph())
    assert answer["typicality"] < 0.01 and FLAG in answer["flags"], answer


def test_confidence_is_the_calibrated_probability(server, seven):
    answer = _predict(server, seven)
    assert answer["confidence"] == pytest.approx(max(answer["probabilities"]))
    assert sum(answer["probabilities"]) == pytest.approx(1, abs=1e-5)


def test_explain_carries_typicality_and_the_flag(server, seven):
    with server.client() as client:
        for picture, flagged in ((seven, False), (_letter("K"), True)):
            response = client.post("/explain", files=[("file", ("picture", picture, "image/png"))])
            assert response.status_code == 200, response.text
            report = response.json()["predictions"][0]
            assert (FLAG in report.get("flags", [])) == flagged and isinstance(report["typicality"], float)


def test_info_says_the_version_is_calibrated_and_the_threshold(server):
    with server.client() as client:
        info = client.get("/info").json()
    served = str(info["model"]["version"])
    assert info["typicality"]["not_a_digit_below"] == 0.01
    assert info["typicality"]["calibrated"][served]["temperature"] > 0


def test_metrics_count_typicality_and_flags(server, seven):
    _predict(server, _letter("W"))
    _predict(server, seven)
    with server.client() as client:
        text = client.get("/metrics").text
    version = str(max(int(p.name) for p in (MODEL_STORE / "mnist-fnn").iterdir() if p.name.isdigit()))
    counts = metric_samples(text, "digitserve_typicality_count")
    assert counts[(("version", version),)] >= 2
    flags = metric_samples(text, "digitserve_flags_total")
    assert flags[(("flag", FLAG), ("version", version))] >= 1


def test_a_version_without_calibration_answers_null_and_never_flags(tmp_path, seven):
    with running(tmp_path, "--model-version", "1") as old:
        for picture in (seven, _letter("K")):
            answer = _predict(old, picture)
            assert answer["typicality"] is None and FLAG not in answer["flags"]
        with old.client() as client:
            info = client.get("/info").json()
    assert info["typicality"]["calibrated"] == {"1": None}
