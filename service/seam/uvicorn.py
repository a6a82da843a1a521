"""uvicorn's httptools protocol as the API servers run it, with ``service.http.keepalive``'s rules.

uvicorn has no hooks for a connection's life, a head's size or a response's writes, so this
subclasses ``HttpToolsProtocol``: the one module that touches uvicorn's internals. Checked against
uvicorn ``UVICORN_VERSION`` (pinned in pyproject.toml); ``tests/unit/test_seam.py`` pins that
version, the signature of every method overridden here and every private name used, and fails
naming what changed. Delete with uvicorn hooks for connection limits, header limits and a
transport factory (its ``h11_max_incomplete_event_size`` bounds h11's heads only).

Private names used: ``parser``, ``cycle`` (its ``scope``, ``keep_alive``, ``response_started``,
``response_complete``), ``loop``, ``logger``, ``_unset_keepalive_if_required``,
``send_400_response``, ``_should_upgrade``, ``handle_websocket_upgrade``,
``_unsupported_upgrade_warning``.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.errors import retry_after
from service.http.calls import Call
from service.http.keepalive import MAX_FIELD_BYTES, MAX_HEAD_BYTES, ConnectionShares, HeadTooLarge, OneWrite

UVICORN_VERSION = "0.55.0"


def balanced_protocol(shares: ConnectionShares, settings: Settings,
                      refused: Callable[[str], None]) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol writing through ``OneWrite``, counting its connections in ``shares``
    and ending keep-alive on those over this server's share; with a deadline for each request's
    headers and body, and a cap on open connections. Pass it as uvicorn's ``http`` setting.

    Slow clients: a request whose headers and body have not all arrived ``read_timeout_s`` after it
    began (or after the connection opened, for its first) gets 408 and the connection is closed, so
    a client that dribbles bytes, or sends none, cannot hold a connection; one answered before its
    body arrived (413, 503) is closed then if the body is still coming. Idle keep-alive connections
    close after uvicorn's ``timeout_keep_alive``. Past ``max_connections`` open on this
    API server, or ``max_connections_per_client`` from one client address (when set), a new
    connection gets a 503 and is closed at once. ``refused(reason)`` counts each."""
    read_timeout_s, max_connections = settings.read_timeout_s, settings.max_connections
    per_client = settings.max_connections_per_client
    from_client: Counter[str] = Counter()  # open connections by client address, on this API server

    class BalancedHttpProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(OneWrite(transport))  # type: ignore[arg-type]
            self.kept = True
            shares.opened()
            shares.open[shares.slot] += 1
            self.address: str | None = None  # counted in from_client, where the per-address cap is set
            self.read_timer: asyncio.TimerHandle | None = None
            self.head_fed: int | None = 0  # bytes received while a request's head is being read (None: its body)
            self.head_size = 0  # the request line's and the headers' bytes, as the parser hands them over
            if shares.open[shares.slot] > max_connections:
                refused("too_many_connections")
                self._close_with(503, f"too many connections: this server holds {max_connections}; retry")
                return
            if per_client:
                self.address = (transport.get_extra_info("peername") or ("",))[0]
                from_client[self.address] += 1
                if from_client[self.address] > per_client:
                    refused("too_many_from_client")
                    self._close_with(503, f"too many connections from {self.address}: this server holds "
                                          f"{per_client} from one address; close some or retry")
                    return
            self._start_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            super().connection_lost(exc)
            shares.open[shares.slot] -= 1
            if self.address is not None:
                from_client[self.address] -= 1
                if not from_client[self.address]:
                    del from_client[self.address]
            self._stop_reading()
            if self.kept:
                shares.released()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self.head_size = 0
            if self.read_timer is None:
                self._start_reading()

        def on_message_complete(self) -> None:
            self._stop_reading()
            self.head_fed = 0  # what comes next is the next request's head
            super().on_message_complete()

        def data_received(self, data: bytes) -> None:
            """uvicorn's, with 431 for a head over the limits: from a callback (``HeadTooLarge``), or here
            for a head still incomplete after more bytes than the limit (held inside httptools meanwhile)."""
            self._unset_keepalive_if_required()
            if self.head_fed is not None:
                self.head_fed += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserCallbackError as e:
                if isinstance(e.__context__, HeadTooLarge):
                    self._too_large(str(e.__context__))
                    return
                self._invalid()
                return
            except httptools.HttpParserError:
                self._invalid()
                return
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            if self.head_fed is not None and self.head_fed > MAX_HEAD_BYTES and not self.transport.is_closing():
                self._too_large(f"the request line and headers are over {MAX_HEAD_BYTES} bytes in all")

        def _invalid(self) -> None:
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)

        def _too_large(self, detail: str) -> None:
            refused("headers_too_large")
            self._stop_reading()
            self._close_with(431, detail)

        def on_url(self, url: bytes) -> None:
            self.head_size += len(url)
            if self.head_size > MAX_HEAD_BYTES:
                raise HeadTooLarge(f"the request line and headers are over {MAX_HEAD_BYTES} bytes in all")
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            size = len(name) + len(value)
            if size > MAX_FIELD_BYTES:
                raise HeadTooLarge(f"a header field is {size} bytes; the limit is {MAX_FIELD_BYTES}")
            self.head_size += size
            if self.head_size > MAX_HEAD_BYTES:
                raise HeadTooLarge(f"the request line and headers are over {MAX_HEAD_BYTES} bytes in all")
            super().on_header(name, value)

        def _start_reading(self) -> None:
            self.read_timer = self.loop.call_later(read_timeout_s, self._read_timed_out)

        def _stop_reading(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _read_timed_out(self) -> None:
            self.read_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and self.cycle.response_started:
                if self.cycle.response_complete:  # answered early (a 413, a 503), its body still coming: enough
                    self.transport.close()
                return
            refused("read_timeout")
            call: Call | None = self.cycle.scope.get("state", {}).get("call") if self.cycle is not None else None
            if call is not None:  # the request's own log line and metrics say 408
                call.status, call.detail = 408, "request headers or body too slow"
            self._close_with(408, f"the request did not arrive within {read_timeout_s:g} s; closing")

        def _close_with(self, status: int, detail: str) -> None:
            body = json.dumps({"detail": detail}).encode()
            head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                    f"x-content-type-options: nosniff\r\ncontent-length: {len(body)}\r\nconnection: close\r\n")
            retry = f"retry-after: {retry_after()}\r\n" if status == 503 else ""
            self.transport.write((head + retry + "\r\n").encode() + body)
            self.transport.close()

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]  # OneWrite's: the response is whole: send it now, not at the iteration's end
            super().on_response_complete()

        def on_headers_complete(self) -> None:
            self.head_fed = None
            super().on_headers_complete()
            if self.kept and self.cycle is not None and shares.over_share():
                self.kept = False
                shares.released()
                self.cycle.keep_alive = False  # "connection: close" on this response, then close

    return BalancedHttpProtocol
