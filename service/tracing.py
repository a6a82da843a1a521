"""Traces: OpenTelemetry spans of each inference call, in the API server that answered it and in the
model worker that computed it, exported over OTLP/HTTP. The one module that makes and ends spans.

On when the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set
(unless ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``); the SDK reads the rest of the
standard variables itself: ``OTEL_SERVICE_NAME`` (default here ``digitserve``), ``OTEL_TRACES_SAMPLER``
and its argument (default ``parentbased_always_on``), ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_*_HEADERS``
and timeouts. Each process that serves (every API server, every model worker) calls ``start`` once and
``stop`` when it ends.

Off, nothing of OpenTelemetry is imported: a call carries no span (``None``), and every helper given
``None`` returns at once (``span`` a shared null context manager). On, spans are made with their parent
given explicitly (the ``Call`` record holds the call's root span, a ``Work`` its parent's
``traceparent``); nothing is attached to the contextvars. The worker learns its spans' times after the
fact (a batch serves many requests), so it records them with explicit start and end times.

The spans of one call (docs/traces.md):

    POST /predict (or ModelInfer)    root, SERVER: the client's traceparent continued
      parse                          the protocol's parsing of the body
      admission                      the admission decision
      imaging                        pictures -> 28x28 frames (service.http.prepare)
      worker                         from the hand-off to a worker until its answer is back
        queue wait                   (model worker) from the hand-off until its batch began
        batch                        (model worker) digitserve.batch.size, .requests, model version, pool
          forward                    (model worker) the forward pass (explain: the whole attribution)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span

    from service.http.calls import Call

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SERVICE = "digitserve"
STOP_TIMEOUT_S = 1.0  # what a stopping process waits for its last spans to be sent
_NULL: AbstractContextManager[None] = contextlib.nullcontext()


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces: an OTLP endpoint is set, and neither the SDK nor the traces
    exporter is switched off (``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``)."""
    return (any(environ.get(name) for name in ENDPOINT_VARIABLES)
            and environ.get("OTEL_SDK_DISABLED", "").strip().lower() != "true"
            and environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "none")


class _Live:
    """Tracing switched on in this process: the tracer, its provider (a batching processor and the OTLP/HTTP
    exporter) and the W3C propagator."""

    def __init__(self, exporter: SpanExporter | None):
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: SERVICE}))
        # the sampler from OTEL_TRACES_SAMPLER(_ARG); no atexit hook: stop() flushes (API servers end by os._exit)
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("digitserve")
        self.propagator = TraceContextTextMapPropagator()
        self.in_context, self.empty = trace.set_span_in_context, Context
        self.server, self.link = trace.SpanKind.SERVER, trace.Link
        self.error = trace.StatusCode.ERROR

    def parent(self, traceparent: str | None, tracestate: str | None = None) -> Context:
        """The remote parent a W3C ``traceparent`` names; an empty context (a new trace) when it is absent
        or malformed, as the W3C specification says."""
        if traceparent is None:
            return self.empty()
        carrier = {"traceparent": traceparent} if tracestate is None else {"traceparent": traceparent,
                                                                            "tracestate": tracestate}
        return self.propagator.extract(carrier, self.empty())

    def started(self, name: str, parent: Context, start: float | None = None, **kwargs: Any) -> Span:
        """A span under ``parent``, begun at ``start`` (``time.monotonic()``) or now. Exceptions set its
        status, without a stack trace event (a client's bad input is no stack trace to keep)."""
        return self.tracer.start_span(name, parent, start_time=None if start is None else _epoch_ns(start),
                                      record_exception=False, **kwargs)


_live: _Live | None = None


def start(exporter: SpanExporter | None = None) -> bool:
    """Once per process: tracing on when ``wanted()`` (or an ``exporter`` is given: the tests' in-memory
    one). Whether it is on. Idempotent."""
    global _live
    if _live is None and (exporter is not None or wanted()):
        _live = _Live(exporter)
    return _live is not None


def stop(timeout_s: float = STOP_TIMEOUT_S) -> None:
    """The spans still queued are sent, waiting at most ``timeout_s`` (the SDK's own shutdown may wait for
    an unreachable collector much longer), and tracing is off."""
    global _live
    live, _live = _live, None
    if live is not None:
        sending = threading.Thread(target=live.provider.shutdown, name="digitserve-trace-stop", daemon=True)
        sending.start()
        sending.join(timeout_s)


def stop_on(signum: int) -> None:
    """When tracing is on, ``signum`` (a model worker's SIGTERM) sends the queued spans first, then has its
    default effect. A worker is terminated, never returns: without this its last batches' spans are lost."""
    if _live is None:
        return

    def stopping(number: int, frame: FrameType | None) -> None:
        stop()
        signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)

    signal.signal(signum, stopping)


def on() -> bool:
    return _live is not None


def begin(name: str, arrived: float, traceparent: str | None, tracestate: str | None,
          attributes: dict[str, Any]) -> Span | None:
    """A call's root span (kind SERVER), from its arrival (``time.monotonic()``), continuing the client's
    ``traceparent``; None when tracing is off or the sampler chose not to record it."""
    if _live is None:
        return None
    span = _live.started(name, _live.parent(traceparent, tracestate), arrived, kind=_live.server,
                         attributes=attributes)
    return span if span.is_recording() else None


def finish(root: Span, status: int, call: Call) -> str:
    """The root span ended once its call is answered, with what it was answered; its trace id, for the
    access log. A 5xx is an error of ours; a 4xx the client's (OpenTelemetry's HTTP conventions)."""
    attributes = {"digitserve.status": status, "digitserve.request_id": call.request_id,
                  "digitserve.pool": call.pool.label}
    if call.version is not None:
        attributes["digitserve.model.version"] = call.version
    if call.batch_size is not None:
        attributes["digitserve.batch.size"] = call.batch_size
    if call.refusal is not None:
        attributes["digitserve.refusal"] = call.refusal
    root.set_attributes(attributes)
    if status >= 500 and _live is not None:
        root.set_status(_live.error, call.detail)
    root.end()
    return trace_id(root)


def span(parent: Span | None, name: str) -> AbstractContextManager[Span | None]:
    """A child of ``parent`` for the block (ended when it ends, its status an error if it raises); the
    shared null context manager when ``parent`` is None (tracing off, or the call not recorded)."""
    if parent is None or _live is None:
        return _NULL
    return _live.started(name, _live.in_context(parent))


def record(parent: Span | None, name: str, start: float) -> None:
    """A child of ``parent`` that began at ``start`` (``time.monotonic()``) and ends now."""
    if parent is not None and _live is not None:
        _live.started(name, _live.in_context(parent), start).end()


def linked(to: Span | None, name: str, attributes: dict[str, Any]) -> Span | None:
    """A span of its own (a new trace) linked to ``to`` (work done for a call after it was answered: the
    shadow's); None when ``to`` is None. The caller ends it."""
    if to is None or _live is None:
        return None
    return _live.started(name, _live.empty(), links=[_live.link(to.get_span_context())], attributes=attributes)


def end(span: Span | None, attributes: dict[str, Any]) -> None:
    """``span`` (a ``linked`` one) ended, with ``attributes`` added; nothing for None."""
    if span is not None:
        span.set_attributes(attributes)
        span.end()


def traceparent(span: Span | None) -> str | None:
    """The W3C ``traceparent`` that makes a span in another process a child of ``span`` (None for None)."""
    if span is None:
        return None
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def trace_id(span: Span) -> str:
    return f"{span.get_span_context().trace_id:032x}"


def batch(parent: str, queued: float, started: float, forward: tuple[float, float], attributes: dict[str, Any]
          ) -> None:
    """In a model worker, after a forward: one traced request's ``queue wait`` (``queued`` to ``started``),
    ``batch`` (``started`` to the forward's end, with ``attributes``) and ``forward`` spans, children of
    the ``parent`` traceparent its API server sent. Times are ``time.monotonic()``: system-wide on Linux."""
    if _live is None:
        return
    offset = _offset()  # one reading for all four spans: where one ends the next begins, exactly
    context, tracer = _live.parent(parent), _live.tracer
    queue_start, start, forward_start, end = (offset + int(t * 1e9) for t in (queued, started, *forward))
    tracer.start_span("queue wait", context, start_time=queue_start).end(start)
    batched = tracer.start_span("batch", context, attributes=attributes, start_time=start)
    tracer.start_span("forward", _live.in_context(batched), start_time=forward_start).end(end)
    batched.end(end)


def _offset() -> int:
    """What turns a ``time.monotonic()`` reading (in ns) into OpenTelemetry's time, ns since the epoch."""
    return time.time_ns() - time.monotonic_ns()


def _epoch_ns(monotonic: float) -> int:
    return _offset() + int(monotonic * 1e9)
