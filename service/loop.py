"""The worker loop: LitServe's batched loop, lean, with batch collection that never spins or polls.

Collection: LitServe's stock loop polls the queue every millisecond for the whole batch timeout
(or, at timeout 0, spins on ``get_nowait``). Ours blocks until the first request arrives,
takes everything already queued without waiting (under load, requests pile up while the
previous forward runs, so batches form by themselves), and then waits at most
``batch_timeout`` for more only while the batch is not full, holds fewer images than a
full-speed forward, and more requests are in flight than it holds (some may still be being
decoded; under load there always are): a lone request never waits, and multi-image requests
do not wait for each other in lock-step. Requests whose deadline passed while queued are
answered 504 here and never computed.

Stages: the same LitAPI stages in the same order (decode_request, batch, predict, unbatch,
encode_response), without what a profile under load showed costing a sixth of the worker's
time: LitServe's loop inspects every stage's signature on every call (for an optional
``context`` argument we do not use) and sends each answer as its own message. Ours sends one
message per API server per batch.
"""

from __future__ import annotations

import logging
import time
from queue import Empty

from fastapi import HTTPException
from litserve import LitAPI
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, PickleableHTTPException

from service.transport import PipeTransport, WorkerQueues

# One forward on the CPU reaches the model's full images/s at 32 images (bench.micro: ~62k/s at 32 and at
# 256, a sixth of that at 1): past it, waiting for more requests would only idle the worker.
FULL_SPEED_IMAGES = 32
EXPIRED = PickleableHTTPException(504, "waited in the queue past the request timeout; not computed")
log = logging.getLogger("digitserve")


class CollectingLoop(BatchedLoop):
    def __call__(self, lit_api: LitAPI, device: str, worker_id: int, request_queue: WorkerQueues,
                 transport: PipeTransport, *args) -> None:
        """Bind this worker to its own pipes."""
        transport.bind(lit_api.api_path, worker_id)
        request_queue.bind(worker_id)
        super().__call__(lit_api, device, worker_id, request_queue, transport, *args)

    def run_batched_loop(self, lit_api: LitAPI, request_queue: WorkerQueues, transport: PipeTransport, *args) -> None:
        while True:  # the worker ends when the server terminates it
            work, timed_out = self.get_batch_requests(lit_api, request_queue, transport)
            answers = [(queue_id, uid, EXPIRED, LitAPIStatus.ERROR) for queue_id, uid in timed_out]
            if work:
                answers += self._answer(lit_api, work)
            transport.answer(answers)

    @staticmethod
    def _answer(lit_api: LitAPI, work: list[tuple]) -> list[tuple]:
        """One batch through the stages; on failure every request of the batch gets the error."""
        queue_ids, uids, inputs = zip(*work)
        try:
            outputs = lit_api.unbatch(lit_api.predict(lit_api.batch([lit_api.decode_request(x) for x in inputs])))
            if len(outputs) != len(inputs):
                raise RuntimeError(f"unbatch returned {len(outputs)} outputs for {len(inputs)} requests")
            return [(q, u, lit_api.encode_response(y), LitAPIStatus.OK) for q, u, y in zip(queue_ids, uids, outputs)]
        except HTTPException as e:
            error = PickleableHTTPException.from_exception(e)
        except Exception:
            log.exception("the model failed on a batch of %d requests", len(inputs))
            error = RuntimeError("the model failed on this batch")
        return [(q, u, error, LitAPIStatus.ERROR) for q, u in zip(queue_ids, uids)]

    def get_batch_requests(self, lit_api: LitAPI, request_queue: WorkerQueues, transport: PipeTransport) -> tuple[list, list]:
        payloads: list = []
        timed_out: list = []
        images = 0
        item = request_queue.get()  # an idle worker sleeps here until a request comes (or it is terminated)
        deadline = time.monotonic() + lit_api.batch_timeout
        while True:
            response_queue_id, uid, queued_at, work = item
            if lit_api.request_timeout not in (None, False, -1) and time.monotonic() - queued_at > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, work))
                images += len(work.images)
            if len(payloads) >= lit_api.max_batch_size:
                return payloads, timed_out
            try:
                item = request_queue.get_nowait()
            except Empty:
                remaining = deadline - time.monotonic()
                if (remaining <= 0 or images >= FULL_SPEED_IMAGES
                        or not request_queue.coming(len(payloads) + len(timed_out))):
                    return payloads, timed_out
                try:
                    item = request_queue.get(timeout=remaining)
                except Empty:
                    return payloads, timed_out
