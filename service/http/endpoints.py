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
from service.model.fnn import INPUT_SIZE, NUM_CLASSES
from service.work import Work


class Native:
    """One pool's route: the request's pictures or pixels in, the worker's JSON out."""

    def __init__(self, plane: DataPlane, pool: str, options_model: type[BaseModel]):
        self.plane, self.pool, self.options_model = plane, pool, options_model

    async def __call__(self, request: Request) -> Response:
        plane = self.plane
        body = await plane.read(request)
        with plane.admit(self.pool):
            work = await plane.prepare(request, body, self.options_model)
            answer, batch_size = await plane.compute(self.pool, work)
        request.scope.setdefault("state", {})["batch_size"] = batch_size
        return Response(content=answer, media_type="application/json")


class Served:
    """Which model and version this server answers for, and whether it is ready: what the KServe routes check."""

    def __init__(self, name: str, version: int, ready: Callable[[], bool]):
        self.name, self.version, self.ready = name, version, ready

    def check(self, request: Request) -> None:
        """404 for a model or version in the path that is not served here."""
        name = request.path_params.get("name", self.name)
        if name != self.name:
            raise HttpError(404, f"unknown model {name!r}: this server serves {self.name!r}")
        version = request.path_params.get("version", str(self.version))
        if version != str(self.version):
            raise HttpError(404, f"version {version!r} of model {self.name!r} is not served here "
                                 f"(served: {self.version})")


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

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"models": [self.served.name]})

    async def _model(self, request: Request) -> Response:
        self.served.check(request)
        return JSONResponse({"name": self.served.name, "ready": self.served.ready()})

    def _checked(self, native: Native) -> Endpoint:
        async def endpoint(request: Request) -> Response:
            self.served.check(request)
            return await native(request)
        return endpoint


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
        self.served.check(request)
        return JSONResponse(v2.model_metadata(self.served.name, [str(self.served.version)]))

    async def _model_ready(self, request: Request) -> Response:
        self.served.check(request)
        ready = self.served.ready()
        return JSONResponse({"name": self.served.name, "ready": ready}, status_code=200 if ready else 503)

    async def _infer(self, request: Request) -> Response:
        self.served.check(request)
        plane = self.plane
        body = await plane.read(request)
        with plane.admit("/predict"):
            tensors = v2.parse_infer(body, request.headers.get("inference-header-content-length"), plane.settings)
            work = await self._work(tensors)
            work.options["output"] = "tensor"
            answer, batch_size = await plane.compute("/predict", work)
        request.scope.setdefault("state", {})["batch_size"] = batch_size
        probabilities = np.frombuffer(answer, np.float32).reshape(tensors.count, NUM_CLASSES)
        content, headers = v2.encode_infer(tensors, self.served.name, str(self.served.version), probabilities)
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
