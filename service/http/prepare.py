"""The preprocessing stage in an API server: parsed requests -> ``Work`` (``service.imaging``).

Under load an API server reads several requests per event-loop iteration, and framing costs per
numpy call, not per pixel: the requests read in one iteration are prepared together, at its
end, with one ``imaging.prepare_many``, for one more event-loop step each. A bad picture still
fails only its own request; a picture without a digit is left out of the images a worker computes
and answered from its note (``service.answers``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from service import answers, imaging
from service.config import Limits
from service.http import inputs
from service.model.fnn import INPUT_SIZE
from service.work import Work, work_units


class Preparer:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._waiting: list[tuple[inputs.Parsed, float, asyncio.Future[Work]]] = []

    def prepare(self, parsed: inputs.Parsed, arrived: float) -> asyncio.Future[Work]:
        """A future of the request's ``Work``, or of the ``InputError`` of its first bad picture."""
        future: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        self._waiting.append((parsed, arrived, future))
        if len(self._waiting) == 1:
            future.get_loop().call_soon(self._prepare_waiting)
        return future

    def prepare_now(self, parsed: inputs.Parsed, arrived: float) -> Work:
        """One request alone, prepared here (called in a thread for big bodies)."""
        return _work(parsed, imaging.prepare(parsed.instances, self.limits), arrived)

    def _prepare_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        outcomes: list[imaging.Prepared | Exception]
        try:
            outcomes = list(imaging.prepare_many([parsed.instances for parsed, _, _ in waiting], self.limits))
        except Exception as e:  # a bug of ours: every request of the iteration answers it
            outcomes = [e] * len(waiting)
        for (parsed, arrived, future), outcome in zip(waiting, outcomes):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(_work(parsed, outcome, arrived))


def _work(parsed: inputs.Parsed, frames: imaging.Prepared, arrived: float) -> Work:
    """The request's frames with a digit (a worker computes those only) and every instance's note."""
    options = parsed.options.model_dump()
    notes: list[dict[str, Any]] = [dict(note) for note in frames.notes]
    images = np.asarray(frames).reshape(len(frames), INPUT_SIZE)
    if len(found := answers.found(notes)) < len(images):
        images = images[found]
    return Work(images, options, arrived, units=work_units(len(images), options), notes=notes or None)
