"""The client API key: with ``DIGITSERVE_API_KEY`` set, /predict and /explain need it."""

from __future__ import annotations

import hmac

from pydantic import SecretStr
from starlette.datastructures import Headers

from service.errors import HttpError


class ApiKey:
    def __init__(self, key: SecretStr | None):
        self._key = None if key is None else key.get_secret_value().encode()

    def check(self, headers: Headers) -> None:
        """Accept ``X-API-Key`` or ``Authorization: Bearer``, compared in constant time; 401 otherwise."""
        if self._key is None:
            return
        given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), self._key):
            raise HttpError(401, "missing or wrong API key: send it as X-API-Key (or Authorization: Bearer)",
                            {"WWW-Authenticate": "Bearer"})
