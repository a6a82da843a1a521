"""The V2 codec (service/http/v2.py) against tritonclient's own bytes, both ways, and against bad and random input.

Requests are built by tritonclient (InferInput, InferRequestedOutput and the body builder its client uses for
every infer call); answers are read back by tritonclient's InferResult. So these tests check the codec
against the client that must work, not against our reading of the spec.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.http.v2 import (
    EXTENSIONS,
    OUTPUTS,
    InferRequest,
    V2Error,
    encode_infer,
    model_metadata,
    parse_infer,
    server_metadata,
)
from service.work import ROW


@dataclass(frozen=True)
class Limits:
    max_instances: int = 64
    max_payload_bytes: int = 8 * 1024 * 1024


LIMITS = Limits()
RNG = np.random.default_rng(20)


def tensor(name: str, data: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    return httpclient.InferInput(name, list(data.shape), datatype).set_data_from_numpy(data, binary_data=binary)


def tritonclient_body(inputs: list[httpclient.InferInput], **kwargs: Any) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length exactly as tritonclient's infer() would send them."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, **kwargs)
    return body, None if json_size is None else str(json_size)


def parse(body: bytes, header: str | None = None, limits: Limits = LIMITS) -> InferRequest:
    return parse_infer(body, header, limits)


def json_body(request: dict[str, Any]) -> bytes:
    return orjson.dumps(request)


def pixels_json(shape: Any, data: Any, datatype: str = "FP32", **extra: Any) -> bytes:
    return json_body({"inputs": [{"name": "pixels", "shape": shape, "datatype": datatype, "data": data}], **extra})


def binary_request(entries: list[dict[str, Any]], blobs: bytes, **extra: Any) -> tuple[bytes, str]:
    header = json_body({"inputs": entries, **extra})
    return header + blobs, str(len(header))


def read_back(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    length = headers.get("Inference-Header-Content-Length")
    return httpclient.InferResult.from_response_body(body, header_length=None if length is None else int(length))


def softmax(n: int) -> np.ndarray:
    logits = RNG.normal(size=(n, 10)).astype(np.float32)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def rows(probs: np.ndarray, typicality: np.ndarray | None = None) -> np.ndarray:
    """A worker's rows: the probabilities, then the typicality (NaN: a version without calibration)."""
    column = np.full(len(probs), np.nan, np.float32) if typicality is None else typicality.astype(np.float32)
    return np.column_stack([probs, column]).astype(np.float32)


# ------------------------------------------------------------------------------ requests tritonclient builds


@pytest.mark.parametrize("shape", [(3, 784), (3, 28, 28), (3, 1, 28, 28)])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_pixels_from_tritonclient(shape: tuple[int, ...], binary: bool) -> None:
    data = RNG.random(shape, dtype=np.float32)
    data.flat[0], data.flat[1] = 0.0, 1.0  # both ends of the range are allowed
    body, header = tritonclient_body([tensor("pixels", data, "FP32", binary)])
    assert (header is not None) == binary
    request = parse(body, header)
    assert request.count == 3 and request.images is None and request.pixels is not None
    assert request.pixels.dtype == np.float32 and request.pixels.shape == (3, 28, 28)
    np.testing.assert_array_equal(request.pixels, data.reshape(3, 28, 28))
    # no outputs listed: tritonclient asks for all of them in binary (binary_data_output)
    assert request.outputs == list(OUTPUTS) and request.binary == dict.fromkeys(OUTPUTS, True)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_pixels_scaled_as_predict_does(binary: bool) -> None:
    data = RNG.integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8)
    data.flat[:2] = [0, 255]
    request = parse(*tritonclient_body([tensor("pixels", data, "UINT8", binary)]))
    assert request.pixels is not None
    # /predict's validate_pixels: float64 division by 255, then float32
    np.testing.assert_array_equal(request.pixels, (data.reshape(2, 28, 28) / 255.0).astype(np.float32))


def test_images_binary_elements_from_tritonclient() -> None:
    pictures = [b"\x89PNG\r\n\x1a\nfirst", b"", b"ends in zeros\x00\x00", bytes(range(256)) * 3]
    data = np.array(pictures, dtype=np.object_)
    request = parse(*tritonclient_body([tensor("image", data, "BYTES")]))
    assert request.pixels is None and request.count == 4
    assert request.images == pictures


def test_images_json_hold_base64() -> None:
    pictures = [b"\x89PNG\r\n\x1a\n\x00\xff\xfe picture", b"GIF89a another"]
    encoded = np.array([base64.b64encode(p) for p in pictures], dtype=np.object_)
    request = parse(*tritonclient_body([tensor("image", encoded, "BYTES", binary=False)]))
    assert request.images == pictures


def test_selected_outputs_id_and_binary_flags() -> None:
    data = RNG.random((1, 784), dtype=np.float32)
    outputs = [
        httpclient.InferRequestedOutput("confidence", binary_data=False),
        httpclient.InferRequestedOutput("label"),
    ]
    request = parse(*tritonclient_body([tensor("pixels", data, "FP32")], outputs=outputs, request_id="req-7"))
    assert request.id == "req-7"
    assert request.outputs == ["confidence", "label"]
    assert request.binary == {"confidence": False, "label": True}


def test_binary_data_output_is_the_default_and_binary_data_overrides_it() -> None:
    body = pixels_json(
        [1, 784],
        [0.5] * 784,
        parameters={"binary_data_output": True, "priority": 1, "custom": "ignored"},
        outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "confidence"}],
    )
    request = parse(body)
    assert request.id is None
    assert request.binary == {"label": False, "confidence": True}
    assert parse(pixels_json([1, 784], [0.5] * 784)).binary == dict.fromkeys(OUTPUTS, False)


def test_json_data_flat_or_nested_row_major() -> None:
    data = RNG.random((2, 28, 28), dtype=np.float32)
    flat = parse(pixels_json([2, 28, 28], data.reshape(-1).tolist())).pixels
    nested = parse(pixels_json([2, 28, 28], data.tolist())).pixels
    assert flat is not None and nested is not None
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, data)  # float32 -> JSON -> float32 is exact


def test_two_binary_inputs_split_in_order() -> None:
    """Blobs belong to inputs in the order of ``inputs``: the second input's bytes must not leak into the first."""
    pixels = RNG.random((1, 784), dtype=np.float32).tobytes()
    entries = [
        {"name": "pixels", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": len(pixels)}},
        {"name": "image", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}},
    ]
    with pytest.raises(V2Error, match="exactly one of"):
        parse(*binary_request(entries, pixels + struct.pack("<I", 1) + b"x"))


# ---------------------------------------------------------------------------------- answers tritonclient reads


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_answer_read_by_tritonclient(binary: bool) -> None:
    request = InferRequest(id="abc", count=5, binary=dict.fromkeys(OUTPUTS, binary))
    probs, typicality = softmax(5), RNG.random(5).astype(np.float32)
    body, headers = encode_infer(request, "mnist-fnn", "3", rows(probs, typicality))
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    assert ("Inference-Header-Content-Length" in headers) == binary
    result = read_back(body, headers)
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("mnist-fnn", "3", "abc")
    assert [o["name"] for o in response["outputs"]] == list(OUTPUTS)
    assert [o["datatype"] for o in response["outputs"]] == ["FP32", "INT64", "FP32", "FP32"]
    got_probs, labels, confidence, got_typicality = (result.as_numpy(name) for name in OUTPUTS)
    np.testing.assert_array_equal(got_typicality, typicality)
    assert got_probs is not None and labels is not None and confidence is not None
    assert got_probs.dtype == np.float32 and labels.dtype == np.int64 and confidence.dtype == np.float32
    np.testing.assert_array_equal(got_probs, probs)
    np.testing.assert_array_equal(labels, probs.argmax(axis=1))
    np.testing.assert_array_equal(confidence, probs.max(axis=1))
    assert labels.shape == (5,) and confidence.shape == (5,) and got_probs.shape == (5, 10)


def test_answer_mixed_and_selected_outputs() -> None:
    request = InferRequest(
        id=None, count=2, outputs=["confidence", "probabilities"], binary={"confidence": True, "probabilities": False}
    )
    probs = softmax(2)
    body, headers = encode_infer(request, "mnist-fnn", "1", rows(probs))
    result = read_back(body, headers)
    response = result.get_response()
    assert "id" not in response
    assert [o["name"] for o in response["outputs"]] == ["confidence", "probabilities"]
    assert result.as_numpy("label") is None
    np.testing.assert_array_equal(result.as_numpy("confidence"), probs.max(axis=1))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)


def test_roundtrip_tritonclient_request_to_tritonclient_result() -> None:
    data = RNG.random((4, 784), dtype=np.float32)
    outputs = [httpclient.InferRequestedOutput("label"), httpclient.InferRequestedOutput("probabilities", False)]
    request = parse(*tritonclient_body([tensor("pixels", data, "FP32")], outputs=outputs, request_id="r"))
    probs = softmax(request.count)
    result = read_back(*encode_infer(request, "mnist-fnn", "2", rows(probs)))
    np.testing.assert_array_equal(result.as_numpy("label"), probs.argmax(axis=1))
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    assert result.get_response()["id"] == "r"


def test_encode_refuses_rows_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        encode_infer(InferRequest(id=None, count=3), "mnist-fnn", "1", rows(softmax(2)))
    with pytest.raises(ValueError, match="shape"):  # the old layout: probabilities only
        encode_infer(InferRequest(id=None, count=3), "mnist-fnn", "1", softmax(3))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_no_digit_instances_answer_label_minus_one_and_zeros(binary: bool) -> None:
    request = InferRequest(id=None, count=3, binary=dict.fromkeys(OUTPUTS, binary))
    probs = softmax(2)
    table = np.zeros((3, ROW), np.float32)
    table[[0, 2]] = rows(probs, np.array([0.5, 0.004]))
    no_digit = np.array([False, True, False])
    result = read_back(*encode_infer(request, "mnist-fnn", "1", table, no_digit))
    assert result.as_numpy("label").tolist() == [int(probs[0].argmax()), -1, int(probs[1].argmax())]
    np.testing.assert_array_equal(result.as_numpy("probabilities")[1], np.zeros(10, np.float32))
    assert result.as_numpy("confidence")[1] == 0 and result.as_numpy("typicality")[1] == 0
    np.testing.assert_allclose(result.as_numpy("typicality")[[0, 2]], [0.5, 0.004])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_typicality_of_a_version_without_calibration(binary: bool) -> None:
    """NaN typicality (no calibration): left out when no output was named; named, it is NaN (JSON null)."""
    probs = softmax(2)
    plain = read_back(*encode_infer(InferRequest(id=None, count=2, binary=dict.fromkeys(OUTPUTS, binary)),
                                    "mnist-fnn", "1", rows(probs)))
    assert [o["name"] for o in plain.get_response()["outputs"]] == ["probabilities", "label", "confidence"]
    asked = InferRequest(id=None, count=2, outputs=["typicality"], binary={"typicality": binary}, chosen=True)
    named = read_back(*encode_infer(asked, "mnist-fnn", "1", rows(probs)))
    assert np.isnan(named.as_numpy("typicality")).all() and named.as_numpy("typicality").shape == (2,)


def test_parse_says_whether_outputs_were_named() -> None:
    assert not parse(pixels_json([1, 784], [0.5] * 784)).chosen
    named = parse(json_body({"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32",
                                         "data": [0.5] * 784}], "outputs": [{"name": "typicality"}]}))
    assert named.chosen and named.outputs == ["typicality"]


def test_metadata() -> None:
    server = server_metadata("0.1.0")
    assert server["name"] == "digitserve" and server["version"] == "0.1.0"
    extensions = server["extensions"]
    assert isinstance(extensions, list) and "binary_tensor_data" in extensions and tuple(extensions) == EXTENSIONS
    assert server_metadata("1", [*EXTENSIONS, "model_repository"])["extensions"] == [
        "binary_tensor_data",
        "model_repository",
    ]
    model = model_metadata("mnist-fnn", ["1", "2"])
    assert set(model) == {"name", "versions", "platform", "inputs", "outputs"}  # the spec's fields, as Triton's
    assert model["versions"] == ["1", "2"]
    assert model["inputs"] == [
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 784]},
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
    ]
    assert model["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
        {"name": "confidence", "datatype": "FP32", "shape": [-1]},
        {"name": "typicality", "datatype": "FP32", "shape": [-1]},
    ]


# ------------------------------------------------------------------------------------------------ bad input


def _client(datatype: str, shape: tuple[int, ...], name: str = "pixels") -> tuple[bytes, str | None]:
    dtype = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "UINT8": np.uint8}[datatype]
    return tritonclient_body([tensor(name, np.zeros(shape, dtype), datatype)])


def _one_pixel_blob(size: Any, blob: bytes, **extra: Any) -> tuple[bytes, str]:
    entry = {"name": "pixels", "shape": [1, 784], "datatype": "FP32", "parameters": {"binary_data_size": size}}
    return binary_request([entry], blob, **extra)


def _image_blob(shape: list[int], blob: bytes) -> tuple[bytes, str]:
    entry = {"name": "image", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": len(blob)}}
    return binary_request([entry], blob)


ZEROS = [0.0] * 784
GOOD_INPUT = {"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": ZEROS}
NAN_BLOB = np.full(784, np.nan, np.float32).tobytes()
INF_BLOB = np.concatenate([np.zeros(783, np.float32), [np.inf]]).astype(np.float32).tobytes()

BAD: dict[str, tuple[tuple[bytes, str | None], int, str]] = {
    # datatype
    "FP64 pixels": (_client("FP64", (2, 784)), 400, "input 'pixels' data-type is 'FP64'"),
    "INT64 pixels": (_client("INT64", (2, 784)), 400, "input 'pixels' data-type is 'INT64'"),
    "FP32 image": (_client("FP32", (2,), "image"), 400, "input 'image' data-type is 'FP32'"),
    "not a V2 datatype": ((pixels_json([1, 784], ZEROS, "FLOAT"), None), 400, "'FLOAT' is not a V2 datatype"),
    "datatype missing": ((json_body({"inputs": [{**GOOD_INPUT, "datatype": None}]}), None), 400, "'datatype'"),
    # shape
    "shape [2,783]": (_client("FP32", (2, 783)), 400, "unexpected shape [2,783]"),
    "shape [2,28]": (_client("FP32", (2, 28)), 400, "unexpected shape [2,28]"),
    "shape [784]": ((pixels_json([784], ZEROS), None), 400, "unexpected shape [784]"),
    "shape [1,3,28,28]": ((pixels_json([1, 3, 28, 28], ZEROS * 3), None), 400, "unexpected shape"),
    "image [N,1]": (
        (json_body({"inputs": [{"name": "image", "shape": [1, 1], "datatype": "BYTES", "data": ["AA=="]}]}), None),
        400,
        "expected [N]",
    ),
    "zero instances": ((pixels_json([0, 784], []), None), 400, "at least 1"),
    "zero-sized dim": ((pixels_json([1, 0], []), None), 400, "unexpected shape [1,0]"),
    "negative dim": ((pixels_json([-1, 784], ZEROS), None), 400, "not a non-negative integer"),
    "float dim": ((pixels_json([1.0, 784], ZEROS), None), 400, "not a non-negative integer"),
    "bool dim": ((pixels_json([True, 784], ZEROS), None), 400, "not a non-negative integer"),
    "dim past int64": ((pixels_json([2**64 - 1, 784], ZEROS), None), 400, "not a non-negative integer"),
    "shape empty": ((pixels_json([], ZEROS), None), 400, "'shape' must be a non-empty list"),
    "shape not a list": ((pixels_json("1x784", ZEROS), None), 400, "'shape' must be a non-empty list"),
    "65 instances": (_client("FP32", (65, 784)), 413, "65 instances in one request; the limit is 64"),
    "huge N": ((pixels_json([2**62, 784], ZEROS), None), 413, "the limit is 64"),
    # JSON data
    "data count": ((pixels_json([1, 784], ZEROS[:-1]), None), 400, "'data' has 783 elements; shape [1,784] needs 784"),
    "data count nested": ((pixels_json([2, 784], [ZEROS]), None), 400, "has 784 elements; shape [2,784] needs 1568"),
    "data ragged": ((pixels_json([1, 784], [ZEROS[:400], ZEROS[:384], [0.0]]), None), 400, "must be a list"),
    "data strings": ((pixels_json([1, 784], ["0.5"] * 784), None), 400, "must be a list (flat or nested) of numbers"),
    "data booleans": ((pixels_json([1, 784], [False] * 784), None), 400, "of numbers 0..1"),
    "data null": ((pixels_json([1, 784], None), None), 400, "must be a list"),
    "data a number": ((pixels_json([1, 784], 0.5), None), 400, "must be a list"),
    "FP32 above 1": ((pixels_json([1, 784], [2.0] * 784), None), 400, "must lie in 0..1, torchvision's ToTensor scale"),
    "FP32 0..255": ((pixels_json([1, 784], [255] * 784), None), 400, "send 0..255 values as UINT8"),
    "FP32 negative": ((pixels_json([1, 784], [-0.5, *ZEROS[1:]]), None), 400, "found -0.5..0"),
    "FP32 overflows": ((pixels_json([1, 784], [1e39, *ZEROS[1:]]), None), 400, "found 0..1e+39"),
    "UINT8 above 255": ((pixels_json([1, 784], [256] + [0] * 783, "UINT8"), None), 400, "0..255"),
    "UINT8 negative": ((pixels_json([1, 784], [-1] + [0] * 783, "UINT8"), None), 400, "0..255"),
    "UINT8 fractions": ((pixels_json([1, 784], [0.5] * 784, "UINT8"), None), 400, "integers 0..255"),
    # binary data
    "NaN": (_one_pixel_blob(3136, NAN_BLOB), 400, "finite numbers (found NaN or infinity)"),
    "infinity": (_one_pixel_blob(3136, INF_BLOB), 400, "finite"),
    "binary size not the shape's": (
        _one_pixel_blob(3132, bytes(3132)),
        400,
        "3132 bytes; shape [1,784] of FP32 needs 3136",
    ),
    "binary body short": (_one_pixel_blob(3136, bytes(100)), 400, "declares 3136 bytes of binary data, 3036 more"),
    "binary bytes unclaimed": (_one_pixel_blob(3136, bytes(3140)), 400, "4 bytes after the binary tensors"),
    "binary size negative": (_one_pixel_blob(-4, b""), 400, "binary_data_size must be a non-negative integer"),
    "binary size float": (_one_pixel_blob(3136.0, bytes(3136)), 400, "binary_data_size must be"),
    "binary size huge": (_one_pixel_blob(2**63, bytes(3136)), 400, "more than the body holds"),
    "binary without header": ((_one_pixel_blob(3136, b"")[0], None), 400, "no Inference-Header-Content-Length"),
    "data and binary": (
        (json_body({"inputs": [{**GOOD_INPUT, "parameters": {"binary_data_size": 0}}]}), None),
        400,
        "has both 'data' and binary_data_size",
    ),
    "header past body": ((pixels_json([1, 784], ZEROS), "999999"), 400, "Inference-Header-Content-Length is 999999"),
    "header not a number": ((pixels_json([1, 784], ZEROS), "12a"), 400, "must be a byte count"),
    "header negative": ((pixels_json([1, 784], ZEROS), "-5"), 400, "must be a byte count"),
    "header unicode digits": ((pixels_json([1, 784], ZEROS), "\u00b2"), 400, "must be a byte count"),
    "header zero (raw binary)": ((bytes(3136), "0"), 400, "raw binary requests"),
    "header mid-JSON": ((pixels_json([1, 784], ZEROS), "10"), 400, "not valid JSON"),
    # BYTES elements
    "element past the end": (
        _image_blob([1], struct.pack("<I", 100) + b"short"),
        400,
        "element 0 says 100 bytes but only 5 remain",
    ),
    "length cut": (
        _image_blob([2], struct.pack("<I", 1) + b"x" + b"\x01\x00"),
        400,
        "ends before element 1's 4-byte length",
    ),
    "elements fewer": (_image_blob([3], struct.pack("<I", 1) + b"x"), 400, "ends before element 1"),
    "elements more": (_image_blob([1], (struct.pack("<I", 1) + b"x") * 2), 400, "5 bytes after the 1 elements"),
    "length 2**32-1": (_image_blob([1], struct.pack("<I", 2**32 - 1)), 400, "says 4294967295 bytes"),
    "JSON image not base64": (
        (json_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]}), None),
        400,
        "element 0 is not valid base64",
    ),
    "JSON image not string": (
        (json_body({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [[1, 2]]}]}), None),
        400,
        "element 0 must be a string",
    ),
    "JSON image count": (
        (json_body({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": ["AA=="]}]}), None),
        400,
        "list of 2 base64 strings",
    ),
    # inputs and outputs
    "unknown input": (_client("FP32", (1, 784), "foo"), 400, "unexpected inference input 'foo'"),
    "duplicate input": (
        (json_body({"inputs": [GOOD_INPUT, GOOD_INPUT]}), None),
        400,
        "input 'pixels' appears more than once",
    ),
    "missing input": ((json_body({"inputs": []}), None), 400, "missing required input"),
    "no inputs key": ((json_body({"id": "x"}), None), 400, "'inputs' must be a list"),
    "inputs not list": ((json_body({"inputs": {}}), None), 400, "'inputs' must be a list"),
    "input not object": ((json_body({"inputs": [1]}), None), 400, "inputs[0] must be an object"),
    "input without name": ((json_body({"inputs": [{"shape": [1, 784]}]}), None), 400, "inputs[0] has no 'name'"),
    "input unknown field": (
        (json_body({"inputs": [{**GOOD_INPUT, "content": 1}]}), None),
        400,
        "unknown field(s) ['content']",
    ),
    "input without data": (
        (json_body({"inputs": [{k: v for k, v in GOOD_INPUT.items() if k != "data"}]}), None),
        400,
        "has no data",
    ),
    "pixels and image": (
        (
            json_body({"inputs": [GOOD_INPUT, {"name": "image", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]}),
            None,
        ),
        400,
        "exactly one of",
    ),
    "unknown output": (
        (pixels_json([1, 784], ZEROS, outputs=[{"name": "logits"}]), None),
        400,
        "unexpected inference output 'logits'",
    ),
    "duplicate output": (
        (pixels_json([1, 784], ZEROS, outputs=[{"name": "label"}] * 2), None),
        400,
        "requested more than once",
    ),
    "outputs not list": ((pixels_json([1, 784], ZEROS, outputs="label"), None), 400, "'outputs' must be a list"),
    "output without name": ((pixels_json([1, 784], ZEROS, outputs=[{}]), None), 400, "outputs[0] must be an object"),
    "output unknown field": (
        (pixels_json([1, 784], ZEROS, outputs=[{"name": "label", "x": 1}]), None),
        400,
        "unknown field(s) ['x']",
    ),
    "classification": (
        (pixels_json([1, 784], ZEROS, outputs=[{"name": "probabilities", "parameters": {"classification": 3}}]), None),
        400,
        "classification",
    ),
    "binary_data not bool": (
        (pixels_json([1, 784], ZEROS, outputs=[{"name": "label", "parameters": {"binary_data": 1}}]), None),
        400,
        "'binary_data' must be a boolean",
    ),
    # request level
    "binary_data_output not bool": (
        (pixels_json([1, 784], ZEROS, parameters={"binary_data_output": "yes"}), None),
        400,
        "'binary_data_output' must be a boolean",
    ),
    "parameter value an object": (
        (pixels_json([1, 784], ZEROS, parameters={"a": {"b": 1}}), None),
        400,
        "parameter 'a' of the request",
    ),
    "parameters not object": ((pixels_json([1, 784], ZEROS, parameters=[1]), None), 400, "'parameters' of the request"),
    "shared memory": (
        (json_body({"inputs": [{**GOOD_INPUT, "parameters": {"shared_memory_region": "r"}}]}), None),
        400,
        "shared memory",
    ),
    "unknown top-level": ((pixels_json([1, 784], ZEROS, input=[]), None), 400, "unknown field(s) ['input']"),
    "id not string": ((pixels_json([1, 784], ZEROS, id=7), None), 400, "'id' must be a string"),
    "not JSON": ((b"{nope", None), 400, "not valid JSON"),
    "JSON array": ((b"[1, 2]", None), 400, "must be a JSON object"),
    "JSON NaN literal": (
        (b'{"inputs": [{"name": "pixels", "shape": [1, 784], "datatype": "FP32", "data": [NaN]}]}', None),
        400,
        "not valid JSON",
    ),
    "empty body": ((b"", None), 400, "request body is empty"),
    "not UTF-8": ((b'{"id": "\xff"}', None), 400, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request(case: str) -> None:
    (body, header), status, words = BAD[case]
    with pytest.raises(V2Error) as raised:
        parse(body, header)
    assert raised.value.status == status, raised.value.message
    assert words in raised.value.message
    assert str(raised.value) == raised.value.message


def test_payload_over_the_limit_is_413() -> None:
    body, header = _client("FP32", (2, 784))
    with pytest.raises(V2Error) as raised:
        parse(body, header, Limits(max_payload_bytes=len(body) - 1))
    assert raised.value.status == 413 and str(len(body)) in raised.value.message
    assert parse(body, header, Limits(max_payload_bytes=len(body))).count == 2


def test_header_length_may_have_surrounding_spaces() -> None:
    body, header = _client("FP32", (1, 784))
    assert header is not None
    assert parse(body, f" {header} ").count == 1


def test_instance_limit_is_inclusive() -> None:
    body, header = _client("FP32", (4, 784))
    assert parse(body, header, Limits(max_instances=4)).count == 4
    with pytest.raises(V2Error, match="4 instances in one request; the limit is 3"):
        parse(body, header, Limits(max_instances=3))


# ---------------------------------------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
headers = st.one_of(st.none(), st.integers(-5, 5000).map(str), st.text(max_size=8))


def _only_v2_errors(body: bytes, header: str | None) -> None:
    try:
        request = parse(body, header)
    except V2Error as e:
        assert 400 <= e.status < 500 and e.message
    else:  # what parses must be what the rest of the service relies on
        assert 1 <= request.count <= LIMITS.max_instances
        if request.pixels is not None:
            assert request.pixels.shape == (request.count, 28, 28) and request.pixels.dtype == np.float32
            assert np.isfinite(request.pixels).all() and 0 <= request.pixels.min() <= request.pixels.max() <= 1
        else:
            assert request.images is not None and len(request.images) == request.count


@FUZZ
@given(body=st.binary(max_size=4096), header=headers)
def test_fuzz_any_bytes(body: bytes, header: str | None) -> None:
    _only_v2_errors(body, header)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
dims = st.lists(
    st.one_of(st.integers(-2, 70), st.sampled_from([784, 28, 1, 2**62, 2**64 - 1, 1.0, 2.0, 28.0, True])), max_size=5
)


@FUZZ
@given(
    name=st.sampled_from(["pixels", "image", "x"]),
    datatype=st.sampled_from(["FP32", "UINT8", "BYTES", "FP64", "INT64", "BOOL", "??"]),
    shape=dims | json_values,
    data=json_values,
    size=st.one_of(st.none(), st.integers(-1, 8000), json_values),
    tail=st.binary(max_size=3200),
    extra=st.dictionaries(st.sampled_from(["id", "parameters", "outputs", "x"]), json_values, max_size=2),
)
def test_fuzz_structured(
    name: str, datatype: str, shape: Any, data: Any, size: Any, tail: bytes, extra: dict[str, Any]
) -> None:
    entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if size is None:
        entry["data"] = data
    else:
        entry["parameters"] = {"binary_data_size": size}
    body, header = binary_request([entry], tail, **extra)
    _only_v2_errors(body, header if size is not None else None)


@FUZZ
@given(
    base=st.floats(width=32),
    spots=st.lists(st.tuples(st.integers(0, 783), st.floats(width=32)), max_size=8),
    datatype=st.sampled_from(["FP32", "UINT8"]),
    binary=st.booleans(),
)
def test_fuzz_pixel_values(base: float, spots: list[tuple[int, float]], datatype: str, binary: bool) -> None:
    """Any float32 values, NaN and infinities included, binary or JSON: refused with 400 or valid pixels."""
    floats = np.full((1, 784), base, dtype=np.float32)
    for position, value in spots:
        floats[0, position] = value
    array: np.ndarray = floats.view(np.uint8)[:, :784].copy() if datatype == "UINT8" else floats
    if binary:
        _only_v2_errors(*tritonclient_body([tensor("pixels", array, datatype)]))
    elif np.isfinite(array).all():  # JSON has no NaN; tritonclient would write one orjson cannot read
        _only_v2_errors(pixels_json([1, 784], array.tolist()[0], datatype), None)


VALID = [
    tritonclient_body([tensor("pixels", RNG.random((2, 784), dtype=np.float32), "FP32")]),
    tritonclient_body([tensor("pixels", RNG.integers(0, 256, (1, 28, 28), dtype=np.uint8), "UINT8")]),
    tritonclient_body([tensor("image", np.array([b"\x89PNG....", b"abc"], dtype=np.object_), "BYTES")]),
]


@FUZZ
@given(
    which=st.integers(0, len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
    header_shift=st.integers(-8, 8),
)
def test_fuzz_mutated_tritonclient_bodies(
    which: int, flips: list[tuple[int, int]], cut: int | None, header_shift: int
) -> None:
    body, header = VALID[which]
    mutated = bytearray(body)
    for position, value in flips:
        mutated[position % len(mutated)] = value
    if cut is not None:
        mutated = mutated[: cut % (len(mutated) + 1)]
    assert header is not None
    _only_v2_errors(bytes(mutated), str(max(int(header) + header_shift, 0)))
