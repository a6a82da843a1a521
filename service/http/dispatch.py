"""Hands a unit of work to a worker of its pool and gives back where its answer will land.

Request ids need only be unique within one API server (answers come back to it alone), so a
counter will do; ``bind`` tells the dispatcher which API server this process is.
"""

from __future__ import annotations

import itertools
import time

from service.pipes import AnswerPipes, Pending, RequestPipes
from service.work import Control, Pool, Work


class Dispatcher:
    def __init__(self, requests: dict[Pool, RequestPipes], answers: AnswerPipes):
        self.requests = requests
        self.answers = answers
        self.server = 0
        self._uids = itertools.count()

    def bind(self, server: int) -> None:
        """In the parent, just before API server ``server`` is forked: the slot it writes and reads."""
        self.server = server

    def watch(self) -> None:
        """In the API server's event loop, at start-up: answers from now on go to their requests."""
        self.answers.watch(self.server)

    def submit(self, pool: Pool, work: Work) -> tuple[int, Pending]:
        """Queue ``work`` for ``pool``; its answer will land in the returned ``Pending``."""
        uid, pending = next(self._uids), Pending()
        worker = self.requests[pool].put((self.server, uid, time.monotonic(), work))
        self.answers.sent(uid, pool, worker, pending)
        return uid, pending

    def submit_to(self, pool: Pool, worker: int, command: Control) -> tuple[int, Pending]:
        """A control for one given worker of ``pool`` (every worker must get it, not the next one up)."""
        uid, pending = next(self._uids), Pending()
        self.requests[pool].put((self.server, uid, time.monotonic(), command), worker)
        self.answers.sent(uid, pool, worker, pending)
        return uid, pending

    def forget(self, uid: int) -> None:
        """Nobody waits for request ``uid`` any more: an answer that comes later is dropped."""
        self.answers.forget(uid)
