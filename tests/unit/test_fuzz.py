"""Fuzz the decode and validation path in-process: whatever the bytes, a clear 4xx or good images.

Every test sends something a client could send (a body and a content type) through
``inputs.parse`` then ``imaging.prepare``, what turns a request into images, and checks the
contract: either N images of (28, 28) float32 in 0..1 (N = the instances sent),
or an ``InputError`` with a 4xx status and a detail that can be sent as JSON. Anything else would be
a 500 over HTTP. Derandomized and without an example database, so CI runs the same cases each time
(about 25 s). For a longer hunt with fresh random cases: ``DIGITSERVE_FUZZ_SCALE=20 pytest tests/unit/test_fuzz.py``
(20x the examples, not derandomized). A failing request is saved, replayable, to FAILURE_FILE.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from starlette.datastructures import Headers

from service import imaging
from service.config import Limits
from service.errors import InputError
from service.http import inputs
from service.http.schemas import ExplainOptions, PredictOptions
from tests.e2e.test_errors import png_claiming

LIMITS = Limits(max_image_side=512, max_image_pixels=100_000, max_instances=64)
CLIENT_STATUSES = {400, 413, 415, 422}
JSON = "application/json"
BOUNDARY = "fuzzb0undary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
OPTIONS = st.sampled_from([PredictOptions, ExplainOptions])

SCALE = float(os.environ.get("DIGITSERVE_FUZZ_SCALE", "1"))
FUZZ = settings(
    max_examples=round(200 * SCALE),
    deadline=None,
    derandomize=SCALE == 1,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example,
                           HealthCheck.filter_too_much],
)


class Req(NamedTuple):
    """A request as the server sees it; ``n`` is how many images it holds if it is well-formed."""

    content_type: str
    body: bytes
    n: int | None = None


class Blob(bytes):
    """Image bytes that print short in a failure report (the full request is saved to a file)."""

    def __repr__(self) -> str:
        return f"Blob(<{len(self)} bytes, starts {bytes(self[:16])!r}, sha1 {hashlib.sha1(self).hexdigest()[:12]}>)"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


FAILURE_FILE = Path(tempfile.gettempdir()) / "digitserve-fuzz-failure.json"


def _save_failure(req: Req, options_model, error: BaseException) -> None:
    """The last (so, after shrinking, the minimal) request that broke the contract, replayable as is."""
    FAILURE_FILE.write_text(json.dumps({
        "content_type": req.content_type, "options": options_model.__name__, "error": repr(error),
        "body_b64": base64.b64encode(req.body).decode(),
        "replay": "parse_and_prepare(Headers(raw=[(b'content-type', ct.encode('latin-1'))]), "
                  "base64.b64decode(body_b64), "
                  "Options, Limits(max_image_side=512, max_image_pixels=100_000, max_instances=64))",
    }, indent=1))
    error.add_note(f"request saved to {FAILURE_FILE}")


def _count(outcome: str) -> None:
    if currently_in_test_context():  # the mix of outcomes: pytest --hypothesis-show-statistics
        event(outcome)


def parse_and_prepare(headers: Headers, body: bytes, options_model, limits: Limits) -> tuple[np.ndarray, object]:
    """What an API server does with a body before queueing it: the schema stage, then imaging."""
    parsed = inputs.parse(headers, body, options_model, limits)
    return imaging.prepare(parsed.instances, limits), parsed.options


def check(req: Req, options_model) -> np.ndarray | None:
    """The contract of parse_and_prepare for any input (see the module docstring)."""
    headers = Headers(raw=[(b"content-type", req.content_type.encode("latin-1"))])
    try:
        images, options = parse_and_prepare(headers, req.body, options_model, LIMITS)
    except InputError as e:
        _count(f"InputError {e.status}")
        assert e.status in CLIENT_STATUSES, (e.status, e.detail)
        assert isinstance(e.detail, str) and e.detail.strip(), repr(e.detail)
        json.dumps({"detail": e.detail}, ensure_ascii=False).encode("utf-8")  # what the error response sends
        return None
    except Exception as e:  # would be a 500: the client's input broke our code
        _save_failure(req, options_model, e)
        raise
    _count("decoded")
    assert isinstance(images, np.ndarray) and images.dtype == np.float32, (type(images), getattr(images, "dtype", None))
    assert images.ndim == 3 and images.shape[1:] == (28, 28), images.shape
    if req.n is not None:
        assert images.shape[0] == req.n, (images.shape, req.n)
    assert np.isfinite(images).all(), "non-finite pixels"
    assert images.min() >= 0.0 and images.max() <= 1.0, (images.min(), images.max())
    assert isinstance(options, options_model)
    return images


# ---------------------------------------------------------------- request builders


def as_json(instances: list, n: int | None = None, **fields) -> Req:
    return Req(JSON, json.dumps({"instances": instances, **fields}).encode(), n if n is not None else len(instances))


def b64_instances(*images: bytes) -> Req:
    return as_json([{"image_b64": base64.b64encode(data).decode()} for data in images])


def multipart(parts: list[tuple[bytes, bytes]], boundary: str = BOUNDARY) -> bytes:
    """``parts``: (headers block, payload); the body exactly as curl -F would frame it."""
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + payload + b"\r\n"
                   for head, payload in parts)
    return out + b"--" + boundary.encode() + b"--\r\n"


def file_part(data: bytes, name: str = "file", filename: str = "digit.png", content_type: str = "image/png"):
    head = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\nContent-Type: {content_type}'
    return head.encode(), data


def field_part(name: str, value: bytes):
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value


def multipart_files(*images: bytes) -> Req:
    return Req(MULTIPART, multipart([file_part(data) for data in images]), len(images))


# ---------------------------------------------------------------- real-looking digit images


def digit(size: tuple[int, int] = (40, 40), dark_on_light: bool = True, seed: int = 7) -> Image.Image:
    """A hand-drawn-looking 7 (grayscale), some strokes, anywhere in the frame."""
    w, h = size
    rng = np.random.default_rng(seed)
    bg, ink = (255, 0) if dark_on_light else (0, 255)
    image = Image.new("L", size, bg)
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, max(1, w // 3))), int(rng.integers(0, max(1, h // 3)))
    x1, y1 = x0 + max(1, w // 2), y0 + max(1, h // 2)
    width = max(1, min(w, h) // 10)
    draw.line([(x0, y0), (x1, y0), (x0 + (x1 - x0) // 3, y1)], fill=ink, width=width)
    return image


def encode(image: Image.Image, fmt: str, **args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **args)
    return buffer.getvalue()


def animated_gif() -> bytes:
    frames = [digit(seed=s).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def png_16bit(fmt: str = "PNG") -> bytes:
    arr = np.asarray(digit(), dtype=np.uint16) * 257
    return encode(Image.fromarray(arr.astype(np.uint16)), fmt)


def tiff_float(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32)), "TIFF")


def float_digit(special: float) -> np.ndarray:
    arr = np.asarray(digit(dark_on_light=False), dtype=np.float32)
    arr[0, 0] = special
    return arr


def one_colour(mode: str = "L", colour=200, fmt: str = "PNG") -> bytes:
    return encode(Image.new(mode, (30, 30), colour), fmt)


SEED_IMAGES: list[bytes] = [
    encode(digit(), "PNG"),
    encode(digit(dark_on_light=False).convert("RGB"), "PNG"),
    encode(digit().convert("RGBA"), "PNG"),
    encode(digit().convert("LA"), "PNG"),
    encode(digit().convert("P"), "PNG", transparency=255),
    encode(digit().convert("1"), "PNG"),
    png_16bit(),
    encode(digit(), "JPEG", quality=80),
    encode(digit().convert("RGB"), "JPEG", progressive=True),
    encode(digit().convert("CMYK"), "JPEG"),
    encode(digit().convert("P"), "GIF"),
    animated_gif(),
    encode(digit().convert("RGB"), "BMP"),
    encode(digit().convert("1"), "BMP"),
    encode(digit().convert("RGB"), "WEBP", quality=70),
    encode(digit().convert("RGBA"), "WEBP", lossless=True),
    encode(digit(), "TIFF"),
    tiff_float(np.asarray(digit(dark_on_light=False), dtype=np.float32)),
    png_16bit("TIFF"),
]
GOOD_PNG = SEED_IMAGES[0]

# Regression examples: the nasty cases, each an (image bytes) that must give good images or a clear 4xx.
NASTY_IMAGES = {
    "png claiming 1x100000": png_claiming(1, 100_000),
    "png claiming 100000x1": png_claiming(100_000, 1),
    "png claiming 0x0": png_claiming(0, 0),
    "png claiming 2^31x2^31": png_claiming(2**31 - 1, 2**31 - 1),
    "animated gif": animated_gif(),
    "1x1 black": encode(Image.new("L", (1, 1), 0), "PNG"),
    "1x1 white": encode(Image.new("L", (1, 1), 255), "PNG"),
    "1x1 rgba transparent": encode(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), "PNG"),
    "2x1 two colours": encode(Image.fromarray(np.array([[0, 255]], np.uint8)), "PNG"),
    "1x512 line": encode(Image.fromarray(np.array([[0] * 255 + [255] * 2 + [0] * 255], np.uint8)), "PNG"),
    "16-bit png": png_16bit(),
    "cmyk jpeg": encode(digit().convert("CMYK"), "JPEG"),
    "one colour grey": one_colour(),
    "one colour black": one_colour(colour=0),
    "one colour rgb jpeg": one_colour("RGB", (10, 200, 30), "JPEG"),
    "fully transparent png": one_colour("RGBA", (0, 0, 0, 0)),
    "float tiff with nan": tiff_float(float_digit(math.nan)),
    "float tiff with inf": tiff_float(float_digit(math.inf)),
    "float tiff with -inf": tiff_float(float_digit(-math.inf)),
    "float tiff all negative": tiff_float(np.full((20, 20), -5.0)),
    "max-side png (512x195)": encode(digit((512, 195)), "PNG"),
    "just over side limit": encode(Image.new("L", (513, 1), 0), "PNG"),
    "pixel limit exactly": encode(digit((400, 250)), "PNG"),
    "gif 0 frames of data": b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
    "bmp header only": (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
                        + struct.pack("<IiiHHIIiiII", 40, 28, 28, 1, 24, 0, 0, 0, 0, 0, 0)),
    "riff not webp": b"RIFF\x04\x00\x00\x00WAVE",
}


# ---------------------------------------------------------------- strategies


@st.composite
def generated_images(draw) -> bytes:
    """Any small image Pillow can write: random size, mode, content (digit, noise, flat) and format."""
    w, h = draw(st.integers(1, 64)), draw(st.integers(1, 64))
    kind = draw(st.sampled_from(["digit", "noise", "flat"]))
    if kind == "digit":
        image = digit((w, h), dark_on_light=draw(st.booleans()), seed=draw(st.integers(0, 99)))
    elif kind == "noise":
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        image = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8))
    else:
        image = Image.new("L", (w, h), draw(st.integers(0, 255)))
    fmt, mode = draw(st.sampled_from([
        ("PNG", "L"), ("PNG", "RGB"), ("PNG", "RGBA"), ("PNG", "LA"), ("PNG", "P"), ("PNG", "1"), ("PNG", "I;16"),
        ("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("GIF", "P"), ("GIF", "L"), ("BMP", "RGB"), ("BMP", "1"),
        ("BMP", "P"), ("WEBP", "RGB"), ("WEBP", "RGBA"), ("TIFF", "L"), ("TIFF", "RGB"), ("TIFF", "CMYK"),
        ("TIFF", "I;16"), ("TIFF", "F"),
    ]))
    if mode == "F":
        arr = np.asarray(image, dtype=np.float32) * draw(st.sampled_from([1.0, -1.0, 1e-6, 1e30]))
        if draw(st.booleans()):
            arr[draw(st.integers(0, h - 1)), draw(st.integers(0, w - 1))] = draw(
                st.floats(allow_nan=True, allow_infinity=True, width=32))
        return tiff_float(arr)
    if mode == "I;16":
        scaled = np.asarray(image, dtype=np.uint16) * draw(st.sampled_from([1, 257]))
        return encode(Image.fromarray(scaled.astype(np.uint16)), fmt)
    image = image.convert(mode)
    args = {}
    if mode in ("P", "L") and fmt in ("PNG", "GIF") and draw(st.booleans()):
        args["transparency"] = draw(st.integers(0, 255))
    return encode(image, fmt, **args)


@st.composite
def mutated(draw, seeds: st.SearchStrategy[bytes]) -> bytes:
    """Flip, insert, delete, overwrite or truncate bytes, often in the header where parsers decide the most."""
    data = bytearray(draw(seeds))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        near_header = draw(st.booleans())
        pos = draw(st.integers(0, min(len(data), 64) - 1 if near_header else len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "int32"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos: pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:  # a size or length field gone wild
            data[pos: pos + 4] = struct.pack(">I", draw(st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 65535, 100_000])))
    return bytes(data)


ANY_IMAGE = st.one_of(
    st.sampled_from(SEED_IMAGES),
    generated_images(),
    mutated(st.sampled_from(SEED_IMAGES)),
    mutated(generated_images()),
    st.sampled_from(list(NASTY_IMAGES.values())),
).map(Blob)

JSON_LEAVES = (
    st.none() | st.booleans()
    | st.integers(min_value=-(10**300), max_value=10**300) | st.integers(-300, 300)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from(["", "AAAA", "data:image/png;base64,", "\x00", "\ud800", "\U0001f600", "saliency", "1e309"])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=40,
)
FIELD_NAMES = st.sampled_from(["image_b64", "pixels", "png", "", "Pixels", "image", "instances"]) | st.text(max_size=8)
OPTION_FIELDS = st.dictionaries(
    st.sampled_from(["method", "target", "steps", "quadrature", "top_k", "heatmap", "model", "instance"])
    | st.text(max_size=6),
    st.sampled_from(["saliency", "gradient_x_input", "integrated_gradients", "midpoint", "exact", "true", "5"])
    | st.integers(-(2**70), 2**70) | st.sampled_from([0, 1, 9, 10, 100, 101, 256, 257]) | JSON_LEAVES,
    max_size=4,
)


@st.composite
def pixel_arrays(draw) -> object:
    """Arrays of random shapes, values and types; 28x28 most often, sparse odd values in a uniform fill."""
    shape = draw(st.sampled_from(["28x28", "28x28", "28x28", "near", "any"]))
    if shape == "28x28":
        rows, cols = 28, 28
    elif shape == "near":
        rows, cols = draw(st.sampled_from([(0, 0), (1, 1), (27, 28), (28, 27), (29, 28), (28, 29), (784, 1), (1, 784)]))
    else:
        rows, cols = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    fill = draw(st.sampled_from(["fixed", "in range", "in range", "any"]).flatmap(lambda kind: {
        "fixed": st.sampled_from([0, 0.0, 255, 128.5, 1]), "in range": st.floats(0, 255),
        "any": st.floats(-1e3, 1e3)}[kind]))
    grid = [[fill] * cols for _ in range(rows)]
    odd = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**40), 10**40) | st.sampled_from(
        [255, 255.0000001, -0.0, -1e-300, 256, True, None, "7", [], [1, 2], {"a": 1}])
    for _ in range(draw(st.sampled_from([0, 0, 0, 0, 1, 2, 6])) if rows and cols else 0):
        grid[draw(st.integers(0, rows - 1))][draw(st.integers(0, cols - 1))] = draw(odd)
    if rows and draw(st.integers(0, 9)) == 0:  # ragged
        grid[draw(st.integers(0, rows - 1))] = grid[0][: draw(st.integers(0, cols))]
    if draw(st.integers(0, 19)) == 0:
        return draw(st.sampled_from([[grid], grid[0] if grid else [], "28x28", 0, {"0": grid}]))
    return grid


@st.composite
def wrong_instance(draw) -> dict:
    kind = draw(st.integers(0, 5))
    if kind == 0:
        return {"pixels": draw(pixel_arrays())}
    if kind == 1:
        return {"image_b64": base64.b64encode(draw(ANY_IMAGE)).decode()}
    if kind == 2:
        return {"image_b64": draw(st.text(max_size=40)
                                  | st.sampled_from(["=", "====", "A", "AA==", "data:;base64,AA=="]))}
    return draw(st.dictionaries(FIELD_NAMES,
                                JSON_VALUES | pixel_arrays() | st.just(base64.b64encode(GOOD_PNG).decode()),
                                max_size=3))


@st.composite
def structured_requests(draw) -> Req:
    instances = draw(st.lists(wrong_instance(), min_size=0, max_size=4))
    if draw(st.integers(0, 29)) == 0:
        instances = instances * 17  # over max_instances
    return as_json(instances, **draw(OPTION_FIELDS))


def _text_for_header(draw, max_size: int = 30) -> str:
    """What an HTTP header value can carry: visible ASCII, space, tab and obs-text (0x80-0xFF)."""
    chars = st.characters(codec="latin-1", exclude_characters="\r\n\x00", exclude_categories=["Cc"]) | st.just("\t")
    return draw(st.text(chars, max_size=max_size))


@st.composite
def content_types(draw) -> str:
    base = draw(st.sampled_from([
        JSON, "APPLICATION/JSON", " application/json ; charset=utf-8", "application/json; charset=latin-1",
        MULTIPART, "multipart/form-data", "multipart/form-data; boundary=", 'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=x; boundary=y", "multipart/mixed; boundary=fuzzb0undary", "image/png",
        "text/plain", "application/x-www-form-urlencoded", "", ";", "application/json;;;", "*/*",
    ]))
    if draw(st.booleans()):
        return base
    return draw(st.sampled_from([base + _text_for_header(draw), _text_for_header(draw)]))


@st.composite
def multipart_requests(draw) -> Req:
    """Random framing around images and fields: names, filenames, transfer encodings, nested parts, junk."""
    parts, files = [], 0
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 6))
        if kind <= 2:
            parts.append(file_part(draw(ANY_IMAGE), filename=draw(st.sampled_from(["7.png", "", "a\"b", "ü.jpg"]))))
            files = None if files is None else files + 1
        elif kind == 3:
            name = draw(st.sampled_from(["method", "steps", "target", "heatmap", "quadrature", "top_k", "file", "x"]))
            parts.append(field_part(name, draw(st.binary(max_size=20)
                                               | st.sampled_from([b"saliency", b"3", b"true", b"\xff\xfe"]))))
        elif kind == 4:
            encoding = draw(st.sampled_from(["base64", "quoted-printable", "8bit", "x-uue", "bogus"]))
            head = ("Content-Disposition: form-data; name=\"file\"; filename=\"7.png\"\r\n"
                    f"Content-Transfer-Encoding: {encoding}")
            parts.append((head.encode(), draw(st.sampled_from([base64.b64encode(GOOD_PNG), b"!!!", b"=ZZ", GOOD_PNG]))))
            files = None if files is None else files + 1
        elif kind == 5:  # a nested multipart part, with or without a filename
            inner = multipart([file_part(GOOD_PNG)], boundary="inner")
            filename = draw(st.sampled_from(["", '; filename="x.png"']))
            head = f'Content-Disposition: form-data; name="{draw(st.sampled_from(["file", "x"]))}"{filename}\r\n' \
                   "Content-Type: multipart/mixed; boundary=inner"
            parts.append((head.encode(), inner))
            files = None if files is None else files + bool(filename)
        else:  # raw header junk
            parts.append((draw(st.binary(max_size=60)), draw(st.binary(max_size=60))))
            files = None
    body = multipart(parts)
    if draw(st.integers(0, 4)) == 0:
        cut = draw(st.integers(0, len(body)))
        body, files = body[:cut], None
    return Req(MULTIPART, body, files)


# ---------------------------------------------------------------- the tests


@FUZZ
@given(content_type=content_types(), body=st.binary(max_size=2000), options=OPTIONS)
@example(content_type=JSON, body=b"", options=PredictOptions)
@example(content_type=JSON, body=b"\xff\xfe\x00", options=PredictOptions)
@example(content_type=MULTIPART, body=b"--" + BOUNDARY.encode() + b"--\r\n", options=ExplainOptions)
@example(content_type="multipart/form-data; boundary=\xff", body=b"--\xff\r\n\r\n", options=PredictOptions)
def test_random_bytes_any_content_type(content_type, body, options):
    check(Req(content_type, body), options)


PART_HEADS = st.sampled_from([
    b"", b"\r\n", b'Content-Disposition: form-data; name="file"; filename="7.png"\r\n\r\n',
    b'Content-Disposition: form-data; name="file"; filename="7.png"\r\nContent-Type: image/png\r\n\r\n',
    b'Content-Disposition: form-data; name="method"\r\n\r\n', b"Content-Disposition: form-data\r\n\r\n",
])
PART_ENDS = st.sampled_from([b"", b"\r\n--" + BOUNDARY.encode() + b"--\r\n", b"\r\n--" + BOUNDARY.encode() + b"\r\n"])


@FUZZ
@given(head=PART_HEADS, body=st.binary(max_size=3000) | ANY_IMAGE, end=PART_ENDS, options=OPTIONS)
def test_random_bytes_as_multipart_parts(head, body, end, options):
    check(Req(MULTIPART, b"--" + BOUNDARY.encode() + b"\r\n" + head + body + end), options)


@FUZZ
@given(value=JSON_VALUES, wrap=st.booleans(), options=OPTIONS)
@example(value={"instances": [{}]}, wrap=False, options=PredictOptions)
@example(value={"instances": [{"pixels": None, "image_b64": None}]}, wrap=False, options=PredictOptions)
@example(value={"instances": [{"image_b64": ""}]}, wrap=False, options=PredictOptions)
@example(value={"instances": [{"pixels": []}]}, wrap=False, options=ExplainOptions)
@example(value={"instances": [{"pixels": [[]]}]}, wrap=False, options=PredictOptions)
@example(value=[{"pixels": [[math.nan] * 28] * 28}], wrap=True, options=PredictOptions)
@example(value=[{"pixels": [[math.inf] * 28] * 28}], wrap=True, options=PredictOptions)
@example(value=[{"pixels": [[10**300] * 28] * 28}], wrap=True, options=PredictOptions)
@example(value=[{"pixels": [[True] * 28] * 28}], wrap=True, options=PredictOptions)
@example(value=[{"pixels": [["1"] * 28] * 28}], wrap=True, options=PredictOptions)
def test_random_json_values(value, wrap, options):
    payload = {"instances": value} if wrap else value
    n = len(value) if wrap and isinstance(value, list) else None
    check(Req(JSON, json.dumps(payload, allow_nan=True).encode(), n), options)


DEEP = 100_000


@pytest.mark.parametrize("body", [
    b"[" * DEEP + b"]" * DEEP,
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    b'{"instances": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    b'{"instances": [{"pixels": ' + b"[" * DEEP + b"]" * DEEP + b"}]}",
    b'{"instances": [{"pixels": [[' + b"9" * 5000 + b"]]}]}",  # past Python's int-digits limit
    b'{"instances": [{"pixels": [[1e99999]]}]}',
    b'{"instances": [{"pixels": [[-Infinity]]}]}',
    b'{"instances": [{"pixels": [[0]]}], "steps": ' + b"9" * 5000 + b"}",
    b'{"instances": [{"image_b64": "\\ud800"}]}',
    b'{"instances": [{"\\ud800": 1}]}',
    b'{"instances": [{"pixels": [[0]]}], "\\udfff": 1}',
    '{"instances": [{"image_b64": "٣٣٣٣"}]}'.encode(),  # non-ASCII digits: not base64
    b'{"instances": [], "instances": [{"pixels": 1}]}',  # duplicate keys: the last one wins
    b"\xef\xbb\xbf" + json.dumps({"instances": [{"image_b64": base64.b64encode(GOOD_PNG).decode()}]}).encode(),
    json.dumps({"instances": [{"image_b64": base64.b64encode(GOOD_PNG).decode()}]}).encode("utf-16"),
], ids=["deep list", "deep object", "deep instances", "deep pixels", "5000-digit int", "1e99999", "-Infinity",
        "5000-digit steps", "lone surrogate b64", "lone surrogate key", "lone surrogate option", "arabic digits b64",
        "duplicate keys", "utf-8 bom", "utf-16"])
@pytest.mark.parametrize("options", [PredictOptions, ExplainOptions], ids=["predict", "explain"])
def test_nasty_json_bodies(body, options):
    check(Req(JSON, body), options)


@FUZZ
@given(req=structured_requests(), options=OPTIONS)
@example(req=as_json([{"pixels": [[0] * 28] * 28}], method="saliency", steps=10**30), options=ExplainOptions)
@example(req=as_json([{"pixels": [[0] * 28] * 28}], steps=257), options=ExplainOptions)
@example(req=as_json([{"pixels": [[0] * 28] * 28}] * 65), options=PredictOptions)
@example(req=as_json([{"pixels": [[0] * 28] * 28}] * 64), options=PredictOptions)
def test_structured_but_wrong_requests(req, options):
    check(req, options)


@FUZZ
@given(pixels=pixel_arrays(), options=OPTIONS)
@example(pixels=[[0] * 28] * 28, options=PredictOptions)
@example(pixels=[[255] * 28] * 28, options=PredictOptions)
@example(pixels=[[255.0000001] * 28] * 28, options=PredictOptions)
@example(pixels=[[-0.0] * 28] * 28, options=PredictOptions)
def test_pixel_arrays(pixels, options):
    decoded = check(Req(JSON, json.dumps({"instances": [{"pixels": pixels}]}, allow_nan=True).encode(), 1), options)
    if decoded is not None:  # pixels are taken as they are: only scaled, never moved
        assert np.array_equal(decoded[0], (np.asarray(pixels, np.float64) / 255).astype(np.float32))


def _as_example(name: str, data: bytes, via: str):
    return example(image=Blob(data), via=via, options=PredictOptions).via(f"{name} ({via})")


def with_nasty_examples(test):
    for name, data in NASTY_IMAGES.items():
        test = _as_example(name, data, "json")(test)
    for name in ("png claiming 1x100000", "animated gif", "16-bit png", "cmyk jpeg", "float tiff with nan"):
        test = _as_example(name, NASTY_IMAGES[name], "multipart")(test)
    return test


@settings(FUZZ, max_examples=round(400 * SCALE))
@with_nasty_examples
@given(image=ANY_IMAGE, via=st.sampled_from(["json", "multipart"]), options=OPTIONS)
def test_images_mutated_or_odd(image, via, options):
    check(b64_instances(image) if via == "json" else multipart_files(image), options)


@FUZZ
@given(images=st.lists(ANY_IMAGE, min_size=1, max_size=3), via=st.sampled_from(["json", "multipart"]), options=OPTIONS)
def test_several_images_in_one_request(images, via, options):
    """Good images among bad: the request is all-or-nothing, and N images come back in order."""
    decoded = check(b64_instances(*images) if via == "json" else multipart_files(*images), options)
    if decoded is not None:
        alone = [check(b64_instances(image), options)[0] for image in images]
        assert np.array_equal(decoded, np.stack(alone))


@FUZZ
@given(req=multipart_requests(), options=OPTIONS)
@example(req=Req(MULTIPART, multipart([field_part("x", b"1")])), options=PredictOptions)
@example(req=Req(MULTIPART, multipart([file_part(GOOD_PNG), field_part("method", b"saliency"),
                                       field_part("steps", b"999")])), options=ExplainOptions)
@example(req=Req(MULTIPART, multipart([file_part(GOOD_PNG, name="image")])), options=PredictOptions)
@example(req=Req(MULTIPART, multipart([file_part(b"")]), 1), options=PredictOptions)
@example(req=Req(MULTIPART, multipart([(b'Content-Disposition: form-data; name="\xff"', b"1"), file_part(GOOD_PNG)])),
         options=PredictOptions)
@example(req=Req(MULTIPART, multipart([
    (b'Content-Disposition: form-data; name="x"\r\nContent-Type: multipart/mixed; boundary=inner',
     multipart([file_part(GOOD_PNG)], boundary="inner")),
    file_part(GOOD_PNG)])), options=PredictOptions).via("nested multipart field part")
def test_multipart_framing(req, options):
    check(req, options)


def test_good_inputs_still_decode():
    """The fuzz strategies' seeds are real digits: each one alone is accepted (the property is not vacuous)."""
    for data in SEED_IMAGES:
        for req in (b64_instances(data), multipart_files(data)):
            decoded = check(req, ExplainOptions)
            assert decoded is not None and decoded.shape == (1, 28, 28)
            assert decoded.max() == pytest.approx(1.0, abs=1e-6)
