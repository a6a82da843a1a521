"""An OTLP/HTTP trace receiver: what a collector is to digitserve's exporter (``service.tracing``).

The tests run one in a thread and read the spans it decoded (``ExportTraceServiceRequest`` protobuf, the
exporter's default encoding; gzip'd when the exporter compresses). The benchmark runs one that only
counts what it is sent, in a process of its own (``python -m harness.otlp --port N``), so that traces
on cost what digitserve's exporter does, not what a collector does with the spans.
"""

from __future__ import annotations

import argparse
import gzip
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue

PATH = "/v1/traces"  # where the exporter posts when given OTEL_EXPORTER_OTLP_ENDPOINT
_ANSWER = ExportTraceServiceResponse().SerializeToString()


@dataclass(frozen=True)
class Span:
    """One received span; ids in lowercase hex (``parent_id`` "" for a root), attributes as plain values."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int  # OTLP's: 1 internal, 2 server
    attributes: dict[str, Any]
    links: list[tuple[str, str]]  # (trace id, span id) of each linked span
    service: str  # the resource's service.name


class Receiver:
    """Listens on 127.0.0.1 (``port`` 0: a free one) while in its ``with`` block. With ``keep``, every span
    received is in ``spans``; ``posts`` counts the exports either way."""

    def __init__(self, keep: bool = True, port: int = 0):
        self.keep, self.posts = keep, 0
        self.spans: list[Span] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """What ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set to."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def received(self, body: bytes) -> None:
        if not self.keep:
            with self._lock:
                self.posts += 1
            return
        request = ExportTraceServiceRequest.FromString(body)
        spans = [
            Span(span.name, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(), span.kind,
                 _values(span.attributes), [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                 _values(resource.resource.attributes).get("service.name", ""))
            for resource in request.resource_spans for scope in resource.scope_spans for span in scope.spans]
        with self._lock:
            self.posts += 1
            self.spans += spans

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _values(pairs: Any) -> dict[str, Any]:
    def plain(pair: KeyValue) -> Any:
        which = pair.value.WhichOneof("value")
        return None if which is None else getattr(pair.value, which)

    return {pair.key: plain(pair) for pair in pairs}


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as a collector: the exporter reuses its connection

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.path != PATH:
                self._answer(404, b"")
                return
            receiver.received(gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body)
            self._answer(200, _ANSWER)

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: one line per export would drown a test's or a benchmark's output."""

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="An OTLP/HTTP trace receiver that counts and discards.")
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    with Receiver(keep=False, port=port):
        threading.Event().wait()  # until the benchmark terminates it


if __name__ == "__main__":
    main()
