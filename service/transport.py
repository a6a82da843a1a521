"""The hand-offs between API servers and model workers: pipes, no Manager, no threads, no shared locks.

Every (worker, API server) pair has its own request pipe and its own response pipe, each with
exactly one writer and one reader, so no lock is shared between processes: a worker killed at
any moment cannot leave behind a lock that wedges its pool.

A frame is ``MAGIC + length + pickle + TAIL``. MAGIC is 16 random bytes drawn at start (TAIL is
its complement); pickles of images and JSON do not contain them by chance. A process killed while writing or reading a frame
leaves its pipe cut mid-frame; the next reader drops bytes up to the next MAGIC, so a
replacement worker and the API servers carry on in step.

Each API server chooses the worker for every request it sends, so its transport knows which
worker holds which of its requests. When LitServe's monitor replaces a dead worker, the main
process first writes a "died" frame into that worker's response pipes, and every API server
answers all its requests sent to the dead worker with ``WorkerDied`` at once, those being
computed and those still in its pipe alike (LitServe itself fails them only in the main process's
buffer, where they are not waiting). Workers send their answers one frame per API server per batch.

Why not LitServe's transports: a Manager queue costs a round trip through the manager process
per message, and its response reader takes one response per event-loop iteration through a
thread hop. Here the event loop watches the pipes itself (``add_reader``), drains every frame
already there in one callback, and hands each answer straight to the request waiting for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import multiprocessing as mp
import os
import pickle
import select
import struct
import time
from collections import deque
from queue import Empty
from typing import Any

from litserve.transport.base import MessageTransport
from litserve.utils import LitAPIStatus, ResponseBufferItem

F_SETPIPE_SZ = 1031  # Linux fcntl command (not exported by Python's fcntl module)
PIPE_BYTES = 1 << 20
MAGIC_BYTES = 16
_LENGTH = struct.Struct("!Q")
# what a frame on a response pipe carries: (kind, payload)
_ANSWERS = "answers"  # [(uid, response, LitAPIStatus), ...]
_DIED = "died"  # None: written by the main process once the worker is dead
log = logging.getLogger("digitserve")


class WorkerDied(Exception):
    """The worker that held this request died before answering it."""


def new_magic() -> bytes:
    return os.urandom(MAGIC_BYTES)


class FrameReader:
    """Cuts one pipe's byte stream into frame payloads, resynchronising after a cut frame.

    A frame is delivered only when whole: its tail follows its payload, and no MAGIC starts
    inside it (a new writer's frame right after one that was cut short).
    """

    def __init__(self, magic: bytes):
        self.magic, self.tail = magic, _tail(magic)
        self.pending = bytearray()
        self.scanned = len(magic)  # where the search for a MAGIC inside the current frame resumes

    def feed(self, chunk: bytes) -> list[bytes]:
        self.pending += chunk
        magic, pending, payloads = self.magic, self.pending, []
        head = len(magic) + _LENGTH.size
        while pending:
            if not pending.startswith(magic):  # the rest of a frame cut short, or one a dead reader began
                if not self._resync(0):
                    break
                continue
            if len(pending) < head:
                break
            end = head + _LENGTH.unpack_from(pending, len(magic))[0]
            inside = pending.find(magic, self.scanned, min(len(pending), end))
            if inside >= 0:
                self._resync(inside)
                continue
            if len(pending) < end + len(self.tail):
                self.scanned = max(len(magic), min(end, len(pending)) - len(magic) + 1)
                break
            if pending[end:end + len(self.tail)] != self.tail:
                self._resync(1)
                continue
            payloads.append(bytes(pending[head:end]))
            del pending[:end + len(self.tail)]
            self.scanned = len(magic)
        return payloads

    def _resync(self, start: int) -> bool:
        """Drop what precedes the next MAGIC at or after ``start`` (all but a possible MAGIC's beginning
        when there is none yet). True when the buffer now starts with a MAGIC."""
        found = self.pending.find(self.magic, start)
        count = found if found >= 0 else max(0, len(self.pending) - len(self.magic) + 1)
        if count:
            log.warning("dropped %d bytes of a frame cut short (a process died mid-transfer)", count)
            del self.pending[:count]
        self.scanned = len(self.magic)
        return found >= 0


@functools.lru_cache
def _tail(magic: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in magic)


def frame(magic: bytes, item: Any) -> bytes:
    data = pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)
    return magic + _LENGTH.pack(len(data)) + data + _tail(magic)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_available(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, PIPE_BYTES)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(payloads: list[bytes]) -> list[Any]:
    items = []
    for payload in payloads:
        try:
            items.append(pickle.loads(payload))
        except Exception:  # a frame that survived a cut intact only by its length: never expected
            log.exception("dropped a frame that could not be unpickled")
    return items


def _pipes(rows: int, columns: int) -> tuple[list[list], list[list]]:
    """rows x columns one-way pipes (grown to 1 MiB): readers[r][c], writers[r][c]."""
    context = mp.get_context("spawn")
    pipes = [[context.Pipe(duplex=False) for _ in range(columns)] for _ in range(rows)]
    for row in pipes:
        for _, writer in row:
            _grow(writer)
    return [[r for r, _ in row] for row in pipes], [[w for _, w in row] for row in pipes]


def _grow(connection) -> None:
    """Grow a pipe to 1 MiB so bursts do not block a writer; keep the default where the system caps it."""
    try:
        fcntl.fcntl(connection.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        log.debug("could not grow a pipe to %d bytes", PIPE_BYTES)


class PipeTransport(MessageTransport):
    """Worker -> API server responses. Worker slots number the pools' workers in order (LitServe's
    ``inference_workers`` order): slot = the pool's offset + worker id."""

    def __init__(self, pools: dict[str, int], consumers: int, magic: bytes):
        self._offsets, offset = {}, 0
        for api_path, size in pools.items():
            self._offsets[api_path], offset = offset, offset + size
        self._readers, self._writers = _pipes(offset, consumers)
        self._magic = magic
        self._slot: int | None = None
        self._setstate_local()

    def _setstate_local(self) -> None:
        # request id -> (slot of the worker it was sent to, where its answer goes)
        self._held: dict[int, tuple[int, ResponseBufferItem]] = {}

    def slot(self, api_path: str, worker_id: int) -> int:
        return self._offsets[api_path] + worker_id

    def bind(self, api_path: str, worker_id: int) -> None:
        """In a worker process: which worker this is, so that ``send`` writes to its own pipes."""
        self._slot = self.slot(api_path, worker_id)

    def send(self, item: Any, consumer_id: int) -> None:
        """LitServe's one-message form, ``(uid, (response, status, response_type, worker_id))``."""
        uid, (response, status, *_) = item
        self.answer([(consumer_id, uid, response, status)])

    def answer(self, answers: list[tuple]) -> None:
        """In a worker: ``(queue_id, uid, response, status)`` each; one frame per API server."""
        by_consumer: dict[int, list] = {}
        for queue_id, uid, response, status in answers:
            by_consumer.setdefault(queue_id, []).append((uid, response, status))
        for queue_id, payload in by_consumer.items():
            _write_all(self._writers[self._slot][queue_id].fileno(), frame(self._magic, (_ANSWERS, payload)))

    def sent(self, uid: int, api_path: str, worker_id: int, item: ResponseBufferItem) -> None:
        """In an API server: request ``uid`` went to this worker; its answer (or ``WorkerDied``, if that
        worker dies first) goes into ``item``, whose event is then set."""
        self._held[uid] = (self.slot(api_path, worker_id), item)

    def forget(self, uid: int) -> None:
        """In an API server: nobody waits for ``uid`` any more (it timed out); drop its answer if one comes.
        An answered request needs no call: its entry went when the answer was delivered."""
        self._held.pop(uid, None)

    def worker_died(self, api_path: str, worker_id: int) -> None:
        """In the main process, after the worker died and before its replacement starts (so this is
        the pipes' only writer): tell every API server."""
        slot = self.slot(api_path, worker_id)
        for writer in self._writers[slot]:
            _write_all(writer.fileno(), frame(self._magic, (_DIED, None)))

    async def areceive(self, consumer_id: int | None = None, timeout: float | None = None) -> Any:
        """LitServe's response reader task calls this once per API server, at start-up: watch this
        server's response pipes. Answers then go from the pipe straight to the request waiting for
        each (``sent``), one event-loop iteration sooner than through a reader task, so this call
        returns nothing: it waits until the task is cancelled at shutdown."""
        self._watch(consumer_id or 0)
        await asyncio.get_running_loop().create_future()

    def _watch(self, consumer_id: int) -> None:
        loop = asyncio.get_running_loop()
        for slot, row in enumerate(self._readers):
            fd = row[consumer_id].fileno()
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._drain, fd, slot, FrameReader(self._magic))

    def _drain(self, fd: int, slot: int, frames: FrameReader) -> None:
        for kind, payload in _loads(frames.feed(_read_available(fd))):
            if kind == _ANSWERS:
                for uid, response, status in payload:
                    if (held := self._held.pop(uid, None)) is not None:
                        _deliver(held[1], response, status)
            elif kind == _DIED:
                self._fail_held(slot)

    def _fail_held(self, slot: int) -> None:
        lost = [uid for uid, (held_by, _) in self._held.items() if held_by == slot]
        for uid in lost:
            _deliver(self._held.pop(uid)[1], WorkerDied(), LitAPIStatus.ERROR)
        if lost:
            log.warning("answering %d requests held by a worker that died", len(lost))

    def close(self, **kwargs) -> None:
        for connection in [*_flat(self._readers), *_flat(self._writers)]:
            connection.close()

    def __getstate__(self) -> dict:
        """Workers get the pipes; the event-loop state stays in the API server."""
        return {k: self.__dict__[k] for k in ("_offsets", "_readers", "_writers", "_magic", "_slot")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setstate_local()


class WorkerQueues:
    """API servers -> the workers of one pool (LitServe's request queue for one api_path).

    Each API server sends round-robin to the pool's workers that are up (to all when none is);
    its writes never block the event loop: what a full pipe does not take waits in a buffer
    that the loop flushes when the pipe drains. Requests put in one event-loop iteration go in
    one write, so the worker is woken once for them, not once each. A worker reads only its own pipes.
    """

    def __init__(self, workers: int, consumers: int, magic: bytes):
        self._readers, self._writers = _pipes(workers, consumers)
        self._magic = magic
        context = mp.get_context("spawn")
        self._up = context.RawArray("b", workers)  # 1 while worker w reads its pipes
        # requests for this pool admitted and not yet answered, per API server (each writes its own)
        self.admitted = context.RawArray("i", consumers)
        self._setstate_local()

    def _setstate_local(self) -> None:
        self._next = 0
        self._outgoing: dict[int, bytearray] = {}
        self._inbox: deque = deque()

    # ---- API-server side
    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> int:
        """``item`` is LitServe's (response_queue_id, uid, queued_at, work): the first names the API server.
        Returns the worker it goes to."""
        worker = self._choose()
        fd = self._writers[worker][item[0]].fileno()
        out = self._outgoing.get(fd)
        if out is None:
            os.set_blocking(fd, False)
            out = self._outgoing[fd] = bytearray()
        if not out:  # the first request for this pipe in this event-loop iteration: write them all at its end
            asyncio.get_running_loop().call_soon(self._flush, fd)
        out += frame(self._magic, item)
        return worker

    def _choose(self) -> int:
        workers = len(self._writers)
        for step in range(workers):
            worker = (self._next + step) % workers
            if self._up[worker]:
                break
        else:
            worker = self._next % workers
        self._next = worker + 1
        return worker

    def _flush(self, fd: int) -> None:
        out = self._outgoing[fd]
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the rest goes once it drains
            while out:
                del out[:os.write(fd, out)]
        loop = asyncio.get_running_loop()
        if out:
            loop.add_writer(fd, self._flush, fd)
        else:
            loop.remove_writer(fd)

    # ---- main-process side
    def down(self, worker_id: int) -> None:
        """The worker died: send new requests to the pool's other workers until its replacement is up."""
        self._up[worker_id] = 0

    # ---- worker side
    def bind(self, worker_id: int) -> None:
        """In a worker process: read this worker's pipes from now on."""
        self._frames = {}
        self._poll = select.poll()
        for reader in self._readers[worker_id]:
            os.set_blocking(reader.fileno(), False)
            self._frames[reader.fileno()] = FrameReader(self._magic)
            self._poll.register(reader.fileno(), select.POLLIN)
        self._up[worker_id] = 1

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._inbox:
            wait = 0.0 if not block else None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait < 0:
                raise Empty
            self._fill(wait)
            if not self._inbox and not block:
                raise Empty
        return self._inbox.popleft()

    def coming(self, collected: int) -> bool:
        """Whether more requests than the ``collected`` ones are in flight: admitted and not yet answered to
        the client, so some may still be being decoded (or already on their way back)."""
        return sum(self.admitted) > collected

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def _fill(self, timeout: float | None) -> None:
        for fd, _ in self._poll.poll(None if timeout is None else timeout * 1000):
            self._inbox.extend(_loads(self._frames[fd].feed(_read_available(fd))))

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("_readers", "_writers", "_magic", "_up", "admitted")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._setstate_local()


def _deliver(item: ResponseBufferItem, response: Any, status: LitAPIStatus) -> None:
    item.response = (response, status)
    item.event.set()


def _flat(rows: list[list]) -> list:
    return [item for row in rows for item in row]
