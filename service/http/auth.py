"""The client API key: with ``DIGITSERVE_API_KEY`` set, every inference call needs it, whatever its protocol
(HTTP headers and gRPC metadata are both lower-case name -> value)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from pydantic import SecretStr

from service.errors import HttpError


def given_key(headers: Mapping[str, str], header: str) -> str:
    """The key a request carries: its own header (``X-API-Key``, ``X-Admin-Key``), else ``Authorization:
    Bearer <key>`` (the scheme's name in any case, RFC 7235); an ``Authorization`` of any other form
    carries none."""
    if given := headers.get(header):
        return given
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    return credentials.strip() if scheme.lower() == "bearer" else ""


class ApiKey:
    def __init__(self, key: SecretStr | None):
        self._key = None if key is None else key.get_secret_value().encode()

    def check(self, headers: Mapping[str, str]) -> None:
        """Accept ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time; 401 otherwise."""
        if self._key is None:
            return
        if not hmac.compare_digest(given_key(headers, "x-api-key").encode(), self._key):
            raise HttpError(401, "missing or wrong API key: send it as X-API-Key (or Authorization: Bearer)",
                            {"WWW-Authenticate": "Bearer"})
