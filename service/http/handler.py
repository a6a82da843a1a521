"""The request handler of /predict and /explain, and the fast path that reaches it.

One request flows one way: admission -> body -> ``inputs.parse`` (schema) -> ``Preparer`` (imaging,
into a ``Work``) -> ``Dispatcher.submit`` -> the worker's answer -> the response. LitServe's stock
handler queues the raw JSON and lets a worker decode it, so one bad image would fail every request
batched with it and a body that is not JSON would become a 500. Here every client mistake is a
4xx with a ``detail`` before anything is queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.config import Settings
from service.errors import HttpError, retry_later
from service.http import inputs
from service.http.admission import Admission
from service.http.auth import ApiKey
from service.http.dispatch import Dispatcher
from service.http.prepare import Preparer
from service.pipes import Pending, WorkerDied
from service.work import Work

OFFLOAD_BYTES = 256 * 1024  # bodies bigger than this are parsed and prepared in a thread
log = logging.getLogger("digitserve")
Endpoint = Callable[[Request], Awaitable[Response]]


class InferenceHandler:
    """POST /predict or /explain: a body in, the worker's JSON bytes (or a clear error) out."""

    def __init__(self, pool: str, options_model: type[BaseModel], settings: Settings, api_key: ApiKey,
                 admission: Admission, preparer: Preparer, dispatcher: Dispatcher):
        self.pool, self.options_model, self.settings = pool, options_model, settings
        self.api_key, self.admission, self.preparer, self.dispatcher = api_key, admission, preparer, dispatcher

    async def __call__(self, request: Request) -> Response:
        self.api_key.check(request.headers)
        with self.admission.admit(self.pool):
            work = await self._work(request)
            body, batch_size = await self._answer(work)
        request.scope.setdefault("state", {})["batch_size"] = batch_size
        return Response(content=body, media_type="application/json")

    async def _work(self, request: Request) -> Work:
        arrived = time.monotonic()
        settings = self.settings
        body = await inputs.read_body(request, settings)
        if len(body) > OFFLOAD_BYTES:  # big images take long to decode: keep the event loop answering
            prepare = self.preparer.prepare_now
            return await asyncio.to_thread(prepare, request.headers, body, self.options_model, arrived)
        parsed = inputs.parse(request.headers, body, self.options_model, settings)
        # prepared at the end of this event-loop iteration, together with the other requests read in it
        return await self.preparer.prepare(parsed, arrived)

    async def _answer(self, work: Work) -> tuple[bytes, int]:
        uid, pending = self.dispatcher.submit(self.pool, work)
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


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error is ``{"detail": "..."}`` with its status (and headers such as Retry-After)."""
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's exception handler for ``HttpError`` and Starlette's ``HTTPException`` (404, 405...)."""
    if isinstance(exc, HttpError):
        return error_response(exc.status, exc.detail, exc.headers)
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


class FastPath:
    """The app's outermost layer: POST to an inference route goes straight to its handler, inside our
    metrics middleware and with our JSON errors; everything else (the GET routes, 404, 405) takes
    FastAPI's full stack. FastAPI wraps every request in server-error, telemetry, body-limit,
    exception and exit-stack layers, about a fifth of an API server's time in a profile under
    load, for nothing these routes use."""

    def __init__(self, routes: dict[str, Endpoint], full_stack: ASGIApp, version: str):
        self.routes = routes
        self.full_stack = full_stack
        self.fast = metrics.MetricsMiddleware(self._handle, version)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            await self.fast(scope, receive, send)
        else:
            await self.full_stack(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response
        try:
            response = await self.routes[scope["path"]](Request(scope, receive))
        except HttpError as e:
            response = error_response(e.status, e.detail, e.headers)
        except Exception:  # a bug of ours: log it and answer, as FastAPI's stack would
            log.exception("unexpected error while handling %s", scope["path"])
            response = error_response(500, "internal server error")
        await response(scope, receive, send)
