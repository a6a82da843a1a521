"""The Open Inference Protocol over gRPC, checked with the real client (``tritonclient.grpc``) against real
server processes: metadata, raw and typed contents, pictures, versions, every error status, the API
key in metadata, deadlines, the drain, the metrics.

This module must not import ``service.grpc`` (tests/e2e/grpc_calls.py says why).
"""

from __future__ import annotations

import base64
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2, service_pb2_grpc

from harness.server import Server, encode, free_port, metric_samples, spawn
from tests.conftest import SERVED
from tests.e2e.grpc_calls import code_of, grpc_server, pixels

MODEL = "mnist-fnn"
KEY = "grpc-key-1"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    with grpc_server(tmp_path_factory.mktemp("grpc"), "--max-instances", "64",
                     env={"DIGITSERVE_API_KEY": KEY}) as served:
        yield served


@pytest.fixture(scope="module")
def client(server) -> Iterator[tg.InferenceServerClient]:
    client = tg.InferenceServerClient(server[1])
    yield client
    client.close()


AUTH = {"x-api-key": KEY}


def rest_labels(server: Server, images: np.ndarray) -> tuple[list[int], np.ndarray]:
    """/predict's answers for 28x28 uint8 images sent as pixels, 64 per request."""
    labels, probabilities = [], []
    with server.client(headers={"X-API-Key": KEY}) as http:
        for start in range(0, len(images), 64):
            chunk = images[start:start + 64]
            answer = http.post("/predict", json={"instances": [{"pixels": image.tolist()} for image in chunk]})
            assert answer.status_code == 200, answer.text
            for prediction in answer.json()["predictions"]:
                labels.append(prediction["label"])
                probabilities.append(prediction["probabilities"])
    return labels, np.asarray(probabilities, np.float32)


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, SERVED)
    server = client.get_server_metadata(as_json=True)
    assert server["name"] == "digitserve" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata(MODEL, as_json=True)
    assert model["name"] == MODEL and SERVED in model["versions"]
    assert {t["name"]: t["datatype"] for t in model["inputs"]} == {"pixels": "FP32", "image": "BYTES"}
    assert [t["name"] for t in model["outputs"]] == ["probabilities", "label", "confidence", "typicality"]
    assert code_of(lambda: client.get_model_metadata("other-model")) == "NOT_FOUND"
    # not served here: not ready, an answer rather than an error (as Triton)
    assert client.is_model_ready("other-model") is False and client.is_model_ready(MODEL, "77") is False
    assert code_of(client.is_model_ready, MODEL, "x") == "INVALID_ARGUMENT"


@pytest.mark.parametrize("datatype", ["FP32", "UINT8"])
def test_raw_pixels_answer_as_predict_does_on_1000_digits(server, client, digits, datatype):
    images, labels = digits
    expected_labels, expected_probabilities = rest_labels(server[0], images)
    got_labels, got_probabilities = [], []
    for start in range(0, len(images), 64):
        chunk = images[start:start + 64]
        data = (chunk / 255).astype(np.float32).reshape(-1, 784) if datatype == "FP32" else chunk.astype(np.uint8)
        result = client.infer(MODEL, [pixels(data, datatype)], headers=AUTH)
        assert result.get_response().model_version == SERVED
        got_labels += result.as_numpy("label").tolist()
        got_probabilities.append(result.as_numpy("probabilities"))
    assert got_labels == expected_labels
    np.testing.assert_allclose(np.concatenate(got_probabilities), expected_probabilities, atol=1e-6)
    assert (np.asarray(got_labels) == labels).mean() > 0.98


def test_pictures_as_bytes_and_a_blank_one_answers_no_digit(server, client, digits):
    images = digits[0][:16]
    pictures = [encode(image) for image in images] + [encode(np.zeros((40, 40), np.uint8))]
    tensor = tg.InferInput("image", [len(pictures)], "BYTES")
    tensor.set_data_from_numpy(np.array(pictures, dtype=object))
    result = client.infer(MODEL, [tensor], headers=AUTH)
    with server[0].client(headers={"X-API-Key": KEY}) as http:
        rest = http.post("/predict", json={"instances": [{"image_b64": base64.b64encode(p).decode()}
                                                         for p in pictures]}).json()["predictions"]
    assert result.as_numpy("label").tolist() == [p["label"] if p["label"] is not None else -1 for p in rest]
    assert result.as_numpy("label")[-1] == -1 and result.as_numpy("typicality")[-1] == 0
    typicality = result.as_numpy("typicality")[:-1]
    np.testing.assert_allclose(typicality, [p["typicality"] for p in rest[:-1]], atol=1e-6)


def test_typed_contents_and_requested_outputs(server, digits):
    """What other clients send: ``contents`` rather than raw bytes, and only the outputs they name."""
    images, labels = digits[0][:8], digits[1][:8]
    with grpc.insecure_channel(server[1]) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed-1")
        tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[8, 28, 28])
        tensor.contents.uint_contents.extend(images.reshape(-1).tolist())
        request.outputs.add(name="label")
        answer = stub.ModelInfer(request, metadata=(("authorization", f"Bearer {KEY}"),))
        assert answer.id == "typed-1" and [o.name for o in answer.outputs] == ["label"]
        assert np.frombuffer(answer.raw_output_contents[0], np.int64).tolist() == labels.tolist()
        request = service_pb2.ModelInferRequest(model_name=MODEL)
        tensor = request.inputs.add(name="image", datatype="BYTES", shape=[2])
        tensor.contents.bytes_contents.extend([encode(image) for image in images[:2]])
        answer = stub.ModelInfer(request, metadata=(("x-api-key", KEY),))
        label = [o.name for o in answer.outputs].index("label")
        assert np.frombuffer(answer.raw_output_contents[label], np.int64).tolist() == labels[:2].tolist()


def test_a_pinned_version_computes_the_answer(client, digits):
    data = (digits[0][:2] / 255).astype(np.float32).reshape(-1, 784)
    result = client.infer(MODEL, [pixels(data, "FP32")], model_version=SERVED, headers=AUTH)
    assert result.get_response().model_version == SERVED
    assert code_of(lambda: client.infer(MODEL, [pixels(data, "FP32")], model_version="77",
                                        headers=AUTH)) == "NOT_FOUND"
    assert code_of(lambda: client.infer(MODEL, [pixels(data, "FP32")], model_version="²",
                                        headers=AUTH)) == "INVALID_ARGUMENT"


def test_every_error_has_its_status(client, digits):
    data = (digits[0][:2] / 255).astype(np.float32).reshape(-1, 784)
    good = pixels(data, "FP32")
    assert code_of(lambda: client.infer(MODEL, [good])) == "UNAUTHENTICATED"
    assert code_of(lambda: client.infer(MODEL, [good], headers={"x-api-key": "wrong"})) == \
        "UNAUTHENTICATED"
    assert code_of(lambda: client.infer(MODEL, [good], headers={"authorization": KEY})) == \
        "UNAUTHENTICATED"  # a key only as "Bearer <key>"
    assert code_of(lambda: client.infer("other", [good], headers=AUTH)) == "NOT_FOUND"
    wrong_type = tg.InferInput("pixels", [2, 784], "FP64")
    wrong_type.set_data_from_numpy(data.astype(np.float64))
    assert code_of(lambda: client.infer(MODEL, [wrong_type], headers=AUTH)) == "INVALID_ARGUMENT"
    out_of_range = pixels(data * 3, "FP32")
    assert code_of(lambda: client.infer(MODEL, [out_of_range], headers=AUTH)) == "INVALID_ARGUMENT"
    unknown = tg.InferInput("letters", [2, 784], "FP32")
    unknown.set_data_from_numpy(data)
    assert code_of(lambda: client.infer(MODEL, [unknown], headers=AUTH)) == "INVALID_ARGUMENT"
    broken = tg.InferInput("image", [1], "BYTES")
    broken.set_data_from_numpy(np.array([b"\x89PNG\r\n\x1a\nnot really"], dtype=object))
    assert code_of(lambda: client.infer(MODEL, [broken], headers=AUTH)) == "INVALID_ARGUMENT"
    too_many = pixels(np.zeros((65, 784), np.float32), "FP32")
    assert code_of(lambda: client.infer(MODEL, [too_many], headers=AUTH)) == "RESOURCE_EXHAUSTED"
    huge = pixels(np.zeros((64, 784 * 50), np.float32).reshape(-1, 784), "FP32")  # 10 MB: past the payload limit
    assert code_of(lambda: client.infer(MODEL, [huge], headers=AUTH)) == "RESOURCE_EXHAUSTED"


def test_the_clients_deadline_is_the_requests(client, digits):
    data = (digits[0][:64] / 255).astype(np.float32).reshape(-1, 784)
    assert code_of(lambda: client.infer(MODEL, [pixels(data, "FP32")], headers=AUTH,
                                        client_timeout=0.0005)) == "DEADLINE_EXCEEDED"
    result = client.infer(MODEL, [pixels(data, "FP32")], headers=AUTH, client_timeout=30)
    assert result.as_numpy("label").shape == (64,)


def test_calls_are_counted_under_grpc_infer(server, client, digits):
    data = (digits[0][:1] / 255).astype(np.float32).reshape(-1, 784)
    client.infer(MODEL, [pixels(data, "FP32")], headers=AUTH)
    code_of(lambda: client.infer(MODEL, [pixels(data, "FP32")]))
    time.sleep(0.3)  # the API server books its answers at the end of an event-loop iteration
    text = httpx.get(f"{server[0].url}/metrics", timeout=10).text
    by_status = {dict(labels)["status"]: value
                 for labels, value in metric_samples(text, "digitserve_requests_total").items()
                 if dict(labels)["endpoint"] == "grpc_infer"}
    assert by_status.get("200", 0) >= 1 and by_status.get("401", 0) >= 1, by_status
    lines = [line for line in server[0].output().splitlines() if '"endpoint":"grpc_infer"' in line.replace(" ", "")]
    assert lines, "no access log line for a gRPC call"


def test_a_drain_answers_every_admitted_call(tmp_path, digits):
    """SIGTERM with calls in flight: each call is answered (OK), or refused as UNAVAILABLE once the
    service drains; none is cut off with another status."""
    port = free_port()
    server = spawn(tmp_path, "--grpc-port", str(port), "--drain-delay-s", "0")
    server.wait_ready()
    data = (digits[0][:64] / 255).astype(np.float32).reshape(-1, 784)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def caller() -> None:
        client = tg.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            while not stop.is_set():
                code = code_of(lambda: client.infer(MODEL, [pixels(data, "FP32")], client_timeout=30))
                outcomes[code] += 1
                if code == "UNAVAILABLE":
                    return
        finally:
            client.close()

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(60)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert server.process.returncode == 0, server.output()[-2000:]
    assert outcomes["OK"] >= 6, outcomes
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    server.stop()
