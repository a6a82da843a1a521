"""The one path every protocol's inference takes: key, body, schema, admission, preprocessing, a worker.

Native /predict and /explain, KServe V1 and the Open Inference Protocol (V2) are thin endpoint
classes over this (``service.http.endpoints``), so they share the admission limits, the batcher,
the worker pools and the metrics. A request flows one way: body (``inputs.read_body``) ->
admission -> ``inputs.parse`` (schema) -> ``Preparer`` (imaging, into a ``Work``) ->
``Dispatcher.submit`` -> the worker's answer. Admission comes once the body is read and parsed, so a
slow client never holds a place in the queue and the request's cost (``work_units``) is known.
"""

from __future__ import annotations

import asyncio
import re
import time
from contextlib import AbstractContextManager
from typing import Any

import orjson
from pydantic import BaseModel
from starlette.requests import Request

from service import answers, metrics
from service.config import Settings
from service.errors import HttpError, retry_later, shown
from service.http import inputs
from service.http.admission import Admission, Admitted
from service.http.auth import ApiKey
from service.http.dispatch import Dispatcher
from service.http.prepare import Preparer
from service.http.versioning import VersionControl
from service.pipes import Pending, WorkerDied
from service.work import Work

_MILLISECONDS = re.compile(r"[0-9]{1,9}")
# Bodies bigger than this are parsed and prepared in a thread: JSON of 16 pixel instances (64 KiB) takes
# milliseconds to parse, and the event loop would answer nobody meanwhile.
OFFLOAD_BYTES = 32 * 1024


class DataPlane:
    def __init__(self, settings: Settings, api_key: ApiKey, admission: Admission, preparer: Preparer,
                 dispatcher: Dispatcher, versions: VersionControl):
        self.settings, self.api_key, self.admission = settings, api_key, admission
        self.preparer, self.dispatcher, self.versions = preparer, dispatcher, versions

    async def read(self, request: Request, pool: str) -> bytes:
        """A refusal at once if ``pool``'s queue stands too long, then the whole body (413 past the limit).
        The API key was checked first, by the endpoint."""
        self.admission.precheck(pool)
        return await inputs.read_body(request, self.settings)

    def deadline(self, request: Request) -> float:
        """Seconds this request may take: ``--request-timeout-s``, or less if the client says so."""
        timeout = self.settings.request_timeout_s
        asked = request.headers.get("x-request-timeout-ms")
        if asked is None:
            return timeout
        if not _MILLISECONDS.fullmatch(asked):
            raise HttpError(400, f"X-Request-Timeout-Ms must be a number of milliseconds (ASCII digits, e.g. 250), "
                                 f"got {shown(asked)}")
        wanted = int(asked) / 1000
        if not wanted > 0:
            raise HttpError(400, f"X-Request-Timeout-Ms must be positive, got {shown(asked)}")
        return min(timeout, wanted)

    async def parse(self, request: Request, body: bytes, options_model: type[BaseModel]) -> inputs.Parsed:
        """The schema stage (a big body in a thread, to keep the event loop answering)."""
        if len(body) > OFFLOAD_BYTES or inputs.heavy(request.headers, body):
            return await asyncio.to_thread(inputs.parse, request.headers, body, options_model, self.settings)
        return inputs.parse(request.headers, body, options_model, self.settings)

    def admit(self, request: Request, pool: str, images: int, units: float, deadline_s: float
              ) -> AbstractContextManager[Admitted]:
        return self.admission.admit(pool, images, units, deadline_s, arrival(request))

    async def prepare(self, parsed: inputs.Parsed, big: bool, arrived: float) -> Work:
        """Preprocessing: the request's ``Work``, or an ``InputError`` naming the bad instance."""
        return await self.preparer.prepare(parsed, arrived, big)

    async def compute(self, pool: str, work: Work, deadline_s: float, admitted: Admitted,
                      pinned: int | None = None) -> tuple[Any, int, int]:
        """A worker of ``pool`` computes ``work`` with the version the board routes it to (or ``pinned``):
        its answer, the size of the batch it was part of, and the version that computed it. A request
        whose pictures all have no digit is answered here, without a worker (batch size 0). Past the
        deadline the client gets 504, the worker drops the work if it has not begun it, and the request
        keeps its place in the admission counts until the worker says so."""
        work.version = self.versions.route(pinned)
        if work.notes and (missing := sum(map(answers.no_digit, work.notes))):
            metrics.count_flag(answers.NO_DIGIT, str(work.version), missing)
            if missing == len(work.notes):
                return self._nothing_found(work), 0, work.version
        timeout = deadline_s
        work.deadline = work.arrived + timeout  # the client's clock started when its request arrived
        remaining = work.deadline - time.monotonic()
        if remaining <= 0:  # reading and preparing it took all its time: nothing to compute
            raise HttpError(504, f"no answer within the request timeout of {timeout:g} s")
        _, pending = self.dispatcher.submit(pool, work)
        # a timer, not asyncio.wait_for: that wraps every wait in a task of its own
        timer = asyncio.get_running_loop().call_later(remaining, pending.event.set)
        try:
            await pending.event.wait()
        finally:
            timer.cancel()
            if not pending.answered:  # timed out or cancelled: counted until the worker answers or drops it
                admitted.keep_until(pending)
        if not pending.answered:
            raise HttpError(504, f"no answer within the request timeout of {timeout:g} s")
        return result(pending)

    def _nothing_found(self, work: Work) -> bytes:
        """The answer of a worker to a request without a digit: no rows (V2's tensors), or the JSON of
        its no_digit rows."""
        if work.options.get("output") == "tensor":
            return b""
        rows = answers.spliced([], work.notes, work.options)
        return orjson.dumps({"model": {"name": self.settings.model, "version": work.version}, "predictions": rows})


def arrival(request: Request) -> float:
    """When the request arrived (the metrics middleware's clock; now, for a request that came another way)."""
    return float(request.scope.get("state", {}).get("arrived") or time.monotonic())


def result(pending: Pending) -> Any:
    """A worker's answer, or the HTTP error its failure means: an ``HttpError`` the worker raised (e.g. 504)
    passes through, a worker that died holding the request is a retryable 503, anything else a 500."""
    if pending.ok:
        return pending.response
    failure = pending.response
    if isinstance(failure, HttpError):
        raise failure
    if isinstance(failure, WorkerDied):
        raise retry_later(503, "the worker computing this request died and is being replaced; retry")
    raise HttpError(500, "internal error while running the model; retry")
