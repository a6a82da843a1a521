"""The one module that touches LitServe's internals, and FastAPI's where LitServe builds the app.

What LitServe still does for us: it spawns the model worker processes (one pool per ``api_path``)
and runs the LitAPI stage contract in them (``setup``, then the loop's ``run``), records each
worker's set-up state, forks the uvicorn API server processes and runs their lifespan, and
monitors the workers, restarting a dead one. What we replaced: the request handler (requests are
parsed and preprocessed before anything is queued), the queues and the response transport (pipes,
``service.pipes``), the body of the worker loop (``service.worker.batching``), the listening
sockets (one per API server), the /health and /info routes and the shutdown.

Every override below is a few lines that hand off to a digitserve object with a name. Checked
against LitServe ``LITSERVE_VERSION``; ``tests/unit/test_seam.py`` pins that version and the
signature of every method overridden here, and fails naming what changed.

Hooks (LitServe 0.2.19): why we override each, and what upstream change would let us delete it.

- ``_register_api_endpoints``: registers nothing: every inference route is reached through
  ``http.fastpath`` (no FastAPI dependency solving, no thread hop for LitServe's sync auth
  dependency). Delete when LitServe takes a custom request handler.
- ``_init_manager``: our request and answer pipes instead of Manager queues (a round trip through
  the manager per message). Delete with a public queue/transport factory (``fast_queue=True`` is
  a no-op in 0.2.19: it sets a misspelt field).
- ``_start_server``: hands LitServe's socket list to ``http.listeners`` (each API server its own
  SO_REUSEPORT socket). Delete with a ``reuse_port`` option or a per-server socket hook. After the
  forks: one line with the API servers' pids, and the ready line's watch (``service.ready``).
- ``_prepare_app_run``: per API server, just before its fork: its socket and its slot in the
  shared counters. Delete with a public per-server start hook.
- ``launch_single_inference_worker``: the monitor calls it to replace a dead worker; the dead
  worker's requests are answered first (``Supervisor.worker_died``), and a worker that keeps
  failing its set-up is not replaced for ever: the service stops with the reason. Delete with a
  worker-died callback and a restart limit.
- ``verify_worker_status``: HTTP starts at once, and /health answers 503 while workers load
  (instead of connection refused). Delete with an option not to wait for a ready worker.
- ``_perform_graceful_shutdown``: lame duck, drain, then stop in order (``Supervisor.stop``).
  Delete with a graceful drain that has a grace period.
- FastAPI's ``app.build_middleware_stack``: ``http.fastpath.FastPath``, so inference POSTs skip
  FastAPI's layers (a large share of an API server's time: docs/performance.md). FastAPI's stack is
  per app: no upstream fix.
- FastAPI's ``app._telemetry``: FastAPI's ``telemetry=`` opt-out, on an app LitServe constructs.
  Delete when LitServe passes FastAPI options through.

Private attributes read or set: ``litapi_request_queues`` and ``_transport`` (where our pipes go),
``workers_setup_status`` (the set-up states, for /health), ``inference_workers`` (the processes to
stop), ``_shutdown_event`` (stops the monitor), ``monitor_internal`` (the monitor's poll), the
monitor thread's name ``litserve-monitoring`` (joined at shutdown), ``app.response_queue_id`` (which
API server is being forked). Public paths used instead of overrides: ``run(**uvicorn_kwargs)`` for the
protocol class and the headers, ``LitAPI.loop`` with a ``LitLoop`` whose ``run`` is our loop,
``app.user_middleware`` (LitServe's gzip removed: answers are small JSON on a fast network).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import litserve as ls
from fastapi import FastAPI
from litserve.loops.base import LitLoop
from litserve.transport.base import MessageTransport
from litserve.utils import WorkerSetupStatus
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware
from starlette.routing import Route

from service import logs, metrics, tracing
from service.capture import Capture
from service.config import Settings
from service.errors import HttpError
from service.grpc.front import GrpcServer
from service.http import openapi
from service.http.admission import Admission
from service.http.dispatch import Dispatcher
from service.http.fastpath import FastPath, Get, Post, http_error, server_error
from service.http.keepalive import ConnectionShares
from service.http.listeners import Listeners
from service.http.routes import Routes
from service.http.watcher import StoreWatcher
from service.load import PoolLoad
from service.pipes import AnswerPipes, RequestPipes
from service.seam.uvicorn import balanced_protocol
from service.supervisor import Supervisor
from service.versions import Board
from service.work import Pool
from service.worker import batching

LITSERVE_VERSION = "0.2.19"
WORKER_POLL_S = 0.1  # how often LitServe's monitor looks for dead workers (a waitpid each: cheap)
log = logging.getLogger("digitserve")


@dataclass
class Parts:
    """The digitserve objects the overrides hand off to (built by ``service.app``)."""

    settings: Settings
    admission: Admission
    loads: dict[Pool, PoolLoad]
    requests: dict[Pool, RequestPipes]
    answers: AnswerPipes
    dispatcher: Dispatcher
    listeners: Listeners
    shares: ConnectionShares
    supervisor: Supervisor
    routes: Routes
    posts: list[Post]  # the inference routes, reached through the fast path
    gets: list[Get]
    device: str
    board: Board
    watcher: StoreWatcher | None
    grpc: GrpcServer | None
    capture: Capture | None

    def serving(self) -> int:
        return self.board.read().serving

    async def api_server_started(self) -> None:
        """In each API server's event loop, once: tracing starts when asked for; answers flow to their
        requests; the first watches the store; the gRPC service listens."""
        tracing.start()
        self.dispatcher.watch()
        if self.watcher is not None and self.admission.slot == 0:
            self._watching = asyncio.get_running_loop().create_task(self.watcher.run())
        if self.grpc is not None:
            await self.grpc.start()

    async def api_server_stopping(self) -> None:
        """In each API server, once its requests are answered: the gRPC service stops; what capture
        and tracing hold is written (an API server ends with ``os._exit``, which runs no ``atexit`` hook)."""
        if self.grpc is not None:
            await self.grpc.stop()
        if self.capture is not None:
            await asyncio.to_thread(self.capture.close)
        if tracing.on():
            await asyncio.to_thread(tracing.stop)

    def bind_api_server(self, slot: int) -> None:
        """Just before API server ``slot`` is forked: its socket and its slot in the shared state."""
        self.listeners.next_server()
        self.admission.slot = slot
        self.dispatcher.bind(slot)
        self.shares.slot = slot


class WorkerLoop(LitLoop):
    """LitServe's loop extension point: ``run`` is our batching loop over our pipes (it never returns).
    It travels to the worker process with its LitAPI, and with it the pool's shared load."""

    def __init__(self, load: PoolLoad):
        super().__init__()
        self.load = load

    def run(self, lit_api: ls.LitAPI, device: str, worker_id: int, request_queue: RequestPipes,
            transport: _AnswerTransport, workers_setup_status: dict[str, str], callback_runner: Any) -> None:
        transport.pipes.bind(Pool(lit_api.api_path), worker_id)
        request_queue.bind(worker_id)
        batching.serve(lit_api, request_queue, transport.pipes, self.load, worker_id)


class _AnswerTransport(MessageTransport):
    """Our answer pipes where LitServe expects its transport. LitServe's lifespan starts one reader task
    per API server calling ``areceive(consumer_id)``: that is where the API server starts watching its
    pipes (answers then go straight to the waiting requests, so the task itself only waits) and its
    gRPC service, and, when the task is cancelled at shutdown, stops that service."""

    def __init__(self, pipes: AnswerPipes, started: Callable[[], Awaitable[None]],
                 stopping: Callable[[], Awaitable[None]]):
        self.pipes, self.started, self.stopping = pipes, started, stopping

    def send(self, item: Any, consumer_id: int) -> None:
        raise RuntimeError("digitserve's workers answer through AnswerPipes.answer, not LitServe's send")

    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None) -> Any:
        await self.started()
        try:
            await asyncio.get_running_loop().create_future()  # until the task is cancelled at shutdown
        finally:
            await self.stopping()

    def close(self, **kwargs: Any) -> None:
        self.pipes.close()

    def __getstate__(self) -> dict[str, Any]:
        """A worker gets the pipes only (``started`` belongs to the API servers' side)."""
        return {"pipes": self.pipes, "started": None, "stopping": None}


def _worker_key(pool: Pool, worker_id: int) -> str:
    """LitServe's key for a worker in ``workers_setup_status``: ``predict_0``."""
    return f"{pool.label}_{worker_id}"


class _WorkerView:
    """The workers' set-up states as LitServe records them, for /health and /metrics."""

    def __init__(self, server: Server):
        self.server = server

    def states(self) -> dict[str, str]:
        return dict(getattr(self.server, "workers_setup_status", None) or {})

    def all_ready(self) -> bool:
        states = self.states()
        return len(states) == sum(self.server.parts.settings.pools().values()) and all(
            v == WorkerSetupStatus.READY for v in states.values())

    def ready(self, pool: Pool) -> int:
        """How many of the pool's workers are ready."""
        states = self.states()
        return sum(states.get(_worker_key(pool, w)) == WorkerSetupStatus.READY
                   for w in range(self.server.parts.settings.pools()[pool]))


class Server(ls.LitServer):
    """LitServer wired to digitserve's parts. ``serve()`` runs it until it is stopped."""

    def __init__(self, apis: list[ls.LitAPI], parts: Parts, callbacks: list[Any] | None = None):
        if callbacks:
            raise ValueError("LitServe callbacks are not supported: digitserve's worker loop does not run them "
                             "(use its metrics and access log instead)")
        for api in apis:
            api.loop = WorkerLoop(parts.loads[Pool(api.api_path)])
        self.parts = parts
        settings = parts.settings
        super().__init__(apis, accelerator=parts.device, devices=1, workers_per_device=settings.pools(),
                         timeout=settings.request_timeout_s,
                         middlewares=[(metrics.MetricsMiddleware, {"serving": parts.serving})],
                         restart_workers=True)  # a dead worker is replaced; its requests get 503 at once
        self.monitor_internal = WORKER_POLL_S
        parts.routes.workers = _WorkerView(self)
        _lean_app(self.app, parts)

    def serve(self, started: Callable[[], Any] = lambda: None) -> None:
        """LitServe's ``run``: it accepts only 0.0.0.0, 127.0.0.1 and ::, so it gets the wildcard of the
        configured address's family (its bind proves the port free); ``http.listeners`` binds the address.
        uvicorn gets no logging set-up of its own (``log_config=None``): ``service.logs`` formats its lines.
        ``started`` runs in this process once every API server is forked."""
        settings = self.parts.settings
        self._started = started
        self.run(host="::" if ":" in settings.bind_address() else "0.0.0.0", port=settings.port, log_config=None,
                 num_api_servers=settings.api_servers, log_level=settings.log_level, generate_client_file=False,
                 access_log=False, http=balanced_protocol(self.parts.shares, settings, metrics.refused_connection),
                 timeout_keep_alive=settings.keep_alive_s, server_header=False,
                 proxy_headers=False)  # nothing uses the client's address or scheme, all X-Forwarded-* changes

    def _register_api_endpoints(self, lit_api: ls.LitAPI, request_type: Any, response_type: Any) -> None:
        """Nothing here: every inference route, /predict and /explain included, is the fast path's."""

    def _init_manager(self, num_api_servers: int) -> Any:
        logs.adopt_litserve()  # LitServe's run() has just given its logger a handler of its own
        manager = super()._init_manager(num_api_servers)
        self.litapi_request_queues.update(self.parts.requests)
        self._transport = _AnswerTransport(self.parts.answers, self.parts.api_server_started,
                                           self.parts.api_server_stopping)
        return manager

    def _start_server(self, port: int, num_api_servers: int, log_level: str, sockets: list[socket.socket],
                      *args: Any, **kwargs: Any) -> Any:
        self.parts.listeners.use(sockets)
        try:
            servers = super()._start_server(port, num_api_servers, log_level, sockets, *args, **kwargs)
        finally:
            self.parts.listeners.close()
        log.info("%d API servers started (pids %s); the workers are loading the model", len(servers),
                 ", ".join(str(server.pid) for server in servers.values()))
        self._started()
        return servers

    def _prepare_app_run(self, app: FastAPI) -> None:
        super()._prepare_app_run(app)
        self.parts.bind_api_server(app.response_queue_id)  # type: ignore[attr-defined]

    def launch_single_inference_worker(self, lit_api: ls.LitAPI, worker_id: int) -> Any:
        pool = Pool(lit_api.api_path)
        # it died before it was ready
        failed_setup = self.workers_setup_status.get(_worker_key(pool, worker_id)) != WorkerSetupStatus.READY
        if self.parts.supervisor.worker_died(pool, worker_id, failed_setup):
            return super().launch_single_inference_worker(lit_api, worker_id)
        self._shutdown_event.set()  # the main thread stops the service; the monitor loop ends
        return self.inference_workers[self._slot(lit_api, worker_id)]  # the dead one: no replacement

    def _slot(self, lit_api: ls.LitAPI, worker_id: int) -> int:
        """The worker's index in ``inference_workers``: the pools' workers in order."""
        pools = list(self.parts.settings.pools().items())
        return sum(size for pool, size in pools[:[p for p, _ in pools].index(lit_api.api_path)]) + worker_id

    def verify_worker_status(self) -> None:
        """Do not wait for a ready worker before starting HTTP (see the table above)."""

    def _perform_graceful_shutdown(self, manager: Any, uvicorn_workers: dict[Any, Any],
                                   shutdown_reason: str = "normal") -> None:
        if threading.current_thread() is not threading.main_thread():  # the monitor, on a worker it gave up on
            self.parts.supervisor.fail(shutdown_reason)
            self._shutdown_event.set()
            return
        processes = [*uvicorn_workers.values(), *self.inference_workers]
        self.parts.supervisor.stop(self._stop_monitor, processes, manager.shutdown)

    def _stop_monitor(self) -> None:
        with contextlib.suppress(OSError, EOFError):  # the manager may be gone already (a signal to the group)
            self._shutdown_event.set()
        for thread in threading.enumerate():
            if thread.name == "litserve-monitoring":
                thread.join(timeout=2 * WORKER_POLL_S)


def _lean_app(app: FastAPI, parts: Parts) -> None:
    """LitServe's FastAPI app, trimmed to what we serve: our routes, our errors, the fast path."""
    app.user_middleware = [m for m in app.user_middleware if m.cls is not GZipMiddleware]
    app._telemetry.update({"tracing": False, "metrics": False, "logs": False})
    # /docs and /redoc would load their scripts from a CDN: the document is /openapi.json, for any viewer
    dropped = ("/", "/health", "/info", "/docs", "/docs/oauth2-redirect", "/redoc")
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in dropped]
    app.docs_url = app.redoc_url = None
    app.router.redirect_slashes = False  # "/predict/" is not found: no 307 to a Location built from the Host
    for post in parts.posts:  # reached through the fast path; here so that another method gets a 405
        app.router.routes.append(Route(post.path, post.endpoint, methods=["POST"], include_in_schema=False))
    for get in parts.gets:
        app.add_api_route(get.path, get.endpoint, methods=[get.method], summary=get.summary,
                          include_in_schema=get.documented)
    openapi.install(app, parts.settings)
    app.add_exception_handler(HttpError, http_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    full_stack: Callable[[], Any] = app.build_middleware_stack  # Starlette builds the stack at the first request
    app.build_middleware_stack = lambda: FastPath(parts.posts, full_stack(), parts.serving)  # type: ignore[method-assign]
