"""Which requests an API server lets in: none while draining, and at most ``max_queued_requests``
admitted and unanswered across all API servers together.

The counts live in shared memory, one slot per API server (each writes only its own: no lock).
A request is counted first and the total checked after, so two servers admitting at the same
moment each see the other's request and together never pass the limit (at worst both refuse).
The workers read the same counts to decide whether more requests are on their way
(``service.pipes.RequestPipes.coming``).
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from service.errors import retry_later

SERVING, LAME_DUCK, DRAINING = 0, 1, 2


class Admission:
    def __init__(self, pools: list[str], api_servers: int, limit: int):
        context = mp.get_context("spawn")
        self.limit = limit
        # per pool, per API server: requests admitted and not yet answered
        self.counts: dict[str, Any] = {pool: context.RawArray("i", api_servers) for pool in pools}
        # read on every request, so a lock-free shared byte rather than an Event
        self._stage: Synchronized[int] = context.RawValue("b", SERVING)
        self.slot = 0  # which API server this process is: set just before each one is forked

    @property
    def stopping(self) -> bool:
        """Lame duck or draining: /health says 503 so that load balancers move traffic away."""
        return self._stage.value != SERVING

    def lame_duck(self) -> None:
        """/health turns 503 while requests are still admitted and answered as before."""
        self._stage.value = LAME_DUCK

    def drain(self) -> None:
        """From now on every API server refuses new work (503); what is admitted is still answered."""
        self._stage.value = DRAINING

    @contextmanager
    def admit(self, pool: str) -> Iterator[None]:
        """Count one request of ``pool`` for as long as the block runs, or refuse it with a 503."""
        if self._stage.value == DRAINING:
            raise retry_later(503, "shutting down: not taking new work")
        counts = self.counts[pool]
        counts[self.slot] += 1
        try:
            if self.in_flight() > self.limit:
                raise retry_later(503, f"overloaded: {self.limit} requests already waiting; retry shortly")
            yield
        finally:
            counts[self.slot] -= 1

    def in_flight(self) -> int:
        """Requests admitted and not yet answered, every pool and API server together."""
        return sum(sum(counts) for counts in self.counts.values())
