"""The hardening's pieces, one by one (the real server's behaviour: tests/e2e/test_hardening.py)."""

from __future__ import annotations

import asyncio
import io
import logging

import httpx
import numpy as np
import pytest
from PIL import Image
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response

from harness.server import encode, png_claiming
from service import cli, imaging
from service.config import Limits, Settings
from service.errors import HttpError, InputError
from service.http.admission import Admission
from service.http.auth import given_key
from service.http.endpoints import pinned_version
from service.http.fastpath import FastPath, Post, error_response
from service.imaging import decode
from service.load import pool_loads
from service.pipes import Pending
from service.work import Pool


def test_a_big_png_is_decoded_smaller_as_pillow_would_reduce_it():
    rng = np.random.default_rng(28)
    rgba = rng.integers(0, 256, (2600, 1950, 4), dtype=np.uint8)  # not a multiple of the factor: partial blocks
    picture = decode.decode_picture(encode(rgba), Limits())
    factor = decode.shrink_factor(1950, 2600)
    assert factor == 4 and picture.size == (1950, 2600) and picture.gray.shape == (650, 488)
    expected = decode._to_gray(Image.fromarray(rgba).reduce(factor))  # Pillow weighs colours by alpha too
    difference = np.abs(picture.gray - expected)  # Pillow rounds its premultiplied colours to 8 bits
    assert difference.max() <= 3 and difference.mean() < 0.6


def test_pictures_of_ordinary_sizes_are_decoded_as_before():
    gray = np.random.default_rng(1).integers(0, 256, (1000, 1279), dtype=np.uint8)
    picture = decode.decode_picture(encode(gray), Limits())
    assert picture.gray.shape == (1000, 1279) and np.array_equal(picture.gray, gray.astype(np.float32))


def test_a_big_grey_16_bit_picture_is_shrunk_on_the_same_scale():
    deep = np.full((1300, 1300), 65535, np.uint16)
    deep[300:1000, 600:700] = 0
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, "PNG")
    gray = decode.decode_picture(buffer.getvalue(), Limits()).gray
    assert gray.shape == (650, 650) and gray.max() == pytest.approx(255) and gray.min() == 0


def test_the_pixels_of_a_request_are_counted_from_the_headers():
    limits = Limits(max_request_pixels=100_000_000, max_image_pixels=64_000_000)
    huge = png_claiming(8000, 8000)  # no pixel data: decoding would say "truncated", not 413
    assert imaging.request_pixels([huge, [[0.0] * 28] * 28], limits) == 64_000_000 + 784
    with pytest.raises(InputError) as refused:
        imaging.request_pixels([huge, huge], limits)
    assert refused.value.status == 413 and "128000000 pixels" in refused.value.detail
    assert imaging.request_pixels([b"not a picture"], limits) == 0  # decoding says what is wrong
    with pytest.raises(InputError) as one:  # one picture over its own limits: that one is named
        imaging.request_pixels([[[0.0] * 28] * 28, huge], Limits())
    assert one.value.status == 413 and one.value.detail.startswith("instance 1: image is 8000x8000")


def test_a_big_picture_is_framed_alone_and_boxed_in_the_clients_pixels():
    picture = np.full((2000, 2000), 255, np.uint8)
    picture[500:1500, 990:1010] = 0
    (note,) = imaging.prepare([encode(picture)], Limits()).notes
    x, y, w, h = note["box"]
    assert 980 <= x <= 990 and 490 <= y <= 500 and 1000 <= h <= 1020 and w <= 40, note


@pytest.mark.parametrize(("authorization", "key"), [
    ("Bearer k1", "k1"), ("bearer k1", "k1"), ("BEARER  k1 ", "k1"), ("k1", ""), ("Basic k1", ""), ("Bearer", ""),
    ("Bearerk1", ""),
])
def test_authorization_carries_a_key_only_as_bearer(authorization, key):
    assert given_key(Headers({"authorization": authorization}), "x-api-key") == key
    assert given_key(Headers({"authorization": authorization, "x-api-key": "k2"}), "x-api-key") == "k2"


@pytest.mark.parametrize("text", ["²", "١", "٣", "1" * 10, "1" * 5000, "0", "-1", "+1", " 1", "1.0", "", "1e3"])
def test_versions_are_one_to_nine_ascii_digits(text):
    for where, status in (("version", 422), ("the version in the path", 404), ("the model version", 400)):
        with pytest.raises(HttpError) as refused:
            pinned_version(text, where, status)
        assert refused.value.status == status and len(refused.value.detail) < 200
        assert refused.value.detail.isascii()
    assert pinned_version("007", "version", 422) == 7 and pinned_version("999999999", "version", 422) == 999_999_999


def test_error_answers_are_ascii_bounded_and_nosniff():
    answer = error_response(400, "é" * 100_000 + "\u202e")
    assert answer.body.isascii() and len(answer.body) < 6_000
    assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("value", ["", " "])
def test_an_empty_key_is_a_start_up_error(value):
    for flag in ("--api-key", "--admin-key"):
        with pytest.raises(ValueError, match="is empty"):
            cli.parse([flag, value])


def test_a_fault_of_ours_is_a_json_500_and_one_bounded_log_line(caplog):
    async def broken(request: Request) -> Response:
        raise RuntimeError("x" * 10_000)

    path = "/boom"
    app = FastPath([Post(path, "predict", broken)], full_stack=None, serving=lambda: 1)  # type: ignore[arg-type]

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://in") as client:
            return await client.post(path + "?" + "v" * 5000)

    with caplog.at_level(logging.ERROR, logger="digitserve"):
        answer = asyncio.run(go())
    assert answer.status_code == 500 and answer.json() == {"detail": "internal server error"}
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is None and "RuntimeError" in record.getMessage() and len(record.getMessage()) < 600


def test_a_request_answered_504_keeps_its_place_until_its_worker_answers():
    config = Settings(_cli_parse_args=[])  # type: ignore[call-arg]
    admission = Admission(config, pool_loads(config))

    async def go() -> tuple[int, int]:
        pending = Pending()
        with admission.admit("/explain", 4, 100.0, 30, 0.0) as admitted:
            admitted.keep_until(pending)  # what compute does when the deadline passes first
        held = admission.in_flight()
        pending.deliver(HttpError(504, "dropped"), False)  # the worker drops it
        return held, admission.in_flight()

    assert asyncio.run(go()) == (1, 0)
    assert admission.loads[Pool.EXPLAIN].held() == (0, 0, 0)
