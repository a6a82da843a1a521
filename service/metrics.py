"""Prometheus metrics, correct across processes (prometheus-client multiprocess mode).

LitServe runs API servers and model workers as separate processes, so every process writes
its samples to files in one folder (``PROMETHEUS_MULTIPROC_DIR``) and ``/metrics`` sums them.
prometheus-client decides at import time whether it is in that mode:
``service.metrics_dir.use_fresh_dir`` must run before this module is first imported.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, tracing
from service.http import calls
from service.work import Pool

ACCESS_LOG = logging.getLogger("digitserve.access")
_PAGE, _TICKS = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
ENDPOINTS = {"/predict": "predict", "/explain": "explain", "/health": "health", "/info": "info", "/metrics": "metrics",
             "/v2": "v2_server", "/v2/health/live": "v2_health", "/v2/health/ready": "v2_health",
             "/v1/models": "v1_model", "/": "page"}
# the inference endpoints (one access-log line each); the fast path labels them as it routes them
INFERENCE = frozenset({"predict", "explain", "v1_predict", "v1_explain", "v2_infer", "grpc_infer"})
_MODEL_ROUTES = (("/v2/models/", "v2_model"), ("/v1/models/", "v1_model"), ("/page/", "page"))
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FORWARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUESTS = Counter("digitserve_requests_total", "HTTP requests answered, by endpoint and status code",
                   ["endpoint", "status", "version"])
REQUEST_SECONDS = Histogram("digitserve_request_duration_seconds", "Time from request arrival to the response",
                            ["endpoint", "version"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("digitserve_in_flight_requests", "Requests being handled now", ["endpoint", "version"],
                  multiprocess_mode="livesum")
QUEUE_WAIT = Histogram("digitserve_queue_wait_seconds", "Time from request arrival to the start of its model forward",
                       ["endpoint", "version"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("digitserve_batch_size", "Images per model forward", ["endpoint", "version"],
                       buckets=BATCH_BUCKETS)
FORWARD_SECONDS = Histogram("digitserve_inference_duration_seconds",
                            "Duration of one model forward (explain: the whole attribution)",
                            ["endpoint", "version"], buckets=FORWARD_BUCKETS)
PREDICTIONS = Counter("digitserve_predictions_total", "Images classified, by predicted label", ["label", "version"])
FLAGS = Counter("digitserve_flags_total", "Instances answered with a flag (no_digit, not_a_digit, the framing's), "
                "by flag and version", ["flag", "version"])
CONFIDENCE = Histogram("digitserve_prediction_confidence", "Probability of the predicted label", ["version"],
                       buckets=CONFIDENCE_BUCKETS)
TYPICALITY = Histogram("digitserve_typicality", "Typicality of each image /predict answered (versions with a "
                       "calibration): uniform on 0..1 for real digits, near 0 for what is not a digit", ["version"],
                       buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
SERVING = Gauge("digitserve_serving_version", "The model version requests are routed to (unpinned, not canary)",
                multiprocess_mode="mostrecent")
CANARY_SHARE = Gauge("digitserve_canary_share", "Share of unpinned requests routed to the canary version",
                     multiprocess_mode="mostrecent")
SHADOW_SHARE = Gauge("digitserve_shadow_share", "Share of the served version's unpinned requests also computed by "
                     "the shadow version (0 = no shadow)", multiprocess_mode="mostrecent")
SHADOW = Counter("digitserve_shadow_total", "Instances computed by the shadow version after being answered, by "
                 "served and shadow version and whether their labels agree", ["served", "shadow", "agree"])
SHADOW_DROPPED = Counter("digitserve_shadow_dropped_total", "Instances the shadow version did not compute: no "
                         "spare capacity (or the shadow was unloaded, or failed)")
VERSION_LOADS = Counter("digitserve_version_loads_total",
                        "Version loads by result: loaded (in every worker), failed, skipped (at start-up)",
                        ["version", "result"])
REFUSALS = Counter("digitserve_refusals_total",
                   "Requests refused by admission, by reason: queue_full, queue_wait, deadline, draining",
                   ["endpoint", "reason"])
WORKER_RESTARTS = Counter("digitserve_worker_restarts_total",
                          "Model workers replaced, by pool and why: died (after set-up) or failed_start",
                          ["pool", "reason"])
MODEL_INFO = Gauge("digitserve_model_info", "The model a live worker serves, and the runtime its pool serves it with",
                   ["name", "version", "device", "pool", "runtime"], multiprocess_mode="livemax")
RUNTIME_FALLBACK = Counter("digitserve_runtime_fallback_total",
                           "Versions a worker serves eager although --runtime export asked for their static graph",
                           ["version", "reason"])
CAPTURE_RECORDS = Counter("digitserve_capture_records_total",
                          "Instances written to --capture-dir (service.capture), all API servers")
CAPTURE_DROPPED = Counter("digitserve_capture_dropped_total",
                          "Instances sampled for capture but never written, by reason: backlog (the writer fell "
                          "behind), failed (a write failed and capture stopped)", ["reason"])


@functools.cache
def labelled(metric: Counter | Gauge | Histogram, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: ``labels`` checks and locks on every call, a few µs on
    each request's path. The label sets here are few and fixed (endpoints, status codes, digits)."""
    return metric.labels(*values)


def render(live: Callable[[], Iterable[Metric]] | None = None) -> Response:
    """The sum over every process's samples, and what is read live at this moment (``live``), in
    Prometheus text format."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    if live is not None:
        registry.register(_Live(live))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Live:
    def __init__(self, collect: Callable[[], Iterable[Metric]]):
        self.collect = collect


def process_tree(root: int) -> Iterable[Metric]:
    """Memory, CPU and open files of every process from ``root`` down (read from /proc at each scrape):
    ``process`` is main, worker (spawned model workers) or forked (API servers, LitServe's manager)."""
    labels = ["process", "pid"]
    memory = GaugeMetricFamily("digitserve_process_resident_memory_bytes", "Resident memory", labels=labels)
    cpu = CounterMetricFamily("digitserve_process_cpu_seconds", "CPU time, user and system", labels=labels)
    files = GaugeMetricFamily("digitserve_process_open_fds", "Open file descriptors", labels=labels)
    for pid in _descendants(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            spawned = b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
            fds = len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:  # it ended while we looked
            continue
        values = ["main" if pid == root else "worker" if spawned else "forked", str(pid)]
        memory.add_metric(values, int(fields[21]) * _PAGE)
        cpu.add_metric(values, (int(fields[11]) + int(fields[12])) / _TICKS)
        files.add_metric(values, fds)
    return [memory, cpu, files]


def _descendants(root: int) -> list[int]:
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):  # every thread's children (a thread may spawn)
                todo += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            continue
    return found


def observe_forward(endpoint: str, version: str, arrivals: list[float], images: int, started: float) -> None:
    """One model forward: its size, its duration, and how long each of its requests waited for it."""
    labelled(BATCH_SIZE, endpoint, version).observe(images)
    labelled(FORWARD_SECONDS, endpoint, version).observe(time.monotonic() - started)
    observe_many(labelled(QUEUE_WAIT, endpoint, version), started - np.asarray(arrivals))


def observe_predictions(version: str, probs: np.ndarray) -> None:
    labels = probs.argmax(1)
    for label, count in enumerate(np.bincount(labels, minlength=probs.shape[1])):
        if count:
            labelled(PREDICTIONS, str(label), version).inc(int(count))
    observe_many(labelled(CONFIDENCE, version), probs.max(1))


def observe_typicality(version: str, typicality: np.ndarray) -> None:
    """A batch's typicality values (of a version with calibration)."""
    observe_many(labelled(TYPICALITY, version), typicality)


def count_flags(version: str, flags: list[list[str]]) -> None:
    """One answer's flags, per instance (counted where answers are made: the API server)."""
    for flag, count in collections.Counter(flag for instance in flags for flag in instance).items():
        labelled(FLAGS, flag, version).inc(count)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """``histogram.observe(v)`` for every value, with one write per bucket hit instead of two per value.
    In multiprocess mode each write takes a lock and packs into a memory-mapped file: per image, that
    was the largest cost left in a worker's batch. Uses prometheus-client's per-bucket values (pinned)."""
    if not len(values):
        return
    slots = np.searchsorted(np.asarray(histogram._upper_bounds), values, side="left")  # first bound >= value
    for slot, count in enumerate(np.bincount(slots, minlength=len(histogram._upper_bounds))):
        if count:
            histogram._buckets[slot].inc(int(count))
    histogram._sum.inc(float(np.sum(values)))


class MetricsMiddleware:
    """Opens every HTTP request's call record (``service.http.calls``), with an inference call's root span
    when traced (``service.tracing``), and books it once answered: counted once, with its real status,
    under a bounded set of endpoint labels; a request id (the client's ``X-Request-ID`` when it sent a
    sane one) returned as a header; one JSON log line per inference request (other endpoints: debug
    level), naming its trace when traced. Log lines carry no image data and no headers, so no API
    key. The ``version`` of an inference request is the one that computed it; of any other, and of
    the in-flight gauge, the version served when it arrived (``serving()``)."""

    def __init__(self, app: ASGIApp, serving: Callable[[], int]):
        self.app = app
        self.serving = serving

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        route = state.get("route")
        call = state["call"] = calls.opened(route.label if route is not None else endpoint_of(scope["path"]),
                                            _header(scope, b"x-request-id"), self.serving())
        if route is not None and tracing.on():  # an inference call: traced
            call.trace = tracing.begin(f"POST {route.path}", call.arrived, _header(scope, b"traceparent"),
                                       _header(scope, b"tracestate"),
                                       {"http.request.method": "POST", "http.route": route.path})
        status = 500  # if the app fails before sending headers, that is what the client sees
        started_response = False

        async def send_status(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", call.request_id.encode())]
            await send(message)

        BOOK.started(call)
        try:
            await self.app(scope, receive, send_status)
        finally:
            if not started_response and call.status is not None:  # nothing was sent (a client gone): what it says
                status = call.status
            BOOK.answered(call, scope["method"], status)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def start(pools: list[Pool], serving: int) -> None:
    """In the main process, at start: the series that dashboards and alerts read exist from the first
    scrape, at 0, not only once a refusal or a restart happened."""
    SERVING.set(serving)
    CANARY_SHARE.set(0)
    SHADOW_SHARE.set(0)
    for pool in pools:
        for reason in ("died", "failed_start"):
            labelled(WORKER_RESTARTS, pool.label, reason)
        for reason in ("queue_full", "queue_wait", "deadline", "draining"):
            labelled(REFUSALS, pool.label, reason)
    for reason in ("read_timeout", "too_many_connections", "too_many_from_client", "headers_too_large"):
        labelled(REFUSALS, "connection", reason)
    for flag in ("no_digit", "not_a_digit"):  # the drift alert divides by them
        labelled(FLAGS, flag, str(serving))
    for agree in ("true", "false"):  # shadow="none": no shadow yet, the series exists for the dashboard
        labelled(SHADOW, str(serving), "none", agree)
    labelled(VERSION_LOADS, str(serving), "loaded").inc()  # the version start-up loaded


def refused_connection(reason: str) -> None:
    """A connection closed before any request on it could be answered (read timeout, too many connections
    on the API server or from the client's address)."""
    labelled(REFUSALS, "connection", reason).inc()


def endpoint_of(path: str) -> str:
    """The ``endpoint`` label of a path: a bounded set, whatever clients ask for."""
    if (endpoint := ENDPOINTS.get(path)) is not None:
        return endpoint
    return next((label for prefix, label in _MODEL_ROUTES if path.startswith(prefix)), "other")


class Answered(NamedTuple):
    """One answered request, as the metrics and the access log see it."""

    endpoint: str
    version: str
    status: int
    seconds: float
    at: float  # time.time() when answered: the log line's timestamp
    request_id: str
    method: str
    batch_size: int | None
    arrived_on: str  # the version served when it arrived: its in-flight gauge's label
    detail: str | None = None  # an error's detail, for the access log
    refusal: str | None = None  # why admission refused it, for digitserve_refusals_total
    trace_id: str | None = None  # its trace's id, when traced


class RequestBook:
    """An API server's requests in flight and answered, written to the metrics and the access log once
    per event-loop iteration: the iteration's access lines are one log record, its latencies one
    histogram update per bucket hit. Per request, the multiprocess metrics' locked file writes and a
    log record each cost an API server about a tenth of its throughput under load. Nothing waits
    longer than the iteration."""

    def __init__(self) -> None:
        self.in_flight: collections.Counter[tuple[str, str]] = collections.Counter()
        self.changed: set[tuple[str, str]] = set()
        self.done: list[Answered] = []

    def started(self, call: calls.Call) -> None:
        self._change((call.endpoint, str(call.serving)), 1)

    def answered(self, call: calls.Call, method: str, status: int) -> None:
        """``call`` was answered with ``status`` (an HTTP status; gRPC's codes are booked as the HTTP
        status they stand for, so one alert reads both); its root span, when traced, ends."""
        arrived_on = str(call.serving)
        self._change((call.endpoint, arrived_on), -1)
        trace_id = None if call.trace is None else tracing.finish(call.trace, status, call)
        self.done.append(Answered(call.endpoint, arrived_on if call.version is None else str(call.version), status,
                                  time.monotonic() - call.arrived, time.time(), call.request_id, method,
                                  call.batch_size, arrived_on, call.detail, call.refusal, trace_id))

    def _change(self, key: tuple[str, str], by: int) -> None:
        if not self.changed:
            asyncio.get_running_loop().call_soon(self.flush)
        self.in_flight[key] += by
        self.changed.add(key)

    def flush(self) -> None:
        done, self.done = self.done, []
        changed, self.changed = self.changed, set()
        for key in changed:
            labelled(IN_FLIGHT, *key).set(self.in_flight[key])
        for (endpoint, status, version), count in collections.Counter(
                (r.endpoint, r.status, r.version) for r in done).items():
            labelled(REQUESTS, endpoint, str(status), version).inc(count)
        latencies = collections.defaultdict(list)
        for r in done:
            latencies[r.endpoint, r.version].append(r.seconds)
        for key, seconds in latencies.items():
            observe_many(labelled(REQUEST_SECONDS, *key), np.asarray(seconds))
        refusals = collections.Counter((r.endpoint, r.refusal) for r in done if r.refusal)
        for (endpoint, reason), count in refusals.items():
            labelled(REFUSALS, endpoint, reason).inc(count)
        api = [r for r in done if r.endpoint in INFERENCE]
        rest = [r for r in done if r.endpoint not in INFERENCE]
        for level, logged in ((logging.INFO, api), (logging.DEBUG, rest)):
            if logged and ACCESS_LOG.isEnabledFor(level):
                name = logging.getLevelName(level)
                ACCESS_LOG.log(level, "\n".join(_log_line(r, name) for r in logged))


BOOK = RequestBook()  # each API server has its own: forked before its first request


def _log_line(r: Answered, level: str) -> str:
    fields = {"request_id": r.request_id, "method": r.method, "endpoint": r.endpoint, "status": r.status,
              "latency_ms": round(r.seconds * 1000, 2), "model_version": r.version, "batch_size": r.batch_size}
    if r.detail is not None:  # what was wrong (never image data or headers: details name the instance)
        fields["detail"] = r.detail[:300]
    if r.trace_id is not None:
        fields["trace_id"] = r.trace_id
    return logs.access_line(r.at, level, fields)
