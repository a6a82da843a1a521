"""Shadow traffic: a loaded candidate version also computes a share of the served version's requests,
after their answers have left, on spare capacity only, and how often it agrees is counted.

Only the served version's unpinned answers are shadowed (a canary's or a pinned version's answer is
not "what users get"). The shadow's work is queued once the event loop has sent the served answer
(``call_soon``: the response is written before the request's task yields), is never admitted (it does
not count against served requests' admission, so it cannot refuse one), and is dropped, counted, when
the pool has no idle worker at that moment, or when no worker began it within the pool's
``--max-queue-wait-ms``: under load the shadow goes first and the served answers never wait for it
beyond one batch already begun. Its answer is compared when it lands (``Pending.then``), with no
task, timer or await of its own. A traced request's shadow is a trace of its own (``shadow``, with the
worker's spans under it), linked to the served request's span.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING

import numpy as np

from service import metrics, tracing
from service.config import Settings
from service.http.admission import Admission
from service.http.calls import Call
from service.http.dispatch import Dispatcher
from service.pipes import Pending
from service.versions import Board, ShadowTally
from service.work import Computed, Pool, Work, work_units

if TYPE_CHECKING:
    from opentelemetry.trace import Span


class Shadow:
    def __init__(self, settings: Settings, admission: Admission, dispatcher: Dispatcher, board: Board,
                 tally: ShadowTally):
        self.admission, self.dispatcher, self.board, self.tally = admission, dispatcher, board, tally
        self.workers = settings.pools()
        self.max_wait_s = {pool: settings.max_queue_wait_s(pool) for pool in self.workers}
        self.running = dict.fromkeys(self.workers, 0)  # this API server's shadow work not yet answered

    def after(self, call: Call, work: Work, served: Computed) -> None:
        """Called with each computed answer, before it is sent: shadows it once it has left, if chosen."""
        state = self.board.read()
        if (state.shadow is None or call.pinned is not None or served.version != state.serving
                or random.random() >= state.shadow_share):
            return
        asyncio.get_running_loop().call_soon(self._start, call.pool, work, served, state.shadow, call.trace)

    def _start(self, pool: Pool, work: Work, served: Computed, version: int, trace: Span | None) -> None:
        count = len(work.images)
        span = tracing.linked(trace, "shadow", {"digitserve.model.version": version, "digitserve.pool": pool.label,
                                                "digitserve.served_version": served.version})
        if self.admission.loads[pool].requests() + self.running[pool] >= self.workers[pool]:
            self._dropped(version, count, span)
            return
        now = time.monotonic()
        shadow = Work(work.images, work.options, now, version, work_units(count, work.options),
                      now + self.max_wait_s[pool], tracing.traceparent(span))
        self.running[pool] += 1
        _, pending = self.dispatcher.submit(pool, shadow)
        pending.then = lambda: self._compare(pool, pending, served, version, span)

    def _compare(self, pool: Pool, pending: Pending, served: Computed, version: int, span: Span | None) -> None:
        self.running[pool] -= 1
        count = len(served.rows)
        if not pending.ok or not isinstance(pending.response, Computed):  # dropped at its deadline, or failed
            self._dropped(version, count, span)
            return
        theirs, ours = pending.response.rows[:, :10], served.rows[:, :10]
        agree = theirs.argmax(1) == ours.argmax(1)
        agreeing = int(agree.sum())
        difference = float(np.abs(theirs.max(1) - ours.max(1)).sum())
        for label, n in (("true", agreeing), ("false", count - agreeing)):
            if n:
                metrics.labelled(metrics.SHADOW, str(served.version), str(version), label).inc(n)
        self.tally.add(version, count, agreeing, difference)
        tracing.end(span, {"digitserve.shadow.agreeing": agreeing})

    def _dropped(self, version: int, count: int, span: Span | None) -> None:
        metrics.SHADOW_DROPPED.inc(count)
        self.tally.add(version, dropped=count)
        tracing.end(span, {"digitserve.shadow.dropped": True})
