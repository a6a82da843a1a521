"""The fast path to the inference routes, and the JSON errors every route answers with."""

from __future__ import annotations

import json
import logging
import re
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import metrics
from service.errors import HttpError, shown

log = logging.getLogger("digitserve")
Endpoint = Callable[[Request], Awaitable[Response]]
MAX_DETAIL = 1000  # characters of an error's detail: the rest is cut (details may quote what a client sent)
NOSNIFF = {"X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class Get:
    """A route served through FastAPI's full stack (and described in the OpenAPI document): the GET
    routes, and the admin API's few POSTs, which need no fast path."""

    path: str
    endpoint: Endpoint
    summary: str
    documented: bool = True
    method: str = "GET"


@dataclass(frozen=True)
class Post:
    """An inference route: its path (``{name}`` segments match a path segment), metrics label and endpoint."""

    path: str
    label: str
    endpoint: Endpoint

    def pattern(self) -> re.Pattern[str]:
        return re.compile(re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/:]+)", re.escape(self.path)))


class ErrorJSON(JSONResponse):
    """An error's JSON: ASCII only (escapes for the rest), whatever a detail quotes."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def error_response(status: int, detail: str, headers: dict[str, str] | None = None,
                   key: str = "detail") -> JSONResponse:
    """Every error is ``{"detail": "..."}`` with its status (and headers such as Retry-After); the KServe
    protocols say ``{"error": "..."}`` instead. ASCII, at most MAX_DETAIL characters of detail, and
    ``nosniff``: nothing a client sent comes back big, or as anything but JSON."""
    if not detail.isascii():
        detail = detail[:MAX_DETAIL].encode("ascii", "backslashreplace").decode()
    if len(detail) > MAX_DETAIL:
        detail = detail[:MAX_DETAIL] + "... (cut)"
    return ErrorJSON({key: detail}, status_code=status, headers={**NOSNIFF, **(headers or {})})


async def server_error(request: Request, exc: Exception) -> Response:
    """FastAPI's handler for anything unexpected: the JSON 500 (``FastPath`` logs it)."""
    return error_response(500, "internal server error")


def log_unexpected(scope: Scope, error: BaseException) -> None:
    """A bug of ours, in one bounded line: what, where in our code, on which request (no traceback dump: a
    client must not be able to fill the log, and one line per failure keeps alerts counting right)."""
    frames = traceback.extract_tb(error.__traceback__)
    where = next((f"{'/'.join(frame.filename.rsplit('/', 2)[-2:])}:{frame.lineno}" for frame in reversed(frames)
                  if "/service/" in frame.filename), "?")
    log.error("unexpected %s while handling %s %s: %s (at %s)", type(error).__name__, scope.get("method"),
              shown(scope.get("path", ""), 80), shown(str(error), 200), where)


async def http_error(request: Request, exc: Exception) -> Response:
    """FastAPI's exception handler for ``HttpError`` and Starlette's ``HTTPException`` (404, 405...)."""
    if isinstance(exc, HttpError):
        return error_response(exc.status, exc.detail, exc.headers)
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


class FastPath:
    """The app's outermost layer: POST to an inference route goes straight to its endpoint, inside our
    metrics middleware and with our JSON errors; everything else (the GET routes, 404, 405) takes
    FastAPI's full stack. FastAPI wraps every request in server-error, telemetry, body-limit,
    exception and exit-stack layers, a large share of an API server's time under load (figures:
    docs/performance.md), for nothing these routes use. Fixed paths are one dict lookup; model paths
    one regex each."""

    def __init__(self, routes: list[Post], full_stack: ASGIApp, serving: Callable[[], int]):
        self.exact = {r.path: r for r in routes if "{" not in r.path}
        self.patterns = [(r.pattern(), r) for r in routes if "{" in r.path]
        self.full_stack = full_stack
        self.fast = metrics.MetricsMiddleware(self._handle, serving)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (route := self._match(scope)) is not None:
            scope.setdefault("state", {})["route"] = route
            await self.fast(scope, receive, send)
        elif scope["type"] == "http":
            await self._full_stack(scope, receive, send)
        else:
            await self.full_stack(scope, receive, send)

    async def _full_stack(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's stack answers its own 500 (``server_error``) and raises the error again, for the
        server to log with its traceback: logged here instead, in one line."""
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.full_stack(scope, receive, sending)
        except Exception as e:
            log_unexpected(scope, e)
            if not started:
                await error_response(500, "internal server error")(scope, receive, send)

    def _match(self, scope: Scope) -> Post | None:
        path = scope["path"]
        if (route := self.exact.get(path)) is not None:
            return route
        for pattern, candidate in self.patterns:
            if (found := pattern.fullmatch(path)) is not None:
                scope["path_params"] = found.groupdict()
                return candidate
        return None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        response: Response
        try:
            response = await scope["state"]["route"].endpoint(Request(scope, receive))
        except HttpError as e:
            response = failed(scope, e)
        except ClientDisconnect:  # gone before its body arrived, or too slow (408 said): nobody to answer
            call = scope["state"]["call"]
            call.status = call.status or 499
            return
        except Exception as e:  # a bug of ours: log it and answer, as FastAPI's stack would
            log_unexpected(scope, e)
            response = error_response(500, "internal server error")
        await response(scope, receive, send)


def failed(scope: Scope, error: HttpError, key: str = "detail") -> JSONResponse:
    """The error's answer; its detail (for the access log) and, for a refusal, why (for the metrics)."""
    call = scope["state"]["call"]
    call.detail, call.refusal = error.detail, getattr(error, "reason", None)
    return error_response(error.status, error.detail, error.headers, key)
