"""The Open Inference Protocol (V2) and KServe V1, checked by clients we did not write.

tritonclient (unmodified, from PyPI) talks to the real server; the same calls go to a real Triton
Inference Server (PyTriton's tritonserver 2.51, tests/e2e/reference_triton.py) serving the same
checkpoint, and the answers must agree. Bad requests are fuzzed over HTTP: only 4xx, and a good
request sent meanwhile is still answered right.
"""

from __future__ import annotations

import base64
import json
import struct
import threading
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import InferenceServerException

from harness.server import Server, encode, metric_samples, running
from service.imaging import normalize
from tests.conftest import SERVED
from tests.e2e.reference_triton import triton_reference

MODEL = "mnist-fnn"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running(tmp_path_factory.mktemp("v2"), "--max-instances", "64") as server:
        yield server


@pytest.fixture(scope="module")
def ours(server: Server) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=4)
    yield client
    client.close()


@pytest.fixture(scope="module")
def reference() -> Iterator[triton.InferenceServerClient]:
    with triton_reference() as endpoints:
        client = triton.InferenceServerClient(endpoints.http)
        yield client
        client.close()


def expected(default_model, pixels01: np.ndarray) -> np.ndarray:
    """The in-process model's probabilities for (N, 784) pixels in 0..1."""
    norm = default_model.metadata.normalization
    x = torch.from_numpy(normalize(pixels01.astype(np.float32), norm.mean, norm.std))
    with torch.inference_mode():
        return default_model.probabilities(x).numpy()


def pixels_input(data: np.ndarray, datatype: str = "FP32", binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("pixels", list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def test_server_and_model_metadata(ours, reference):
    assert ours.is_server_live() and ours.is_server_ready() and ours.is_model_ready(MODEL)
    metadata = ours.get_server_metadata()
    assert metadata["name"] == "digitserve" and "binary_tensor_data" in metadata["extensions"]
    assert set(metadata) >= set(reference.get_server_metadata())  # the same fields Triton answers
    model, theirs = ours.get_model_metadata(MODEL), reference.get_model_metadata(MODEL)
    assert set(model) >= set(theirs) | {"name", "versions", "platform", "inputs", "outputs"}
    assert model["outputs"] == theirs["outputs"]
    assert model["inputs"][0] == theirs["inputs"][0]  # pixels FP32 [-1, 784]; ours also takes `image`
    assert ours.get_model_metadata(MODEL, model_version=SERVED)["versions"] == [SERVED]


def test_inputs_built_from_the_advertised_metadata_are_accepted(ours, digits):
    """What a generic client does: read each input's datatype and shape from the metadata, put the batch
    size for -1, and send. The advertised forms (docs/protocols.md) must be ones we accept."""
    images, labels = digits[0][:3], digits[1][:3]
    for advertised in ours.get_model_metadata(MODEL)["inputs"]:
        shape = [3 if dim == -1 else dim for dim in advertised["shape"]]
        if advertised["name"] == "pixels":
            data = (images / 255).astype(triton.triton_to_np_dtype(advertised["datatype"])).reshape(shape)
        else:
            data = np.array([encode(image) for image in images], dtype=object).reshape(shape)
        tensor = triton.InferInput(advertised["name"], shape, advertised["datatype"])
        tensor.set_data_from_numpy(data)
        assert ours.infer(MODEL, [tensor]).as_numpy("label").tolist() == labels.tolist(), advertised


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_labels_equal_the_in_process_model_on_1000_test_digits(ours, digits, default_model, binary):
    images, labels = digits
    pixels = (images.reshape(len(images), 784) / 255).astype(np.float32)
    want = expected(default_model, pixels)
    for start in range(0, len(pixels), 50):
        batch = pixels[start: start + 50]
        outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
        answer = ours.infer(MODEL, [pixels_input(batch, binary=binary)], outputs=outputs, request_id=f"r{start}")
        np.testing.assert_array_equal(answer.as_numpy("label"), want[start: start + 50].argmax(1))
        np.testing.assert_allclose(answer.as_numpy("probabilities"), want[start: start + 50], atol=1e-6)
        assert answer.get_response()["id"] == f"r{start}" and answer.get_response()["model_version"] == SERVED
    assert (want.argmax(1) == labels).mean() > 0.98


def test_uint8_pixels_and_every_shape_give_the_same_answer(ours, digits):
    images = digits[0][:8]
    as_fp32 = ours.infer(MODEL, [pixels_input((images / 255).astype(np.float32).reshape(8, 784))])
    for data, datatype in ((images.reshape(8, 784), "UINT8"), (images, "UINT8"), (images[:, None], "UINT8"),
                           ((images / 255).astype(np.float32), "FP32")):
        answer = ours.infer(MODEL, [pixels_input(np.ascontiguousarray(data), datatype)])
        np.testing.assert_allclose(answer.as_numpy("probabilities"), as_fp32.as_numpy("probabilities"), atol=1e-6)


def test_bytes_images_are_preprocessed_like_predict(ours, server, digits):
    pictures = [encode(image) for image in digits[0][:16]]
    tensor = triton.InferInput("image", [len(pictures)], "BYTES")
    tensor.set_data_from_numpy(np.array(pictures, dtype=object))
    answer = ours.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("confidence")])
    assert [o["name"] for o in answer.get_response()["outputs"]] == ["confidence"]  # only what was asked for
    with server.client() as client:
        native = client.post("/predict", files=[("file", p) for p in pictures]).json()["predictions"]
    np.testing.assert_allclose(answer.as_numpy("confidence"), [p["confidence"] for p in native], atol=1e-6)


def test_a_pinned_version_and_an_unknown_one(ours, digits):
    data = (digits[0][:2].reshape(2, 784) / 255).astype(np.float32)
    assert ours.infer(MODEL, [pixels_input(data)], model_version=SERVED).get_response()["model_version"] == SERVED
    with pytest.raises(InferenceServerException) as missing:
        ours.infer(MODEL, [pixels_input(data)], model_version="9")
    assert missing.value.status() == "404" and "version 9 " in missing.value.message()


def test_answers_agree_with_a_real_triton(ours, reference, digits):
    data = (digits[0][:64].reshape(64, 784) / 255).astype(np.float32)
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput(name, binary_data=binary)
                   for name in ("probabilities", "label", "confidence")]
        mine, theirs = (client.infer(MODEL, [pixels_input(data, binary=binary)], outputs=outputs)
                        for client in (ours, reference))
        for name in ("probabilities", "label", "confidence"):
            a, b = mine.as_numpy(name), theirs.as_numpy(name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        assert [(o["name"], o["datatype"], o["shape"]) for o in mine.get_response()["outputs"]] == [
            (o["name"], o["datatype"], o["shape"]) for o in theirs.get_response()["outputs"]]


BAD_CALLS = {  # case -> (the call, what our message must name)
    "unknown model": (lambda c, d: c.infer("nope", [pixels_input(d)]), "unknown model 'nope'"),
    "wrong datatype": (lambda c, d: c.infer(MODEL, [pixels_input(d.astype(np.float64), "FP64")]), "FP64"),
    "wrong shape": (lambda c, d: c.infer(MODEL, [pixels_input(d[:, :783].copy())]), "[2,783]"),
    "missing input": (lambda c, d: c.infer(MODEL, []), "pixels"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_requests_get_the_status_class_triton_gives_and_our_message(ours, reference, digits, case):
    data = (digits[0][:2].reshape(2, 784) / 255).astype(np.float32)
    call, names = BAD_CALLS[case]
    statuses = []
    for client in (ours, reference):
        with pytest.raises(InferenceServerException) as refused:
            call(client, data)
        statuses.append(refused.value.status())
        if client is ours:
            assert names in refused.value.message(), refused.value.message()
    assert statuses[0][0] == statuses[1][0] == "4", (case, statuses)


def test_kserve_v1_routes(server, digits):
    picture = encode(digits[0][0])
    with server.client() as client:
        assert client.get("/v1/models").json() == {"models": [MODEL]}
        assert client.get(f"/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
        assert client.get("/v1/models/other").status_code == 404
        body = {"instances": [{"image_b64": base64.b64encode(picture).decode()}]}
        answer = client.post(f"/v1/models/{MODEL}:predict", json=body).json()
        assert answer["predictions"][0]["label"] == int(digits[1][0])
        assert answer == client.post("/predict", json=body).json()
        explained = client.post(f"/v1/models/{MODEL}:explain", json={**body, "method": "saliency"}).json()
        assert explained["predictions"][0]["method"] == "saliency"
        wrong = client.post("/v1/models/other:predict", json=body)
        assert wrong.status_code == 404 and "unknown model" in wrong.json()["error"]
        bad = client.post(f"/v1/models/{MODEL}:predict", json={"instances": []})
        assert bad.status_code == 422 and "instances" in bad.json()["error"]


def test_protocol_traffic_is_counted_under_its_own_endpoint_labels(server, ours, digits):
    ours.is_server_ready()
    ours.get_model_metadata(MODEL)
    ours.infer(MODEL, [pixels_input((digits[0][:1].reshape(1, 784) / 255).astype(np.float32))])
    with server.client() as client:
        client.get("/v1/models")
        text = client.get("/metrics").text
    requests = metric_samples(text, "digitserve_requests_total")
    counts = {dict(labels)["endpoint"]: value for labels, value in requests.items() if dict(labels)["status"] == "200"}
    assert {"v2_infer", "v2_model", "v2_health", "v1_model"} <= set(counts), counts
    forwards = metric_samples(text, "digitserve_batch_size_count")  # V2 goes through the predict pool's batcher
    assert sum(v for labels, v in forwards.items() if dict(labels)["endpoint"] == "predict") >= counts["v2_infer"]


# ---- fuzzing the V2 and V1 routes over HTTP

def binary_body(header: dict, blob: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}


NASTY = st.one_of(
    st.builds(lambda dt, shape, size: ({"inputs": [{"name": "pixels", "datatype": dt, "shape": shape,
                                                    "parameters": {"binary_data_size": size}}]}, b"\0" * max(0, size)),
              st.sampled_from(["FP32", "UINT8", "FP64", "BYTES", "INT64", "nope"]),
              st.lists(st.integers(-3, 1 << 40), min_size=0, max_size=4), st.integers(-5, 6000)),
    st.builds(lambda lengths, tail: ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(lengths)],
                                                  "parameters": {"binary_data_size": len(tail) + 4 * len(lengths)}}]},
                                     b"".join(struct.pack("<I", n) for n in lengths) + tail),
              st.lists(st.integers(0, 1 << 31), min_size=1, max_size=3), st.binary(max_size=64)),
    st.builds(lambda data: ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784],
                                         "data": data}]}, b""),
              st.lists(st.floats(allow_nan=True, allow_infinity=True), max_size=784)),
    st.builds(lambda extra: ({"inputs": [], "parameters": extra}, b""),
              st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=5) | st.none(), max_size=3)),
)


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=NASTY, header_shift=st.sampled_from([0, 0, 0, 7, -3, 10_000]))
def test_malformed_v2_and_v1_requests_get_a_4xx_and_disturb_nobody(server, digits, case, header_shift):
    header, blob = case
    body, headers = binary_body(header, blob)
    headers["Inference-Header-Content-Length"] = str(int(headers["Inference-Header-Content-Length"]) + header_shift)
    good = (digits[0][:1].reshape(1, 784) / 255).astype(np.float32)
    results: dict[str, object] = {}

    def good_request() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            results["good"] = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
                {"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": good.ravel().tolist()}]})

    thread = threading.Thread(target=good_request)
    thread.start()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        answer = client.post(f"/v2/models/{MODEL}/infer", content=body, headers=headers)
        v1 = client.post(f"/v1/models/{MODEL}:predict", content=body, headers={"content-type": "application/json"})
    thread.join()
    for response in (answer, v1):
        assert 400 <= response.status_code < 500, (response.status_code, response.text)
        assert response.json()["error"]
    good_answer = results["good"]
    assert isinstance(good_answer, httpx.Response) and good_answer.status_code == 200
    assert good_answer.json()["outputs"][1]["data"] == [int(digits[1][0])]
