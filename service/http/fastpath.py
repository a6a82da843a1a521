"""The fast path to the inference routes, and the JSON errors every route answers with."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from service import metrics
from service.errors import HttpError

log = logging.getLogger("digitserve")
Endpoint = Callable[[Request], Awaitable[Response]]


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


def error_response(status: int, detail: str, headers: dict[str, str] | None = None,
                   key: str = "detail") -> JSONResponse:
    """Every error is ``{"detail": "..."}`` with its status (and headers such as Retry-After); the KServe
    protocols say ``{"error": "..."}`` instead."""
    return JSONResponse({key: detail}, status_code=status, headers=headers)


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
    exception and exit-stack layers, about a fifth of an API server's time in a profile under
    load, for nothing these routes use. Fixed paths are one dict lookup; model paths one regex each."""

    def __init__(self, routes: list[Post], full_stack: ASGIApp, serving: Callable[[], int]):
        self.exact = {r.path: r for r in routes if "{" not in r.path}
        self.patterns = [(r.pattern(), r) for r in routes if "{" in r.path]
        self.full_stack = full_stack
        self.fast = metrics.MetricsMiddleware(self._handle, serving)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (route := self._match(scope)) is not None:
            state = scope.setdefault("state", {})
            state["endpoint"], state["route"] = route.label, route
            await self.fast(scope, receive, send)
        else:
            await self.full_stack(scope, receive, send)

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
        except ClientDisconnect:  # gone before its body arrived (or timed out reading it): nobody to answer
            scope["state"].setdefault("status", 499)
            return
        except Exception:  # a bug of ours: log it and answer, as FastAPI's stack would
            log.exception("unexpected error while handling %s", scope["path"])
            response = error_response(500, "internal server error")
        await response(scope, receive, send)


def failed(scope: Scope, error: HttpError, key: str = "detail") -> JSONResponse:
    """The error's answer; its detail (for the access log) and, for a refusal, why (for the metrics)."""
    state = scope.setdefault("state", {})
    state["detail"], state["refusal"] = error.detail, getattr(error, "reason", None)
    return error_response(error.status, error.detail, error.headers, key)
