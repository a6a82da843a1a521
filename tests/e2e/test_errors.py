"""Bad input gets a clear 4xx with a JSON detail; the service keeps serving everyone else."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from harness.server import b64, encode, png_claiming


def seven() -> np.ndarray:
    pixels = np.zeros((28, 28), np.uint8)
    pixels[6, 8:21] = 255
    pixels[6:23, 19:21] = 255
    return pixels


def as_json(body: object) -> tuple[bytes, str]:
    return json.dumps(body).encode(), "application/json"


def instance(**fields) -> tuple[bytes, str]:
    return as_json({"instances": [fields]})


GOOD_PNG = encode(255 - seven())
BAD_INPUTS = {
    "empty body": ((b"", "application/json"), 400, "empty"),
    "not json": ((b"{not json", "application/json"), 400, "not valid JSON"),
    "json list": (as_json([1, 2]), 422, "JSON object"),
    "instances not a list": (as_json({"instances": "seven"}), 422, "instances"),
    "no instances field": (as_json({"images": []}), 422, "instances"),
    "empty instances": (as_json({"instances": []}), 422, "at least 1"),
    "too many instances": (as_json({"instances": [{"pixels": seven().tolist()}] * 65}), 413, "limit is 64"),
    "invalid base64": (instance(image_b64="***"), 400, "base64"),
    "not an image": (instance(image_b64=b64(b"hello, I am text")), 400, "not an image"),
    "truncated png": (instance(image_b64=b64(GOOD_PNG[: len(GOOD_PNG) // 2])), 400, "truncated"),
    "png failing its checksum": (instance(image_b64=b64(GOOD_PNG[:45] + bytes([GOOD_PNG[45] ^ 4]) + GOOD_PNG[46:])),
                                 400, "checksum"),
    "truncated jpeg": (instance(image_b64=b64(encode(255 - seven(), "JPEG")[:300])), 400, "truncated"),
    "zero width": (instance(image_b64=b64(png_claiming(0, 28))), 400, "image"),
    "decompression bomb": (instance(image_b64=b64(png_claiming(100_000, 100_000))), 413, "100000x100000"),
    "payload too large": (as_json({"instances": [{"image_b64": "A" * 2_100_000}]}), 413, "limit"),
    "pixels wrong shape": (instance(pixels=[[0] * 28] * 27), 422, "28x28"),
    "pixels ragged": (instance(pixels=[[0] * 28] * 27 + [[0] * 3]), 422, "28x28"),
    "pixels nan": ((b'{"instances": [{"pixels": [[NaN' + b", 0" * 27 + b"]" + b", [" + b", ".join([b"0"] * 28)
                    + b"]" * 1 + b"]}]}", "application/json"), 422, None),
    "pixels negative": (instance(pixels=(seven().astype(int) - 1).tolist()), 422, "0..255"),
    "pixels over 255": (instance(pixels=(seven().astype(int) + 1).tolist()), 422, "0..255"),
    "pixels not numbers": (instance(pixels=[["a"] * 28] * 28), 422, "pixels"),
    "both image and pixels": (instance(pixels=seven().tolist(), image_b64=b64(GOOD_PNG)), 422, "exactly one"),
    "unknown top-level field": (as_json({"instances": [{"pixels": seven().tolist()}], "model": "x"}), 422, "model"),
    "unknown instance field": (instance(png=b64(GOOD_PNG)), 422, "png"),
    "wrong content type": ((GOOD_PNG, "image/png"), 415, "content type"),
    "multipart without file": ((b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
                                "multipart/form-data; boundary=b"), 422, "file"),
    "multipart without boundary": ((b"garbage", "multipart/form-data"), 400, "multipart"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_clear_4xx_and_service_keeps_serving(served, case):
    (body, content_type), status, words = BAD_INPUTS[case]
    with served.client() as client:
        response = client.post("/predict", content=body, headers={"content-type": content_type})
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        assert isinstance(detail, str) and detail
        if words:
            assert words.lower() in detail.lower(), detail
        assert client.get("/health").status_code == 200
        good = client.post("/predict", files=[("file", ("7.png", GOOD_PNG, "image/png"))])
        assert good.status_code == 200 and good.json()["predictions"][0]["label"] == 7


BIG_SEVEN = encode(np.kron(255 - seven(), np.ones((3, 3), np.uint8)))  # another size: framed in its own group


@pytest.mark.parametrize("bad,status", [("%%%", 400)], ids=["undecodable"])
def test_detail_names_the_bad_instance(served, bad, status):
    """Decoding fails image by image and names the instance (a blank picture is an answer: test_no_digit)."""
    body = {"instances": [{"image_b64": b64(GOOD_PNG)}, {"image_b64": b64(BIG_SEVEN)}, {"image_b64": bad},
                          {"image_b64": b64(GOOD_PNG)}]}
    with served.client() as client:
        response = client.post("/predict", json=body)
    assert response.status_code == status
    assert response.json()["detail"].startswith("instance 2:")


def test_bad_requests_do_not_affect_concurrent_good_ones(served):
    """Good and bad requests interleaved under load: every good one gets the right answer."""
    good = json.dumps({"instances": [{"pixels": seven().tolist()}]})
    bad = [body for (body, ct), status, _ in BAD_INPUTS.values() if ct == "application/json" and status < 413]
    requests = [(good, 200) if i % 2 else (bad[i % len(bad)], None) for i in range(120)]
    with served.client() as client:
        def send(item):
            body, expect = item
            response = client.post("/predict", content=body, headers={"content-type": "application/json"})
            return response, expect

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(send, requests))
    for response, expect in results:
        if expect == 200:
            assert response.status_code == 200 and response.json()["predictions"][0]["label"] == 7
        else:
            assert 400 <= response.status_code < 500, response.text
