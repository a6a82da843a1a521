"""What the API servers' HTTP connections obey: connections kept even, heads bounded, one write per response.

The decisions and the shared state are here; ``service.seam.uvicorn`` applies them inside uvicorn's
httptools protocol (the only place that touches its internals).

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
import multiprocessing as mp
from typing import Any

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
