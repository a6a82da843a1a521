"""HTTP body -> a parsed request: its instances (encoded pictures or pixel arrays) and its options.

The schema stage, in the API server: content type, JSON or multipart, the instance count, base64
and the options are checked here, and every client mistake becomes an ``InputError`` (a 4xx with a
detail). The pictures themselves are ``service.imaging``'s to decode and frame.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from email import policy
from email.parser import BytesParser
from typing import TypeVar

from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request

from service.config import Limits
from service.errors import InputError, shown
from service.http.schemas import INSTANCES, Instance
from service.imaging import Raw

Options = TypeVar("Options", bound=BaseModel)
_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,")
_BOUNDARY = re.compile(r';\s*boundary\s*=\s*(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
# Multipart bodies with more delimiters than this are parsed in a thread: the email parser costs about half
# a millisecond per part.
LIGHT_MULTIPART_PARTS = 2


@dataclass
class Parsed:
    """A request's instances in order (each ``bytes`` of an encoded picture or a pixel array) and its options."""

    instances: list[Raw]
    options: BaseModel


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
    if declared and declared.isascii() and declared.isdigit() and int(declared) > limits.max_payload_bytes:
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


def heavy(headers: Headers, body: bytes) -> bool:
    """Whether parsing this body takes long enough to belong in a thread (beside big bodies): a multipart
    body of several parts."""
    content_type = headers.get("content-type", "")
    return (content_type[:19].lower() == "multipart/form-data"
            and body.count(b"\r\n--") > LIGHT_MULTIPART_PARTS)


def parse(headers: Headers, body: bytes, options_model: type[Options], limits: Limits) -> Parsed:
    """Dispatch on content type; count the instances, validate the options. CPU-bound, no I/O."""
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
    return Parsed([_raw(item, index) for index, item in enumerate(raw)], options)


def _parse_json(body: bytes, options_model: type[Options],
                limits: Limits) -> tuple[Sequence[Instance | bytes], BaseModel]:
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


def _parse_multipart(headers: Headers, body: bytes, options_model: type[Options],
                     limits: Limits) -> tuple[Sequence[Instance | bytes], BaseModel]:
    """Form parts: one or more ``file`` parts (curl -F file=@digit.png) and option fields. The parts are
    counted (their delimiters) before any is parsed: past the instance limit and the options, 413."""
    content_type = headers.get("content-type", "")
    found = _BOUNDARY.search(content_type)
    if found is None:
        raise InputError(400, "multipart/form-data needs a boundary: Content-Type: multipart/form-data; "
                              "boundary=...")
    delimiter = b"--" + (found.group(1) or found.group(2)).encode("latin-1")
    parts = body.count(delimiter) - 1  # the last delimiter closes the body
    if parts < 1:
        raise InputError(400, "multipart body has no part: it is empty, or no part starts with its boundary "
                              "line (--boundary), or the closing --boundary-- line is missing")
    most = limits.max_instances + len(options_model.model_fields)
    if parts > most:
        raise InputError(413, f"multipart body has {parts} parts; at most {most} are taken (max_instances "
                              f"{limits.max_instances} files, and the options)")
    message = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise InputError(400, "multipart body could not be parsed (is its Content-Type's boundary the one the "
                              "body uses?)")
    files, fields = [], {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename() is not None:
            if name != "file":
                raise InputError(422, f"unexpected file part {shown(str(name))}: name image parts 'file'")
            payload = part.get_payload(decode=True)
            files.append(payload if isinstance(payload, bytes) else b"")
        elif name:
            value = part.get_payload(decode=True)
            if not isinstance(value, bytes):
                raise InputError(422, f"form field {shown(str(name))} must be plain text")
            fields[name] = value.decode("utf-8", "replace")
    if not files:
        raise InputError(422, "multipart body has no 'file' part (curl -F file=@digit.png)")
    return files, _options(options_model, fields, limits)


def _options(options_model: type[Options], fields: dict, limits: Limits) -> BaseModel:
    try:
        return options_model.model_validate(fields, context={"max_ig_steps": limits.max_ig_steps})
    except ValidationError as e:
        raise InputError(422, describe(e)) from None


def _raw(item: Instance | bytes, index: int) -> Raw:
    if isinstance(item, bytes):
        return item
    if item.pixels is not None:
        return item.pixels
    try:
        return base64.b64decode(_DATA_URL.sub("", (item.image_b64 or "").strip(), count=1), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(400, f"instance {index}: image_b64 is not valid base64") from None
