"""The GET routes beside inference: /health, /info and /metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service import metrics
from service.config import Limits, Settings
from service.http.admission import Admission
from service.http.versioning import VersionControl, described, metadata_of
from service.versions import Runtimes
from service.work import Pool


class Workers(Protocol):
    """What the process that spawned the workers knows of them (``service.seam``)."""

    def states(self) -> dict[str, str]: ...
    def all_ready(self) -> bool: ...
    def ready(self, pool: Pool) -> int: ...


class Routes:
    workers: Workers  # set by ``service.seam`` once the server that spawns them exists

    def __init__(self, settings: Settings, device: str, admission: Admission, versions: VersionControl,
                 runtimes: Runtimes):
        self.settings, self.device, self.admission, self.versions = settings, device, admission, versions
        self.runtimes = runtimes

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
        return JSONResponse(info_payload(self.settings, self.device, self.versions, self.runtimes))

    async def metrics(self, request: Request) -> Response:
        return metrics.render(self._live)

    def _live(self) -> list[Metric]:
        """Read at each scrape: ready workers per pool, the admission's wait estimate, every process."""
        ready = GaugeMetricFamily("digitserve_workers_ready", "Workers of the pool ready to compute", labels=["pool"])
        for pool in self.settings.pools():
            ready.add_metric([pool.label], self.workers.ready(pool))
        wait = GaugeMetricFamily("digitserve_queue_wait_estimate_seconds",
                                 "How long a request admitted now would wait, by pool", labels=["pool"])
        for pool in self.settings.pools():
            wait.add_metric([pool.label], self.admission.wait_estimate(pool))
        return [ready, wait, *metrics.process_tree(os.getppid())]


def info_payload(settings: Settings, device: str, versions: VersionControl, runtimes: Runtimes) -> dict[str, Any]:
    """What /info answers: the served version's metadata, the versions loaded and the canary, the serving
    configuration (and the runtime each pool serves each loaded version with) and the input limits."""
    state = versions.board.read()
    meta = metadata_of(settings.store, settings.model, state.serving)
    export = meta.get("export")
    return {
        "model": {
            "name": settings.model,
            "version": state.serving,
            "sha256": meta.get("sha256"),
            "test_accuracy": meta.get("metrics", {}).get("test_accuracy"),
            "architecture": meta.get("architecture"),
            "normalization": meta.get("normalization"),
            "created_at": meta.get("created_at"),
            "static_graph": export and {"kind": export["kind"], "device": export["device"],
                                        "sha256": export["artifact"]["sha256"]},
            "path": str(Path(settings.store) / settings.model / str(state.serving)),
        },
        "versions": {**described(state), "problems": versions.board.notes()},
        "serving": {
            "device": device,
            "runtime": settings.runtime,
            "runtimes": runtimes.read(),
            "workers": settings.pools(),
            "api_servers": settings.api_servers,
            "max_batch_size": settings.max_batch_size,
            "batch_timeout_ms": settings.batch_timeout_ms,
            "request_timeout_s": settings.request_timeout_s,
            "max_queued_requests": settings.max_queued_requests,
        },
        "limits": {name: getattr(settings, name) for name in Limits.model_fields},
        "typicality": {  # docs/typicality.md: versions without a calibration answer typicality null, never flag
            "not_a_digit_below": settings.not_a_digit_below,
            "calibrated": {str(v): _calibration(metadata_of(settings.store, settings.model, v)) for v in state.loaded},
        },
    }


def _calibration(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A version's calibration as /info shows it (its temperature and score), or None where it has none."""
    record = meta.get("calibration")
    return {"temperature": record.get("temperature"), "score": record.get("score")} if record else None
