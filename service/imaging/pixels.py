"""Pixels that arrive already in MNIST's frame: checked like pictures (a blank or inverted frame, or one
on the wrong scale, would otherwise get a confident wrong answer), never moved; and the model's mean/std."""

from __future__ import annotations

import numpy as np

from service.errors import InputError
from service.imaging import ink
from service.imaging.frame import BlankImage
from service.model.fnn import IMAGE_SIDE, MNIST_MEAN, MNIST_STD

_BLANK = BlankImage(0).detail
_INVERTED = ("pixels look inverted (a light background): MNIST frames are a light digit (up to 255) on a "
             "black (0) background; send 255 - value")
_TENSOR_INVERTED = _INVERTED.replace("255)", "1)").replace("255 - value", "1 - value")


def validate_pixels(pixels: object) -> np.ndarray:
    """A client's 28x28 array of 0..255 numbers -> float32 (28, 28) in 0..1, geometry untouched."""
    try:
        arr = np.asarray(pixels, dtype=np.float64)
    except (ValueError, TypeError):
        raise InputError(422, "pixels must be a 28x28 array of numbers (rows of equal length)") from None
    if arr.shape == (IMAGE_SIDE * IMAGE_SIDE,):
        raise InputError(422, "pixels must be 28 rows of 28 numbers; got a flat list of 784: send it as 28 lists "
                              "of 28 (row by row, e.g. numpy's reshape(28, 28).tolist())")
    if arr.shape != (IMAGE_SIDE, IMAGE_SIDE):
        raise InputError(422, f"pixels must be 28x28 (28 rows of 28 numbers), got shape "
                              f"{'x'.join(map(str, arr.shape)) or 'scalar'}")
    if not np.isfinite(arr).all():
        raise InputError(422, "pixels must be finite numbers (found NaN or infinity)")
    low, high = float(arr.min()), float(arr.max())
    if low < 0 or high > 255:
        raise InputError(422, f"pixels must lie in 0..255 (found {low:g}..{high:g})")
    if 0 < high <= 1:
        raise InputError(422, f"pixels are on the 0..255 scale (MNIST's bytes), but these all lie in 0..1 (found "
                              f"{low:g}..{high:g}), as torchvision's ToTensor gives: multiply them by 255")
    _check_content(arr[None], 255.0, _INVERTED, np.array([high]), np.array([low]))
    return (arr / 255.0).astype(np.float32)


def check_frames(frames: np.ndarray) -> None:
    """(N, 28, 28) float frames in 0..1 (tensors: the Open Inference Protocol's ``pixels``), checked as
    ``validate_pixels`` checks one: non-finite values, a blank frame or an inverted one is a 422 that
    names its instance. A handful of reductions over the batch, on every V2 request's path."""
    flat = frames.reshape(len(frames), -1)
    high, low = flat.max(1), flat.min(1)  # NaN and infinities show in these
    finite = np.isfinite(high) & np.isfinite(low)
    if not finite.all():
        raise InputError(422, "pixels must be finite numbers (found NaN or infinity)").at(
            f"instance {int(finite.argmin())}")
    _check_content(frames, 1.0, _TENSOR_INVERTED, high, low)


def _check_content(frames: np.ndarray, full: float, inverted: str, high: np.ndarray, low: np.ndarray) -> None:
    """Blank (no contrast of 16 grey levels against the border, as for pictures) or inverted (a light
    border): 422 for the first such frame, naming it when there are several. ``high``, ``low``: each
    frame's extremes, which both callers have already computed for their own checks."""
    paper = ink.border_median(frames)
    blank = np.maximum(high - paper, paper - low) < ink.MIN_CONTRAST / 255 * full
    light = paper >= full / 2
    for wrong, detail in ((blank, _BLANK), (light, inverted)):
        if wrong.any():
            error = InputError(422, detail)
            raise error.at(f"instance {int(wrong.argmax())}") if len(frames) > 1 else error


def frame_note(frame: np.ndarray) -> tuple[list[int], list[str]]:
    """A checked frame's ink box (x, y, width, height: pixels of at least a tenth of the brightest) and
    flags, as a picture's are found."""
    peak = float(frame.max())
    strokes = frame >= ink.INK_SHARE * peak
    rows, cols = np.flatnonzero(strokes.any(1)), np.flatnonzero(strokes.any(0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    flags = [ink.FAINT] if peak * 255 < ink.LOW_CONTRAST else []
    if ink.several(np.where(strokes, frame, 0), ink.STRONG_SHARE * peak):
        flags.insert(0, ink.MULTIPLE)
    return box, flags


def normalize(images: np.ndarray, mean: float = MNIST_MEAN, std: float = MNIST_STD) -> np.ndarray:
    """(N, 28, 28) in 0..1 -> the model's input, with the mean/std the model was trained with."""
    return (images - np.float32(mean)) / np.float32(std)
