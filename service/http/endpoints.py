"""Thin endpoint classes, one per protocol, over the one data plane (``service.http.dataplane``).

- ``Native``: POST /predict and /explain, digitserve's JSON or multipart; errors ``{"detail": ...}``.
- ``KServeV1``: /v1/models, /v1/models/{name}[:predict|:explain]; the same instances and answers as
  the native routes; errors ``{"error": ...}`` as KServe's.
- ``OpenInferenceV2``: the Open Inference Protocol's REST routes (``/v2/...``); tensors in and out
  through the codec of ``service.http.v2``; errors ``{"error": ...}`` as the spec and tritonclient read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.errors import HttpError
from service.http import v2
from service.http.dataplane import DataPlane
from service.http.fastpath import Endpoint, error_response
from service.http.inputs import Parsed
from service.http.schemas import PredictOptions
from service.http.versioning import VersionControl
from service.model.fnn import INPUT_SIZE, NUM_CLASSES
from service.work import Work


class Native:
    """One pool's route: the request's pictures or pixels in, the worker's JSON out. ``?version=N`` pins
    the version that computes it."""

    def __init__(self, plane: DataPlane, pool: str, options_model: type[BaseModel]):
        self.plane, self.pool, self.options_model = plane, pool, options_model

    async def __call__(self, request: Request) -> Response:
        plane = self.plane
        pinned = pinned_version(request.query_params.get("version"), "version")
        body = await plane.read(request)
        with plane.admit(self.pool):
            work = await plane.prepare(request, body, self.options_model)
            answer, batch_size, version = await plane.compute(self.pool, work, pinned)
        computed(request, batch_size, version)
        return Response(content=answer, media_type="application/json")


def pinned_version(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    if not text.isdigit() or int(text) < 1:
        raise HttpError(422 if where == "version" else 404, f"{where} must be a version number (1, 2, ...), "
                                                            f"got {text!r}")
    return int(text)


def computed(request: Request, batch_size: int, version: int) -> None:
    """For the access log and the metrics: the forward's size and the version that computed the answer."""
    state = request.scope.setdefault("state", {})
    state["batch_size"], state["version"] = batch_size, version


class Served:
    """Which model this server answers for, its loaded versions, and whether it is ready."""

    def __init__(self, name: str, versions: VersionControl, ready: Callable[[], bool]):
        self.name, self.versions, self.ready = name, versions, ready

    def check(self, request: Request) -> int | None:
        """404 for a model in the path that is not served here; the version in the path, if any."""
        name = request.path_params.get("name", self.name)
        if name != self.name:
            raise HttpError(404, f"unknown model {name!r}: this server serves {self.name!r}")
        return pinned_version(request.path_params.get("version"), "the version in the path")

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
            return error_response(e.status, e.detail, e.headers, key="error")

    return answer


class KServeV1:
    def __init__(self, served: Served, predict: Native, explain: Native):
        self.served = served
        self.predict = kserve_errors(self._checked(predict))
        self.explain = kserve_errors(self._checked(explain))
        self.model = kserve_errors(self._model)

    async def _model(self, request: Request) -> Response:
        self.served.check(request)
        return JSONResponse({"name": self.served.name, "ready": self.served.ready()})

    def _checked(self, native: Native) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            self.served.check(request)
            return await native(request)
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
        loaded = self.served.loaded(self.served.check(request))
        return JSONResponse(v2.model_metadata(self.served.name, [str(v) for v in loaded]))

    async def _model_ready(self, request: Request) -> Response:
        self.served.loaded(self.served.check(request))
        ready = self.served.ready()
        return JSONResponse({"name": self.served.name, "ready": ready}, status_code=200 if ready else 503)

    async def _infer(self, request: Request) -> Response:
        pinned = self.served.check(request)
        plane = self.plane
        body = await plane.read(request)
        with plane.admit("/predict"):
            tensors = v2.parse_infer(body, request.headers.get("inference-header-content-length"), plane.settings)
            work = await self._work(tensors)
            work.options["output"] = "tensor"
            answer, batch_size, version = await plane.compute("/predict", work, pinned)
        computed(request, batch_size, version)
        probabilities = np.frombuffer(answer, np.float32).reshape(tensors.count, NUM_CLASSES)
        content, headers = v2.encode_infer(tensors, self.served.name, str(version), probabilities)
        return Response(content=content, headers=headers)

    async def _work(self, tensors: v2.InferRequest) -> Work:
        """``pixels`` are already in MNIST's frame: no decoding at all. ``image`` goes through /predict's
        preprocessing."""
        arrived = time.monotonic()
        if tensors.pixels is not None:
            options: dict[str, Any] = {}
            return Work(tensors.pixels.reshape(tensors.count, INPUT_SIZE).astype(np.float32, copy=False), options,
                        arrived)
        return await self.plane.preparer.prepare(Parsed(list(tensors.images or []), PredictOptions()), arrived)
