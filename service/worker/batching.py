"""The worker loop: batch collection that never spins or polls, then the LitAPI stages.

``service.seam`` runs ``serve`` as the body of a LitServe loop (``LitLoop.run``), in each worker process.

Collection: LitServe's stock loop polls the queue every millisecond for the whole batch timeout
(or, at timeout 0, spins on ``get_nowait``). Ours blocks until the first request arrives,
takes everything already queued without waiting (under load, requests pile up while the
previous forward runs, so batches form by themselves), and then waits at most
``batch_timeout`` for more only while the batch is not full, holds fewer images than a
full-speed forward, and more requests are in flight than it holds (some may still be being
decoded; under load there always are): a lone request never waits, and multi-image requests
do not wait for each other in lock-step. Requests whose deadline passed while queued (the
service's request timeout, or the client's own ``X-Request-Timeout-Ms``: ``Work.deadline``) are
answered 504 here and never computed; their API server counts them as admitted until then.

Stages: the same LitAPI stages in the same order (decode_request, batch, predict, unbatch,
encode_response), without what a profile under load showed costing a sixth of the worker's
time: LitServe's loop inspects every stage's signature on every call (for an optional
``context`` argument we do not use) and sends each answer as its own message. Ours sends one
message per API server per batch. LitServe callbacks are not run here; ``service.seam``
refuses them at start-up.
"""

from __future__ import annotations

import logging
import time
from queue import Empty
from typing import Any, Protocol

from service.costs import Fit
from service.errors import HttpError
from service.load import PoolLoad
from service.pipes import AnswerPipes, RequestPipes
from service.work import Control

# One forward on the CPU reaches the model's full images/s at 32 images (see docs/performance.md): past
# it, waiting for more requests would only idle the worker.
FULL_SPEED_IMAGES = 32
# A batch holds at most this many work units (images x integrated-gradients steps): past it a batch of
# heavy explanations would make every request in it wait for all of them; under it, the first ones are
# answered while the rest are computed, and the admission's wait estimate holds for each.
FULL_BATCH_UNITS = 8192
EXPIRED = HttpError(504, "waited in the queue past the request timeout; not computed")
log = logging.getLogger("digitserve")


class Stages(Protocol):
    """The LitAPI stages the loop calls (``service.worker.stages``), and the batching limits."""

    max_batch_size: int
    batch_timeout: float
    request_timeout: float | None

    def decode_request(self, request: Any) -> Any: ...
    def batch(self, inputs: list[Any]) -> Any: ...
    def predict(self, x: Any) -> Any: ...
    def unbatch(self, output: Any) -> list[Any]: ...
    def encode_response(self, output: Any) -> Any: ...
    def control(self, command: Control) -> Any: ...


Reply = tuple[int, int, Any, bool]  # (API server, request id, answer or error, ok)


def serve(stages: Stages, requests: RequestPipes, answers: AnswerPipes, load: PoolLoad, worker: int) -> None:
    """Collect a batch, run it through the stages, answer; then any controls; forever (the server
    terminates the worker). Controls (``service.work.Control``) come between batches. Each batch's
    time goes into this worker's fitted costs, published in the pool's ``load`` for admission."""
    fit = Fit()
    while True:
        work, timed_out, controls = collect(stages, requests, load)
        replies: list[Reply] = [(server, uid, EXPIRED, False) for server, uid in timed_out]
        if work:
            started = time.monotonic()
            replies += run_stages(stages, work)
            items = [item for _, _, item in work]
            fitted = fit.add(len(items), sum(len(item.images) for item in items), sum(item.units for item in items),
                             time.monotonic() - started)
            if fitted is not None:
                load.costs.publish(worker, fitted)
        replies += [run_control(stages, *control) for control in controls]
        answers.answer(replies)


def run_stages(stages: Stages, work: list[tuple[int, int, Any]]) -> list[Reply]:
    """One batch through the stages. A request ``decode_request`` refuses gets its own error; if a later
    stage fails, every request of the batch gets the error."""
    replies: list[Reply] = []
    accepted: list[tuple[int, int, Any]] = []
    for server, uid, item in work:
        try:
            accepted.append((server, uid, stages.decode_request(item)))
        except HttpError as e:
            replies.append((server, uid, e, False))
    if not accepted:
        return replies
    servers, uids, inputs = zip(*accepted)
    error: Exception
    try:
        outputs = stages.unbatch(stages.predict(stages.batch(list(inputs))))
        if len(outputs) != len(inputs):
            raise RuntimeError(f"unbatch returned {len(outputs)} outputs for {len(inputs)} requests")
        return replies + [(s, u, stages.encode_response(y), True) for s, u, y in zip(servers, uids, outputs)]
    except HttpError as e:
        error = e
    except Exception:
        log.exception("the model failed on a batch of %d requests", len(inputs))
        error = RuntimeError("the model failed on this batch")
    return replies + [(s, u, error, False) for s, u in zip(servers, uids)]


def run_control(stages: Stages, server: int, uid: int, command: Control) -> Reply:
    try:
        return server, uid, stages.control(command), True
    except Exception as e:  # a version that cannot be loaded: the admin path says why, nothing else changes
        log.exception("control %s v%d failed", command.op, command.version)
        return server, uid, HttpError(409, f"{type(e).__name__}: {e}"), False


Collected = tuple[list[tuple[int, int, Any]], list[tuple[int, int]], list[tuple[int, int, Control]]]


def collect(stages: Stages, requests: RequestPipes, load: PoolLoad) -> Collected:
    """The next batch: (api_server, uid, work) to compute, (api_server, uid) whose deadline passed, and
    controls, which end the collection at once."""
    payloads: list[tuple[int, int, Any]] = []
    timed_out: list[tuple[int, int]] = []
    controls: list[tuple[int, int, Control]] = []
    images, units = 0, 0.0
    timeout = stages.request_timeout if stages.request_timeout not in (None, False, -1) else None
    item = requests.get()  # an idle worker sleeps here until a request comes (or it is terminated)
    deadline = time.monotonic() + stages.batch_timeout
    while True:
        server, uid, queued_at, work = item
        if isinstance(work, Control):
            controls.append((server, uid, work))
            return payloads, timed_out, controls
        now = time.monotonic()
        if now > work.deadline or (timeout is not None and now - queued_at > timeout):
            timed_out.append((server, uid))
        else:
            work.queued = queued_at  # where its queue wait began (service.tracing)
            payloads.append((server, uid, work))
            images += len(work.images)
            units += work.units
        if len(payloads) >= stages.max_batch_size or units >= FULL_BATCH_UNITS:
            return payloads, timed_out, controls
        try:
            item = requests.get_nowait()
        except Empty:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or images >= FULL_SPEED_IMAGES or not load.coming(len(payloads) + len(timed_out)):
                return payloads, timed_out, controls
            try:
                item = requests.get(timeout=remaining)
            except Empty:
                return payloads, timed_out, controls
