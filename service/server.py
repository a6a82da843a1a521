"""The HTTP side: a LitServer whose request handler validates and preprocesses in the API server.

LitServe's stock handler queues the raw JSON and lets a worker decode it, so one bad image
fails every request batched with it and a body that is not JSON becomes a 500. Ours turns
the body into normalised images first (``service.inputs``), answers every client mistake
with a 4xx and a ``detail``, and queues only work that can succeed. Batching, the worker
pools (one per api_path) and the response plumbing stay LitServe's.
"""

from __future__ import annotations

import asyncio
import logging
import time

import litserve as ls
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from litserve.server import BaseRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem

from service import inputs, metrics
from service.api import DigitAPI, PredictAPI, Work
from service.config import Settings
from service.errors import InputError
from service.preprocess import normalize
from service.schema import PredictOptions
from service.store import LoadedModel

OFFLOAD_BYTES = 256 * 1024
log = logging.getLogger("digitserve")


class DigitRequestHandler(BaseRequestHandler):
    """Body -> validated images -> LitServe's queue -> the worker's JSON bytes, or a clear error."""

    def __init__(self, lit_api: DigitAPI, server: "DigitServer", options_model: type[PredictOptions]):
        super().__init__(lit_api, server)
        self.options_model = options_model

    async def handle_request(self, request: Request, request_type=None) -> Response:
        arrived = time.monotonic()
        settings: Settings = self.server.settings
        try:
            body = await inputs.read_body(request, settings)
            if len(body) > OFFLOAD_BYTES:  # big images take long to decode: keep the event loop answering
                decoded = await asyncio.to_thread(inputs.parse_sync, request.headers, body, self.options_model, settings)
            else:
                decoded = inputs.parse_sync(request.headers, body, self.options_model, settings)
            work = self.server.to_work(decoded, arrived)
        except InputError as e:
            raise HTTPException(e.status, e.detail) from None
        except Exception:  # a bug of ours, never the client's fault: log it, answer, keep the connection
            log.exception("unexpected error while decoding a request")
            raise HTTPException(500, "internal error while reading the request") from None
        uid, _ = await self._submit_request(work)
        item = ResponseBufferItem(asyncio.Event())
        self.server.response_buffer[uid] = item
        try:
            await asyncio.wait_for(item.event.wait(), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within the request timeout of {settings.request_timeout_s:g} s") from None
        finally:
            self.server.response_buffer.pop(uid, None)
        response, status = item.response
        if status != LitAPIStatus.OK:
            self.server_error(response)
        return Response(content=response, media_type="application/json")

    @staticmethod
    def server_error(response: object) -> None:
        """Worker-side failures: an HTTPException the loop raised (e.g. 504) passes through, anything else is a 500."""
        if isinstance(response, HTTPException):
            raise response
        raise HTTPException(500, "internal error while running the model; the request was not answered")


class DigitServer(ls.LitServer):
    """LitServer with digitserve's request handler and an /info that describes the served model."""

    def __init__(self, apis: list[tuple[DigitAPI, type[PredictOptions]]], settings: Settings, model: LoadedModel, device: str):
        self.settings = settings
        self.model = model
        self.device = device
        self.options_models = {api.api_path: options for api, options in apis}
        super().__init__(
            [api for api, _ in apis],
            accelerator=device,
            devices=1,
            workers_per_device={api.api_path: self.pool_size(api.api_path) for api, _ in apis},
            timeout=settings.request_timeout_s,
            middlewares=[(metrics.MetricsMiddleware, {"version": str(model.version)})],
        )
        self.app.router.routes = [r for r in self.app.router.routes if getattr(r, "path", None) != self.info_path]
        self.app.add_api_route(self.info_path, self.info, methods=["GET"])
        self.app.add_api_route("/metrics", metrics.render, methods=["GET"], include_in_schema=False)
        self.app.add_exception_handler(HTTPException, _json_error)

    def pool_size(self, api_path: str) -> int:
        return self.settings.explain_workers if api_path == "/explain" else self.settings.workers

    def _register_api_endpoints(self, lit_api: DigitAPI, request_type, response_type) -> None:
        handler = DigitRequestHandler(lit_api, self, self.options_models[lit_api.api_path])
        self.app.add_api_route(lit_api.api_path, handler.handle_request, methods=["POST"],
                               dependencies=[Depends(self.setup_auth(lit_api))])

    def to_work(self, decoded: inputs.Decoded, arrived: float) -> Work:
        """Normalise with the served model's own mean/std; flatten to the model's input."""
        norm = self.model.metadata.normalization
        images = normalize(decoded.images, norm.mean, norm.std).reshape(len(decoded.images), -1)
        return Work(images, decoded.options.model_dump(), arrived)

    async def info(self) -> dict:
        meta = self.model.metadata
        return {
            "model": {
                "name": self.model.name,
                "version": self.model.version,
                "sha256": meta.sha256,
                "test_accuracy": self.model.test_accuracy,
                "architecture": meta.architecture.model_dump(),
                "normalization": meta.normalization.model_dump(),
                "created_at": (meta.model_extra or {}).get("created_at"),
                "path": str(self.model.path),
            },
            "serving": {
                "device": self.device,
                "workers": {path: self.pool_size(path) for path in self.options_models},
                "api_servers": self.settings.api_servers,
                "max_batch_size": self.settings.max_batch_size,
                "batch_timeout_ms": self.settings.batch_timeout_ms,
                "request_timeout_s": self.settings.request_timeout_s,
            },
            "limits": {name: getattr(self.settings, name) for name in type(self.settings).model_fields
                       if name.startswith("max_") and name not in ("max_batch_size",)},
        }


async def _json_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Every error is ``{"detail": "..."}`` with its status (and headers such as Retry-After)."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def build_server(settings: Settings, model: LoadedModel, device: str) -> DigitServer:
    """The predict pool (and, when present, the explain pool) on one LitServer."""
    apis = [(PredictAPI(settings, model.version), PredictOptions)]
    return DigitServer(apis, settings, model, device)
