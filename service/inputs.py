"""HTTP body -> validated, MNIST-normalised images. Runs in the API server, before anything is queued.

Everything a client can get wrong is found here and becomes an ``InputError`` (a 4xx with a
detail); only well-formed work reaches the model workers, so one bad request can never fail
another request's batch.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from email import policy
from email.parser import BytesParser
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from service.config import Limits
from service.errors import InputError
from service.model import IMAGE_SIDE
from service.preprocess import BlankImage, decode_image, to_mnist, validate_pixels
from service.schema import INSTANCES, Instance

Options = TypeVar("Options", bound=BaseModel)
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")


@dataclass
class Decoded:
    """A request's images in 0..1, (N, 28, 28), in request order, and its other fields."""

    images: np.ndarray
    options: BaseModel


@dataclass
class Parsed:
    """A request read and its pictures decoded, not yet framed: the ``pixels`` instances already in
    ``frames``, the pictures' grayscale by instance index."""

    frames: np.ndarray
    pictures: dict[int, np.ndarray]
    options: BaseModel

    def framed(self, pictures: np.ndarray) -> Decoded:
        """The request with its pictures' frames (``to_mnist`` of ``pictures.values()``) in place."""
        self.frames[list(self.pictures)] = pictures
        return Decoded(self.frames, self.options)


def frame(parsed: Parsed) -> Decoded:
    """The request's pictures framed on their own; a blank one is an error naming its instance."""
    try:
        return parsed.framed(to_mnist(list(parsed.pictures.values())))
    except BlankImage as blank:
        raise blank.at(f"instance {list(parsed.pictures)[blank.position]}") from None


class IterationFramer:
    """Frames the pictures of all the requests read in one event-loop iteration with one ``to_mnist``.

    Under load an API server reads several requests per iteration, and framing costs per numpy call,
    not per pixel (``service.preprocess``): framed together, a handful of single-image requests cost
    about what one does, for one more event-loop step each. Should a picture be blank, the requests
    are framed one by one, so that only its own request fails.
    """

    def __init__(self) -> None:
        self._waiting: list[tuple[Parsed, asyncio.Future]] = []

    def frame(self, parsed: Parsed) -> asyncio.Future:
        """A future of ``frame(parsed)``: the decoded request, or the ``InputError`` of a blank picture."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((parsed, future))
        if len(self._waiting) == 1:
            future.get_loop().call_soon(self._frame_waiting)
        return future

    def _frame_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        outcomes: list[Decoded | Exception]
        try:
            frames = to_mnist([gray for parsed, _ in waiting for gray in parsed.pictures.values()])
            outcomes, start = [], 0
            for parsed, _ in waiting:
                outcomes.append(parsed.framed(frames[start: start + len(parsed.pictures)]))
                start += len(parsed.pictures)
        except BlankImage:  # rare: frame request by request, so that only the blank picture's request fails
            outcomes = [_outcome(parsed) for parsed, _ in waiting]
        except Exception as e:  # a bug of ours: every request of the iteration answers it
            outcomes = [e] * len(waiting)
        for (_, future), outcome in zip(waiting, outcomes):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)


def _outcome(parsed: Parsed) -> Decoded | Exception:
    try:
        return frame(parsed)
    except Exception as e:
        return e


def describe(error: ValidationError, prefix: str = "") -> str:
    """Pydantic's errors as one readable line: ``instances.0.pixels: Input should be a valid list``."""
    errors = error.errors()
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "") or "body"
        parts.append(f"{where}: {err['msg']}")
    more = len(errors) - 5
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (by header or by counting)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_payload_bytes:
        raise InputError(413, f"payload is {declared} bytes; the limit is {limits.max_payload_bytes}")
    chunks, size = [], 0
    while True:  # the ASGI messages themselves: Request.stream() is an async generator around this loop
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limits.max_payload_bytes:
            raise InputError(413, f"payload exceeds the limit of {limits.max_payload_bytes} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def parse_sync(headers: Headers, body: bytes, options_model: type[Options], limits: Limits) -> Decoded:
    """Dispatch on content type; count, decode and preprocess every image. CPU-bound, no I/O."""
    return frame(read_sync(headers, body, options_model, limits))


def read_sync(headers: Headers, body: bytes, options_model: type[Options], limits: Limits) -> Parsed:
    """``parse_sync`` up to the framing: dispatch on content type, count, validate, decode every picture."""
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        raw, options = _parse_json(body, options_model, limits)
    elif content_type == "multipart/form-data":
        raw, options = _parse_multipart(headers, body, options_model, limits)
    else:
        raise InputError(
            415, f"unsupported content type {content_type or '(none)'!r}: send application/json "
            '({"instances": [...]}) or multipart/form-data with "file" parts'
        )
    if len(raw) > limits.max_instances:
        raise InputError(413, f"{len(raw)} instances in one request; the limit is {limits.max_instances}")
    return _decode(raw, options, limits)


def _parse_json(body: bytes, options_model: type[Options], limits: Limits) -> tuple[list[Instance], BaseModel]:
    if not body.strip():
        raise InputError(400, 'request body is empty: send {"instances": [{"image_b64": ...} | {"pixels": ...}]}')
    try:
        payload = json.loads(body)
    except RecursionError:
        raise InputError(400, "JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(400, f"body is not valid JSON: {e}") from None
    if not isinstance(payload, dict):
        raise InputError(422, f'body must be a JSON object {{"instances": [...]}}, got {type(payload).__name__}')
    if "instances" not in payload:
        raise InputError(422, 'instances: field required ({"instances": [{"image_b64": ...} | {"pixels": ...}]})')
    try:
        instances = INSTANCES.validate_python(payload.pop("instances"))
    except ValidationError as e:
        raise InputError(422, describe(e, prefix="instances")) from None
    return instances, _options(options_model, payload, limits)


def _parse_multipart(headers: Headers, body: bytes, options_model: type[Options], limits: Limits):
    """Form parts: one or more ``file`` parts (curl -F file=@digit.png) and option fields."""
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + headers.get("content-type", "").encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise InputError(400, "multipart body could not be parsed (missing or wrong boundary)")
    files, fields = [], {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            if name != "file":
                raise InputError(422, f"unexpected file part {name!r}: name image parts 'file'")
            files.append(part.get_payload(decode=True) or b"")
        elif name:
            value = part.get_payload(decode=True)
            if value is None:
                raise InputError(422, f"form field {name!r} must be plain text")
            fields[name] = value.decode("utf-8", "replace")
    if not files:
        raise InputError(422, "multipart body has no 'file' part (curl -F file=@digit.png)")
    return files, _options(options_model, fields, limits)


def _options(options_model: type[Options], fields: dict, limits: Limits) -> BaseModel:
    try:
        return options_model.model_validate(fields, context={"max_ig_steps": limits.max_ig_steps})
    except ValidationError as e:
        raise InputError(422, describe(e)) from None


def _decode(raw: list[Instance] | list[bytes], options: BaseModel, limits: Limits) -> Parsed:
    """Every instance checked: pixels validated into their frames, pictures decoded one by one."""
    frames = np.empty((len(raw), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    pictures: dict[int, np.ndarray] = {}
    for index, item in enumerate(raw):
        try:
            if isinstance(item, Instance) and item.pixels is not None:
                frames[index] = validate_pixels(item.pixels)
            else:
                pictures[index] = decode_image(item if isinstance(item, bytes) else _b64(item.image_b64), limits)
        except InputError as e:
            raise e.at(f"instance {index}") from None
    return Parsed(frames, pictures, options)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(_DATA_URL.sub("", text.strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, "image_b64 is not valid base64") from None
