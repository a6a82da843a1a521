"""The one path every protocol's inference takes: key, body, admission, preprocessing, a worker, the answer.

Native /predict and /explain, KServe V1 and the Open Inference Protocol (V2) are thin endpoint
classes over this (``service.http.endpoints``), so they share the admission limits, the batcher,
the worker pools and the metrics. A request flows one way: body (``inputs.read_body``) ->
admission -> ``inputs.parse`` (schema) -> ``Preparer`` (imaging, into a ``Work``) ->
``Dispatcher.submit`` -> the worker's answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request

from service.config import Settings
from service.errors import HttpError, retry_later
from service.http import inputs
from service.http.admission import Admission
from service.http.auth import ApiKey
from service.http.dispatch import Dispatcher
from service.http.prepare import Preparer
from service.http.versioning import VersionControl
from service.pipes import Pending, WorkerDied
from service.work import Work

OFFLOAD_BYTES = 256 * 1024  # bodies bigger than this are parsed and prepared in a thread


class DataPlane:
    def __init__(self, settings: Settings, api_key: ApiKey, admission: Admission, preparer: Preparer,
                 dispatcher: Dispatcher, versions: VersionControl):
        self.settings, self.api_key, self.admission = settings, api_key, admission
        self.preparer, self.dispatcher, self.versions = preparer, dispatcher, versions

    async def read(self, request: Request) -> bytes:
        """The API key, then the whole body (413 past the limit)."""
        self.api_key.check(request.headers)
        return await inputs.read_body(request, self.settings)

    @contextmanager
    def admit(self, pool: str) -> Iterator[None]:
        with self.admission.admit(pool):
            yield

    async def prepare(self, request: Request, body: bytes, options_model: type[BaseModel]) -> Work:
        """Schema and preprocessing: the request's ``Work``, or an ``InputError``."""
        arrived = time.monotonic()
        if len(body) > OFFLOAD_BYTES:  # big images take long to decode: keep the event loop answering
            prepare = self.preparer.prepare_now
            return await asyncio.to_thread(prepare, request.headers, body, options_model, arrived)
        parsed = inputs.parse(request.headers, body, options_model, self.settings)
        # prepared at the end of this event-loop iteration, together with the other requests read in it
        return await self.preparer.prepare(parsed, arrived)

    async def compute(self, pool: str, work: Work, pinned: int | None = None) -> tuple[Any, int, int]:
        """A worker of ``pool`` computes ``work`` with the version the board routes it to (or ``pinned``):
        its answer, the size of the batch it was part of, and the version that computed it."""
        work.version = self.versions.route(pinned)
        uid, pending = self.dispatcher.submit(pool, work)
        timeout = self.settings.request_timeout_s
        # a timer, not asyncio.wait_for: that wraps every wait in a task of its own
        timer = asyncio.get_running_loop().call_later(timeout, pending.event.set)
        try:
            await pending.event.wait()
        finally:
            timer.cancel()
            if not pending.answered:  # timed out or cancelled: an answer that comes later has nobody to go to
                self.dispatcher.forget(uid)
        if not pending.answered:
            raise HttpError(504, f"no answer within the request timeout of {timeout:g} s")
        return result(pending)


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
