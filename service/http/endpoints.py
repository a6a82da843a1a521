"""Thin endpoint classes, one per protocol, over the one data plane (``service.http.dataplane``).

- ``Native``: POST /predict and /explain, digitserve's JSON or multipart; errors ``{"detail": ...}``.
- ``KServeV1``: /v1/models, /v1/models/{name}[:predict|:explain]; the same instances and answers as
  the native routes; errors ``{"error": ...}`` as KServe's.
- ``OpenInferenceV2``: the Open Inference Protocol's REST routes (``/v2/...``); tensors in and out
  through the codec of ``service.http.v2``; errors ``{"error": ...}`` as the spec and tritonclient read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import imaging
from service.errors import HttpError
from service.http import v2
from service.http.dataplane import OFFLOAD_BYTES, DataPlane, arrival
from service.http.fastpath import Endpoint, failed
from service.http.inputs import Parsed
from service.http.schemas import PredictOptions
from service.http.versioning import VersionControl
from service.model.fnn import IMAGE_SIDE, INPUT_SIZE, NUM_CLASSES
from service.work import Work, work_units


class Native:
    """One pool's route: the request's pictures or pixels in, the worker's JSON out. ``?version=N`` pins
    the version that computes it."""

    def __init__(self, plane: DataPlane, pool: str, options_model: type[BaseModel]):
        self.plane, self.pool, self.options_model = plane, pool, options_model

    async def __call__(self, request: Request) -> Response:
        plane = self.plane
        pinned = pinned_version(request.query_params.get("version"), "version")
        deadline = plane.deadline(request)
        body = await plane.read(request, self.pool)
        parsed = await plane.parse(request, body, self.options_model)
        images = len(parsed.instances)
        with plane.admit(request, self.pool, images, work_units(images, parsed.options.model_dump()), deadline):
            work = await plane.prepare(parsed, len(body) > OFFLOAD_BYTES, arrival(request))
            answer, batch_size, version = await plane.compute(self.pool, work, deadline, pinned)
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
            return failed(request.scope, e, key="error")

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
        deadline = plane.deadline(request)
        body = await plane.read(request, "/predict")
        tensors = v2.parse_infer(body, request.headers.get("inference-header-content-length"), plane.settings)
        with plane.admit(request, "/predict", tensors.count, 0.0, deadline):
            arrived = arrival(request)
            if tensors.pixels is not None:
                work = self._pixels(tensors, arrived)
            else:
                work = await self._images(tensors, arrived)
            work.options["output"] = "tensor"
            answer, batch_size, version = await plane.compute("/predict", work, deadline, pinned)
        computed(request, batch_size, version)
        # the worker's rows: the probabilities, then the typicality (service.worker.stages.tensor_rows)
        probabilities = np.frombuffer(answer, np.float32).reshape(tensors.count, NUM_CLASSES + 1)[:, :NUM_CLASSES]
        return TensorResponse(*v2.encode_answer(tensors, self.served.name, str(version), probabilities))

    @staticmethod
    def _pixels(tensors: v2.InferRequest, arrived: float) -> Work:
        """``pixels`` are already in MNIST's frame: no decoding at all, only the checks /predict's pixels get."""
        assert tensors.pixels is not None
        frames = tensors.pixels.reshape(tensors.count, IMAGE_SIDE, IMAGE_SIDE)
        imaging.check_frames(frames)
        return Work(frames.reshape(tensors.count, INPUT_SIZE), {}, arrived)

    async def _images(self, tensors: v2.InferRequest, arrived: float) -> Work:
        """``image`` goes through /predict's preprocessing, with /predict's default options."""
        return await self.plane.preparer.prepare(Parsed(list(tensors.images or []), _PREDICT_DEFAULTS), arrived)


_PREDICT_DEFAULTS = PredictOptions()  # read, never changed: the preparer dumps each request's options afresh


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
