"""The HTTP side: a LitServer whose request handler validates and preprocesses in the API server.

LitServe's stock handler queues the raw JSON and lets a worker decode it, so one bad image
fails every request batched with it and a body that is not JSON becomes a 500. Ours turns
the body into normalised images first (``service.inputs``), answers every client mistake
with a 4xx and a ``detail``, and queues only work that can succeed. Batching, the worker
pools (one per api_path) and the response plumbing stay LitServe's.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import multiprocessing as mp
import socket
import threading
import time
from typing import Awaitable, Callable

import litserve as ls
from fastapi import HTTPException, Request, Response
from fastapi.responses import JSONResponse
from starlette.middleware.gzip import GZipMiddleware
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send
from litserve.server import BaseRequestHandler
from litserve.utils import LitAPIStatus, ResponseBufferItem, WorkerSetupStatus

from service import inputs, metrics
from service.api import DigitAPI, ExplainAPI, PredictAPI, Work
from service.protocol import ConnectionShares, balanced_protocol
from service.config import Limits, Settings
from service.errors import InputError
from service.preprocess import normalize
from service.schema import ExplainOptions, PredictOptions
from service.store import LoadedModel
from service.transport import PipeTransport, WorkerDied, WorkerQueues, new_magic

OFFLOAD_BYTES = 256 * 1024
log = logging.getLogger("digitserve")


class DigitRequestHandler(BaseRequestHandler):
    """Body -> validated images -> LitServe's queue -> the worker's JSON bytes, or a clear error."""

    def __init__(self, lit_api: DigitAPI, server: "DigitServer", options_model: type[PredictOptions]):
        super().__init__(lit_api, server)
        self.options_model = options_model

    async def handle_request(self, request: Request, request_type=None) -> Response:
        server = self.server
        server.authorize(request)
        if server.draining.value:
            raise HTTPException(503, "shutting down: not taking new work", headers={"Retry-After": "1"})
        # Count first, then check the total of all API servers: two servers admitting at the same moment
        # each see the other's request, so together they never pass the limit (at worst both refuse).
        admitted = server.litapi_request_queues[self.lit_api.api_path].admitted
        slot = server.app.response_queue_id  # this API server's own counter: one writer, no lock
        admitted[slot] += 1
        try:
            if server.in_flight() > server.settings.max_queued_requests:
                raise HTTPException(503, f"overloaded: {server.settings.max_queued_requests} requests already waiting; "
                                    "retry shortly", headers={"Retry-After": "1"})
            return await self._answer(request)
        finally:
            admitted[slot] -= 1

    async def _answer(self, request: Request) -> Response:
        arrived = time.monotonic()
        settings: Settings = self.server.settings
        try:
            body = await inputs.read_body(request, settings)
            if len(body) > OFFLOAD_BYTES:  # big images take long to decode: keep the event loop answering
                decoded = await asyncio.to_thread(inputs.parse_sync, request.headers, body, self.options_model, settings)
            else:
                # framed at the end of this event-loop iteration, together with the other requests read in it
                decoded = await self.server.framer.frame(inputs.read_sync(request.headers, body, self.options_model, settings))
            work = self.server.to_work(decoded, arrived)
        except InputError as e:
            raise HTTPException(e.status, e.detail) from None
        except Exception:  # a bug of ours, never the client's fault: log it, answer, keep the connection
            log.exception("unexpected error while decoding a request")
            raise HTTPException(500, "internal error while reading the request") from None
        item = ResponseBufferItem(asyncio.Event())
        uid = self.server.submit(self.lit_api.api_path, work, item)
        # a timer, not asyncio.wait_for: that wraps every wait in a task of its own
        timer = asyncio.get_running_loop().call_later(settings.request_timeout_s, item.event.set)
        try:
            await item.event.wait()
        finally:
            timer.cancel()
            if item.response is None:  # timed out or cancelled: an answer that comes later has nobody to go to
                self.server.forget(uid)
        if item.response is None:
            raise HTTPException(504, f"no answer within the request timeout of {settings.request_timeout_s:g} s")
        response, status = item.response
        if status != LitAPIStatus.OK:
            self.server_error(response)
        body, batch_size = response
        request.scope.setdefault("state", {})["batch_size"] = batch_size
        return Response(content=body, media_type="application/json")

    @staticmethod
    def server_error(response: object) -> None:
        """Worker-side failures: an HTTPException the loop raised (e.g. 504) passes through, a worker that
        died holding the request is a retryable 503, anything else is a 500."""
        if isinstance(response, HTTPException):
            raise response
        if isinstance(response, WorkerDied):
            raise HTTPException(503, "the worker computing this request died and is being replaced; retry",
                                headers={"Retry-After": "1"})
        raise HTTPException(500, "internal error while running the model; retry")


class DigitServer(ls.LitServer):
    """LitServer with digitserve's request handler, /health, /info, /metrics and a draining shutdown."""

    def __init__(self, apis: list[tuple[DigitAPI, type[PredictOptions]]], settings: Settings, model: LoadedModel, device: str):
        self.settings = settings
        self.model = model
        self.device = device
        self.options_models = {api.api_path: options for api, options in apis}
        # shared with the forked HTTP processes; read on every request, so a lock-free flag, not an Event
        self.draining = mp.get_context("spawn").RawValue("b", 0)
        self.framer = inputs.IterationFramer()  # each forked API server has its own
        self.failure: str | None = None
        self._uids = itertools.count()
        self._fast_routes: dict[str, Callable[[Request], Awaitable[Response]]] = {}
        self._stopped = False
        super().__init__(
            [api for api, _ in apis],
            accelerator=device,
            devices=1,
            workers_per_device={api.api_path: self.pool_size(api.api_path) for api, _ in apis},
            timeout=settings.request_timeout_s,
            middlewares=[(metrics.MetricsMiddleware, {"version": str(model.version)})],
            restart_workers=True,  # a dead worker is replaced; the requests it held get 503 at once
        )
        self.monitor_internal = 0.5  # LitServe's worker-liveness poll (seconds)
        # LitServe adds gzip for every response over 1 kB; answers here are small JSON on a fast
        # network, where compressing costs more CPU than it saves.
        self.app.user_middleware = [m for m in self.app.user_middleware if m.cls is not GZipMiddleware]
        # FastAPI asks OpenTelemetry for its tracer, meter and logger providers on every request (a few
        # per cent of an API server's time under load). We export Prometheus metrics, not OpenTelemetry:
        # the opt-out FastAPI(telemetry={...}) offers, applied to the app LitServe built.
        self.app._telemetry.update(tracing=False, metrics=False, logs=False)
        ours = {self.info_path, self.healthcheck_path}
        self.app.router.routes = [r for r in self.app.router.routes if getattr(r, "path", None) not in ours]
        self.app.add_api_route(self.healthcheck_path, self.health, methods=["GET"])
        self.app.add_api_route(self.info_path, self.info, methods=["GET"])
        self.app.add_api_route("/metrics", metrics.render, methods=["GET"], include_in_schema=False)
        self.app.add_exception_handler(HTTPException, _json_error)
        full_stack = self.app.build_middleware_stack  # Starlette builds the stack at the first request
        self.app.build_middleware_stack = lambda: FastPath(self._fast_routes, full_stack(), str(model.version))

    def _init_manager(self, num_api_servers: int):
        """LitServe's set-up without Manager queues on the hot path: requests go over ``WorkerQueues``,
        responses over ``PipeTransport``, one pipe per (worker, API server) each way. A Manager queue
        costs a round trip through the manager process on every put and get (the largest cost in a
        profile under load). LitServe's own alternative, ``fast_queue=True`` (ZeroMQ), is a no-op in
        0.2.19: it sets a misspelt field."""
        manager = super()._init_manager(num_api_servers)
        magic = new_magic()
        pools = {api.api_path: self.pool_size(api.api_path) for api in self.litapi_connector}
        for api_path, size in pools.items():
            self.litapi_request_queues[api_path] = WorkerQueues(size, num_api_servers, magic)
        self._transport = PipeTransport(pools, num_api_servers, magic)
        return manager

    def _start_server(self, port: int, num_api_servers: int, log_level: str, sockets: list[socket.socket], *args, **kwargs):
        """Each API server listens on a socket of its own (SO_REUSEPORT), so the kernel spreads
        connections across them by a hash of each connection's addresses. On one shared socket the
        first server to wake takes every connection waiting: 64 keep-alive connections split as
        unevenly as 15/49, and the busier server's requests waited three times as long. LitServe
        bound ``sockets[0]`` without the option, which proved the port free; each server gets its
        replacement just before it is forked (``_prepare_app_run``)."""
        shared = sockets.pop()
        self._address, self._family = shared.getsockname(), shared.family
        shared.close()
        self._listeners = sockets
        self._shares = ConnectionShares(num_api_servers)
        kwargs["http"] = balanced_protocol(self._shares)  # uvicorn's protocol, keeping the connections even
        kwargs["server_header"] = False  # no "server: uvicorn" on every response: it tells only attackers anything
        # Nothing here uses the client's address or scheme, which is all X-Forwarded-* would change:
        # uvicorn's proxy-headers layer would only add a step to every request.
        kwargs["proxy_headers"] = False
        try:
            return super()._start_server(port, num_api_servers, log_level, sockets, *args, **kwargs)
        finally:
            for listener in sockets:  # the last server's: it has its own copy now
                listener.close()

    def _prepare_app_run(self, app) -> None:
        """Runs once per API server, just before LitServe forks it: its own listening socket (the
        previous server, already forked, keeps its copy of the one before) and its connection slot."""
        super()._prepare_app_run(app)
        self._shares.slot = app.response_queue_id
        for listener in self._listeners:
            listener.close()
        listener = socket.socket(self._family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind(self._address)
        self._listeners[:] = [listener]

    def launch_single_inference_worker(self, lit_api: DigitAPI, worker_id: int):
        """LitServe's monitor calls this to replace a dead worker. First, while nothing writes its pipes:
        new requests go to the pool's other workers, and the API servers answer every request they
        sent the dead one (503 + Retry-After, at once, rather than after the replacement's start-up)."""
        self.litapi_request_queues[lit_api.api_path].down(worker_id)
        self._transport.worker_died(lit_api.api_path, worker_id)
        log.warning("%s worker %d died; starting a replacement", lit_api.api_path, worker_id)
        return super().launch_single_inference_worker(lit_api, worker_id)

    def authorize(self, request: Request) -> None:
        """With DIGITSERVE_API_KEY set, /predict and /explain need it (X-API-Key or Authorization: Bearer)."""
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("x-api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), key.get_secret_value().encode()):
            raise HTTPException(401, "missing or wrong API key: send it as X-API-Key (or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})

    def verify_worker_status(self) -> None:
        """Start HTTP at once instead of after the first worker is up: while workers load,
        /health answers 503 (a load balancer sees "not ready", not "connection refused").
        A worker that fails to start exits, and the worker monitor then stops the service."""

    async def health(self) -> JSONResponse:
        """200 only while every worker of every pool has loaded the model and run its warm-up."""
        if self.draining.value:
            return JSONResponse({"status": "draining"}, status_code=503)
        workers = dict(self.workers_setup_status)
        expected = sum(self.pool_size(path) for path in self.options_models)
        ready = len(workers) == expected and all(v == WorkerSetupStatus.READY for v in workers.values())
        return JSONResponse({"status": "ok" if ready else "starting", "workers": workers}, status_code=200 if ready else 503)

    def _perform_graceful_shutdown(self, manager, uvicorn_workers: dict, shutdown_reason: str = "normal") -> None:
        """Drain, then stop, within the grace period: /health turns 503 and new work is refused at
        once, requests already admitted are answered, then the HTTP processes, the workers and the
        manager stop. LitServe's worker monitor calls this from its thread when a worker died: then
        we only record why and wake the main thread, which does the stopping."""
        if threading.current_thread() is not threading.main_thread():
            if not self._stopped:  # a worker we did not stop ourselves
                self.failure = shutdown_reason
                self._shutdown_event.set()
            return
        if self._stopped:
            return
        self._stopped = True
        self.draining.value = 1
        # Stop LitServe's monitor, which would otherwise restart the workers we stop. The event lives in
        # the Manager, and this thread's connection to it may be stuck in the wait() we just interrupted:
        # set it over a fresh connection, from a helper thread.
        setter = threading.Thread(target=self._shutdown_event.set, daemon=True)
        setter.start()
        setter.join(timeout=2)
        started = time.monotonic()
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.in_flight():
            log.warning("grace period over with %d requests unanswered", self.in_flight())
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring":
                thread.join(timeout=2 * self.monitor_internal)
        for process in [*uvicorn_workers.values(), *self.inference_workers]:
            process.terminate()
        for process in [*uvicorn_workers.values(), *self.inference_workers]:
            process.join(timeout=max(1.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
        manager.shutdown()
        log.info("stopped in %.1f s (%s)", time.monotonic() - started, self.failure or shutdown_reason)

    def in_flight(self) -> int:
        """/predict and /explain requests admitted and not yet answered, all API servers together."""
        return sum(sum(queues.admitted) for queues in self.litapi_request_queues.values())

    def pool_size(self, api_path: str) -> int:
        return self.settings.explain_workers if api_path == "/explain" else self.settings.workers

    def _register_api_endpoints(self, lit_api: DigitAPI, request_type, response_type) -> None:
        handler = DigitRequestHandler(lit_api, self, self.options_models[lit_api.api_path])
        # A plain Starlette route: no FastAPI dependency solving or response validation on the hot
        # path, and no LitServe auth dependency (its no-op default is a sync function, which runs
        # in a thread pool: a thread hop on every request).
        self.app.router.routes.append(Route(lit_api.api_path, handler.handle_request, methods=["POST"]))
        self._fast_routes[lit_api.api_path] = handler.handle_request

    def submit(self, api_path: str, work: Work, item: ResponseBufferItem) -> int:
        """Queue ``work`` for the pool of ``api_path``; its answer will land in ``item``. Request ids only
        need to be unique within this API server (answers come back to it alone): a counter will do."""
        uid = next(self._uids)
        worker = self.litapi_request_queues[api_path].put((self.app.response_queue_id, uid, time.monotonic(), work))
        self._transport.sent(uid, api_path, worker, item)
        return uid

    def forget(self, uid: int) -> None:
        """Nobody waits for request ``uid`` any more: an answer that comes later is dropped."""
        self._transport.forget(uid)

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
                "max_queued_requests": self.settings.max_queued_requests,
            },
            "limits": {name: getattr(self.settings, name) for name in Limits.model_fields},
        }


def error_response(exc: HTTPException) -> JSONResponse:
    """Every error is ``{"detail": "..."}`` with its status (and headers such as Retry-After)."""
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _json_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(exc)


class FastPath:
    """The app's outermost layer: POST /predict and /explain go straight to their handlers, inside our
    metrics middleware and with our JSON errors; everything else (the GET routes, 404, 405) takes
    FastAPI's full stack. FastAPI wraps every request in server-error, telemetry, body-limit,
    exception and exit-stack layers, about a fifth of an API server's time in a profile under
    load, for nothing these two routes use."""

    def __init__(self, routes: dict[str, Callable[[Request], Awaitable[Response]]], full_stack: ASGIApp, version: str):
        self.routes = routes
        self.full_stack = full_stack
        self.fast = metrics.MetricsMiddleware(self._handle, version)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in self.routes:
            await self.fast(scope, receive, send)
        else:
            await self.full_stack(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.routes[scope["path"]](Request(scope, receive))
        except StarletteHTTPException as e:
            response = error_response(e)
        except Exception:  # a bug of ours: log it and answer, as FastAPI's stack would
            log.exception("unexpected error while handling %s", scope["path"])
            response = JSONResponse({"detail": "internal server error"}, status_code=500)
        await response(scope, receive, send)


def build_server(settings: Settings, model: LoadedModel, device: str) -> DigitServer:
    """The predict pool and the explain pool (LitServe runs one pool per api_path) on one LitServer."""
    apis = [(PredictAPI(settings, model.version), PredictOptions), (ExplainAPI(settings, model.version), ExplainOptions)]
    return DigitServer(apis, settings, model, device)
