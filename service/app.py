"""Wiring: the objects one digitserve is made of, built once in the main process, and the server.

Everything here is created before any process is forked or spawned, so the API servers inherit
it and the workers receive what they need (their pipes) when LitServe starts them.
"""

from __future__ import annotations

from pydantic import BaseModel

from service.config import Settings
from service.http.admission import Admission
from service.http.auth import ApiKey
from service.http.dispatch import Dispatcher
from service.http.handler import InferenceHandler
from service.http.keepalive import ConnectionShares
from service.http.listeners import Listeners
from service.http.prepare import Preparer
from service.http.routes import Routes
from service.http.schemas import ExplainOptions, PredictOptions
from service.model.store import LoadedModel
from service.pipes import AnswerPipes, RequestPipes, new_magic
from service.seam import Parts, Server
from service.supervisor import Supervisor
from service.worker.stages import ExplainAPI, PredictAPI

OPTIONS: dict[str, type[BaseModel]] = {"/predict": PredictOptions, "/explain": ExplainOptions}


def build(settings: Settings, model: LoadedModel, device: str) -> Server:
    """The predict pool and the explain pool (LitServe runs one pool per api_path) on one server."""
    pools = settings.pools()
    magic = new_magic()
    admission = Admission(list(pools), settings.api_servers, settings.max_queued_requests)
    requests = {pool: RequestPipes(size, settings.api_servers, magic, admission.counts[pool])
                for pool, size in pools.items()}
    answers = AnswerPipes(pools, settings.api_servers, magic)
    dispatcher = Dispatcher(requests, answers)
    preparer, api_key = Preparer(settings), ApiKey(settings.api_key)
    handlers = {pool: InferenceHandler(pool, OPTIONS[pool], settings, api_key, admission, preparer, dispatcher)
                for pool in pools}
    parts = Parts(
        settings=settings, admission=admission, requests=requests, answers=answers, dispatcher=dispatcher,
        listeners=Listeners(settings.host, settings.port), shares=ConnectionShares(settings.api_servers),
        supervisor=Supervisor(settings, admission, requests, answers),
        routes=Routes(settings, model, device, admission), handlers=handlers, device=device,
        version=str(model.version),
    )
    return Server([PredictAPI(settings, model.version), ExplainAPI(settings, model.version)], parts)
