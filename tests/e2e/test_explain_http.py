"""/explain over HTTP: same inputs and preprocessing as /predict, its own pool, clear errors."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from harness.server import encode
from service.imaging import normalize
from service.work import METHODS
from service.worker.explain import Explainer
from tests.e2e.test_errors import BAD_INPUTS, GOOD_PNG


def explain_in_process(model, pixels: np.ndarray, method: str) -> list[dict]:
    """The explanation of the eager module, with the answer's part as /predict gives it (calibrated)."""
    norm = model.metadata.normalization
    x = torch.from_numpy(normalize((pixels / 255.0).astype(np.float32), norm.mean, norm.std).reshape(len(pixels), -1))
    reports = Explainer(model.model, norm.mean, norm.std).explain(x, method, [None] * len(x), 32, 10, False)
    with torch.inference_mode():
        for report, probabilities in zip(reports, model.probabilities(x).tolist()):
            report["probabilities"] = probabilities
    return reports


@pytest.mark.parametrize("method", METHODS)
def test_explain_over_http_equals_in_process(served, default_model, mnist_test, method):
    pixels = mnist_test[0][:4].numpy()
    with served.client() as client:
        response = client.post("/explain",
                               json={"instances": [{"pixels": p.tolist()} for p in pixels], "method": method})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["version"] == default_model.version
    expected = explain_in_process(default_model, pixels, method)
    for got, want, label in zip(body["predictions"], expected, mnist_test[1][:4].tolist()):
        assert got["method"] == method and got["label"] == label and got["target"] == label
        np.testing.assert_allclose(got["attributions"], want["attributions"], atol=1e-5)
        np.testing.assert_allclose(got["input"], want["input"], atol=1e-6)
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
        assert [layer["name"] for layer in got["layers"]] == ["fc1", "relu", "fc2"]


def test_default_integrated_gradients_say_how_complete_they_are(served, mnist_test):
    """Asked for nothing but instances, every answer is integrated gradients with a convergence_delta
    that is tiny (the exact quadrature: within 1e-4 relative); the OpenAPI document describes the
    field, and exact as the default quadrature."""
    pixels = mnist_test[0][300:308].numpy()
    with served.client() as client:
        response = client.post("/explain", json={"instances": [{"pixels": p.tolist()} for p in pixels]})
        document = client.get("/openapi.json").json()
    assert response.status_code == 200, response.text
    for report in response.json()["predictions"]:
        assert report["method"] == "integrated_gradients"
        delta = report["convergence_delta"]
        assert abs(delta["relative"]) < 1e-4 and abs(delta["absolute"]) < 1e-3, delta
    schemas = document["components"]["schemas"]
    assert "convergence_delta" in schemas["Explanation"]["properties"]
    assert {"absolute", "relative"} <= set(schemas["ConvergenceDelta"]["properties"])
    assert schemas["ExplainRequest"]["properties"]["quadrature"]["default"] == "exact"


def test_multipart_with_options_and_heatmap(served):
    """curl -F file=@7.png -F method=saliency -F target=1 -F heatmap=true works like JSON."""
    with served.client() as client:
        response = client.post("/explain", files=[("file", ("7.png", GOOD_PNG, "image/png"))],
                               data={"method": "saliency", "target": "1", "heatmap": "true"})
    assert response.status_code == 200, response.text
    report = response.json()["predictions"][0]
    assert report["label"] == 7 and report["target"] == 1 and report["method"] == "saliency"
    heatmap = Image.open(io.BytesIO(base64.b64decode(report["heatmap_png"])))
    assert heatmap.format == "PNG" and heatmap.size[0] >= 280


def test_predict_unchanged_by_explain_traffic(served, mnist_test):
    """Hooks live only inside an explain call: /predict gives the same answers before, during and after."""
    pixels = [{"pixels": p.tolist()} for p in mnist_test[0][200:216].numpy()]
    with served.client() as client:
        before = client.post("/predict", json={"instances": pixels}).json()

        def explain(method):
            return client.post("/explain", json={"instances": pixels[:2], "method": method}).status_code

        with ThreadPoolExecutor(4) as pool:
            during = [pool.submit(client.post, "/predict", json={"instances": pixels}) for _ in range(8)]
            assert set(pool.map(explain, METHODS * 3)) == {200}
            during = [f.result().json() for f in during]
        after = client.post("/predict", json={"instances": pixels}).json()
    assert after == before
    for answer in during:  # batched with other requests: on a GPU the kernel (and last bits) follow the batch shape
        for got, want in zip(answer["predictions"], before["predictions"]):
            assert got["label"] == want["label"]
            np.testing.assert_allclose(got["probabilities"], want["probabilities"], rtol=0, atol=1e-6)


EXPLAIN_ERRORS = {
    "unknown method": ({"method": "lime"}, "method"),
    "steps zero": ({"steps": 0}, "steps"),
    "steps over the limit": ({"steps": 257}, "at most 256"),
    "target over 9": ({"target": 10}, "target"),
    "negative target": ({"target": -1}, "target"),
    "top_k zero": ({"top_k": 0}, "top_k"),
    "unknown option": ({"colour": "red"}, "colour"),
}


@pytest.mark.parametrize("case", EXPLAIN_ERRORS, ids=list(EXPLAIN_ERRORS))
def test_bad_explain_options_get_422(served, case):
    options, words = EXPLAIN_ERRORS[case]
    with served.client() as client:
        response = client.post("/explain",
                               json={"instances": [{"image_b64": base64.b64encode(GOOD_PNG).decode()}], **options})
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"]
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_predict_bad_inputs_get_the_same_4xx_on_explain(served, case):
    (body, content_type), status, _ = BAD_INPUTS[case]
    with served.client() as client:
        on_predict = client.post("/predict", content=body, headers={"content-type": content_type})
        on_explain = client.post("/explain", content=body, headers={"content-type": content_type})
    assert on_explain.status_code == on_predict.status_code == status
    assert on_explain.json()["detail"] == on_predict.json()["detail"]


def test_heatmaps_of_two_digits_differ(served, mnist_test):
    images = mnist_test[0][:2].numpy()  # a 7 and a 2
    with served.client() as client:
        response = client.post("/explain",
                               files=[("file", (f"{i}.png", encode(im), "image/png")) for i, im in enumerate(images)],
                               data={"heatmap": "true"})
    first, second = (base64.b64decode(p["heatmap_png"]) for p in response.json()["predictions"])
    assert first != second
