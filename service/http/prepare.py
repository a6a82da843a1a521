"""The preprocessing stage in an API server: parsed requests -> ``Work`` (``service.imaging``).

First the pixels the request's pictures claim in their headers are counted (413 past
``--max-request-pixels``). A request with many pixels (or a big body) is prepared in a thread, so
that the event loop keeps answering while its pictures are decoded. The others are cheap: under
load an API server reads several of them per event-loop iteration, and framing costs per numpy
call, not per pixel, so the requests read in one iteration are prepared together, at its end,
with one ``imaging.prepare_many``, for one more event-loop step each. A bad picture still fails
only its own request; a picture without a digit is left out of the images a worker computes and
answered from its note (``service.answers``).
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

# Pictures that claim more pixels than this in all take milliseconds to decode: in a thread. (A 280x280
# canvas has 78,400; a phone photo 12 million, decoded at a quarter of its side.)
OFFLOAD_PIXELS = 1_000_000


class Preparer:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._waiting: list[tuple[inputs.Parsed, float, asyncio.Future[Work]]] = []

    async def prepare(self, parsed: inputs.Parsed, arrived: float, big_body: bool = False) -> Work:
        """The request's ``Work``, or the ``InputError`` of its first bad picture (413 for too many pixels)."""
        if imaging.request_pixels(parsed.instances, self.limits) > OFFLOAD_PIXELS or big_body:
            return await asyncio.to_thread(self.prepare_now, parsed, arrived)
        return await self._batched(parsed, arrived)

    def _batched(self, parsed: inputs.Parsed, arrived: float) -> asyncio.Future[Work]:
        """Prepared at the end of this event-loop iteration, with the other requests read in it."""
        future: asyncio.Future[Work] = asyncio.get_running_loop().create_future()
        self._waiting.append((parsed, arrived, future))
        if len(self._waiting) == 1:
            future.get_loop().call_soon(self._prepare_waiting)
        return future

    def prepare_now(self, parsed: inputs.Parsed, arrived: float) -> Work:
        """One request alone, prepared here (in a thread: see ``prepare``)."""
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
