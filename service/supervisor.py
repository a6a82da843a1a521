"""What the main process does once everything runs: answer for dead workers, and stop in order.

Stopping (SIGTERM, Ctrl-C): first a lame-duck phase on SIGTERM only, ``--drain-delay-s`` long, in
which /health answers 503 while requests are still answered normally, so a load balancer that
health-checks every few seconds takes the replica out of rotation before anything is refused;
then new work is refused (503), what was admitted is answered within ``--shutdown-grace-s``,
and the HTTP processes, the workers and the manager stop.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from service import metrics
from service.config import Settings
from service.http.admission import Admission
from service.pipes import AnswerPipes, RequestPipes
from service.versions import SetupFailures
from service.work import Pool

log = logging.getLogger("digitserve")
START_ATTEMPTS = 3  # a worker that fails its set-up this many times in a row stops the service


class Process(Protocol):
    def terminate(self) -> None: ...
    def kill(self) -> None: ...
    def join(self, timeout: float | None = None) -> None: ...
    def is_alive(self) -> bool: ...


class Supervisor:
    def __init__(self, settings: Settings, admission: Admission, requests: dict[Pool, RequestPipes],
                 answers: AnswerPipes, setup_failures: SetupFailures):
        self.settings, self.admission, self.requests, self.answers = settings, admission, requests, answers
        self.setup_failures = setup_failures
        self.signal: str | None = None  # "SIGTERM" or "SIGINT", set by the signal handler (service.__main__)
        self.failure: str | None = None  # why the service stopped on its own, if it did
        self._stopped = False
        self._failed_starts: dict[tuple[str, int], int] = {}

    def worker_died(self, pool: Pool, worker_id: int, failed_setup: bool) -> bool:
        """Before a dead worker's replacement starts (so the main process is its pipes' only writer): new
        requests go to the pool's other workers, and the API servers answer every request they sent
        the dead one (503 + Retry-After, at once, rather than after the replacement's start-up).

        A worker that died in its set-up is replaced at most ``START_ATTEMPTS - 1`` times in a row; then
        the service stops with one line naming the cause (False: start no replacement)."""
        self.requests[pool].down(worker_id)
        self.answers.worker_died(pool, worker_id)
        key = (pool, worker_id)
        self._failed_starts[key] = self._failed_starts.get(key, 0) + 1 if failed_setup else 0
        metrics.labelled(metrics.WORKER_RESTARTS, Pool(pool).label, "failed_start" if failed_setup else "died").inc()
        if self._failed_starts[key] >= START_ATTEMPTS:
            self.fail(f"{pool} worker {worker_id} failed to start {START_ATTEMPTS} times: "
                      f"{self.setup_failures.reason(pool)}")
            log.error("%s", self.failure)
            return False
        log.warning("%s worker %d %s; starting a replacement", pool, worker_id,
                    "failed to start" if failed_setup else "died")
        return True

    def fail(self, reason: str) -> None:
        """The service cannot go on (called from a monitoring thread): the main thread will stop it."""
        if not self._stopped:
            self.failure = reason

    def stop(self, stop_monitor: Callable[[], None], processes: Iterable[mp.process.BaseProcess | Process],
             shut_manager: Callable[[], None]) -> None:
        """Lame duck (SIGTERM), drain, then stop every process, within the grace period. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        started = time.monotonic()
        delay = self.settings.drain_delay_s if self.signal == "SIGTERM" else 0.0
        if delay:
            self.admission.lame_duck()
            log.info("SIGTERM: /health answers 503; still serving for --drain-delay-s %g s", delay)
            time.sleep(delay)
        self.admission.drain()
        # Stop the worker monitor (it would restart the workers we stop) from a helper thread: its
        # connection to the manager may be stuck in the wait() the signal interrupted.
        setter = threading.Thread(target=stop_monitor, daemon=True)
        setter.start()
        setter.join(timeout=2)
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        while self.admission.in_flight() > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.admission.in_flight():
            log.warning("grace period over with %d requests unanswered", self.admission.in_flight())
        stop_all(list(processes), deadline)
        shut_manager()
        why = "a worker could not start" if self.failure else f"after {self.signal}" if self.signal else "on request"
        log.info("stopped %s in %.1f s", why, time.monotonic() - started)


def stop_all(processes: list[mp.process.BaseProcess | Process], deadline: float) -> None:
    """SIGTERM every process, wait for them until ``deadline`` (at least a second), then SIGKILL the rest."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=max(1.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
