"""The preprocessing stage in an API server: parsed requests -> ``Work`` (``service.imaging``).

First the pixels the request's pictures claim in their headers are counted (413 past
``--max-request-pixels``). A request with many pixels (or a big body) is prepared in a thread, so
that the event loop keeps answering while its pictures are decoded. The others are cheap: under
load an API server reads several of them per event-loop iteration, and framing costs per numpy
call, not per pixel, so the requests read in one iteration are prepared together, at its end,
with one ``imaging.prepare_many``, for one more event-loop step each. A bad picture still fails
only its own request; a picture without a digit is left out of the images a worker computes and
answered from its note (``service.http.dataplane``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from service import imaging
from service.config import Limits
from service.imaging import NO_DIGIT, Note, Raw
from service.model.fnn import INPUT_SIZE
from service.work import Work

PreparedWork = tuple[Work, list[Note]]

# Pictures that claim more pixels than this in all take milliseconds to decode: in a thread. (A 280x280
# canvas has 78,400; a phone photo 12 million, decoded at a quarter of its side.)
OFFLOAD_PIXELS = 1_000_000


class Preparer:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._waiting: list[tuple[list[Raw], dict[str, Any], float, asyncio.Future[PreparedWork]]] = []

    async def prepare(self, pictures: list[Raw], options: dict[str, Any], arrived: float, big_body: bool = False
                      ) -> PreparedWork:
        """The request's ``Work`` and its notes, or the ``InputError`` of its first bad picture (413 for too
        many pixels)."""
        if imaging.request_pixels(pictures, self.limits) > OFFLOAD_PIXELS or big_body:
            return await asyncio.to_thread(self.prepare_now, pictures, options, arrived)
        return await self._batched(pictures, options, arrived)

    def _batched(self, pictures: list[Raw], options: dict[str, Any], arrived: float) -> asyncio.Future[PreparedWork]:
        """Prepared at the end of this event-loop iteration, with the other requests read in it."""
        future: asyncio.Future[PreparedWork] = asyncio.get_running_loop().create_future()
        self._waiting.append((pictures, options, arrived, future))
        if len(self._waiting) == 1:
            future.get_loop().call_soon(self._prepare_waiting)
        return future

    def prepare_now(self, pictures: list[Raw], options: dict[str, Any], arrived: float) -> PreparedWork:
        """One request alone, prepared here (in a thread: see ``prepare``)."""
        return _work(imaging.prepare(pictures, self.limits), options, arrived)

    def _prepare_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        outcomes: list[imaging.Prepared | Exception]
        try:
            outcomes = list(imaging.prepare_many([pictures for pictures, _, _, _ in waiting], self.limits))
        except Exception as e:  # a bug of ours: every request of the iteration answers it
            outcomes = [e] * len(waiting)
        for (_, options, arrived, future), outcome in zip(waiting, outcomes):
            if future.done():  # the request was cancelled meanwhile
                continue
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            else:
                future.set_result(_work(outcome, options, arrived))


def _work(frames: imaging.Prepared, options: dict[str, Any], arrived: float) -> PreparedWork:
    """The request's frames with a digit (a worker computes those only) and every instance's note."""
    notes = frames.notes
    images = np.asarray(frames).reshape(len(frames), INPUT_SIZE)
    found = [i for i, note in enumerate(notes) if NO_DIGIT not in note["flags"]]
    if len(found) < len(images):
        images = images[found]
    return Work(images, options, arrived), notes
