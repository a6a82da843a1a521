"""Tracing's own code (``service.tracing``), with OpenTelemetry's in-memory exporter in place of OTLP/HTTP:
the client's ``traceparent`` is continued (or a new trace begun, as W3C says, when it is malformed), the
spans hang where they should, a ``Work`` carries its parent across a pickle to the worker's spans, and
off is a no-op that imports nothing of OpenTelemetry's SDK.

The real processes, the OTLP/HTTP export and the access log are tests/e2e/test_traces.py's.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from service import tracing
from service.errors import HttpError
from service.http import calls
from service.work import Work

TRACE_ID, PARENT = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.start(exporter)
    yield exporter
    tracing.stop()


def finished(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """Every span, by name, once tracing stopped (which sends what its batching processor held)."""
    tracing.stop()
    return {span.name: span for span in exporter.get_finished_spans()}


def ids(span: ReadableSpan) -> tuple[str, str | None]:
    """(trace id, parent span id) in hex."""
    return f"{span.context.trace_id:032x}", None if span.parent is None else f"{span.parent.span_id:016x}"


def test_the_environment_switches_traces_on():
    assert not tracing.wanted({})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://collector:4318/v1/metrics"})
    for off in ({"OTEL_SDK_DISABLED": "true"}, {"OTEL_TRACES_EXPORTER": "none"}):
        assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", **off})


def test_off_every_helper_is_a_no_op():
    assert not tracing.on()
    assert tracing.begin("POST /predict", time.monotonic(), TRACEPARENT, None, {}) is None
    assert tracing.span(None, "parse") is tracing.span(None, "imaging")  # one shared null context manager
    with tracing.span(None, "parse") as span:
        assert span is None
    assert tracing.traceparent(None) is None
    assert tracing.linked(None, "shadow", {}) is None
    tracing.end(None, {})
    tracing.record(None, "admission", time.monotonic())
    tracing.batch(TRACEPARENT, 0.0, 0.0, (0.0, 0.0), {})  # a worker with tracing off: nothing


def test_off_nothing_of_the_sdk_is_imported():
    """The serving modules import ``service.tracing``; OpenTelemetry's SDK and exporter come only when on."""
    script = ("import sys; import service.tracing, service.http.dataplane, service.worker.stages, service.grpc.front; "
              "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_call_continues_the_clients_traceparent(exporter):
    call = calls.opened("predict", None, 1)
    call.trace = tracing.begin("POST /predict", call.arrived, TRACEPARENT, "vendor=value", {"http.route": "/predict"})
    assert call.trace is not None
    with tracing.span(call.trace, "parse"):
        pass
    tracing.record(call.trace, "admission", time.monotonic())
    call.version, call.batch_size = 2, 5
    assert tracing.finish(call.trace, 200, call) == TRACE_ID
    spans = finished(exporter)
    root = spans["POST /predict"]
    assert ids(root) == (TRACE_ID, PARENT) and root.parent.is_remote
    assert root.context.trace_state.get("vendor") == "value"
    for child in ("parse", "admission"):
        assert ids(spans[child]) == (TRACE_ID, f"{root.context.span_id:016x}")
    assert (root.attributes["digitserve.model.version"], root.attributes["digitserve.batch.size"]) == (2, 5)
    assert root.start_time <= spans["parse"].start_time and root.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("given", [None, "garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE_ID}-{'0' * 16}-01",
                                   f"ff-{TRACE_ID}-{PARENT}-01"])
def test_without_a_valid_traceparent_a_new_trace_begins(exporter, given):
    call = calls.opened("predict", None, 1)
    call.trace = tracing.begin("POST /predict", call.arrived, given, None, {})
    assert call.trace is not None
    tracing.finish(call.trace, 200, call)
    trace_id, parent = ids(finished(exporter)["POST /predict"])
    assert parent is None and trace_id not in (TRACE_ID, "0" * 32)


def test_a_client_that_does_not_sample_gets_no_span(exporter):
    """The default sampler follows the client's sampled flag."""
    assert tracing.begin("POST /predict", time.monotonic(), f"00-{TRACE_ID}-{PARENT}-00", None, {}) is None
    assert finished(exporter) == {}


def test_errors_mark_their_span_and_a_5xx_its_call(exporter):
    call = calls.opened("predict", None, 1)
    call.trace = tracing.begin("POST /predict", call.arrived, None, None, {})
    with pytest.raises(HttpError), tracing.span(call.trace, "worker"):
        raise HttpError(504, "no answer within the request timeout")
    call.detail = "no answer within the request timeout"
    tracing.finish(call.trace, 504, call)
    spans = finished(exporter)
    assert spans["worker"].status.status_code is StatusCode.ERROR and not spans["worker"].events
    assert spans["POST /predict"].status.status_code is StatusCode.ERROR
    assert spans["POST /predict"].status.description == call.detail


def test_a_works_trace_survives_pickling_to_the_workers_spans(exporter):
    """What the API server's ``worker`` span hands over in ``Work.trace`` becomes the parent of the worker's
    queue wait and batch spans, and the batch of the forward."""
    call = calls.opened("predict", None, 1)
    call.trace = tracing.begin("POST /predict", call.arrived, TRACEPARENT, None, {})
    with tracing.span(call.trace, "worker") as waiting:
        work = Work(np.ones((3, 784), np.float32), {}, call.arrived, 2, trace=tracing.traceparent(waiting))
        arrived: Work = pickle.loads(pickle.dumps(work))
        assert arrived.trace == work.trace and np.array_equal(arrived.images, work.images)
        now = time.monotonic()
        tracing.batch(arrived.trace, now - 0.003, now - 0.002, (now - 0.001, now), {"digitserve.batch.size": 3})
    spans = finished(exporter)
    worker = f"{spans['worker'].context.span_id:016x}"
    assert ids(spans["queue wait"]) == ids(spans["batch"]) == (TRACE_ID, worker)
    assert ids(spans["forward"]) == (TRACE_ID, f"{spans['batch'].context.span_id:016x}")
    assert spans["batch"].attributes["digitserve.batch.size"] == 3
    # the worker's times, taken on the monotonic clock, keep their order on the epoch's
    queue, batch, forward = spans["queue wait"], spans["batch"], spans["forward"]
    assert queue.start_time < queue.end_time == batch.start_time < forward.start_time < forward.end_time
    assert forward.end_time == batch.end_time


def test_untraced_work_pickles_without_a_trace():
    work = Work(np.zeros((1, 784), np.float32), {}, 0.0)
    assert pickle.loads(pickle.dumps(work)).trace is None


def test_shadow_work_is_linked_to_the_served_call(exporter):
    call = calls.opened("predict", None, 1)
    call.trace = tracing.begin("POST /predict", call.arrived, TRACEPARENT, None, {})
    shadow = tracing.linked(call.trace, "shadow", {"digitserve.model.version": 1})
    assert shadow is not None
    tracing.end(shadow, {"digitserve.shadow.agreeing": 3})
    tracing.finish(call.trace, 200, call)
    spans = finished(exporter)
    (link,) = spans["shadow"].links
    assert link.context.span_id == spans["POST /predict"].context.span_id
    assert spans["shadow"].parent is None and spans["shadow"].context.trace_id != int(TRACE_ID, 16)
    assert spans["shadow"].attributes["digitserve.shadow.agreeing"] == 3
