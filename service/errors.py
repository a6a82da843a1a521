"""The client-facing error: an HTTP status and a ``detail`` that says what is wrong and where."""

from __future__ import annotations


class InputError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail

    def at(self, where: str) -> "InputError":
        """The same error, its detail prefixed with which instance or field it concerns."""
        return InputError(self.status, f"{where}: {self.detail}")
