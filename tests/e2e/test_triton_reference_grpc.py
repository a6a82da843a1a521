"""The same gRPC calls (``inference.GRPCInferenceService``, through tritonclient.grpc 2.73.0 and its own stubs)
to a real tritonserver 2.51 (PyTriton 0.7.0, tests/e2e/reference_triton.py) serving our checkpoint and to our
server: the same status code for every refusal, the same labels for the same digits.

What Triton 2.51 answers (code, message), and where digitserve answers the same code:

- ServerLive, ServerReady: true. ServerMetadata: "triton" 2.51.0, extensions with binary_tensor_data.
  ModelMetadata: pixels FP32 [-1,784] and our four outputs (ours also lists ``image`` BYTES [-1]).
- unknown model, or version (ModelInfer and ModelMetadata): NOT_FOUND "Request for unknown model: 'nope' is
  not found", "Request for unknown model: 'mnist-fnn' version 77 is not found".
- ModelReady of a model or version it does not serve: OK, ready false. digitserve answered NOT_FOUND (or
  FAILED_PRECONDITION for a version in its store but not loaded) until this test: a readiness poll gets an
  answer, not an error, and tritonclient's ``is_model_ready`` returns False instead of raising; fixed.
- a version that is not a number ("x", "-1"; ModelInfer, ModelReady, ModelMetadata): INVALID_ARGUMENT "failed
  to get model version from specified version string 'x' (details: stol), version should be an integral value
  > 0", "invalid model version specified '-1' , version should be an integral value > 0". digitserve answered
  NOT_FOUND, as for REST's path (a path that names nothing), with a message about "the path"; a message's field
  is an argument, so now INVALID_ARGUMENT "the model version must be a version number ...".
- wrong datatype (FP64): INVALID_ARGUMENT "[request id: <id_unknown>] inference input 'pixels' data-type is
  'FP64', but model 'mnist-fnn' expects 'FP32'"; datatype "FLOAT": "... data-type is '<invalid>' ...".
- wrong shape ([2,783]): INVALID_ARGUMENT "[request id: <id_unknown>] unexpected shape for input 'pixels' for
  model 'mnist-fnn'. Expected [-1,784], got [2,783]. "
- no input: INVALID_ARGUMENT "[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model
  'mnist-fnn'. Got input(s) [], but missing required input(s) ['pixels']. Please provide all required input(s)."
- unknown input: INVALID_ARGUMENT "unexpected inference input 'letters' for model 'mnist-fnn'"; the same
  input twice: "[request id: <id_unknown>] input 'pixels' already exists in request"; unknown output:
  "unexpected inference output 'nope' for model 'mnist-fnn'".
- raw contents of the wrong size: INVALID_ARGUMENT "[request id: <id_unknown>] input byte size mismatch for
  input 'pixels' for model 'mnist-fnn'. Expected 6272, got 6268" (typed contents one element short: the same);
  a negative dimension: the same message ("Expected -6272, got 6272"); typed contents and raw contents
  together: "contents field must not be specified when using raw_input_contents for 'pixels' for model
  'mnist-fnn'"; typed contents in another type's field (``int_contents``): "unexpected explicit tensor data
  for input tensor 'pixels' for model 'mnist-fnn' of type 'INT32', expected datatype 'FP32'"; no contents:
  "unable to find data for input tensor 'pixels' for model 'mnist-fnn' in request."
- a deadline that expires (0.5 ms on 64 digits): DEADLINE_EXCEEDED "Deadline Exceeded".

Where digitserve answers another code on purpose (``DIFFERENT`` checks both sides):

- UINT8 pixels, and FP32 [N,28,28]: Triton INVALID_ARGUMENT ("data-type is 'UINT8', but model 'mnist-fnn'
  expects 'FP32'", "Expected [-1,784], got [2,28,28]"): its model config holds one datatype and one shape per
  input. Ours takes both (docs/protocols.md) and answers the labels Triton gives the same digits as FP32.
- FP32 values past 1, NaN: Triton computes them (OK). Ours: INVALID_ARGUMENT: 0..3 is 0..255 sent as FP32, and
  NaN is no pixel; a wrong answer said with confidence is worse than a refusal.
- 65 digits in one call: Triton has no such limit (OK); ours RESOURCE_EXHAUSTED past ``--max-instances``.
- more ``raw_input_contents`` than inputs: Triton ignores the extra ones (OK); ours INVALID_ARGUMENT: bytes
  that feed no input are a client's bug.
- a version in our store but not loaded: Triton knows only the version it serves (NOT_FOUND); ours
  FAILED_PRECONDITION, whose message says to load it with the admin API.
- version "0": Triton NOT_FOUND (it reads an integer, and serves no version 0); version " 2" (a space, then
  2): Triton OK (``stol`` skips the space). Ours INVALID_ARGUMENT for both: versions are 1 to 9 ASCII digits,
  from 1, in a path or a query as in a message.

Not compared: BYTES pictures (``image``; Triton: INVALID_ARGUMENT "unexpected inference input 'image' for
model 'mnist-fnn'"): decoding pictures is digitserve's own, and the reference leaves it out; the API key
(the reference has none; tests/e2e/test_grpc.py); a [0,784] tensor (PyTriton's stub fails: INTERNAL
"memoryview: cannot cast view with zeros in shape or strides"); ModelStatistics and the other extensions
(PyTriton restricts them: UNAVAILABLE "This protocol is restricted, expecting header
'triton-grpc-protocol-triton-access-token'"; ours does not declare them: UNIMPLEMENTED). A call with two
faults (an unknown version and a bad tensor) may be refused for either: Triton checks the version first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tests.conftest import SERVED
from tests.e2e.grpc_calls import code_of, grpc_server, pixels
from tests.e2e.reference_triton import triton_reference

pytestmark = pytest.mark.slow

MODEL = "mnist-fnn"
DIGITS = 200
CHUNK = 50  # digits a call: under our --max-instances (64)
NOT_LOADED = "1"  # in the committed store, not served (the highest version, SERVED, is)


@pytest.fixture(scope="module")
def addresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``host:port`` of each server's gRPC API: "triton" and "ours", serving the same checkpoint."""
    with triton_reference() as triton, grpc_server(tmp_path_factory.mktemp("grpc-reference")) as (_, ours):
        yield {"triton": triton.grpc, "ours": ours}


@pytest.fixture(scope="module")
def clients(addresses: dict[str, str]) -> Iterator[dict[str, tg.InferenceServerClient]]:
    clients = {name: tg.InferenceServerClient(address) for name, address in addresses.items()}
    yield clients
    for client in clients.values():
        client.close()


@pytest.fixture(scope="module")
def stubs(addresses: dict[str, str]) -> Iterator[dict[str, service_pb2_grpc.GRPCInferenceServiceStub]]:
    """Triton's own generated stubs, for messages tritonclient would not build."""
    channels = {name: grpc.insecure_channel(address) for name, address in addresses.items()}
    yield {name: service_pb2_grpc.GRPCInferenceServiceStub(channel) for name, channel in channels.items()}
    for channel in channels.values():
        channel.close()


@pytest.fixture(scope="module")
def digits(mnist_test) -> tuple[np.ndarray, np.ndarray]:
    """The first 200 MNIST test digits, uint8 [N,28,28], and their labels."""
    images, labels = mnist_test
    return images[:DIGITS].numpy(), labels[:DIGITS].numpy()


def fp32(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), 784) / 255).astype(np.float32)


def test_health_and_metadata(clients):
    triton, ours = clients["triton"], clients["ours"]
    for client in (triton, ours):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, SERVED)
        assert "binary_tensor_data" in client.get_server_metadata(as_json=True)["extensions"]
    assert triton.get_server_metadata().name == "triton" and ours.get_server_metadata().name == "digitserve"
    theirs, mine = (client.get_model_metadata(MODEL, as_json=True) for client in (triton, ours))
    assert theirs["versions"] == mine["versions"] == [SERVED]
    assert mine["outputs"] == theirs["outputs"]
    assert mine["inputs"] == [*theirs["inputs"], {"name": "image", "datatype": "BYTES", "shape": ["-1"]}]


def test_not_served_is_not_ready_on_both(clients):
    for client in clients.values():
        assert client.is_model_ready("nope") is False
        assert client.is_model_ready(MODEL, "77") is False
        assert code_of(client.is_model_ready, MODEL, "x") == "INVALID_ARGUMENT"


def test_fp32_raw_contents_give_the_same_labels_on_200_digits(clients, digits):
    images, truth = digits
    answers: dict[str, list[tg.InferResult]] = {}
    for name, client in clients.items():
        answers[name] = [client.infer(MODEL, [pixels(fp32(images[start:start + CHUNK]))])
                         for start in range(0, DIGITS, CHUNK)]
        assert {answer.get_response().model_version for answer in answers[name]} == {SERVED}
    labels, probabilities = ({name: np.concatenate([a.as_numpy(output) for a in answers[name]]) for name in answers}
                             for output in ("label", "probabilities"))
    np.testing.assert_array_equal(labels["ours"], labels["triton"])
    np.testing.assert_allclose(probabilities["ours"], probabilities["triton"], atol=1e-5)
    assert (labels["ours"] == truth).mean() > 0.95


def test_typed_contents_and_a_pinned_version_give_the_same_labels(stubs, digits):
    images = digits[0][:8]
    labels = {}
    for name, stub in stubs.items():
        request = service_pb2.ModelInferRequest(model_name=MODEL, model_version=SERVED)
        tensor = request.inputs.add(name="pixels", datatype="FP32", shape=[len(images), 784])
        tensor.contents.fp32_contents.extend(fp32(images).reshape(-1).tolist())
        request.outputs.add(name="label")
        answer = stub.ModelInfer(request, timeout=30)
        assert answer.model_version == SERVED and [o.name for o in answer.outputs] == ["label"]
        labels[name] = np.frombuffer(answer.raw_output_contents[0], np.int64).tolist()
    assert labels["ours"] == labels["triton"] == digits[1][:8].tolist()


def by_hand(stub: Any, data: np.ndarray, change: Callable[[Any, Any], object]) -> object:
    """ModelInfer of ``data`` as FP32 ``pixels``, a message built with Triton's own protobuf classes and then
    changed by ``change(request, tensor)`` (which gives the tensor its contents)."""
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="pixels", datatype="FP32", shape=list(data.shape))
    change(request, tensor)
    return stub.ModelInfer(request, timeout=30)


def raw(data: np.ndarray, cut: int = 0) -> Callable[[Any, Any], object]:
    return lambda request, tensor: request.raw_input_contents.append(data.tobytes()[:len(data.tobytes()) - cut])


def typed(data: np.ndarray, field: str = "fp32_contents") -> Callable[[Any, Any], object]:
    return lambda request, tensor: getattr(tensor.contents, field).extend(data.reshape(-1).tolist())


def both(*changes: Callable[[Any, Any], object]) -> Callable[[Any, Any], object]:
    return lambda request, tensor: [change(request, tensor) for change in changes]


def datatype(name: str, then: Callable[[Any, Any], object]) -> Callable[[Any, Any], object]:
    return both(lambda request, tensor: setattr(tensor, "datatype", name), then)


def shape(dims: list[int], then: Callable[[Any, Any], object]) -> Callable[[Any, Any], object]:
    return both(lambda request, tensor: (tensor.ClearField("shape"), tensor.shape.extend(dims)), then)


Call = Callable[[tg.InferenceServerClient, Any, np.ndarray], object]  # (client, stub, 2 digits as FP32)
SAME: dict[str, tuple[Call, str]] = {
    "unknown model": (lambda c, s, d: c.infer("nope", [pixels(d)]), "NOT_FOUND"),
    "unknown version": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version="77"), "NOT_FOUND"),
    "metadata, unknown model": (lambda c, s, d: c.get_model_metadata("nope"), "NOT_FOUND"),
    "metadata, unknown version": (lambda c, s, d: c.get_model_metadata(MODEL, "77"), "NOT_FOUND"),
    "version not a number": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version="x"), "INVALID_ARGUMENT"),
    "negative version": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version="-1"), "INVALID_ARGUMENT"),
    "metadata, version not a number": (lambda c, s, d: c.get_model_metadata(MODEL, "x"), "INVALID_ARGUMENT"),
    "wrong datatype": (lambda c, s, d: c.infer(MODEL, [pixels(d.astype(np.float64), "FP64")]), "INVALID_ARGUMENT"),
    "not a datatype": (lambda c, s, d: by_hand(s, d, datatype("FLOAT", raw(d))), "INVALID_ARGUMENT"),
    "wrong shape": (lambda c, s, d: c.infer(MODEL, [pixels(d[:, :783].copy())]), "INVALID_ARGUMENT"),
    "negative dimension": (lambda c, s, d: by_hand(s, d, shape([-2, 784], raw(d))), "INVALID_ARGUMENT"),
    "missing input": (lambda c, s, d: c.infer(MODEL, []), "INVALID_ARGUMENT"),
    "unknown input": (lambda c, s, d: c.infer(MODEL, [pixels(d, name="letters")]), "INVALID_ARGUMENT"),
    "an input twice": (lambda c, s, d: c.infer(MODEL, [pixels(d), pixels(d)]), "INVALID_ARGUMENT"),
    "unknown output": (lambda c, s, d: c.infer(MODEL, [pixels(d)], outputs=[tg.InferRequestedOutput("nope")]),
                       "INVALID_ARGUMENT"),
    "raw contents 4 bytes short": (lambda c, s, d: by_hand(s, d, raw(d, cut=4)), "INVALID_ARGUMENT"),
    "typed contents 1 element short": (lambda c, s, d: by_hand(s, d, typed(d.reshape(-1)[:-1])), "INVALID_ARGUMENT"),
    "typed contents in INT32's field": (lambda c, s, d: by_hand(s, d, typed(np.ones(d.shape, int), "int_contents")),
                                        "INVALID_ARGUMENT"),
    "typed and raw contents": (lambda c, s, d: by_hand(s, d, both(typed(d), raw(d))), "INVALID_ARGUMENT"),
    "no contents": (lambda c, s, d: by_hand(s, d, lambda request, tensor: None), "INVALID_ARGUMENT"),
    "a deadline that expires": (lambda c, s, d: c.infer(MODEL, [pixels(np.repeat(d, 32, axis=0))],
                                                       client_timeout=0.0005), "DEADLINE_EXCEEDED"),
}


def codes(call: Call, clients: dict[str, tg.InferenceServerClient], stubs: dict[str, Any],
          data: np.ndarray) -> dict[str, str]:
    """Each server's code for the same call."""
    return {name: code_of(call, clients[name], stubs[name], data) for name in clients}


@pytest.mark.parametrize("case", SAME)
def test_every_refusal_has_tritons_code(clients, stubs, digits, case):
    call, expected = SAME[case]
    data = fp32(digits[0][:2])
    assert codes(call, clients, stubs, data) == {"triton": expected, "ours": expected}, case
    for client in clients.values():  # a refusal leaves each serving
        assert client.infer(MODEL, [pixels(data)], client_timeout=30).as_numpy("label").tolist() == \
            digits[1][:2].tolist()


DIFFERENT: dict[str, tuple[Call, str, str]] = {  # case: (call, Triton's code, ours); the docstring says why
    "UINT8 pixels": (lambda c, s, d: c.infer(MODEL, [pixels((d * 255).round().astype(np.uint8), "UINT8")]),
                     "INVALID_ARGUMENT", "OK"),
    "FP32 [N,28,28]": (lambda c, s, d: c.infer(MODEL, [pixels(d.reshape(-1, 28, 28))]), "INVALID_ARGUMENT", "OK"),
    "values past 1": (lambda c, s, d: c.infer(MODEL, [pixels(d * 3)]), "OK", "INVALID_ARGUMENT"),
    "NaN": (lambda c, s, d: c.infer(MODEL, [pixels(np.full_like(d, np.nan))]), "OK", "INVALID_ARGUMENT"),
    "65 digits": (lambda c, s, d: c.infer(MODEL, [pixels(np.resize(d, (65, 784)))]), "OK", "RESOURCE_EXHAUSTED"),
    "more raw contents than inputs": (lambda c, s, d: by_hand(s, d, both(raw(d), raw(d))), "OK", "INVALID_ARGUMENT"),
    "a version in the store, not loaded": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version=NOT_LOADED),
                                           "NOT_FOUND", "FAILED_PRECONDITION"),
    "version 0": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version="0"), "NOT_FOUND", "INVALID_ARGUMENT"),
    "version ' 2'": (lambda c, s, d: c.infer(MODEL, [pixels(d)], model_version=f" {SERVED}"), "OK",
                     "INVALID_ARGUMENT"),
}


@pytest.mark.parametrize("case", DIFFERENT)
def test_where_we_differ_on_purpose(clients, stubs, digits, case):
    assert NOT_LOADED != SERVED
    call, triton, ours = DIFFERENT[case]
    assert codes(call, clients, stubs, fp32(digits[0][:2])) == {"triton": triton, "ours": ours}, case


def test_uint8_and_28x28_answer_what_triton_answers_for_fp32(clients, digits):
    images = digits[0][:CHUNK]
    theirs = clients["triton"].infer(MODEL, [pixels(fp32(images))])
    for tensor in (pixels(images, "UINT8"), pixels(fp32(images).reshape(-1, 28, 28))):
        mine = clients["ours"].infer(MODEL, [tensor])
        np.testing.assert_array_equal(mine.as_numpy("label"), theirs.as_numpy("label"))
        np.testing.assert_allclose(mine.as_numpy("probabilities"), theirs.as_numpy("probabilities"), atol=1e-5)
