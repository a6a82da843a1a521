"""Wiring: the objects one digitserve is made of, built once in the main process, and the server.

Everything here is created before any process is forked or spawned, so the API servers inherit
it and the workers receive what they need (their pipes, the version board) when LitServe starts them.
"""

from __future__ import annotations

import logging
from importlib.metadata import version

from service import metrics
from service.capture import Capture
from service.config import Settings
from service.grpc.front import GrpcServer, InferenceService
from service.http import page
from service.http.admin import Admin
from service.http.admission import Admission
from service.http.auth import ApiKey
from service.http.dataplane import DataPlane
from service.http.dispatch import Dispatcher
from service.http.endpoints import KServeV1, Native, OpenInferenceV2, Served
from service.http.fastpath import Get, Post
from service.http.keepalive import ConnectionShares
from service.http.listeners import Listeners
from service.http.prepare import Preparer
from service.http.routes import Routes
from service.http.schemas import ExplainOptions, PredictOptions
from service.http.shadow import Shadow
from service.http.versioning import VersionControl, files_signature
from service.http.watcher import StoreWatcher
from service.load import pool_loads
from service.model.store import LoadedModel
from service.pipes import AnswerPipes, RequestPipes, new_magic
from service.seam.litserve import Parts, Server
from service.supervisor import Supervisor
from service.versions import Board, Runtimes, SetupFailures, ShadowTally
from service.work import Pool
from service.worker.stages import ExplainAPI, PredictAPI

log = logging.getLogger("digitserve")


def build(settings: Settings, model: LoadedModel, device: str, skipped: dict[int, str] | None = None) -> Server:
    """The predict pool and the explain pool (LitServe runs one pool per api_path) on one server, serving
    ``model``'s version first; ``skipped`` are the higher versions start-up passed over, and why."""
    pools = settings.pools()
    magic = new_magic()
    loads = pool_loads(settings)
    admission = Admission(settings, loads)
    requests = {pool: RequestPipes(size, settings.api_servers, magic) for pool, size in pools.items()}
    answers = AnswerPipes(pools, settings.api_servers, magic)
    dispatcher = Dispatcher(requests, answers)
    board = _board(settings, model, skipped or {})
    tally = ShadowTally()
    versions = VersionControl(settings, board, dispatcher, tally)
    capture = Capture(settings.capture_dir, settings.capture_share, settings.capture_max_mb * 2**20, "api") \
        if settings.capture_dir is not None else None
    plane = DataPlane(settings, ApiKey(settings.api_key), admission, Preparer(settings), dispatcher, versions,
                      Shadow(settings, admission, dispatcher, board, tally), capture)
    runtimes = Runtimes()
    routes = Routes(settings, device, admission, versions, runtimes)
    served = Served(settings.model, versions, routes.is_ready)
    posts, gets = _routes(plane, served, routes)
    failures = SetupFailures(list(pools))
    parts = Parts(
        settings=settings, admission=admission, loads=loads, requests=requests, answers=answers, dispatcher=dispatcher,
        listeners=Listeners(settings.bind_address(), settings.port), shares=ConnectionShares(settings.api_servers),
        supervisor=Supervisor(settings, admission, requests, answers, failures), routes=routes, posts=posts,
        gets=gets, device=device, board=board,
        watcher=StoreWatcher(settings, versions) if settings.watch_store_s else None,
        grpc=GrpcServer(settings, InferenceService(plane, served, version("digitserve"), lambda: board.read().serving))
        if settings.grpc_port else None,
        capture=capture,
    )
    return Server([PredictAPI(settings, board, runtimes, failures), ExplainAPI(settings, board, runtimes, failures)],
                  parts)


def _board(settings: Settings, model: LoadedModel, skipped: dict[int, str]) -> Board:
    """The version board, serving ``model``; versions skipped at start are said loudly: log, /info, a metric."""
    board = Board(model.version)
    for version_skipped, reason in skipped.items():
        board.note(version_skipped, f"skipped at start-up: {reason}",
                   files=files_signature(settings.store, settings.model, version_skipped))
        metrics.labelled(metrics.VERSION_LOADS, str(version_skipped), "skipped").inc()
        log.warning("not serving v%d: %s", version_skipped, reason)
    metrics.start(list(settings.pools()), model.version)
    return board


def _routes(plane: DataPlane, served: Served, routes: Routes) -> tuple[list[Post], list[Get]]:
    """Every route: the native ones, KServe V1 and the Open Inference Protocol (V2), over one data plane;
    the page; and the admin API when there is an admin key."""
    settings = plane.settings
    predict, explain = Native(plane, Pool.PREDICT, PredictOptions), Native(plane, Pool.EXPLAIN, ExplainOptions)
    v1, v2 = KServeV1(served, predict, explain), OpenInferenceV2(plane, served, version("digitserve"))
    posts = [
        Post("/predict", "predict", predict),
        Post("/explain", "explain", explain),
        Post("/v1/models/{name}:predict", "v1_predict", v1.predict),
        Post("/v1/models/{name}:explain", "v1_explain", v1.explain),
        Post("/v2/models/{name}/infer", "v2_infer", v2.infer),
        Post("/v2/models/{name}/versions/{version}/infer", "v2_infer", v2.infer),
    ]
    gets = [
        Get("/health", routes.health, "200 once every worker is ready; 503 while starting or stopping"),
        Get("/info", routes.info, "the served model and the serving configuration"),
        Get("/metrics", routes.metrics, "Prometheus text format", documented=False),
        Get("/v2", v2.server, "Open Inference Protocol: server metadata"),
        Get("/v2/health/live", v2.live, "Open Inference Protocol: liveness (200 while the process answers)"),
        Get("/v2/health/ready", v2.ready, "Open Inference Protocol: readiness"),
        Get("/v2/models/{name}", v2.model, "Open Inference Protocol: model metadata"),
        Get("/v2/models/{name}/versions/{version}", v2.model, "Open Inference Protocol: model metadata"),
        Get("/v2/models/{name}/ready", v2.model_ready, "Open Inference Protocol: model readiness"),
        Get("/v2/models/{name}/versions/{version}/ready", v2.model_ready, "Open Inference Protocol: model readiness"),
        Get("/v1/models", v1.models, "KServe V1: the models served"),
        Get("/v1/models/{name}", v1.model, "KServe V1: model readiness"),
        Get("/", page.index, "the page: draw a digit, see the prediction and why", documented=False),
        Get("/page/{name}", page.asset, "the page's script, style sheet and icon", documented=False),
    ]
    if settings.admin_key is not None:
        gets += Admin(settings.admin_key, served.versions, settings.model).routes()
    return posts, gets
