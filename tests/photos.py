"""Photo-like pictures of MNIST digits, seeded: a digit written on paper, lit, photographed and saved.

Each picture is one MNIST **training-file** digit, drawn as ink on paper and photographed: ``render``
composes reflectance (paper x ink) with illumination in linear light, then the camera (blur, gamma,
sensor noise, JPEG). The digits are those the committed model held out for validation (the seed-1
split of ``service.model.training``), so the model never trained on them and the test digits stay
for a held-out set.

A *kind* is one variation alone on an otherwise clean photo (white paper, black pen, even light,
no noise, PNG), or ``combined``: every variation at once, with random strengths. ``Style`` holds
the ranges; ``VARIANT`` is a differently parameterised style (other sizes, harsher light, other
inks) to check that nothing is tuned to ``DEFAULT``.

    python -m tests.photos [--seed 0] [--count 500] [--variant] [--test-digits]   # accuracy by kind
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

KINDS = ("gradient", "shadow", "paper", "pencil", "noise", "blur", "rotation", "jpeg", "phone", "combined")
Range = tuple[float, float]
_GAMMA = np.round(255 * np.linspace(0, 1, 4096) ** (1 / 2.2)).astype(np.uint8)  # linear light -> sRGB-like levels


@dataclass(frozen=True)
class Style:
    """The ranges every variation draws from (a picture's side in pixels, strengths as fractions)."""

    side: Range = (200, 560)  # shorter side of an ordinary picture
    phone_side: Range = (2100, 2600)  # shorter side at phone resolution (the longer one: equal or 4:3)
    digit: Range = (0.3, 0.6)  # digit height / shorter side
    phone_digit: Range = (0.08, 0.3)
    sharpness: Range = (1.0, 3.0)  # how crisp pen strokes are (1: the upscaled digit as it is)
    gradient: Range = (0.35, 0.7)  # darkest / brightest illumination across the page
    shadow: Range = (0.3, 0.6)  # illumination in the shadow, the lit side being 1
    penumbra: Range = (0.003, 0.05)  # width of the shadow's edge / shorter side
    paper: Range = (0.7, 0.9)  # paper albedo (white paper is 0.9)
    texture: Range = (0.02, 0.08)  # paper grain, relative
    pen: Range = (0.03, 0.15)  # pen albedo
    pencil: Range = (0.3, 0.6)  # graphite albedo (grey)
    noise: Range = (3.0, 12.0)  # sensor noise, grey levels (sd)
    blur: Range = (0.6, 2.0)  # Gaussian blur sd, pixels per 400 px of picture
    rotation: Range = (-12.0, 12.0)  # degrees
    quality: Range = (25, 90)  # JPEG quality
    exposure: Range = (0.75, 1.0)  # brightest paper / full scale


DEFAULT = Style()
VARIANT = Style(side=(120, 900), phone_side=(2400, 3400), digit=(0.15, 0.8), phone_digit=(0.05, 0.2),
                sharpness=(0.8, 4.0), gradient=(0.25, 0.8), shadow=(0.2, 0.7), penumbra=(0.001, 0.1),
                paper=(0.6, 0.95), texture=(0.01, 0.12), pen=(0.0, 0.25), pencil=(0.25, 0.7),
                noise=(2.0, 16.0), blur=(0.4, 2.6), rotation=(-15.0, 15.0), quality=(15, 95), exposure=(0.5, 1.05))


@dataclass(frozen=True)
class Photo:
    """One picture as a client would send it, and what is known about it."""

    data: bytes  # PNG or JPEG
    label: int
    kind: str
    size: tuple[int, int]  # width, height
    box: tuple[int, int, int, int]  # the digit's ink, (x, y, width, height) in the picture


def validation_digits(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 training-file digits the committed model held out (uint8 (N, 28, 28), labels)."""
    import torch

    from service.model.data import load_mnist

    images, labels = load_mnist(data_dir, train=True)
    held_out = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:5000]
    return images[held_out].numpy(), labels[held_out].numpy()


def photos(digits: np.ndarray, labels: np.ndarray, count: int, seed: int, style: Style = DEFAULT,
           kinds: tuple[str, ...] = KINDS) -> Iterator[Photo]:
    """``count`` pictures, the kinds in turn (so each has count / len(kinds)), digits drawn at random."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(digits), size=count, replace=False)
    for i, pick in enumerate(picks):
        kind = kinds[i % len(kinds)]
        yield render(digits[pick], int(labels[pick]), kind, np.random.default_rng([seed, i]), style)


def render(digit: np.ndarray, label: int, kind: str, rng: np.random.Generator, style: Style = DEFAULT) -> Photo:
    """One MNIST digit (uint8 28x28, light on dark) as a photo of ink on paper with the variations of ``kind``."""
    on = _variations(kind, rng)
    phone = "phone" in on
    u = _uniform(rng)
    short = round(u(*(style.phone_side if phone else style.side)))
    # phones render at a quarter of their size, then upscale: their optics and demosaicing are soft anyway
    work = 4 if phone else 1
    width, height = _shape(short // work, rng)
    ink, box = _coverage(digit, (width, height), on, rng, style, phone)
    paper = _paper(ink.shape, on, rng, style)
    ink_albedo = u(*style.pencil) if "pencil" in on and rng.random() < 0.6 else u(*style.pen)
    if "pencil" in on and ink_albedo >= style.pencil[0]:  # graphite: grainy coverage
        ink = ink * np.clip(1 - 0.5 * _smooth_noise(ink.shape, 0.7, rng), 0, 1)
    colour = _colours(on, rng)
    light = _light((width, height), on, rng, style) * u(*style.exposure)
    lit_paper, lit_ink = light * paper * (1 - ink), light * (ink_albedo * ink)
    picture = np.stack([lit_paper * c_paper + lit_ink * c_ink for c_paper, c_ink in colour], -1)
    if "blur" in on:
        picture = _blur(picture, u(*style.blur) * short / work / 400)
    image = Image.fromarray(_GAMMA[(np.clip(picture, 0, 1) * (len(_GAMMA) - 1)).astype(np.uint16)])
    image = _sensor_noise(image, u(*style.noise) if "noise" in on else 0.0, rng)
    if phone:  # a phone's demosaicing and denoising leave its noise a few pixels across
        image = image.resize((width * work, height * work), Image.Resampling.BILINEAR)
        box = tuple(v * work for v in box)  # type: ignore[assignment]
    data = _save(image, on, rng, style)
    return Photo(data, label, kind, image.size, box)


def _variations(kind: str, rng: np.random.Generator) -> set[str]:
    """The kind alone, or every variation for ``combined`` (a tenth of them at phone resolution)."""
    if kind != "combined":
        return {kind}
    every = set(KINDS) - {"phone", "combined"}
    return every | ({"phone"} if rng.random() < 0.1 else set())


def _uniform(rng: np.random.Generator):
    return lambda low, high: float(rng.uniform(low, high))


def _shape(short: int, rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): square, landscape or portrait 4:3."""
    long = round(short * rng.choice([1.0, 4 / 3]))
    return (long, short) if rng.random() < 0.5 else (short, long)


def _coverage(digit: np.ndarray, size: tuple[int, int], on: set[str], rng: np.random.Generator, style: Style,
              phone: bool) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Ink coverage 0..1 over the page (the digit upscaled, crisped like a pen, rotated, placed) and its box."""
    width, height = size
    u = _uniform(rng)
    target = u(*(style.phone_digit if phone else style.digit)) * min(size)
    scale = target / 20  # MNIST's digits fill a 20-pixel box of their 28
    side = max(28, round(28 * scale))
    up = np.asarray(Image.fromarray(digit.astype(np.float32) / 255, "F").resize((side, side), Image.Resampling.BICUBIC))
    k = u(*style.sharpness)
    up = np.clip((up - 0.5) * k + 0.5, 0, 1) if k > 1 else np.clip(up * k, 0, 1)
    angle = u(*style.rotation) if "rotation" in on else 0.0
    layer = np.asarray(Image.fromarray(up.astype(np.float32), "F").rotate(angle, Image.Resampling.BICUBIC, expand=True))
    layer = np.clip(layer, 0, 1)
    rows, cols = np.flatnonzero(layer.max(1) > 0.1), np.flatnonzero(layer.max(0) > 0.1)
    layer = layer[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    h, w = layer.shape
    h, w = min(h, height), min(w, width)
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    ink = np.zeros((height, width), np.float32)
    ink[top: top + h, left: left + w] = layer[:h, :w]
    return ink, (left, top, w, h)


def _paper(shape: tuple[int, int], on: set[str], rng: np.random.Generator, style: Style) -> np.ndarray:
    """Paper albedo: 0.9 white, or off-white with grain at a fibre scale and at a pixel scale."""
    if "paper" not in on:
        return np.full(shape, 0.9, np.float32)
    u = _uniform(rng)
    texture = u(*style.texture)
    grain = 0.6 * _smooth_noise(shape, u(2, 6), rng) + 0.4 * _smooth_noise(shape, 0.6, rng)
    return (u(*style.paper) * (1 + texture * grain)).astype(np.float32)


def _colours(on: set[str], rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Per channel (R, G, B): (paper tint, ink tint). Off-white paper is warm; pens are black or blue."""
    paper = (1.0, float(rng.uniform(0.94, 1.0)), float(rng.uniform(0.82, 0.97))) if "paper" in on else (1, 1, 1)
    ink = (0.5, 0.7, 1.6) if "pencil" in on and rng.random() < 0.3 else (1, 1, 1)  # a blue ballpoint
    return [(p, i) for p, i in zip(paper, ink)]


def _light(size: tuple[int, int], on: set[str], rng: np.random.Generator, style: Style) -> np.ndarray:
    """Illumination over the page: even, a gradient (a lamp to one side, vignetting), and/or a shadow edge."""
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    yy, xx = yy / max(size), xx / max(size)
    light = np.ones((height, width), np.float32)
    u = _uniform(rng)
    if "gradient" in on:
        angle = u(0, 2 * math.pi)
        ramp = xx * math.cos(angle) + yy * math.sin(angle)
        ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
        low = u(*style.gradient)
        light *= low + (1 - low) * ramp
        cy, cx = u(0, height / max(size)), u(0, width / max(size))
        light *= 1 - u(0, 0.25) * ((yy - cy) ** 2 + (xx - cx) ** 2)  # a lamp's falloff
    if "shadow" in on:
        angle = u(0, math.pi)
        # the edge passes through the middle half of the page
        oy, ox = u(0.25, 0.75) * height / max(size), u(0.25, 0.75) * width / max(size)
        distance = (xx - ox) * math.sin(angle) - (yy - oy) * math.cos(angle)
        softness = u(*style.penumbra) * min(size) / max(size)
        lit = 1 / (1 + np.exp(-np.clip(distance / max(softness, 1e-4) * 4, -30, 30)))
        depth = u(*style.shadow)
        light *= depth + (1 - depth) * lit
    return light


def _smooth_noise(shape: tuple[int, int], scale: float, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean noise of unit sd with features about ``scale`` pixels across (drawn small, upscaled)."""
    h, w = shape
    small = (max(2, round(w / scale)), max(2, round(h / scale)))
    noise = rng.standard_normal((small[1], small[0]), dtype=np.float32)
    big = np.asarray(Image.fromarray(noise, "F").resize((w, h), Image.Resampling.BILINEAR))
    return big / max(float(big.std()), 1e-6)


def _blur(picture: np.ndarray, sigma: float) -> np.ndarray:
    """A slightly out-of-focus lens: Gaussian blur of each channel."""
    return ndimage.gaussian_filter(picture, (sigma, sigma, 0), truncate=3.0)


def _sensor_noise(image: Image.Image, sd: float, rng: np.random.Generator) -> Image.Image:
    """Gaussian read noise in grey levels, independent per channel (photon noise is swamped at these levels)."""
    if sd <= 0:
        return image
    pixels = np.asarray(image, np.float32)
    pixels = pixels + rng.standard_normal(pixels.shape, dtype=np.float32) * sd
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def _save(image: Image.Image, on: set[str], rng: np.random.Generator, style: Style) -> bytes:
    """PNG when nothing asks for JPEG; phones save JPEG at high quality, ``jpeg`` at any."""
    buffer = io.BytesIO()
    if "jpeg" in on:
        image.save(buffer, "JPEG", quality=int(rng.integers(*style.quality, endpoint=True)))
    elif "phone" in on:
        image.save(buffer, "JPEG", quality=int(rng.integers(85, 95, endpoint=True)))
    else:
        image.save(buffer, "PNG", compress_level=0)  # stored: deflating noise costs more than the rest
    return buffer.getvalue()


def accuracy_by_kind(pictures: list[Photo], predicted: list[int]) -> dict[str, float]:
    """Share right per kind, and ``all``."""
    right: dict[str, list[bool]] = {}
    for photo, label in zip(pictures, predicted):
        right.setdefault(photo.kind, []).append(photo.label == label)
        right.setdefault("all", []).append(photo.label == label)
    return {kind: sum(r) / len(r) for kind, r in right.items()}


def read(pictures: Iterable[Photo]) -> tuple[list[Photo], list[int], int]:
    """The pictures, what the committed model reads in each (-1 where no digit is found), and how many
    had none found, in process."""
    import torch

    from service import imaging
    from service.config import Limits
    from service.model import store

    loaded = store.load(Path("model_store"), store.DEFAULT_NAME)
    norm = loaded.metadata.normalization
    seen, predicted, unread = [], [], 0
    for picture in pictures:
        seen.append(picture)
        prepared = imaging.prepare([picture.data], Limits())
        if "no_digit" in prepared.notes[0]["flags"]:
            unread += 1
            predicted.append(-1)
            continue
        x = torch.from_numpy(imaging.normalize(np.asarray(prepared), norm.mean, norm.std)).reshape(1, -1)
        with torch.inference_mode():
            predicted.append(int(loaded.model(x).argmax(1)))
    return seen, predicted, unread


def report_by_kind(description: str, make: Callable[[np.ndarray, np.ndarray, int, int], Iterable[Photo]]) -> None:
    """The command line of ``python -m tests.crops`` and ``python -m tests.ruled``: ``make(digits, labels,
    count, seed)``'s pictures, drawn from the held-out training digits, and the share read by kind."""
    import os

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=500)
    args = parser.parse_args()
    digits, labels = validation_digits(Path(os.environ.get("DIGITSERVE_DATA_DIR", "../shared/datasets")))
    pictures, predicted, unread = read(make(digits, labels, args.count, args.seed))
    scores = accuracy_by_kind(pictures, predicted)
    print({kind: round(score, 3) for kind, score in scores.items()}, f"no digit found: {unread}")


def _main() -> None:
    import os
    import time

    import torch

    from service import imaging
    from service.config import Limits
    from service.errors import InputError
    from service.model import store
    from service.model.data import load_mnist

    parser = argparse.ArgumentParser(description="accuracy of the committed model on generated photos, by kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--variant", action="store_true", help="the differently parameterised style")
    parser.add_argument("--test-digits", action="store_true", help="MNIST test digits, not held-out training ones")
    args = parser.parse_args()
    data_dir = Path(os.environ.get("DIGITSERVE_DATA_DIR", "../shared/datasets"))
    if args.test_digits:
        images, labels = load_mnist(data_dir, train=False)
        digits, labels_ = images.numpy(), labels.numpy()
    else:
        digits, labels_ = validation_digits(data_dir)
    style = VARIANT if args.variant else DEFAULT
    loaded = store.load(Path("model_store"), store.DEFAULT_NAME)
    norm = loaded.metadata.normalization
    pictures, predicted, flagged, refused, spent = [], [], 0, [], 0.0
    for photo in photos(digits, labels_, args.count, args.seed, style):
        pictures.append(photo)
        started = time.perf_counter()
        try:
            prepared = imaging.prepare([photo.data], Limits())
        except InputError as e:
            refused.append((photo.kind, e.detail))
            predicted.append(-1)
            continue
        finally:
            spent += time.perf_counter() - started
        flagged += bool(prepared.notes[0]["flags"])
        x = torch.from_numpy(imaging.normalize(np.asarray(prepared), norm.mean, norm.std)).reshape(1, -1)
        with torch.inference_mode():
            predicted.append(int(loaded.model(x).argmax(1)))
    scores = accuracy_by_kind(pictures, predicted)
    print({kind: round(score, 3) for kind, score in scores.items()})
    print(f"flagged {flagged}; refused {refused}; prepare {spent / len(pictures) * 1000:.1f} ms per picture")


if __name__ == "__main__":
    _main()


__all__ = ["DEFAULT", "KINDS", "VARIANT", "Photo", "Style", "accuracy_by_kind", "photos", "render",
           "validation_digits"]
