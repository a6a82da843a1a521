"""The GET routes beside inference: /health, /info and /metrics."""

from __future__ import annotations

from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import metrics
from service.config import Limits, Settings
from service.http.admission import Admission
from service.model.store import LoadedModel


class Workers(Protocol):
    """What the process that spawned the workers knows of them (``service.seam``)."""

    def states(self) -> dict[str, str]: ...
    def all_ready(self) -> bool: ...


class Routes:
    workers: Workers  # set by ``service.seam`` once the server that spawns them exists

    def __init__(self, settings: Settings, model: LoadedModel, device: str, admission: Admission):
        self.settings, self.model, self.device, self.admission = settings, model, device, admission

    async def health(self, request: Request) -> JSONResponse:
        """200 only while every worker of every pool has loaded the model and run its warm-up, and the
        service is not shutting down: ``{"status": "ok" | "starting" | "draining", "workers": {...}}``."""
        if self.admission.stopping:
            return JSONResponse({"status": "draining"}, status_code=503)
        ready = self.is_ready()
        return JSONResponse({"status": "ok" if ready else "starting", "workers": self.workers.states()},
                            status_code=200 if ready else 503)

    def is_ready(self) -> bool:
        return not self.admission.stopping and self.workers.all_ready()

    async def info(self, request: Request) -> JSONResponse:
        return JSONResponse(info_payload(self.settings, self.model, self.device))

    async def metrics(self, request: Request) -> Response:
        return metrics.render()


def info_payload(settings: Settings, model: LoadedModel, device: str) -> dict[str, Any]:
    """What /info answers: the served model's metadata, the serving configuration and the input limits."""
    meta = model.metadata
    return {
        "model": {
            "name": model.name,
            "version": model.version,
            "sha256": meta.sha256,
            "test_accuracy": model.test_accuracy,
            "architecture": meta.architecture.model_dump(),
            "normalization": meta.normalization.model_dump(),
            "created_at": (meta.model_extra or {}).get("created_at"),
            "path": str(model.path),
        },
        "serving": {
            "device": device,
            "workers": settings.pools(),
            "api_servers": settings.api_servers,
            "max_batch_size": settings.max_batch_size,
            "batch_timeout_ms": settings.batch_timeout_ms,
            "request_timeout_s": settings.request_timeout_s,
            "max_queued_requests": settings.max_queued_requests,
        },
        "limits": {name: getattr(settings, name) for name in Limits.model_fields},
    }
