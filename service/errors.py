"""Errors that become an HTTP answer: a status and a ``detail`` that says what is wrong and where.

They cross process boundaries (a worker answers a request with one), so they pickle with their
status and headers.
"""

from __future__ import annotations

import math


class HttpError(Exception):
    """An answer other than 200: ``{"detail": detail}`` with ``status`` (and headers such as Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers

    def __reduce__(self) -> tuple[type[HttpError], tuple[int, str, dict[str, str] | None]]:
        return type(self), (self.status, self.detail, self.headers)


class InputError(HttpError):
    """Something the client sent is wrong (a 4xx)."""

    def at(self, where: str) -> InputError:
        """The same error, its detail prefixed with which instance or field it concerns."""
        return InputError(self.status, f"{where}: {self.detail}", self.headers)


def shown(text: str, limit: int = 40) -> str:
    """Client text quoted in a detail: ASCII (escapes for the rest), at most ``limit`` characters of it."""
    return ascii(text[:limit]) + ("..." if len(text) > limit else "")


def retry_after(after_s: float = 1) -> str:
    """Retry-After's value for a refusal the client should retry in ``after_s`` seconds, whatever refuses it
    (admission, a replaced worker, the connection caps) and on every protocol (gRPC sends it as trailing
    metadata): whole seconds, at least 1, rounded up: told to come back sooner, it would be refused again."""
    return str(max(1, math.ceil(after_s)))


def retry_later(status: int, detail: str, after_s: float = 1) -> HttpError:
    """A refusal the client should retry (503 overloaded, draining, a worker replaced), with Retry-After."""
    return HttpError(status, detail, {"Retry-After": retry_after(after_s)})
