"""The worker loop: LitServe's batched loop with batch collection that never spins or polls.

LitServe's stock collection polls the queue every millisecond for the whole batch timeout
(or, at timeout 0, spins on ``get_nowait``). Ours blocks until the first request arrives,
takes everything already queued without waiting (under load, requests pile up while the
previous forward runs, so batches form by themselves), and waits at most ``batch_timeout``
for more only while the batch is not full. Requests whose deadline passed while queued are
answered 504 here and never computed.
"""

from __future__ import annotations

import time
from queue import Empty, Queue

from litserve import LitAPI
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, LoopResponseType

from service.transport import PipeTransport, WorkerQueues

IDLE_WAKEUP_S = 1.0  # how often an idle worker wakes to notice shutdown


class CollectingLoop(BatchedLoop):
    def __call__(self, lit_api: LitAPI, device: str, worker_id: int, request_queue: WorkerQueues,
                 transport: PipeTransport, *args) -> None:
        """Bind this worker to its own pipes. Every request it reads is announced at once ("this
        worker has it"), so that if it dies, the API servers answer that request instead of waiting."""
        transport.bind(lit_api.api_path, worker_id)

        def taken(item: tuple) -> None:
            self.put_response(transport, item[0], item[1], (), LitAPIStatus.START, LoopResponseType.REGULAR)

        request_queue.bind(worker_id, taken)
        super().__call__(lit_api, device, worker_id, request_queue, transport, *args)

    def get_batch_requests(self, lit_api: LitAPI, request_queue: Queue, transport: MessageTransport) -> tuple[list, list]:
        payloads: list = []
        timed_out: list = []
        try:
            item = request_queue.get(timeout=IDLE_WAKEUP_S)
        except Empty:
            return payloads, timed_out
        deadline = time.monotonic() + lit_api.batch_timeout
        while True:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, queued_at, work = item
            if lit_api.request_timeout not in (None, False, -1) and time.monotonic() - queued_at > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, work))
            if len(payloads) >= lit_api.max_batch_size:
                return payloads, timed_out
            try:
                item = request_queue.get_nowait()
            except Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return payloads, timed_out
                try:
                    item = request_queue.get(timeout=remaining)
                except Empty:
                    return payloads, timed_out
