"""The Triton reference itself: a real tritonserver 2.51 (PyTriton 0.7.0) serving our checkpoint, through tritonclient.

What Triton 2.51 answers for the bad requests that digitserve's V2 API must answer in the same status class
(recorded here, through tritonclient 2.73.0 and raw HTTP; the tests below assert the status and the gist):

- unknown model (POST /v2/models/nope/infer): 404
  "Request for unknown model: 'nope' is not found"
  (unknown version, /v2/models/mnist-fnn/versions/7/infer: 404
  "Request for unknown model: 'mnist-fnn' version 7 is not found")
- wrong datatype (pixels FP64 [2,784]; UINT8 the same): 400
  "[request id: <id_unknown>] inference input 'pixels' data-type is 'FP64', but model 'mnist-fnn' expects 'FP32'"
- wrong shape (pixels FP32 [2,783]; [2,28,28] the same): 400
  "[request id: <id_unknown>] unexpected shape for input 'pixels' for model 'mnist-fnn'. Expected [-1,784],
  got [2,783]. "
- missing input ("inputs": []): 400
  "[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model 'mnist-fnn'. Got input(s) [], but
  missing required input(s) ['pixels']. Please provide all required input(s)."

So all four are 4xx: 404 for a model or version that does not exist, 400 for the three bad inputs (Triton
uses no 413 or 422 on /infer). Also seen, for the V2 codec's other cases (raw HTTP):
- unknown input name alone: 400 "unexpected inference input 'foo' for model 'mnist-fnn'"; unknown output: 400
  "unexpected inference output 'nope' ..."; duplicate input: 400 "input 'pixels' already exists in request";
  datatype "FLOAT": 400 "invalid datatype for input pixels".
- binary_data_size not the shape's byte size: 400 "input byte size mismatch for input 'pixels' ... Expected
  3136, got 3132"; binary body shorter than declared: 400 "unexpected size for input 'pixels', expecting 3036
  additional bytes"; Inference-Header-Content-Length past the body: 400 "inference header size should be in
  range (0, 3249), got: 1000113".
- Triton answers 500 (the spec says "typically 400"; digitserve answers 400 and follows the spec) for
  unparseable JSON ("failed to parse the request JSON buffer"), a data count not matching the shape ("Unable
  to parse 'data': Shape does not match true shape of 'data' field"), a string in FP32 data, a negative
  dimension ("Unable to parse 'shape'"), "inputs" not an array, binary_data_output not a boolean.
- Triton accepts NaN in FP32 JSON data (answers NaN probabilities) and ignores unknown top-level keys;
  digitserve rejects both with 400 (NaN is not a pixel; an unknown key is a typo that would otherwise be silent).
- Not Triton's own behaviour but PyTriton's: a [0,784] tensor, a shape of 2**62 rows or a raw binary request
  (Inference-Header-Content-Length: 0) make PyTriton's Python stub fail (500, and "Stub process is not
  healthy" afterwards), so the reference is not asked those.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from service.http.v2 import V2Error, parse_infer
from tests.e2e.reference_triton import ROOT, triton_reference

pytestmark = pytest.mark.slow

MODEL = "mnist-fnn"
STORE = ROOT / "model_store"
DIGITS = 100


@dataclass(frozen=True)
class CodecLimits:
    max_instances: int = 64
    max_payload_bytes: int = 8 * 1024 * 1024


def _data_dir() -> Path:
    return Path(os.environ.get("DIGITSERVE_DATA_DIR") or "/work/shared/datasets")


def _version() -> int:
    return max(int(p.name) for p in (STORE / MODEL).iterdir() if p.name.isdigit())


def _torch_probabilities(pixels: np.ndarray) -> np.ndarray:
    """The in-process model on the same checkpoint: Linear -> ReLU -> Linear on normalised input, softmax of the
    logits over the version's temperature."""
    folder = STORE / MODEL / str(_version())
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    metadata = json.loads((folder / "metadata.json").read_text())
    norm = metadata["normalization"]
    temperature = (metadata.get("calibration") or {}).get("temperature", 1.0)
    net = torch.nn.Sequential(torch.nn.Linear(784, 500), torch.nn.ReLU(), torch.nn.Linear(500, 10))
    net.load_state_dict({k.replace("fc1", "0").replace("fc2", "2"): v for k, v in state.items()})
    x = (torch.from_numpy(pixels).reshape(len(pixels), 784) - norm["mean"]) / norm["std"]
    with torch.no_grad():
        return torch.softmax(net(x) / temperature, dim=1).numpy()


@pytest.fixture(scope="module")
def client() -> Iterator[httpclient.InferenceServerClient]:
    with triton_reference(STORE, MODEL) as endpoints:
        triton = httpclient.InferenceServerClient(endpoints.http)
        yield triton
        triton.close()


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """The first 100 real MNIST test digits as FP32 in 0..1 (ToTensor's scale), [N,784], and their labels."""
    dataset = torchvision.datasets.MNIST(str(_data_dir()), train=False)
    images = dataset.data[:DIGITS].numpy().reshape(DIGITS, 784).astype(np.float32) / 255.0
    return images, dataset.targets[:DIGITS].numpy()


def _pixels(data: np.ndarray, datatype: str = "FP32", binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("pixels", list(data.shape), datatype)
    return tensor.set_data_from_numpy(data, binary_data=binary)


def test_server_metadata(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_server_metadata()
    assert meta["name"] == "triton" and meta["version"].startswith("2.51")
    assert "binary_tensor_data" in meta["extensions"]
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)


def test_model_metadata(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata(MODEL)
    assert meta == {
        "name": MODEL,
        "versions": [str(_version())],
        "platform": "python",
        "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [-1, 784]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "typicality", "datatype": "FP32", "shape": [-1]},
        ],
    }
    assert client.get_model_metadata(MODEL, str(_version()))["name"] == MODEL


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_torch(
    client: httpclient.InferenceServerClient, digits: tuple[np.ndarray, np.ndarray], binary: bool
) -> None:
    images, truth = digits
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label", "confidence")]
    result = client.infer(MODEL, [_pixels(images, binary=binary)], outputs=outputs, request_id="ref-1")
    expected = _torch_probabilities(images)
    probs, labels, confidence = (result.as_numpy(n) for n in ("probabilities", "label", "confidence"))
    assert probs is not None and labels is not None and confidence is not None
    assert (probs.dtype, probs.shape) == (np.float32, (DIGITS, 10))
    assert (labels.dtype, labels.shape) == (np.int64, (DIGITS,))
    assert (confidence.dtype, confidence.shape) == (np.float32, (DIGITS,))
    np.testing.assert_array_equal(labels, expected.argmax(axis=1))
    np.testing.assert_allclose(probs, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(confidence, expected.max(axis=1), atol=1e-5, rtol=0)
    assert (labels == truth).mean() > 0.95  # the committed model is the trained one, not a random net
    response = result.get_response()
    assert response["id"] == "ref-1" and response["model_version"] == str(_version())


BAD: dict[str, tuple[str, list[tuple[str, str, np.ndarray]], str, list[str]]] = {
    # case: (model, inputs, status, words in Triton's message)
    "unknown model": ("nope", [("pixels", "FP32", np.zeros((2, 784), np.float32))], "404", ["unknown model", "nope"]),
    "wrong datatype": (MODEL, [("pixels", "FP64", np.zeros((2, 784)))], "400", ["pixels", "data-type", "FP64"]),
    "wrong shape": (MODEL, [("pixels", "FP32", np.zeros((2, 783), np.float32))], "400", ["shape", "pixels", "783"]),
    "missing input": (MODEL, [], "400", ["missing required input", "pixels"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_requests(client: httpclient.InferenceServerClient, case: str) -> None:
    model, tensors, status, words = BAD[case]
    inputs = [_pixels(data, datatype) for _, datatype, data in tensors]
    with pytest.raises(InferenceServerException) as raised:
        client.infer(model, inputs)
    assert raised.value.status() == status, raised.value.message()
    message = raised.value.message() or ""
    assert all(word in message for word in words), message
    assert client.is_model_ready(MODEL)  # a bad request leaves the reference serving
    if model == MODEL:  # the same bytes through our V2 codec: the same status class (the model name is routing's)
        body, header = httpclient.InferenceServerClient.generate_request_body(inputs)
        with pytest.raises(V2Error) as ours:
            parse_infer(body, None if header is None else str(header), CodecLimits())
        assert ours.value.status // 100 == int(status) // 100, ours.value.message
