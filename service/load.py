"""A pool's load, shared by the API servers that admit its requests and the workers that compute them.

One ``PoolLoad`` per pool, in shared memory: the requests, images and work units each API server
admitted and has not yet answered (one slot per API server, each written by its own server only:
no lock), and the costs the pool's workers fitted (``service.costs``). Admission
(``service.http.admission``) counts and reads it; a worker reads the counts to tell whether more
requests are on their way while it collects a batch, and publishes its fitted costs. Neither side
owns it: ``service.app`` builds it and hands it to both.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

from service.config import Settings
from service.costs import Costs
from service.work import Pool

_FIELDS = 3  # requests, images, units


class PoolLoad:
    def __init__(self, servers: int, workers: int):
        # one array, a (requests, images, units) triple per API server: admission reads it twice a request,
        # and one slice of one array is the cheapest read of shared memory from Python
        self._held: Any = mp.get_context("spawn").RawArray("d", servers * _FIELDS)
        self.costs = Costs(workers)

    def add(self, slot: int, images: int, units: float) -> Callable[[], None]:
        """API server ``slot`` admitted a request of ``images`` and ``units``: counted until the returned
        release is called (once)."""
        held, at = self._held, slot * _FIELDS
        held[at] += 1
        held[at + 1] += images
        held[at + 2] += units

        def release() -> None:
            held[at] -= 1
            held[at + 1] -= images
            held[at + 2] -= units

        return release

    def held(self) -> tuple[int, float, float]:
        """Requests, images and work units admitted and not yet answered, every API server together."""
        values = self._held[:]
        return round(sum(values[0::_FIELDS])), sum(values[1::_FIELDS]), sum(values[2::_FIELDS])

    def requests(self) -> int:
        return round(sum(self._held[0::_FIELDS]))

    def coming(self, collected: int) -> bool:
        """In a worker collecting a batch: whether more requests than the ``collected`` ones are in flight
        (admitted and not yet answered to the client), so some may still be being prepared."""
        return self.requests() > collected


def pool_loads(settings: Settings) -> dict[Pool, PoolLoad]:
    """Each configured pool's load, for its API servers and workers."""
    return {pool: PoolLoad(settings.api_servers, size) for pool, size in settings.pools().items()}
