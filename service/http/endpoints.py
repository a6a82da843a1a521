"""Thin endpoint classes, one per protocol, over the one data plane (``service.http.dataplane``).

- ``Native``: POST /predict and /explain, digitserve's JSON or multipart; errors ``{"detail": ...}``.
- ``KServeV1``: /v1/models, /v1/models/{name}[:predict|:explain]; the same instances and answers as
  the native routes; errors ``{"error": ...}`` as KServe's.
- ``OpenInferenceV2``: the Open Inference Protocol's REST routes (``/v2/...``); tensors in and out
  through the codec of ``service.http.v2``; errors ``{"error": ...}`` as the spec and tritonclient read.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.errors import HttpError, shown
from service.http import inputs, native, v2
from service.http.calls import Call
from service.http.dataplane import DataPlane, Inputs, asked_timeout
from service.http.fastpath import Endpoint, failed
from service.http.versioning import VersionControl
from service.work import Pool


def call_of(request: Request) -> Call:
    """The request's call record, opened on arrival by the metrics middleware."""
    call: Call = request.scope["state"]["call"]
    return call


class Native:
    """One pool's route: the request's pictures or pixels in, JSON records out (``service.http.native``).
    ``?version=N`` pins the version that computes it."""

    def __init__(self, plane: DataPlane, pool: Pool, options_model: type[BaseModel]):
        self.plane, self.pool, self.options_model = plane, pool, options_model

    async def __call__(self, request: Request) -> Response:
        self.plane.authorize(call_of(request), request.headers)
        return await self.keyed(request)

    async def keyed(self, request: Request) -> Response:
        """The route once its caller's key was checked (first, before anything else is read)."""
        plane, call = self.plane, call_of(request)
        call.pool = self.pool
        # most requests have no query string: not parsing one (Starlette's QueryParams) is a cost saved per call
        asked = request.query_params.get("version") if request.scope["query_string"] else None
        call.pinned = pinned_version(asked, "version", 422)
        plane.limit(call, asked_timeout(request.headers.get("x-request-timeout-ms")))
        plane.precheck(call)
        body = await inputs.read_body(request, plane.settings)
        parsed = await plane.parse(call, len(body), inputs.heavy(request.headers, body), inputs.parse,
                                   request.headers, body, self.options_model, plane.settings)
        options = parsed.options.model_dump()
        answer = await plane.infer(call, Inputs(len(parsed.instances), parsed.instances, None, options, len(body)))
        return Response(content=native.encode(answer, plane.settings.model, options), media_type="application/json")


_VERSION = re.compile(r"[0-9]{1,9}")  # ASCII digits only: str.isdigit() takes "²" and Arabic-Indic digits


PATH_VERSION = ("the version in the path", 404)  # no such resource


def pinned_version(text: str | None, where: str, status: int) -> int | None:
    """A version a request names, 1 to 9 ASCII digits; ``status`` when malformed: 404 in a path (no such
    resource), 422 in a query, 400 in a gRPC message's field."""
    if text is None:
        return None
    if not _VERSION.fullmatch(text) or int(text) < 1:
        raise HttpError(status, f"{where} must be a version number (1 to 9 digits: 1, 2, ...), got {shown(text)}")
    return int(text)


class Served:
    """Which model this server answers for, its loaded versions, and whether it is ready."""

    def __init__(self, name: str, versions: VersionControl, ready: Callable[[], bool]):
        self.name, self.versions, self.ready = name, versions, ready

    def check(self, name: str, version: str | None, field: tuple[str, int] = PATH_VERSION) -> int | None:
        """404 for a model that is not served here; the version asked for, if any (``field``: where it was
        given, and the status when it is malformed)."""
        if name != self.name:
            raise HttpError(404, f"unknown model {shown(name)}: this server serves {self.name!r}")
        return pinned_version(version, *field)

    def checked(self, request: Request) -> int | None:
        """``check`` for the model and version in a request's path."""
        return self.check(request.path_params.get("name", self.name), request.path_params.get("version"))

    def loaded(self, pinned: int | None) -> list[int]:
        """The loaded versions (a pinned one must be among them: 404/409 otherwise)."""
        if pinned is not None:
            self.versions.route(pinned)
        return list(self.versions.board.read().loaded)


def kserve_errors(endpoint: Endpoint) -> Endpoint:
    """The same endpoint answering its errors as ``{"error": ...}``."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HttpError as e:
            return failed(request.scope, e, key="error")

    return answer


class KServeV1:
    def __init__(self, served: Served, predict: Native, explain: Native):
        self.served = served
        self.predict = kserve_errors(self._checked(predict))
        self.explain = kserve_errors(self._checked(explain))
        self.model = kserve_errors(self._model)

    async def _model(self, request: Request) -> Response:
        self.served.checked(request)
        return JSONResponse({"name": self.served.name, "ready": self.served.ready()})

    def _checked(self, native: Native) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            native.plane.authorize(call_of(request), request.headers)
            self.served.checked(request)
            return await native.keyed(request)
        return endpoint

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"models": [self.served.name]})


class OpenInferenceV2:
    def __init__(self, plane: DataPlane, served: Served, version: str):
        self.plane, self.served, self.server_version = plane, served, version
        self.infer = kserve_errors(self._infer)
        self.model = kserve_errors(self._model)
        self.model_ready = kserve_errors(self._model_ready)

    async def server(self, request: Request) -> JSONResponse:
        return JSONResponse(v2.server_metadata(self.server_version))

    async def live(self, request: Request) -> JSONResponse:
        """200 while this process answers at all: starting, serving or draining (Kubernetes' liveness)."""
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> JSONResponse:
        """200 only while every worker is ready and the service is not stopping (readiness)."""
        ready = self.served.ready()
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def _model(self, request: Request) -> Response:
        loaded = self.served.loaded(self.served.checked(request))
        return JSONResponse(v2.model_metadata(self.served.name, [str(v) for v in loaded]))

    async def _model_ready(self, request: Request) -> Response:
        self.served.loaded(self.served.checked(request))
        ready = self.served.ready()
        return JSONResponse({"name": self.served.name, "ready": ready}, status_code=200 if ready else 503)

    async def _infer(self, request: Request) -> Response:
        plane, call = self.plane, call_of(request)
        plane.authorize(call, request.headers)
        call.pinned = self.served.checked(request)
        plane.limit(call, asked_timeout(request.headers.get("x-request-timeout-ms")))
        plane.precheck(call)
        body = await inputs.read_body(request, plane.settings)
        tensors = await plane.parse(call, len(body), False, v2.parse_infer, body,
                                    request.headers.get("inference-header-content-length"), plane.settings)
        answer = await plane.infer(call, v2.inputs(tensors, len(body)))
        return TensorResponse(*v2.encode_answer(tensors, self.served.name, str(answer.version), answer.rows,
                                                answer.no_digit))


class TensorResponse(Response):
    """A V2 answer from :func:`v2.encode_answer`: ``application/json``, or ``application/octet-stream`` with
    ``Inference-Header-Content-Length`` when binary outputs follow the JSON header. The same headers as
    ``Response(content, headers=...)`` writes, in the same order, without re-encoding a header dict per
    request."""

    def __init__(self, body: bytes, header_length: int | None):
        self.status_code, self.background, self.body = 200, None, body
        if header_length is None:
            self.raw_headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        else:
            self.raw_headers = [(b"content-type", b"application/octet-stream"),
                                (b"inference-header-content-length", b"%d" % header_length),
                                (b"content-length", b"%d" % len(body))]
