"""Open Inference Protocol (KServe V2, Triton's HTTP API) for ``mnist-fnn``: bytes in, tensors out, and back.

A pure codec, so that the HTTP layer only routes and the rules live in one place that tests can hit without a
server: :func:`parse_infer` turns a ``POST .../infer`` body (JSON, or JSON followed by binary tensors as the
binary tensor data extension has it) into an :class:`InferRequest` (and :func:`inputs`, the data plane's
view of it); :func:`encode_infer` turns the plane's rows (per instance its 10 probabilities, then its
typicality) into the answer body and its headers; :func:`server_metadata` and
:func:`model_metadata` are ``GET /v2`` and ``GET /v2/models/{m}``.

Tensors (DESIGN, "Open Inference Protocol"): exactly one input, ``pixels`` (FP32 in 0..1, or UINT8 in 0..255;
``[N,784]``, ``[N,28,28]`` or ``[N,1,28,28]``) or ``image`` (BYTES ``[N]``, encoded pictures); outputs
``probabilities`` FP32 ``[N,10]``, ``label`` INT64 ``[N]``, ``confidence`` FP32 ``[N]``, ``typicality`` FP32 ``[N]``
(DESIGN, "Not a digit"). A picture in which no digit is found answers ``label`` -1 and 0 for the
others. A version without calibration has no typicality: the output is then left out unless asked
for by name, and asked for, it is NaN (``null`` in JSON, which numpy reads as NaN) for every image
with a digit.

Statuses follow Triton, which answers 400 for every bad infer request it names (wrong datatype, wrong shape,
missing, unknown or duplicate input, byte counts that do not add up); 413 is ours, for the same limits as
``/predict`` (instances per request, payload bytes). Where Triton answers 500 for a malformed body (JSON that
does not parse, a data count that does not match the shape, a negative dimension), the spec's "typically 400"
wins. Every problem is a :class:`V2Error`; no bytes make this module raise anything else.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
import orjson

from service.errors import HttpError
from service.http.dataplane import Inputs
from service.work import ROW

INPUTS: Final = ("pixels", "image")
OUTPUTS: Final = ("probabilities", "label", "confidence", "typicality")
OUTPUT_DATATYPES: Final = {"probabilities": "FP32", "label": "INT64", "confidence": "FP32", "typicality": "FP32"}
NO_LABEL: Final = -1  # ``label`` of a picture in which no digit is found
PIXEL_DATATYPES: Final = ("FP32", "UINT8")
PIXEL_SHAPES: Final = ((784,), (28, 28), (1, 28, 28))  # what may follow N
V2_DATATYPES: Final = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}
    | {"FP16", "FP32", "FP64", "BF16", "BYTES"}
)
# Extensions GET /v2 lists; the HTTP layer passes a longer tuple when it serves more (e.g. model_repository).
EXTENSIONS: Final = ("binary_tensor_data",)
# Spec: "<project>_<format>". Ours is a PyTorch state_dict run eagerly, which none of the spec's names is.
PLATFORM: Final = "pytorch_statedict"
SERVER_NAME: Final = "digitserve"

_TOP_LEVEL: Final = frozenset({"id", "parameters", "inputs", "outputs", "model_name", "model_version"})
_INPUT_KEYS: Final = frozenset({"name", "shape", "datatype", "parameters", "data"})
_OUTPUT_KEYS: Final = frozenset({"name", "parameters"})
_SHARED_MEMORY: Final = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_SHARED_MEMORY_KEYS: Final = frozenset(_SHARED_MEMORY)
_ELEMENT_SIZE: Final = {"FP32": 4, "UINT8": 1}
_MAX_HEADER_DIGITS: Final = 20
_ELEMENT_LENGTH: Final = struct.Struct("<I")  # before each binary BYTES element
_FLAG, _SIZE = "binary_data_output", "binary_data_size"
_OUTPUT_FLAG: Final = frozenset({_FLAG})
_BINARY_SIZE: Final = frozenset({_SIZE})
_PLAIN_INPUT_KEYS: Final = frozenset({"name", "shape", "datatype", "parameters"})
_ACCEPTED: Final = {"pixels": PIXEL_DATATYPES, "image": ("BYTES",)}
_SCALARS: Final = (str, int, float, bool)
_FP32: Final = np.dtype("<f4")
_INT64: Final = np.dtype("<i8")
_UINT32: Final = np.dtype("<u4")
# IEEE-754 float32 bit patterns of +0.0 ... 1.0 are the unsigned integers 0 ... 0x3F800000, in order; every other
# value (negative, -0.0, above 1, infinite, NaN) has a larger one. So one integer max checks a binary FP32 tensor.
_ONE_FP32_BITS: Final = 0x3F800000
# UINT8 pixel v -> float32(float64(v) / 255), as /predict scales them: one lookup instead of two casts and a divide
_UINT8_SCALE: Final = (np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)


class V2Error(HttpError):
    """A request we refuse: ``status`` (4xx) and ``message``, which the HTTP layer sends as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.message = message


MAX_ID = 256
_ID = re.compile(f"[\x20-\x7e]{{1,{MAX_ID}}}")


def _bad(message: str) -> V2Error:
    return V2Error(400, message)


class Limits(Protocol):
    """What the codec needs of ``service.config.Limits`` (read-only, so settings objects and dataclasses both fit)."""

    @property
    def max_instances(self) -> int: ...

    @property
    def max_payload_bytes(self) -> int: ...


@dataclass
class InferRequest:
    """A checked infer request: either ``pixels`` (float32 (N,28,28) in 0..1; binary FP32 pixels are a read-only
    view of the request's body, not a copy) or ``images`` (N encoded pictures).

    ``outputs`` are the requested outputs in the order they were asked for (all of them when none were:
    ``chosen`` is then False); ``binary[name]`` says whether that output goes back as binary data rather
    than JSON.
    """

    id: str | None
    count: int
    pixels: np.ndarray | None = None
    images: list[bytes] | None = None
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    binary: dict[str, bool] = field(default_factory=dict)
    chosen: bool = False


@dataclass(slots=True)
class _Input:
    """One entry of ``inputs`` after its structure was checked; its bytes or JSON data not yet.
    ``blob`` is its binary data, which starts ``start`` bytes into the body."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: object = None
    binary_size: int | None = None
    blob: memoryview | None = None
    start: int = 0


# ---------------------------------------------------------------------------------------------- parse


def parse_infer(body: bytes, header_length: str | None, limits: Limits) -> InferRequest:
    """A V2 infer body -> :class:`InferRequest`, or :class:`V2Error` naming what is wrong and where.

    ``header_length`` is the ``Inference-Header-Content-Length`` header (None when absent: then the whole body
    is JSON). After the JSON header come the binary tensors of the inputs that declare
    ``parameters.binary_data_size``, in the order of ``inputs``, and nothing else.

    JSON cannot carry raw bytes, so an ``image`` sent as JSON ``data`` holds one base64 string per picture
    (what ``/predict``'s ``image_b64`` holds); in binary each element is a 4-byte little-endian length and the
    picture's bytes, as tritonclient serialises BYTES.
    """
    if len(body) > limits.max_payload_bytes:
        raise V2Error(413, f"payload is {len(body)} bytes; the limit is {limits.max_payload_bytes}")
    size = _header_size(header_length, len(body))
    header = _load_json(bytes(body[:size]))
    if header_length is not None and (plain := _plain_binary(header, body, size, limits)) is not None:
        return plain
    return checked(header, body, size, header_length is not None, limits)


def checked(header: dict[str, object], body: bytes, start: int, binary: bool, limits: Limits) -> InferRequest:
    """An infer request's JSON ``header`` (and, when ``binary``, its tensors' bytes: ``body[start:]``, in the
    order of the inputs that declare ``binary_data_size``) checked -> :class:`InferRequest`. The REST
    body's and the gRPC message's (``service.grpc.codec``) checks, in one place."""
    if not _TOP_LEVEL.issuperset(header):
        unknown = sorted(set(header) - _TOP_LEVEL)
        raise _bad(f"unknown field(s) {unknown} in the infer request (allowed: {', '.join(sorted(_TOP_LEVEL))})")
    request_id = header.get("id")
    if request_id is not None and not (isinstance(request_id, str) and _ID.fullmatch(request_id)):
        raise _bad(f"'id' must be a string of 1 to {MAX_ID} printable ASCII characters (it is echoed)")
    parameters = _parameters(header.get("parameters"), "the request")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise _bad("parameter 'binary_data_output' must be a boolean")
    inputs = _inputs(header.get("inputs"))
    _attach_blobs(inputs, body, start, binary=binary)
    chosen = _only_input(inputs)
    count = _batch_size(chosen, limits)
    outputs, as_binary = _outputs(header.get("outputs"), default_binary)
    named = header.get("outputs") not in (None, [])
    if chosen.name == "pixels":
        return InferRequest(request_id, count, _pixels(chosen, count), None, outputs, as_binary, named)
    return InferRequest(request_id, count, None, _images(chosen, count, body), outputs, as_binary, named)


def _plain_binary(header: dict[str, object], body: bytes, start: int, limits: Limits) -> InferRequest | None:
    """The request tritonclient sends most: one input as binary data filling the rest of the body, no
    ``outputs``, at most ``binary_data_output`` as a parameter, values in range. Its answer, in one pass over
    the header; None for anything else, or anything doubtful, which the full checks of :func:`parse_infer`
    then accept or refuse (so this path changes no outcome, only its cost)."""
    inputs, outputs, parameters, request_id = (header.get(key) for key in ("inputs", "outputs", "parameters", "id"))
    if type(inputs) is not list or len(inputs) != 1 or (outputs is not None and outputs != []):
        return None
    if (request_id is not None and not (type(request_id) is str and _ID.fullmatch(request_id))) or \
            not _TOP_LEVEL.issuperset(header):
        return None
    if parameters is None:
        default_binary = False
    elif type(parameters) is dict and parameters.keys() == _OUTPUT_FLAG and type(flag := parameters[_FLAG]) is bool:
        default_binary = flag
    else:
        return None
    entry = inputs[0]
    if type(entry) is not dict or entry.keys() != _PLAIN_INPUT_KEYS:
        return None
    name, datatype, shape, sizes = entry["name"], entry["datatype"], entry["shape"], entry["parameters"]
    if type(sizes) is not dict or sizes.keys() != _BINARY_SIZE or type(size := sizes[_SIZE]) is not int:
        return None
    if type(shape) is not list or not shape or any(type(dim) is not int for dim in shape):
        return None
    count = shape[0]
    if size != len(body) - start or not 1 <= count <= limits.max_instances:
        return None
    if name == "pixels" and datatype in PIXEL_DATATYPES and tuple(shape[1:]) in PIXEL_SHAPES:
        if size != count * 784 * _ELEMENT_SIZE[datatype]:
            return None
        if datatype == "UINT8":
            pixels = _UINT8_SCALE[np.frombuffer(body, np.uint8, offset=start)]
        else:
            pixels = np.frombuffer(body, _FP32, offset=start)
            if np.maximum.reduce(pixels.view(_UINT32)) > _ONE_FP32_BITS:
                return None
        return InferRequest(request_id, count, pixels.reshape(count, 28, 28), None, list(OUTPUTS),
                            dict.fromkeys(OUTPUTS, default_binary))
    if name == "image" and datatype == "BYTES" and len(shape) == 1:
        images = _byte_elements(body, start, len(body), count)  # its errors are the full checks' too
        return InferRequest(request_id, count, None, images, list(OUTPUTS), dict.fromkeys(OUTPUTS, default_binary))
    return None


def _header_size(header_length: str | None, body_size: int) -> int:
    """How many leading bytes of the body are JSON: all of them without the header, else the header's value."""
    if header_length is None:
        return body_size
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_HEADER_DIGITS:
        raise _bad(f"Inference-Header-Content-Length must be a byte count, got {header_length[:40]!r}")
    size = int(text)
    if size == 0:
        raise _bad(
            "raw binary requests (Inference-Header-Content-Length: 0) are for models with a single input; "
            "this one takes 'pixels' or 'image', so send the JSON header first"
        )
    if size > body_size:
        raise _bad(f"Inference-Header-Content-Length is {size} but the body has only {body_size} bytes")
    return size


def _load_json(header: bytes) -> dict[str, object]:
    if not header or header.isspace():
        raise _bad('request body is empty: send {"inputs": [{"name": "pixels", ...}]}')
    try:
        parsed = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        raise _bad(f"infer request is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise _bad("infer request must be a JSON object with 'inputs'")
    return parsed


def _parameters(raw: object, where: str) -> dict[str, object]:
    """A ``parameters`` object: values are strings, numbers or booleans (spec); names we do not use are ignored."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _bad(f"'parameters' of {where} must be an object")
    for key, value in raw.items():
        if not isinstance(value, _SCALARS):
            raise _bad(f"parameter '{key}' of {where} must be a string, number or boolean")
    if not _SHARED_MEMORY_KEYS.isdisjoint(raw):
        shared = [key for key in _SHARED_MEMORY if key in raw]
        raise _bad(f"{where} asks for shared memory ({shared[0]}); this server does not offer that extension")
    return raw


def _inputs(raw: object) -> list[_Input]:
    if not isinstance(raw, list):
        raise _bad('\'inputs\' must be a list of tensors, e.g. [{"name": "pixels", ...}]')
    inputs: list[_Input] = []
    for index, entry in enumerate(raw):
        tensor = _input(entry, index)
        if any(seen.name == tensor.name for seen in inputs):
            raise _bad(f"input '{tensor.name}' appears more than once")
        inputs.append(tensor)
    return inputs


def _input(entry: object, index: int) -> _Input:
    """One ``inputs`` entry: a known name, a V2 datatype this name accepts, integer dims, data or a byte count."""
    if not isinstance(entry, dict):
        raise _bad(f"inputs[{index}] must be an object with name, shape, datatype and data")
    name = entry.get("name")
    if not isinstance(name, str):
        raise _bad(f"inputs[{index}] has no 'name' string")
    if name not in INPUTS:
        raise _bad(f"unexpected inference input '{name[:64]}' (this model takes 'pixels' or 'image')")
    if not _INPUT_KEYS.issuperset(entry):
        raise _bad(f"input '{name}': unknown field(s) {sorted(set(entry) - _INPUT_KEYS)}")
    datatype = entry.get("datatype")
    if not (isinstance(datatype, str) and datatype in _ACCEPTED[name]):
        datatype = _datatype(datatype, name)  # says which rule it breaks
    shape = _shape(entry.get("shape"), name)
    raw_parameters = entry.get("parameters")
    parameters = {} if raw_parameters is None else _parameters(raw_parameters, f"input '{name}'")
    size = parameters.get("binary_data_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _bad(f"input '{name}': binary_data_size must be a non-negative integer")
    if size is not None and "data" in entry:
        raise _bad(f"input '{name}' has both 'data' and binary_data_size; give one")
    if size is None and "data" not in entry:
        raise _bad(f"input '{name}' has no data (give 'data', or binary data with parameters.binary_data_size)")
    return _Input(name, datatype, shape, data=entry.get("data"), binary_size=size)


def _datatype(raw: object, name: str) -> str:
    if not isinstance(raw, str):
        raise _bad(f"input '{name}': 'datatype' must be a string such as \"FP32\"")
    if raw not in V2_DATATYPES:
        raise _bad(f"input '{name}': '{raw[:32]}' is not a V2 datatype ({', '.join(sorted(V2_DATATYPES))})")
    accepted = PIXEL_DATATYPES if name == "pixels" else ("BYTES",)
    if raw not in accepted:
        wanted = "FP32 (0..1) or UINT8 (0..255)" if name == "pixels" else "BYTES (encoded pictures)"
        raise _bad(f"input '{name}' data-type is '{raw}', but model expects {wanted}")
    return raw


def _shape(raw: object, name: str) -> tuple[int, ...]:
    """Integer, non-negative dims that fit in int64; whether they fit this input is :func:`_batch_size`'s."""
    if not isinstance(raw, list) or not raw:
        raise _bad(f"input '{name}': 'shape' must be a non-empty list of dimensions")
    for dim in raw:
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim < 2**63:
            raise _bad(f"input '{name}': shape {_text(raw)} has a dimension that is not a non-negative integer")
    return tuple(raw)


def _text(shape: Sequence[object]) -> str:
    return "[" + ",".join(str(dim)[:24] for dim in list(shape)[:8]) + (",...]" if len(shape) > 8 else "]")


def _attach_blobs(inputs: list[_Input], body: bytes, start: int, binary: bool) -> None:
    """Hand each input that declared ``binary_data_size`` its bytes (those after the JSON header, which ends at
    ``start``), in order; every byte must be claimed."""
    declared = [tensor for tensor in inputs if tensor.binary_size is not None]
    if declared and not binary:
        raise _bad(
            f"input '{declared[0].name}' declares binary_data_size but the request has no "
            "Inference-Header-Content-Length header to say where the binary data starts"
        )
    rest, offset = len(body) - start, 0
    if declared:
        view = memoryview(body)
        for tensor in declared:
            size = tensor.binary_size or 0
            if offset + size > rest:
                short = offset + size - rest
                raise _bad(
                    f"input '{tensor.name}' declares {size} bytes of binary data, {short} more than the body holds"
                )
            tensor.start = start + offset
            tensor.blob = view[tensor.start : tensor.start + size]
            offset += size
    if offset != rest:
        raise _bad(f"{rest - offset} bytes after the binary tensors belong to no input's binary_data_size")


def _only_input(inputs: list[_Input]) -> _Input:
    if not inputs:
        raise _bad("missing required input: give 'pixels' (FP32 0..1 or UINT8 0..255) or 'image' (BYTES)")
    if len(inputs) > 1:
        raise _bad("give exactly one of the inputs 'pixels' or 'image', not both")
    return inputs[0]


def _batch_size(tensor: _Input, limits: Limits) -> int:
    """N, once the dims after it are the input's (so a product of dims cannot overflow) and N is 1..limit."""
    count, rest = tensor.shape[0], tensor.shape[1:]
    if tensor.name == "pixels" and rest not in PIXEL_SHAPES:
        raise _bad(
            f"input 'pixels': unexpected shape {_text(tensor.shape)}; expected [N,784], [N,28,28] or [N,1,28,28]"
        )
    if tensor.name == "image" and rest:
        raise _bad(f"input 'image': unexpected shape {_text(tensor.shape)}; expected [N] (one element per picture)")
    if count == 0:
        raise _bad(f"input '{tensor.name}': shape {_text(tensor.shape)} has no instances; N must be at least 1")
    if count > limits.max_instances:
        raise V2Error(
            413, f"input '{tensor.name}': {count} instances in one request; the limit is {limits.max_instances}"
        )
    return count


def _pixels(tensor: _Input, count: int) -> np.ndarray:
    """Checked pixels -> float32 (N,28,28) in 0..1: FP32 as sent, UINT8 divided by 255 as /predict does.

    Binary FP32 pixels in range come back as a read-only view of the request's body: no copy."""
    elements = count * 784
    if tensor.blob is not None:
        expected = elements * _ELEMENT_SIZE[tensor.datatype]
        if len(tensor.blob) != expected:
            raise _bad(
                f"input 'pixels': binary_data_size is {len(tensor.blob)} bytes; shape {_text(tensor.shape)} of "
                f"{tensor.datatype} needs {expected}"
            )
        if tensor.datatype == "UINT8":  # every byte is a UINT8 in range
            return _UINT8_SCALE[np.frombuffer(tensor.blob, np.uint8)].reshape(count, 28, 28)
        values = np.frombuffer(tensor.blob, _FP32)
        if np.maximum.reduce(values.view(_UINT32)) <= _ONE_FP32_BITS:  # all in +0..1: the checks below would pass
            return values.reshape(count, 28, 28)
    else:
        values = _json_numbers(tensor, elements)
    if tensor.datatype == "UINT8":
        if values.min() < 0 or values.max() > 255:
            raise _bad(f"input 'pixels': UINT8 values must lie in 0..255 (found {values.min()}..{values.max()})")
        return _UINT8_SCALE[values].reshape(count, 28, 28)
    # Checked before the cast to float32, so that a huge JSON number is out of range rather than a cast overflow.
    if not np.isfinite(values).all():
        raise _bad("input 'pixels': FP32 values must be finite numbers (found NaN or infinity)")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise _bad(
            f"input 'pixels': FP32 values must lie in 0..1, torchvision's ToTensor scale (found {low:g}..{high:g}); "
            "send 0..255 values as UINT8"
        )
    return values.astype(np.float32).reshape(count, 28, 28)


def _json_numbers(tensor: _Input, elements: int) -> np.ndarray:
    """JSON ``data``, flat or nested (row-major), as a flat array of numbers of the datatype's kind."""
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        values = np.asarray(None)  # ragged or too deep: reported as not numbers below
    integers = tensor.datatype == "UINT8"
    kinds = "iu" if integers else "iuf"
    if values.dtype.kind not in kinds or values.ndim == 0:
        wanted = "integers 0..255" if integers else "numbers 0..1"
        raise _bad(f"input 'pixels': {tensor.datatype} 'data' must be a list (flat or nested) of {wanted}")
    if values.size != elements:
        raise _bad(f"input 'pixels': 'data' has {values.size} elements; shape {_text(tensor.shape)} needs {elements}")
    return values.reshape(-1)


def _images(tensor: _Input, count: int, body: bytes) -> list[bytes]:
    """BYTES elements: length-prefixed in binary, base64 strings in JSON (see :func:`parse_infer`)."""
    if tensor.blob is not None:
        return _byte_elements(body, tensor.start, tensor.start + len(tensor.blob), count)
    data = tensor.data
    if not isinstance(data, list) or len(data) != count:
        found = f"{len(data)} elements" if isinstance(data, list) else "not a list"
        raise _bad(f"input 'image': 'data' must be a list of {count} base64 strings (shape [{count}]); {found}")
    images = []
    for index, element in enumerate(data):
        if not isinstance(element, str):
            raise _bad(f"input 'image': element {index} must be a string holding the picture's base64")
        try:
            images.append(base64.b64decode(element, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(f"input 'image': element {index} is not valid base64") from None
    return images


def _byte_elements(body: bytes, start: int, end: int, count: int) -> list[bytes]:
    """Binary BYTES, ``body[start:end]``: ``count`` times (uint32 little-endian length, bytes), ending exactly
    at ``end``. Each element is sliced from the body: one copy, no memoryview in between."""
    images, offset, unpack = [], start, _ELEMENT_LENGTH.unpack_from
    for index in range(count):
        if offset + 4 > end:
            raise _bad(f"input 'image': binary data ends before element {index}'s 4-byte length ({count} expected)")
        (length,) = unpack(body, offset)
        offset += 4
        if offset + length > end:
            raise _bad(f"input 'image': element {index} says {length} bytes but only {end - offset} remain")
        images.append(bytes(body[offset : offset + length]))  # a no-op on the bytes a body is
        offset += length
    if offset != end:
        raise _bad(f"input 'image': {end - offset} bytes after the {count} elements of shape [{count}]")
    return images


def _outputs(raw: object, default_binary: bool) -> tuple[list[str], dict[str, bool]]:
    """Requested outputs (all of them when none are listed) and, for each, binary or JSON."""
    if raw is None or raw == []:
        return list(OUTPUTS), dict.fromkeys(OUTPUTS, default_binary)
    if not isinstance(raw, list):
        raise _bad('\'outputs\' must be a list such as [{"name": "label"}]')
    names: list[str] = []
    binary: dict[str, bool] = {}
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise _bad(f"outputs[{index}] must be an object with a 'name' string")
        name = entry["name"]
        if name not in OUTPUTS:
            raise _bad(f"unexpected inference output '{name[:64]}' (this model has {', '.join(OUTPUTS)})")
        if name in binary:
            raise _bad(f"output '{name}' is requested more than once")
        unknown = sorted(set(entry) - _OUTPUT_KEYS)
        if unknown:
            raise _bad(f"output '{name}': unknown field(s) {unknown}")
        binary[name] = _binary_flag(_parameters(entry.get("parameters"), f"output '{name}'"), name, default_binary)
        names.append(name)
    return names, binary


def _binary_flag(parameters: dict[str, object], name: str, default: bool) -> bool:
    if "classification" in parameters:
        raise _bad(f"output '{name}' asks for classification; this server does not offer that extension")
    flag = parameters.get("binary_data", default)
    if not isinstance(flag, bool):
        raise _bad(f"output '{name}': parameter 'binary_data' must be a boolean")
    return flag


# --------------------------------------------------------------------------------------------- encode


def inputs(request: InferRequest, body_bytes: int) -> Inputs:
    """The data plane's view of a checked request: ``pixels`` are frames already; ``image`` pictures are
    prepared as /predict's are, with its (empty) options."""
    if request.pixels is not None:
        return Inputs(request.count, frames=request.pixels, options={}, body_bytes=body_bytes)
    return Inputs(request.count, pictures=list(request.images or ()), options={}, body_bytes=body_bytes)


def encode_infer(
    request: InferRequest, model_name: str, model_version: str, rows: np.ndarray, no_digit: np.ndarray | None = None
) -> tuple[bytes, dict[str, str]]:
    """The answer to ``request`` from its (N, ``ROW``) rows (the data plane's ``Answer.rows``): body and headers.

    Binary outputs follow the JSON header in the order of ``outputs``; then ``Inference-Header-Content-Length``
    says where they start and the body is ``application/octet-stream``, else it is plain ``application/json``.
    """
    body, header_length = encode_answer(request, model_name, model_version, rows, no_digit)
    if header_length is None:
        return body, {"Content-Type": "application/json"}
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(header_length)}


def encode_answer(
    request: InferRequest, model_name: str, model_version: str, rows: np.ndarray, no_digit: np.ndarray | None = None
) -> tuple[bytes, int | None]:
    """:func:`encode_infer`'s body, and the length of its JSON header when binary outputs follow it (None when
    the body is all JSON), for an HTTP layer that writes its headers itself. Only the requested outputs are
    computed; ``typicality``, when none were named, only where the version has it."""
    outputs: list[dict[str, object]] = []
    blobs: list[bytes] = []
    for name, array in tensors(request, rows, no_digit):
        entry: dict[str, object] = {"name": name, "datatype": OUTPUT_DATATYPES[name], "shape": list(array.shape)}
        if request.binary.get(name, False):
            blob = array.tobytes()  # every output is little-endian, as the extension requires
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.reshape(-1)
        outputs.append(entry)
    answer: dict[str, object] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        answer["id"] = request.id
    answer["outputs"] = outputs
    header = orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    blobs.insert(0, header)
    return b"".join(blobs), len(header)


def tensors(request: InferRequest, rows: np.ndarray, no_digit: np.ndarray | None = None
            ) -> list[tuple[str, np.ndarray]]:
    """The requested outputs (name, little-endian array) from the (N, ``ROW``) rows, in the order asked;
    ``typicality``, when no output was named, only where the version has it."""
    table = np.ascontiguousarray(rows, dtype=_FP32)
    if table.shape != (request.count, ROW):
        raise ValueError(f"rows have shape {table.shape}; the request needs ({request.count}, {ROW})")
    names = request.outputs
    if not request.chosen and np.isnan(table[:, -1]).any():  # a version without calibration
        names = [name for name in names if name != "typicality"]
    return [(name, _output(name, table, no_digit)) for name in names]


def _output(name: str, table: np.ndarray, no_digit: np.ndarray | None) -> np.ndarray:
    """One output tensor from the (N, ``ROW``) little-endian float32 rows."""
    probs = table[:, :10]
    if name == "probabilities":
        return np.ascontiguousarray(probs)
    if name == "label":
        labels = probs.argmax(axis=1).astype(_INT64, copy=False)
        if no_digit is not None and no_digit.any():
            labels[no_digit] = NO_LABEL
        return labels
    if name == "confidence":
        return np.maximum.reduce(probs, axis=1)  # probs.max(axis=1) without its Python wrapper; float32 as probs
    if name == "typicality":
        return np.ascontiguousarray(table[:, 10])
    raise KeyError(name)


# ------------------------------------------------------------------------------------------- metadata


def server_metadata(version: str, extensions: Iterable[str] = EXTENSIONS) -> dict[str, object]:
    """``GET /v2``: who we are and the protocol extensions we serve (tritonclient checks for binary_tensor_data)."""
    return {"name": SERVER_NAME, "version": version, "extensions": list(extensions)}


def model_metadata(name: str, versions: list[str]) -> dict[str, object]:
    """``GET /v2/models/{name}``: tensors with -1 for the batch dimension.

    V2 metadata has one datatype and one shape per tensor (Triton lists one, too), so ``pixels`` is advertised
    as its canonical form, FP32 ``[-1,784]``, the same as the Triton reference serving this checkpoint and usable
    as it is by clients that build inputs from it; UINT8 and the ``[N,28,28]`` / ``[N,1,28,28]`` shapes are
    accepted as well. A wildcard (``[-1,-1]``) would advertise refused shapes (docs/protocols.md).
    """
    return {
        "name": name,
        "versions": list(versions),
        "platform": PLATFORM,
        "inputs": [
            {"name": "pixels", "datatype": "FP32", "shape": [-1, 784]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "confidence", "datatype": "FP32", "shape": [-1]},
            {"name": "typicality", "datatype": "FP32", "shape": [-1]},
        ],
    }
