"""Turn any digit picture into what the model was trained on: MNIST's 28x28 frame.

MNIST was made by fitting each digit into a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing that box in a 28x28 image so that the centre of mass of the ink
lies at the centre. We do the same to whatever a client sends (``docs/pictures.md``):

- ``decode``: bytes -> a grey picture (transparency on white, or on black under a light drawing; a phone's
  JPEG decoded smaller);
- ``margin``: a margin of the picture's own paper around a digit cropped tight;
- ``ink``: where the digit's ink is, the way a document scanner finds it (local background,
  polarity, noise, threshold, connected components), and what made that uncertain;
- ``frame``: MNIST's recipe on that ink (crop, fit in 20x20, centre of mass at the centre);
- ``pixels``: frames that arrive ready made, checked like pictures; the model's mean/std.

``prepare`` and ``prepare_many`` run these for the API server; the worker applies
``normalize``. This package is the only place that knows these steps.

Memory: a request holds one big picture at a time. ``request_pixels`` refuses a request whose
pictures claim too many pixels in all, from their headers; each picture is decoded already made
smaller where it is big (``decode``), and one still bigger than ``FRAMED_ALONE_PIXELS`` once
decoded is framed at once, alone, so that only its 28x28 frame is kept. Small pictures (MNIST
files, canvases) are kept and framed together, which is what makes many of them cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypedDict

import numpy as np

from service.config import Limits
from service.errors import InputError
from service.imaging.decode import Picture, check_size, claimed_size, decode_image, decode_picture
from service.imaging.frame import BlankImage, to_mnist, to_mnist_with_ink
from service.imaging.ink import FAINT, MULTIPLE, Ink
from service.imaging.pixels import check_frames, frame_note, normalize, validate_pixels
from service.model.fnn import IMAGE_SIDE, INPUT_SIZE

NO_DIGIT = "no_digit"  # the flag of a picture in which no digit is found (DESIGN.md, "Not a digit")
Raw: TypeAlias = "bytes | list[list[float]] | list[float]"  # as a client sends it: a picture, or pixels
FLAGS = (MULTIPLE, FAINT)
FRAMED_ALONE_PIXELS = 320 * 320  # a decoded picture bigger than this is framed as soon as it is decoded

__all__ = ["FLAGS", "NO_DIGIT", "BlankImage", "Note", "Prepared", "Raw", "check_frames", "decode_image", "normalize",
           "prepare", "prepare_many", "request_pixels", "to_mnist", "validate_pixels"]


class Note(TypedDict):
    """What the framing found in one instance: ``box`` [x, y, width, height] of the digit in the client's
    picture (pixels, EXIF orientation applied; for ``pixels`` instances, in the 28x28 frame), and
    ``flags``, a subset of FLAGS in that order, empty when nothing made it unsure; or, for a picture
    in which no digit is found, ``box`` None and ``flags`` [NO_DIGIT] (its frame is black)."""

    box: list[int] | None
    flags: list[str]


class Prepared(np.ndarray):
    """One request's frames, float32 (n, 28, 28) in 0..1, usable as the array they are; ``notes[i]``
    is instance i's ``Note``. (An array, so that code that takes frames keeps taking them.)"""

    notes: list[Note]

    def __new__(cls, frames: np.ndarray, notes: list[Note]) -> Prepared:
        prepared = np.asarray(frames).view(cls)
        prepared.notes = notes
        return prepared

    def __array_finalize__(self, obj: Any) -> None:
        """Views and copies of the whole request (a reshape to (n, 784)) keep the notes; parts of it
        do not (``notes`` follows the first axis only while it is the request's)."""
        notes = getattr(obj, "notes", [])
        self.notes = notes if self.ndim and len(self) == len(notes) else []


@dataclass
class _Decoded:
    """A request's instances decoded, not yet framed: the pixel arrays already in ``frames`` (and their
    notes), the pictures by instance index."""

    frames: np.ndarray
    pictures: dict[int, Picture]
    notes: list[Note | None] = field(default_factory=list)

    def framed(self, frames: np.ndarray, inks: Sequence[Ink | None]) -> Prepared:
        indices = list(self.pictures)
        self.frames[indices] = frames
        for index, digit in zip(indices, inks):
            self.notes[index] = _note(digit, self.pictures[index])
        return Prepared(self.frames, self.notes)  # type: ignore[arg-type]  # every instance has its note now


def request_pixels(instances: Sequence[Raw], limits: Limits) -> int:
    """The pixels a request's instances claim in all, read from the pictures' headers (a ``pixels``
    instance: 784): 413 for a picture over the per-picture limits, naming it, or for all of them past
    ``--max-request-pixels``, before a single picture is decoded."""
    total = 0
    for index, item in enumerate(instances):
        if not isinstance(item, bytes):
            total += INPUT_SIZE
            continue
        width, height = claimed_size(item)
        if width and height:
            try:
                check_size(width, height, limits)
            except InputError as e:
                raise e.at(f"instance {index}") from None
        total += width * height
    if total > limits.max_request_pixels:
        raise InputError(413, f"the request's pictures hold {total} pixels in all; the limit is "
                              f"{limits.max_request_pixels} (max_request_pixels): send fewer or smaller pictures")
    return total


def prepare(instances: Sequence[Raw], limits: Limits) -> Prepared:
    """One request's instances -> float32 (n, 28, 28) in 0..1, MNIST-framed, with a note per instance
    (a picture without a digit is noted ``no_digit``); the first bad one raises an ``InputError``
    naming its instance."""
    (outcome,) = prepare_many([instances], limits)
    if isinstance(outcome, InputError):
        raise outcome
    return outcome


def prepare_many(requests: Sequence[Sequence[Raw]], limits: Limits) -> list[Prepared | InputError]:
    """Several requests' instances at once, each request's frames (and notes) or its ``InputError``.

    Framing costs per numpy call, not per pixel, so the pictures of all the requests are framed
    together: a handful of single-image requests cost about what one does. A bad picture fails
    only its own request; a blank one is an answer (``no_digit``), not a failure.
    """
    outcomes: list[_Decoded | InputError] = []
    for instances in requests:
        try:
            outcomes.append(_decode(instances, limits))
        except InputError as e:
            outcomes.append(e)
    decoded = [d for d in outcomes if isinstance(d, _Decoded)]
    frames, inks = to_mnist_with_ink([picture.gray for d in decoded for picture in d.pictures.values()])
    done: list[Prepared | InputError] = []
    start = 0
    for outcome in outcomes:
        if isinstance(outcome, _Decoded):
            count = len(outcome.pictures)
            done.append(outcome.framed(frames[start: start + count], inks[start: start + count]))
            start += count
        else:
            done.append(outcome)
    return done


def _decode(instances: Sequence[Raw], limits: Limits) -> _Decoded:
    """Every instance checked: pixels validated into their frames, pictures decoded one by one (a big
    one framed at once, so that its pixels are dropped before the next is decoded)."""
    frames = np.empty((len(instances), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    pictures: dict[int, Picture] = {}
    notes: list[Note | None] = [None] * len(instances)
    for index, item in enumerate(instances):
        try:
            if isinstance(item, bytes):
                picture = decode_picture(item, limits)
                if picture.gray.size <= FRAMED_ALONE_PIXELS:
                    pictures[index] = picture
                    continue
                framed, (digit,) = to_mnist_with_ink([picture.gray])
                frames[index] = framed[0]
                notes[index] = _note(digit, picture)
            else:
                frames[index] = validate_pixels(item)
                box, flags = frame_note(frames[index])
                notes[index] = Note(box=box, flags=flags)
        except InputError as e:
            raise e.at(f"instance {index}") from None
    return _Decoded(frames, pictures, notes)


def _note(digit: Ink | None, picture: Picture) -> Note:
    """What the framing found in one picture: its digit's box and flags, or that it has none."""
    if digit is None:
        return Note(box=None, flags=[NO_DIGIT])
    return Note(box=_client_box(digit.box, picture), flags=digit.flags)


def _client_box(box: tuple[int, int, int, int], picture: Picture) -> list[int]:
    """A box in the decoded pixels -> the client's picture's pixels (they differ when a JPEG was decoded
    smaller), rounded outwards; plain ints, as the answer's JSON needs."""
    x, y, w, h = (int(v) for v in box)
    height, width = picture.gray.shape
    if width == picture.size[0] and height == picture.size[1]:
        return [x, y, w, h]
    sx, sy = picture.size[0] / width, picture.size[1] / height
    left, top = int(x * sx), int(y * sy)
    right, bottom = min(picture.size[0], -int(-(x + w) * sx // 1)), min(picture.size[1], -int(-(y + h) * sy // 1))
    return [left, top, right - left, bottom - top]
