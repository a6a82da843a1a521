"""In-process preprocessing: the two PNG decoders agree, and framing images together (a request's,
or all requests' of one event-loop iteration) gives each the frame it would get alone, placed as
MNIST places digits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from harness.server import encode
from service.config import Limits
from service.errors import InputError
from service.http.inputs import Parsed
from service.http.prepare import Preparer
from service.http.schemas import PredictOptions
from service.imaging import BlankImage, decode_image, to_mnist


def digits(mnist_test, count: int) -> list[np.ndarray]:
    return list(mnist_test[0][:count].numpy())


def on_canvas(digit: np.ndarray, size: tuple[int, int], at: tuple[int, int], scale: int = 1) -> np.ndarray:
    """A real digit, optionally enlarged, pasted light-on-dark onto a bigger canvas at (row, column)."""
    picture = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC))
    canvas = np.zeros(size, np.uint8)
    canvas[at[0]: at[0] + picture.shape[0], at[1]: at[1] + picture.shape[1]] = picture
    return canvas


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA"])
def test_plain_png_decodes_like_pillow(mode):
    """8-bit PNGs go through libspng, other formats through Pillow: the same picture as PNG and as a
    lossless TIFF must give the same gray to within one level (random colours and transparency)."""
    rng = np.random.default_rng(3)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
    pixels = rng.integers(0, 256, size=(37, 45, channels), dtype=np.uint8)
    picture = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    from_png = decode_image(encode(picture, "PNG"), Limits())
    from_tiff = decode_image(encode(picture, "TIFF"), Limits())
    assert from_png.shape == (37, 45) and from_png.dtype == np.float32
    np.testing.assert_allclose(from_png, from_tiff, atol=1.0)
    assert np.ptp(from_png) > 100  # the picture survived: not flattened to one colour


def test_a_request_frames_each_image_as_if_alone(mnist_test):
    """Mixed sizes, contrasts, polarities and positions in one call: each frame equals that image framed alone."""
    seven, two, one, zero, four = digits(mnist_test, 5)
    grays = [
        seven, two * 0.4 + 90, 255 - one,  # 28x28: bright, faint on gray, dark-on-light
        on_canvas(zero, (90, 70), (5, 10), scale=2), on_canvas(seven, (90, 70), (30, 2), scale=2),  # resized
        on_canvas(four, (50, 60), (10, 20)),  # another size, only moved
    ]
    grays = [g.astype(np.float32) for g in grays]
    together = to_mnist(grays)
    alone = np.stack([to_mnist([g])[0] for g in grays])
    assert together.shape == (6, 28, 28) and together.dtype == np.float32
    np.testing.assert_array_equal(together, alone)
    assert len({frame.tobytes() for frame in together}) == 6  # no image got another's frame


def test_frames_follow_the_mnist_recipe(mnist_test):
    """White on black in 0..1, the digit within 20x20, its centre of mass within a pixel of the centre;
    where it sits on the canvas and which way round its colours are change nothing."""
    seven = digits(mnist_test, 1)[0]
    variants = [on_canvas(seven, (120, 100), at) for at in ((0, 0), (80, 60), (40, 13))]
    variants += [255 - v for v in variants]
    frames = to_mnist([v.astype(np.float32) for v in variants])
    for frame in frames[1:]:
        np.testing.assert_array_equal(frame, frames[0])
    frame = frames[0]
    assert frame.max() == pytest.approx(1.0) and frame.min() == 0.0
    rows, cols = np.flatnonzero(frame.any(1)), np.flatnonzero(frame.any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 <= 20
    cy, cx = ndimage.center_of_mass(frame)
    assert abs(cy - 13.5) <= 1 and abs(cx - 13.5) <= 1, (cy, cx)
    big = to_mnist([on_canvas(seven, (200, 200), (30, 50), scale=5).astype(np.float32)])[0]  # enlarged 5x
    assert max(np.ptp(np.flatnonzero(big.any(1))), np.ptp(np.flatnonzero(big.any(0)))) + 1 == 20
    assert np.abs(big - frame).mean() < 0.05  # close to the original after the round trip through 20x20


def test_blank_image_is_reported_by_its_position(mnist_test):
    seven = digits(mnist_test, 1)[0].astype(np.float32)
    blank = np.full((50, 50), 200, np.float32)
    with pytest.raises(BlankImage) as raised:
        to_mnist([seven, on_canvas(seven.astype(np.uint8), (50, 50), (3, 3)).astype(np.float32), blank, seven])
    assert raised.value.position == 2 and raised.value.status == 422


def test_a_flipped_bit_anywhere_in_a_png_is_refused(mnist_test):
    """libspng is told to skip chunk checksums; we check them, so a damaged file is a 400, as with Pillow,
    never a decoded picture of noise."""
    png = encode(digits(mnist_test, 1)[0])
    decode_image(png, Limits())  # intact, it decodes
    rng = np.random.default_rng(11)
    for position, bit in zip(rng.integers(0, len(png), 200), rng.integers(0, 8, 200)):
        damaged = bytearray(png)
        damaged[position] ^= 1 << int(bit)
        with pytest.raises(InputError) as refused:
            decode_image(bytes(damaged), Limits())
        assert refused.value.status == 400, (position, refused.value.detail)


def test_requests_of_one_iteration_are_framed_together_and_apart(mnist_test):
    """The API server prepares the pictures of all requests read in one event-loop iteration in one
    call: each request still gets exactly its own frames, and a blank picture fails only its request."""
    seven, two, one = (d.astype(np.float32) for d in digits(mnist_test, 3))
    blank = np.full((28, 28), 255, np.float32)
    canvas = on_canvas(one.astype(np.uint8), (60, 50), (9, 4)).astype(np.float32)
    good = [[seven], [two, canvas, one], [], [one, two]]  # uneven counts: a wrong split shows

    def frame_in_one_iteration(requests):
        async def frame_all():
            preparer = Preparer(Limits())
            parsed = [Parsed([encode(gray.astype(np.uint8)) for gray in grays], PredictOptions()) for grays in requests]
            return await asyncio.gather(*(preparer.prepare(p, 0.0) for p in parsed), return_exceptions=True)
        return asyncio.run(frame_all())

    for requests in (good, [*good[:2], [one, blank], *good[2:]]):
        for grays, result in zip(requests, frame_in_one_iteration(requests)):
            if grays and grays[-1] is blank:
                assert isinstance(result, InputError) and result.status == 422
                assert result.detail.startswith("instance 1: no digit"), result.detail
            else:
                assert result.images.shape == (len(grays), 28 * 28)
                np.testing.assert_array_equal(result.images.reshape(-1, 28, 28), to_mnist(grays))
