"""Each API server listens on a socket of its own (SO_REUSEPORT), bound to the configured address.

The kernel then spreads connections across the API servers by a hash of each connection's
addresses. On one shared socket the first server to wake takes every connection waiting: 64
keep-alive connections split as unevenly as 15/49, and the busier server's requests waited three
times as long. A second digitserve on the same port still fails with "address already in use":
LitServe first binds the port without SO_REUSEPORT to prove it free (``service.seam``).
"""

from __future__ import annotations

import socket


def check_free(host: str, port: int) -> None:
    """Bind ``host:port`` and let it go, as LitServe's own check does (SO_REUSEADDR, no SO_REUSEPORT), before
    anything is spawned: ``OSError`` (EADDRINUSE, EADDRNOTAVAIL) when the service could not listen there."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Listeners:
    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self._current: list[socket.socket] = []

    def use(self, sockets: list[socket.socket]) -> None:
        """Take the list of sockets the API servers will be started with (each gets its own in it)."""
        for old in sockets:
            old.close()
        sockets.clear()
        self._current = sockets

    def next_server(self) -> None:
        """In the parent, just before the next API server is forked: its own listening socket in the list.
        The previous server, already forked, keeps its copy of the one before."""
        for listener in self._current:
            listener.close()
        listener = socket.socket(_family(self.host), socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.host, self.port))
        self._current[:] = [listener]

    def close(self) -> None:
        """After the last fork: the parent needs no listening socket of its own."""
        for listener in self._current:
            listener.close()
