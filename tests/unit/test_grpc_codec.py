"""The gRPC codec in process: a ``ModelInferRequest`` checked as the REST codec checks a body, answers as raw
contents, our statuses as gRPC codes, and the generated modules current with the proto file.

(tritonclient.grpc is not imported here: its messages have the same protobuf names as ours.)"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from service.grpc import codec
from service.grpc import oip_pb2 as pb
from service.http.v2 import V2Error
from service.work import ROW

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Limits:
    max_instances: int = 64
    max_payload_bytes: int = 1024 * 1024


def request(name: str = "pixels", datatype: str = "FP32", shape: tuple[int, ...] = (2, 784), raw: bytes | None = None,
            **fields) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="mnist-fnn", **fields)
    message.inputs.add(name=name, datatype=datatype, shape=shape)
    if raw is not None:
        message.raw_input_contents.append(raw)
    return message


def test_raw_fp32_and_uint8_pixels_are_the_frames():
    frames = np.random.default_rng(0).random((2, 784), dtype=np.float32)
    checked = codec.infer_request(request(raw=frames.tobytes()), Limits())
    assert checked.count == 2 and np.array_equal(checked.pixels.reshape(2, 784), frames)
    bytes_ = np.arange(2 * 784, dtype=np.uint32) % 256
    checked = codec.infer_request(request(datatype="UINT8", shape=(2, 28, 28), raw=bytes_.astype(np.uint8).tobytes()),
                                  Limits())
    np.testing.assert_allclose(checked.pixels.reshape(-1), bytes_ / 255, atol=1e-7)


def test_typed_contents_are_read_as_the_rest_codecs_data():
    message = request(datatype="UINT8", shape=(1, 784))
    message.inputs[0].contents.uint_contents.extend([255] * 784)
    assert codec.infer_request(message, Limits()).pixels.max() == 1.0
    pictures = request(name="image", datatype="BYTES", shape=(2,))
    pictures.inputs[0].contents.bytes_contents.extend([b"first", b"second picture"])
    assert codec.infer_request(pictures, Limits()).images == [b"first", b"second picture"]
    raw_pictures = request(name="image", datatype="BYTES", shape=(1,),
                           raw=struct.pack("<I", 3) + b"abc")
    assert codec.infer_request(raw_pictures, Limits()).images == [b"abc"]


@pytest.mark.parametrize(("message", "status", "says"), [
    (request(raw=b"\0" * 10), 400, "binary_data_size"),
    (request(datatype="FP64", raw=b"\0" * 2 * 784 * 8), 400, "FP64"),
    (request(name="letters", raw=b""), 400, "letters"),
    (request(shape=(65, 784), raw=b"\0" * 65 * 784 * 4), 413, "limit is 64"),
    (request(shape=(64, 784 * 2), raw=b"\0" * 64 * 784 * 8), 400, "shape"),
    (request(raw=np.full(2 * 784, 2.0, np.float32).tobytes()), 400, "0..1"),
])
def test_bad_requests_are_refused_saying_why(message, status, says):
    with pytest.raises(V2Error) as refused:
        codec.infer_request(message, Limits())
    assert refused.value.status == status and says in refused.value.detail


def test_raw_and_typed_contents_do_not_mix_and_raw_needs_one_entry_per_input():
    mixed = request(raw=b"\0" * 2 * 784 * 4)
    mixed.inputs[0].contents.fp32_contents.append(0.5)
    with pytest.raises(V2Error, match="typed contents"):
        codec.infer_request(mixed, Limits())
    two = request(raw=b"\0" * 2 * 784 * 4)
    two.raw_input_contents.append(b"")
    with pytest.raises(V2Error, match="2 entries for 1 inputs"):
        codec.infer_request(two, Limits())
    with pytest.raises(V2Error) as big:
        codec.infer_request(request(shape=(64, 784 * 6), raw=b"\0" * 64 * 784 * 24), Limits())
    assert big.value.status == 413


def test_answers_are_raw_contents_of_the_requested_outputs():
    probs = np.random.default_rng(1).dirichlet(np.ones(10), 2).astype(np.float32)
    rows = np.column_stack([probs, [0.3, 0.004]]).astype(np.float32)
    assert rows.shape[1] == ROW
    message = request(raw=b"\0" * 2 * 784 * 4, id="abc")
    message.outputs.add(name="label")
    message.outputs.add(name="typicality")
    answer = codec.infer_response(codec.infer_request(message, Limits()), "mnist-fnn", "2", rows, np.zeros(2, bool))
    assert (answer.id, answer.model_version) == ("abc", "2")
    assert [(o.name, o.datatype, list(o.shape)) for o in answer.outputs] == [("label", "INT64", [2]),
                                                                             ("typicality", "FP32", [2])]
    assert np.frombuffer(answer.raw_output_contents[0], np.int64).tolist() == probs.argmax(1).tolist()
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[1], np.float32), [0.3, 0.004])
    uncalibrated = np.column_stack([probs, [np.nan, np.nan]]).astype(np.float32)
    every = codec.infer_response(codec.infer_request(request(raw=b"\0" * 2 * 784 * 4), Limits()), "m", "1",
                                 uncalibrated, np.zeros(2, bool))
    assert [o.name for o in every.outputs] == ["probabilities", "label", "confidence"]


def test_statuses_map_onto_grpc_codes():
    assert codec.code(400) == codec.code(422) == grpc.StatusCode.INVALID_ARGUMENT
    assert codec.code(401) == grpc.StatusCode.UNAUTHENTICATED and codec.code(404) == grpc.StatusCode.NOT_FOUND
    assert codec.code(413) == grpc.StatusCode.RESOURCE_EXHAUSTED and codec.code(503) == grpc.StatusCode.UNAVAILABLE
    assert codec.code(504) == grpc.StatusCode.DEADLINE_EXCEEDED and codec.code(500) == grpc.StatusCode.INTERNAL
    # refused because it would wait past its own deadline: that deadline is what it exceeds
    assert codec.code(503, "deadline") == grpc.StatusCode.DEADLINE_EXCEEDED
    assert codec.code(503, "queue_wait") == grpc.StatusCode.UNAVAILABLE


def test_the_generated_modules_are_current(tmp_path):
    """``make proto`` output, committed: regenerated from oip.proto, they are the same files."""
    (tmp_path / "service" / "grpc").mkdir(parents=True)
    shutil.copy(ROOT / "service" / "grpc" / "oip.proto", tmp_path / "service" / "grpc")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "service/grpc/oip.proto"], cwd=tmp_path, check=True)
    for name in ("oip_pb2.py", "oip_pb2.pyi"):
        assert (tmp_path / "service" / "grpc" / name).read_text() == (ROOT / "service" / "grpc" / name).read_text(), \
            f"service/grpc/{name} is stale: run `make proto`"
