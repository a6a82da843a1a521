"""The Open Inference Protocol's gRPC service (``inference.GRPCInferenceService``), in every API server.

Each API server runs a ``grpc.aio`` server on its own event loop, beside uvicorn, listening on
``--grpc-port`` with SO_REUSEPORT as the HTTP sockets do (``service.http.listeners``): the kernel
spreads gRPC connections over the API servers, and a call takes exactly the path a REST V2 call
takes in that process: its key, its limits, admission, the preparer, the dispatcher, the worker
pools, the versions and the metrics (endpoint ``grpc_infer``). Nothing here knows a worker; this is a
codec (``service.grpc.codec``) and an endpoint over the data plane.

The client's gRPC deadline is the call's deadline (capped by ``--request-timeout-s``); a call whose
deadline passes or whose client cancels keeps its place in admission until its worker drops or
answers it, as an HTTP request does. Draining refuses new calls (UNAVAILABLE) while admitted ones
are answered; the server stops with its API server. A ``traceparent`` in the call's metadata is
continued as an HTTP header is (``service.tracing``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc

from service import metrics, tracing
from service.config import Settings
from service.errors import HttpError
from service.grpc import codec
from service.grpc import oip_pb2 as pb
from service.http import calls, v2
from service.http.dataplane import DataPlane
from service.http.endpoints import Served
from service.http.fastpath import MAX_DETAIL, log_unexpected

log = logging.getLogger("digitserve")
ENDPOINT = "grpc_infer"
SERVICE = "inference.GRPCInferenceService"
# a message may hold the largest body REST takes, and the protobuf framing around it
_FRAMING_BYTES = 64 * 1024
# a version in a message's field that is not a version number is a bad argument (REST's path: no such resource)
MODEL_VERSION = ("the model version", 400)


class InferenceService:
    def __init__(self, plane: DataPlane, served: Served, version: str, serving: Callable[[], int]):
        self.plane, self.served, self.version, self.serving = plane, served, version, serving

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.served.ready())

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return codec.server_metadata(self.version)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        """``ready: false`` for a model or version not served here, as Triton answers (a readiness poll gets
        an answer, not an error); INVALID_ARGUMENT for a version that is not a version number."""
        try:
            self.served.loaded(self.served.check(request.name, request.version or None, MODEL_VERSION))
        except HttpError as e:
            if e.status == 400:
                await context.abort(codec.code(e.status), _ascii(e.detail))
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=self.served.ready())

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            loaded = self.served.loaded(self.served.check(request.name, request.version or None, MODEL_VERSION))
        except HttpError as e:
            await context.abort(codec.code(e.status), _ascii(e.detail))
        return codec.model_metadata(self.served.name, [str(v) for v in loaded])

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        metadata = {key: value for key, value in context.invocation_metadata() if isinstance(value, str)}
        call = calls.opened(ENDPOINT, metadata.get("x-request-id"), self.serving())
        if tracing.on():
            call.trace = tracing.begin(f"{SERVICE}/ModelInfer", call.arrived, metadata.get("traceparent"),
                                       metadata.get("tracestate"),
                                       {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "ModelInfer"})
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        status = 200
        metrics.BOOK.started(call)
        try:
            return await self._infer(call, request, metadata, context.time_remaining())
        except HttpError as e:
            status, call.detail, call.refusal = e.status, e.detail, getattr(e, "reason", None)
            trailing = [("x-request-id", call.request_id)]
            if e.headers and "Retry-After" in e.headers:
                trailing.append(("retry-after", e.headers["Retry-After"]))
            await context.abort(codec.code(e.status, call.refusal), _ascii(e.detail), tuple(trailing))
            raise  # not reached: abort raises
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed first
            status = 499
            raise
        except Exception as e:  # a bug of ours: one line, INTERNAL, the server goes on
            status = 500
            log_unexpected({"method": "gRPC", "path": f"/{SERVICE}/ModelInfer"}, e)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            raise
        finally:
            metrics.BOOK.answered(call, "GRPC", status)

    async def _infer(self, call: calls.Call, request: pb.ModelInferRequest, metadata: dict[str, str],
                     remaining: float | None) -> pb.ModelInferResponse:
        plane = self.plane
        plane.authorize(call, metadata)
        call.pinned = self.served.check(request.model_name, request.model_version or None, MODEL_VERSION)
        plane.limit(call, remaining)
        plane.precheck(call)
        size = request.ByteSize()
        tensors = await plane.parse(call, size, False, codec.infer_request, request, plane.settings)
        answer = await plane.infer(call, v2.inputs(tensors, size))
        return codec.infer_response(tensors, self.served.name, str(answer.version), answer.rows, answer.no_digit)


def _ascii(detail: str) -> str:
    """A detail as gRPC's status message: ASCII, bounded (it may quote what a client sent)."""
    text = detail[:MAX_DETAIL]
    return text if text.isascii() else text.encode("ascii", "backslashreplace").decode()


class GrpcServer:
    """One API server's gRPC server: started on its event loop, stopped with it."""

    def __init__(self, settings: Settings, service: InferenceService):
        self.settings, self.service = settings, service
        self._server: Any = None

    async def start(self) -> None:
        limit = self.settings.max_payload_bytes + _FRAMING_BYTES
        server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 1),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ])
        server.add_generic_rpc_handlers((handlers(self.service),))
        host = self.settings.bind_address()
        address = f"[{host}]:{self.settings.grpc_port}" if ":" in host else f"{host}:{self.settings.grpc_port}"
        if not server.add_insecure_port(address):
            log.error("gRPC: cannot listen on %s; this API server serves HTTP only", address)
            return
        await server.start()
        self._server = server

    async def stop(self) -> None:
        """At the API server's shutdown (after the main process drained every admitted call)."""
        if self._server is not None:
            await self._server.stop(grace=1.0)


def handlers(service: InferenceService) -> grpc.GenericRpcHandler:
    """Every RPC the proto declares, served by ``service``'s method of its name (a missing one fails at
    start, not at a client's call): no generated servicer base class with an UNIMPLEMENTED default."""
    declared = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return grpc.method_handlers_generic_handler(declared.full_name, {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name),
            request_deserializer=getattr(pb, method.input_type.name).FromString,
            response_serializer=getattr(pb, method.output_type.name).SerializeToString)
        for method in declared.methods})
