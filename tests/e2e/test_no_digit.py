"""A picture without a digit is an answer, not an error (DESIGN.md, "Not a digit"), on every protocol.

A request mixing digits and blank pictures (white paper; a photo of paper under a lamp) is answered
200, the blank ones per instance (``no_digit``), the others as if they came alone; a request of blank
pictures only is answered without a worker; ``pixels`` frames keep their 422. And a printed digit
cropped tight (issue #30's bold 6) is read.
"""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.http as triton
from PIL import Image, ImageDraw, ImageFont

from harness.server import b64, encode, metric_samples
from tests.crops import FONT_DIR

NO_DIGIT_ROW = {"label": None, "confidence": None, "probabilities": None, "typicality": 0.0, "box": None,
                "flags": ["no_digit"]}


def paper_photo() -> bytes:
    """Paper under a lamp, with grain and noise, and no digit."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:400]
    paper = 200 - 60 * xx / 400 - 20 * yy / 300 + rng.normal(0, 3, (300, 400))
    return encode(paper.astype(np.uint8), "JPEG")


WHITE = encode(np.full((50, 50), 255, np.uint8))


@pytest.fixture(scope="module")
def digits(mnist_test) -> list[tuple[bytes, int]]:
    images, labels = mnist_test
    return [(encode(images[i].numpy()), int(labels[i])) for i in range(3)]


def mixed(digits) -> tuple[list[bytes], list[int | None]]:
    """digit, white, digit, paper photo, digit: and their labels (None: no digit)."""
    (a, la), (b, lb), (c, lc) = digits
    return [a, WHITE, b, paper_photo(), c], [la, None, lb, None, lc]


def check_rows(rows: list[dict], labels: list[int | None]) -> None:
    assert len(rows) == len(labels)
    for row, label in zip(rows, labels):
        if label is None:
            assert {k: row[k] for k in NO_DIGIT_ROW} == NO_DIGIT_ROW, row
        else:
            assert row["label"] == label and "no_digit" not in row["flags"] and len(row["probabilities"]) == 10, row


def test_predict_json_answers_blank_pictures_per_instance(served, digits):
    pictures, labels = mixed(digits)
    with served.client() as client:
        response = client.post("/predict", json={"instances": [{"image_b64": b64(p)} for p in pictures]})
        alone = client.post("/predict", json={"instances": [{"image_b64": b64(pictures[0])}]}).json()
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    check_rows(rows, labels)
    single = alone["predictions"][0]  # the others are answered as if alone
    assert {k: rows[0][k] for k in ("label", "box", "flags")} == {k: single[k] for k in ("label", "box", "flags")}
    np.testing.assert_allclose(rows[0]["probabilities"], single["probabilities"], atol=1e-6)


def test_multipart_answers_blank_pictures_per_instance(served, digits):
    pictures, labels = mixed(digits)
    with served.client() as client:
        files = [("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pictures)]
        response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    check_rows(response.json()["predictions"], labels)


def test_kserve_v1_answers_like_predict(served, digits):
    pictures, labels = mixed(digits)
    with served.client() as client:
        response = client.post("/v1/models/mnist-fnn:predict",
                               json={"instances": [{"image_b64": b64(p)} for p in pictures]})
    assert response.status_code == 200, response.text
    check_rows(response.json()["predictions"], labels)


def test_explain_answers_blank_pictures_with_a_row_of_nothing(served, digits):
    pictures, labels = mixed(digits)
    with served.client() as client:
        response = client.post("/explain", json={"instances": [{"image_b64": b64(p)} for p in pictures[:2]],
                                                 "method": "saliency"})
    assert response.status_code == 200, response.text
    found, blank = response.json()["predictions"]
    assert found["label"] == labels[0] and len(found["attributions"]) == 28
    assert {k: blank[k] for k in NO_DIGIT_ROW} == NO_DIGIT_ROW
    assert blank["method"] == "saliency" and blank["attributions"] is None and blank["input"] is None
    with served.client() as client:  # only blank pictures: answered without a worker, the same row
        alone = client.post("/explain", json={"instances": [{"image_b64": b64(WHITE)}], "method": "saliency"})
    assert alone.status_code == 200 and alone.json()["predictions"] == [blank], alone.text


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_v2_answers_label_minus_one_for_blank_pictures(served, digits, binary):
    """Outputs in binary or in JSON: label -1 and zeros where no digit is found."""
    pictures, labels = mixed(digits)
    client = triton.InferenceServerClient(served.url.removeprefix("http://"))
    try:
        tensor = triton.InferInput("image", [len(pictures)], "BYTES")
        tensor.set_data_from_numpy(np.array(pictures, dtype=np.object_), binary_data=True)  # bytes are not UTF-8
        outputs = [triton.InferRequestedOutput(name, binary_data=binary)
                   for name in ("probabilities", "label", "confidence", "typicality")]
        answer = client.infer("mnist-fnn", [tensor], outputs=outputs)
        default = client.infer("mnist-fnn", [tensor])
    finally:
        client.close()
    assert answer.as_numpy("label").tolist() == [-1 if label is None else label for label in labels]
    blank = [i for i, label in enumerate(labels) if label is None]
    assert not answer.as_numpy("probabilities")[blank].any() and not answer.as_numpy("confidence")[blank].any()
    typicality = answer.as_numpy("typicality")
    assert typicality.shape == (5,) and typicality.dtype == np.float32 and not typicality[blank].any()
    # the default version is calibrated: its digits have a typicality, given unasked too
    assert ((typicality[[0, 2, 4]] > 0) & (typicality[[0, 2, 4]] <= 1)).all()
    assert [o["name"] for o in default.get_response()["outputs"]] == ["probabilities", "label", "confidence",
                                                                       "typicality"]
    assert default.as_numpy("label").tolist() == answer.as_numpy("label").tolist()


def test_v2_model_metadata_lists_typicality(served):
    with served.client() as client:
        outputs = client.get("/v2/models/mnist-fnn").json()["outputs"]
    assert {"name": "typicality", "datatype": "FP32", "shape": [-1]} in outputs


def test_only_blank_pictures_answer_200_without_a_worker_and_are_counted(served):
    with served.client() as client:
        before = metric_samples(client.get("/metrics").text, "digitserve_flags_total")
        response = client.post("/predict", json={"instances": [{"image_b64": b64(WHITE)}] * 3})
        after = metric_samples(client.get("/metrics").text, "digitserve_flags_total")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["predictions"] == [NO_DIGIT_ROW] * 3 and body["model"]["name"] == "mnist-fnn"
    counted = {labels: value - before.get(labels, 0) for labels, value in after.items()}
    assert sum(v for labels, v in counted.items() if ("flag", "no_digit") in labels) >= 3, counted


def test_blank_pixels_keep_their_422(served):
    with served.client() as client:
        response = client.post("/predict", json={"instances": [{"pixels": [[0] * 28] * 28}]})
    assert response.status_code == 422 and "no digit found" in response.json()["detail"]


def test_a_bold_printed_digit_cropped_tight_is_read(served):
    """Issue #30: a clear, bold printed 6, 42x61, dark on light grey, the digit filling the picture."""
    font = ImageFont.truetype(str(FONT_DIR / "DejaVuSans-Bold.ttf"), 400)
    left, top, right, bottom = font.getbbox("6", stroke_width=12)
    big = Image.new("L", (right - left, bottom - top), 215)
    ImageDraw.Draw(big).text((-left, -top), "6", fill=30, font=font, stroke_width=12, stroke_fill=30)
    six = big.resize((42, 61), Image.Resampling.LANCZOS)
    with served.client() as client:
        response = client.post("/predict", files=[("file", ("6.png", encode(np.asarray(six)), "image/png"))])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 6
