"""Which requests an API server lets in, decided once a request's body is read and parsed.

Refused at once (503 with ``Retry-After``): while draining; past ``--max-queued-requests`` admitted
and unanswered across all API servers; and when the request would wait longer than its pool's
``--max-queue-wait-ms`` (``--explain-max-queue-wait-ms``) or than its own deadline
(``--request-timeout-s``, or a client's ``X-Request-Timeout-Ms``). The wait is estimated from the
work the pool already holds, in work units (an image through the model; an image x steps for
integrated gradients by the midpoint rule), over the rate its workers measured recently (units per
busy second, ``service.worker.batching``). A burst of heavy explanations is then told to come back
instead of queueing for many seconds, and a load balancer sees a fast refusal, not a slow replica.

That estimate sees the workers. When the API servers themselves are the bottleneck (thousands of
small requests decoding pictures), requests queue in their event loops instead: each API server
also watches the time its own answered requests took, from arrival to answer, and while the
shortest of the last interval's (CoDel's signal of a standing queue) was over the limit, it
refuses new ones the same way.

A request counts from its admission until its worker answered it or dropped it, even when its
client was answered 504 (or left) before that: a short client deadline must not free a place for
work that is still queued or being computed (``Admitted.keep_until``).

The counts and the workers' costs are each pool's ``service.load.PoolLoad``, in shared memory.
A request is counted first and the totals checked after, so two servers admitting at the same
moment each see the other's request (at worst both refuse).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from service.config import Settings
from service.errors import HttpError, retry_after
from service.load import PoolLoad
from service.pipes import Pending
from service.work import Pool

SERVING, LAME_DUCK, DRAINING = 0, 1, 2
INTERVAL_S = 0.1  # the sojourn check judges each interval of this length ...
MIN_SAMPLES = 5  # ... when at least this many requests were answered in it
PRIOR_ERROR = 1.5


class Refused(HttpError):
    """A 503 of admission, with why (``reason`` is the metrics' label) and when to come back."""

    def __init__(self, reason: str, detail: str, after_s: float = 1.0):
        super().__init__(503, detail, {"Retry-After": retry_after(after_s)})
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.reason, self.detail, float(self.headers["Retry-After"]) if self.headers else 1.0)


class Admission:
    def __init__(self, settings: Settings, loads: dict[Pool, PoolLoad]):
        context = mp.get_context("spawn")
        pools = settings.pools()
        self.limit = settings.max_queued_requests
        self.max_wait_s = {pool: settings.max_queue_wait_s(pool) for pool in pools}
        self.loads = loads
        # read on every request, so a lock-free shared byte rather than an Event
        self._stage: Synchronized[int] = context.RawValue("b", SERVING)
        self.slot = 0  # which API server this process is: set just before each one is forked
        self._sojourn = {pool: Sojourn() for pool in pools}  # this API server's own (not shared)
        # taken / predicted of its recent answers; until answers say otherwise, the estimates are taken to be
        # optimistic (a rate measured on idle cores, a burst that competes for them)
        self._error = dict.fromkeys(pools, PRIOR_ERROR)

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

    def precheck(self, pool: Pool) -> None:
        """Before a body is read: refuse at once while draining, or while what the pool already holds (or
        this API server's standing queue) is past the limit whatever the request is: reading and parsing
        its body would only add to the wait."""
        if self._stage.value == DRAINING:
            raise Refused("draining", "shutting down: not taking new work")
        wait = max(self.wait_estimate(pool), self._sojourn[pool].standing(time.monotonic()))
        limit = self.max_wait_s[pool]
        if wait > limit:
            raise Refused("queue_wait", f"overloaded: requests for {pool} wait about {wait * 1000:.0f} ms (the "
                                        f"limit is {limit * 1000:.0f} ms); retry later", wait - limit)

    @contextmanager
    def admit(self, pool: Pool, images: int, units: float, deadline_s: float, arrived: float) -> Iterator[Admitted]:
        """Count one request of ``pool`` (``images`` and ``units`` of work, arrived at ``arrived``) for as
        long as the block runs (or, past it, until ``Admitted.keep_until``'s answer), or refuse it. A
        block that ends without error was answered: its time teaches the estimate."""
        if self._stage.value == DRAINING:
            raise Refused("draining", "shutting down: not taking new work")
        admitted = Admitted(self.loads[pool].add(self.slot, images, units))
        try:
            predicted = self._check(pool, deadline_s, (1, images, units))
            yield admitted
            now = time.monotonic()
            self._sojourn[pool].add(now - arrived, now)
            self._learn(pool, now - arrived, predicted)
        finally:
            if not admitted.kept:
                admitted.release()

    def _learn(self, pool: Pool, took: float, predicted: float) -> None:
        """How far off the estimate was (the workers' rate is measured, but contention for the cores
        changes it): a decayed ratio of taken to predicted times, applied to the next estimates."""
        if predicted < 0.05:  # too short to say anything of the queue
            return
        ratio = min(max(took / predicted, 0.5), 4.0)
        self._error[pool] += 0.3 * (ratio - self._error[pool])

    def _check(self, pool: Pool, deadline_s: float, own: tuple[int, int, float]) -> float:
        if self.in_flight() > self.limit:
            raise Refused("queue_full", f"overloaded: {self.limit} requests already waiting; retry shortly")
        predicted = self.wait_estimate(pool, own)
        wait = max(predicted, self._sojourn[pool].standing(time.monotonic()))
        limit = self.max_wait_s[pool]
        if wait > limit:
            raise Refused("queue_wait", f"overloaded: this request would wait about {wait * 1000:.0f} ms for "
                                        f"{pool} (the limit is {limit * 1000:.0f} ms); retry later", wait - limit)
        if wait > deadline_s:
            raise Refused("deadline", f"this request would wait about {wait * 1000:.0f} ms, past its deadline "
                                      f"of {deadline_s * 1000:.0f} ms; not computed", wait - deadline_s)
        return predicted

    def wait_estimate(self, pool: Pool, own: tuple[int, int, float] = (0, 0, 0.0)) -> float:
        """Seconds a request would wait before its own computation starts: what the pool holds (less
        ``own``, the request's own work, already counted) at its workers' fitted costs (0 until they
        fitted any), corrected by how far off this API server's recent estimates were."""
        load = self.loads[pool]
        requests, images, units = load.held()
        held = load.costs.seconds(requests - own[0], images - own[1], units - own[2])
        return max(held, 0.0) * self._error[pool]

    def in_flight(self) -> int:
        """Requests admitted and not yet answered, every pool and API server together."""
        return sum(load.requests() for load in self.loads.values())


class Admitted:
    """A request's place in the counts, released when its ``admit`` block ends, or later."""

    __slots__ = ("kept", "release")

    def __init__(self, release: Callable[[], None]):
        self.release, self.kept = release, False

    def keep_until(self, pending: Pending) -> None:
        """The client was answered (or left) before the worker: the place is released once the worker
        answers or drops the request, not when the block ends."""
        self.kept = True
        if pending.answered:
            self.release()
        else:
            pending.then = self.release


class Sojourn:
    """The shortest time from arrival to answer of the requests answered in each interval: above the
    limit for a whole interval, the queue is standing, not a passing burst."""

    def __init__(self) -> None:
        self._start, self._shortest, self._count, self._last = 0.0, math.inf, 0, 0.0

    def add(self, seconds: float, now: float) -> None:
        self._roll(now)
        self._shortest, self._count = min(self._shortest, seconds), self._count + 1

    def standing(self, now: float) -> float:
        """The last whole interval's shortest sojourn (0 when too few were answered in it to judge)."""
        self._roll(now)
        return self._last

    def _roll(self, now: float) -> None:
        if now - self._start < INTERVAL_S:
            return
        recent = now - self._start < 2 * INTERVAL_S  # the interval that just ended, not an old one
        self._last = self._shortest if recent and self._count >= MIN_SAMPLES else 0.0
        self._start, self._shortest, self._count = now, math.inf, 0
