"""Turn any digit picture into what the model was trained on: MNIST's 28x28 frame.

MNIST was made by fitting each digit into a 20x20 box (keeping its aspect ratio, with
anti-aliasing) and placing that box in a 28x28 image so that the centre of mass of the ink
lies at the centre. We do the same to whatever a client sends (``docs/pictures.md``):

- ``decode``: bytes -> a grey picture (transparency on white; a phone's JPEG decoded smaller);
- ``margin``: a margin of the picture's own paper around a digit cropped tight;
- ``ink``: where the digit's ink is, the way a document scanner finds it (local background,
  polarity, noise, threshold, connected components), and what made that uncertain;
- ``frame``: MNIST's recipe on that ink (crop, fit in 20x20, centre of mass at the centre);
- ``pixels``: frames that arrive ready made, checked like pictures; the model's mean/std.

``prepare`` and ``prepare_many`` run these for the API server; the worker applies
``normalize``. This package is the only place that knows these steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypedDict

import numpy as np

from service.answers import NO_DIGIT
from service.config import Limits
from service.errors import InputError
from service.imaging.decode import Picture, decode_image, decode_picture
from service.imaging.frame import BlankImage, to_mnist, to_mnist_with_ink
from service.imaging.ink import FAINT, MULTIPLE, Ink
from service.imaging.pixels import check_frames, frame_note, normalize, validate_pixels
from service.model.fnn import IMAGE_SIDE

Raw: TypeAlias = "bytes | list[list[float]] | list[float]"  # as a client sends it: a picture, or pixels
FLAGS = (MULTIPLE, FAINT)

__all__ = ["FLAGS", "NO_DIGIT", "BlankImage", "Note", "Prepared", "Raw", "check_frames", "decode_image", "normalize",
           "prepare", "prepare_many", "to_mnist", "validate_pixels"]


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
            self.notes[index] = (Note(box=None, flags=[NO_DIGIT]) if digit is None else
                                 Note(box=_client_box(digit.box, self.pictures[index]), flags=digit.flags))
        return Prepared(self.frames, self.notes)  # type: ignore[arg-type]  # every instance has its note now


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
    """Every instance checked: pixels validated into their frames, pictures decoded one by one."""
    frames = np.empty((len(instances), IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    pictures: dict[int, Picture] = {}
    notes: list[Note | None] = [None] * len(instances)
    for index, item in enumerate(instances):
        try:
            if isinstance(item, bytes):
                pictures[index] = decode_picture(item, limits)
            else:
                frames[index] = validate_pixels(item)
                box, flags = frame_note(frames[index])
                notes[index] = Note(box=box, flags=flags)
        except InputError as e:
            raise e.at(f"instance {index}") from None
    return _Decoded(frames, pictures, notes)


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
