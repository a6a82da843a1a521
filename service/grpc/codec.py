"""The Open Inference Protocol over gRPC: ``ModelInferRequest`` -> checked tensors, numbers -> ``ModelInferResponse``.

The same tensors and the same checks as the REST codec (``service.http.v2``), which this module hands
the request to in the shape of its JSON header: typed contents become ``data``; raw contents (one
entry per input, ``raw_input_contents``) and typed BYTES contents become binary data, as the REST
binary extension has it. Outputs always go back as ``raw_output_contents``, as Triton answers them
and tritonclient reads them. HTTP statuses of our errors map onto gRPC's codes (``CODES``).
"""

from __future__ import annotations

import struct
from typing import Any

import grpc
import numpy as np

from service.grpc import oip_pb2 as pb
from service.http import v2
from service.http.v2 import Limits, V2Error

_LENGTH = struct.Struct("<I")
# the typed contents field each datatype's elements travel in (INT8/16/32 share one, as UINT8/16/32 do)
_TYPED = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
          "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
          "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
          "FP64": "fp64_contents", "BYTES": "bytes_contents"}
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 415: grpc.StatusCode.INVALID_ARGUMENT,
         422: grpc.StatusCode.INVALID_ARGUMENT, 499: grpc.StatusCode.CANCELLED,
         503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}


def code(status: int, refusal: str | None = None) -> grpc.StatusCode:
    """The gRPC code of one of our HTTP statuses (INTERNAL for a 5xx it does not name). A call admission
    refuses because it would wait past its own deadline (``refusal`` "deadline", HTTP's 503) is
    DEADLINE_EXCEEDED, as Triton answers it: the client's deadline cannot be met, retrying sooner won't help."""
    if refusal == "deadline":
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def infer_request(message: pb.ModelInferRequest, limits: Limits) -> v2.InferRequest:
    """A ``ModelInferRequest`` checked as the REST codec checks a body, or a :class:`V2Error` (a 4xx)."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise V2Error(400, f"raw_input_contents has {len(raw)} entries for {len(message.inputs)} inputs; give one "
                           "per input, in order")
    blobs: list[bytes] = []
    inputs: list[dict[str, Any]] = []
    for index, tensor in enumerate(message.inputs):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        parameters = _parameters(tensor.parameters)
        if raw:
            if tensor.HasField("contents"):
                raise V2Error(400, f"input '{tensor.name[:64]}' has typed contents although raw_input_contents is "
                                   "given: use one or the other")
            blobs.append(raw[index])
            parameters["binary_data_size"] = len(raw[index])
        elif tensor.datatype == "BYTES":  # elements of any bytes, framed as the binary extension frames them
            blob = b"".join(_LENGTH.pack(len(element)) + element for element in tensor.contents.bytes_contents)
            blobs.append(blob)
            parameters["binary_data_size"] = len(blob)
        else:
            field = _TYPED.get(tensor.datatype, "fp32_contents")
            entry["data"] = np.asarray(getattr(tensor.contents, field))
        if parameters:
            entry["parameters"] = parameters
        inputs.append(entry)
    header: dict[str, object] = {"inputs": inputs}
    if message.id:
        header["id"] = message.id
    if message.parameters:
        header["parameters"] = _parameters(message.parameters)
    if message.outputs:
        header["outputs"] = [{"name": output.name, **({"parameters": _parameters(output.parameters)}
                                                      if output.parameters else {})} for output in message.outputs]
    body = b"".join(blobs)
    if len(body) > limits.max_payload_bytes:
        raise V2Error(413, f"tensors of {len(body)} bytes; the limit is {limits.max_payload_bytes}")
    return v2.checked(header, body, 0, bool(blobs), limits)


def _parameters(parameters: Any) -> dict[str, object]:
    """A protobuf ``map<string, InferParameter>`` as the plain values the REST codec checks."""
    out: dict[str, object] = {}
    for name, parameter in parameters.items():
        which = parameter.WhichOneof("parameter_choice")
        out[name] = getattr(parameter, which) if which else ""
    return out


def infer_response(request: v2.InferRequest, model: str, version: str, rows: np.ndarray,
                   no_digit: np.ndarray) -> pb.ModelInferResponse:
    """The answer: the requested outputs' metadata, and their bytes as ``raw_output_contents``."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=request.id or "")
    for name, array in v2.tensors(request, rows, no_digit):
        response.outputs.add(name=name, datatype=v2.OUTPUT_DATATYPES[name], shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def model_metadata(name: str, versions: list[str]) -> pb.ModelMetadataResponse:
    """``ModelMetadata``: the same tensors as ``GET /v2/models/{name}``."""
    metadata = v2.model_metadata(name, versions)
    response = pb.ModelMetadataResponse(name=name, versions=versions, platform=str(metadata["platform"]))
    for kind in ("inputs", "outputs"):
        for tensor in metadata[kind]:  # type: ignore[attr-defined]
            getattr(response, kind).add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
    return response


def server_metadata(version: str) -> pb.ServerMetadataResponse:
    metadata = v2.server_metadata(version)
    return pb.ServerMetadataResponse(name=str(metadata["name"]), version=version,
                                     extensions=list(metadata["extensions"]))  # type: ignore[call-overload]
