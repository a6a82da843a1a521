"""The admin API (only with ``DIGITSERVE_ADMIN_KEY`` set: without it these routes do not exist).

    GET  /admin/versions                      store, loaded, serving, canary share, shadow agreement, failures
    POST /admin/versions/{version}/load       verify and load into every worker
    POST /admin/versions/{version}/unload
    POST /admin/serve                         {"version": 3, "canary": {"version": 4, "share": 0.1}}
    POST /admin/canary/promote | rollback     the canary becomes the served version | is dropped
    POST /admin/shadow                        {"version": 4, "share": 0.5}; {"version": null} stops it

Triton's repository extension maps onto the same calls, so tritonclient's ``load_model`` and
``unload_model`` work: ``index`` lists the store's versions with their state, ``load`` loads the
newest version that verifies (making room if needed) and serves it, ``unload`` unloads every
version that is neither served, the canary nor the shadow (the served one always stays: a model server that
unloads what it serves answers nothing).

The key (``X-Admin-Key`` or ``Authorization: Bearer``) is separate from the client API key;
401 without one, 403 for a wrong one.
"""

from __future__ import annotations

import hmac
from typing import TypeVar

import orjson
from pydantic import BaseModel, SecretStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.errors import HttpError, shown
from service.http.auth import given_key
from service.http.endpoints import PATH_VERSION, kserve_errors, pinned_version
from service.http.fastpath import Endpoint, Get
from service.http.inputs import describe
from service.http.schemas import ServeBody, ShadowBody
from service.http.versioning import VersionControl, described
from service.versions import State

B = TypeVar("B", bound=BaseModel)


class Admin:
    def __init__(self, key: SecretStr, versions: VersionControl, model: str):
        self._key, self.versions, self.model = key.get_secret_value().encode(), versions, model

    def routes(self) -> list[Get]:
        guarded = self._guarded
        return [
            Get("/admin/versions", guarded(self.list), "admin: the store's versions and what is served"),
            Get("/admin/versions/{version}/load", guarded(self.load), "admin: load a version", method="POST"),
            Get("/admin/versions/{version}/unload", guarded(self.unload), "admin: unload a version", method="POST"),
            Get("/admin/serve", guarded(self.serve), "admin: serve a version, with an optional canary",
                method="POST"),
            Get("/admin/canary/promote", guarded(self.promote), "admin: the canary is served", method="POST"),
            Get("/admin/canary/rollback", guarded(self.rollback), "admin: drop the canary", method="POST"),
            Get("/admin/shadow", guarded(self.shadow), "admin: a version also computes a share of the served "
                "requests, after they are answered (null: stop)", method="POST"),
            Get("/v2/repository/index", kserve_errors(guarded(self.index)), "repository: the versions",
                method="POST"),
            Get("/v2/repository/models/{name}/load", kserve_errors(guarded(self.repository_load)),
                "repository: load and serve the newest version", method="POST"),
            Get("/v2/repository/models/{name}/unload", kserve_errors(guarded(self.repository_unload)),
                "repository: unload what is not served", method="POST"),
        ]

    def _guarded(self, endpoint: Endpoint) -> Endpoint:
        async def checked(request: Request) -> Response:
            given = given_key(request.headers, "x-admin-key")
            if not given:
                raise HttpError(401, "admin key required: send it as X-Admin-Key (or Authorization: Bearer)",
                                {"WWW-Authenticate": "Bearer"})
            if not hmac.compare_digest(given.encode(), self._key):
                raise HttpError(403, "wrong admin key")
            return await endpoint(request)
        return checked

    async def list(self, request: Request) -> JSONResponse:
        return JSONResponse(self.versions.listing())

    async def load(self, request: Request) -> JSONResponse:
        return _state(await self.versions.load(self._version(request)))

    async def unload(self, request: Request) -> JSONResponse:
        return _state(await self.versions.unload(self._version(request)))

    async def serve(self, request: Request) -> JSONResponse:
        body = await _body(request, ServeBody)
        canary = body.canary
        if canary is None:
            return _state(await self.versions.serve(body.version))
        return _state(await self.versions.serve(body.version, canary.version, canary.share))

    async def promote(self, request: Request) -> JSONResponse:
        state = self.versions.board.read()
        if state.canary is None:
            raise HttpError(409, "there is no canary to promote")
        return _state(await self.versions.serve(state.canary))

    async def rollback(self, request: Request) -> JSONResponse:
        state = self.versions.board.read()
        if state.canary is None:
            raise HttpError(409, "there is no canary to roll back")
        return _state(await self.versions.serve(state.serving))

    async def shadow(self, request: Request) -> JSONResponse:
        body = await _body(request, ShadowBody)
        return _state(await self.versions.shadow(body.version, body.share))

    async def index(self, request: Request) -> JSONResponse:
        listing = self.versions.listing()
        return JSONResponse([{"name": self.model, "version": str(v["version"]),
                              "state": "READY" if v["loaded"] else "UNAVAILABLE",
                              **({"reason": v["last_failure"]["reason"]} if v["last_failure"] else {})}
                             for v in listing["versions"]])

    async def repository_load(self, request: Request) -> Response:
        self._model_in_path(request)
        versions = [v["version"] for v in self.versions.listing()["versions"]]
        if not versions:
            raise HttpError(404, f"no versions of {self.model!r} in the store")
        await self.versions.load(versions[-1], make_room=True)
        await self.versions.serve(versions[-1])
        return Response(status_code=200)

    async def repository_unload(self, request: Request) -> Response:
        self._model_in_path(request)
        state = self.versions.board.read()
        for version in state.loaded:
            if version not in (state.serving, state.canary, state.shadow):
                await self.versions.unload(version)
        return Response(status_code=200)

    def _model_in_path(self, request: Request) -> None:
        if request.path_params["name"] != self.model:
            raise HttpError(404, f"unknown model {shown(request.path_params['name'])}: this server serves "
                                 f"{self.model!r}")

    @staticmethod
    def _version(request: Request) -> int:
        version = pinned_version(request.path_params["version"], *PATH_VERSION)
        assert version is not None
        return version


async def _body(request: Request, schema: type[B]) -> B:
    try:
        return schema.model_validate(orjson.loads(await request.body() or b"{}"))
    except orjson.JSONDecodeError as e:
        raise HttpError(400, f"body is not valid JSON: {e}") from None
    except ValidationError as e:
        raise HttpError(422, describe(e)) from None


def _state(state: State) -> JSONResponse:
    return JSONResponse(described(state))

