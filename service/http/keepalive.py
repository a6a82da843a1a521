"""uvicorn's HTTP protocol as the API servers run it: connections kept even, one write per response.

Balance. Each API server accepts on a socket of its own (SO_REUSEPORT) and the kernel sends each
new connection to one of them by a hash of its addresses: even only on average. The split is often
uneven enough (docs/performance.md) that the busier server's requests wait longer, which is what
a client's p99 sees. So each API server counts, in shared memory, the connections it keeps; one
that keeps two or more over the mean answers its next request with ``Connection: close``
(the same way uvicorn ends keep-alive at shutdown), and the client reconnects wherever the hash
sends it. HTTP/1.1 lets a server end keep-alive after any response; clients reconnect on their own.

Head size. A header field over ``MAX_FIELD_BYTES`` (name and value), or a request line and headers
over ``MAX_HEAD_BYTES`` in all, gets 431 and the connection is closed, as soon as the bytes
received say so: httptools itself would gather a header of any size (by repeated concatenation),
and uvicorn a URL of any size.

One write. uvicorn writes a response's head and its body separately: two send() calls, two
packets and two wake-ups of the client for every response, the largest single cost left in an
API server's profile under load. ``OneWrite`` sends them together.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
from collections import Counter
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.errors import retry_after

MAX_FIELD_BYTES = 16 * 1024
MAX_HEAD_BYTES = 64 * 1024


class HeadTooLarge(Exception):
    """Raised in a parser callback: the request's head is over a limit (the detail says which)."""


class ConnectionShares:
    """The connections each API server keeps open (for the balance) and has open (for the cap). Each
    server writes only its own slot: no lock."""

    def __init__(self, servers: int):
        context = mp.get_context("spawn")
        self.kept = context.RawArray("i", servers)
        self.open = context.RawArray("i", servers)
        self.slot = 0  # which API server this process is: set in the parent just before each one is forked

    def opened(self) -> None:
        self.kept[self.slot] += 1

    def released(self) -> None:
        self.kept[self.slot] -= 1

    def over_share(self) -> bool:
        kept = self.kept
        return kept[self.slot] > sum(kept) / len(kept) + 1


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
            if self.cycle is not None:  # the request's own log line and metrics say 408
                self.cycle.scope["state"].update(status=408, detail="request headers or body too slow")
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


class OneWrite:
    """A connection's transport that holds writes until ``flush``: the protocol flushes when a response
    is whole, so its head and body leave in one write. Whatever else is written (100 Continue, a
    streamed chunk) leaves at the end of the event-loop iteration at the latest, and ``close`` sends
    what is pending first; order is kept. Waiting for the iteration's end alone would cost latency:
    other callbacks queued before the flush, such as decoding a 32-image request, would run first."""

    def __init__(self, transport: asyncio.Transport):
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)  # one piece: CPython returns it as is, no copy
            self._pending.clear()
            if not self._transport.is_closing():  # the client left in the meantime: nobody to send it to
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
