"""The hand-offs between API servers and model workers: pipes, no Manager, no threads, no shared locks.

Every (worker, API server) pair has its own request pipe and its own response pipe, each with
exactly one writer and one reader, so no lock is shared between processes: a worker killed at
any moment cannot leave behind a lock that wedges its pool.

A message is ``MAGIC + length + pickle + TAIL``. MAGIC is 16 random bytes drawn at start (TAIL is
its complement); pickles of images and JSON do not contain them by chance. A process killed while
writing or reading a message leaves its pipe cut mid-message; the next reader drops bytes up to the
next MAGIC, so a replacement worker and the API servers carry on in step.

Each API server chooses the worker for every request it sends, so it knows which worker holds
which of its requests. When a worker dies, the main process first writes a "died" message into
that worker's answer pipes, and every API server answers all its requests sent to the dead worker
with ``WorkerDied`` at once, those being computed and those still in its pipe alike. Workers send
their answers one message per API server per batch.

Nothing here knows LitServe: ``service.seam`` plugs these pipes in where LitServe expects its
request queues and its transport.

Why not LitServe's transports: a Manager queue costs a round trip through the manager process
per message, and its response reader takes one response per event-loop iteration through a
thread hop. Here the event loop watches the pipes itself (``add_reader``), drains every frame
already there in one callback, and hands each answer straight to the request waiting for it.
"Message" here is a unit on a pipe; MNIST's 28x28 placement is ``service.imaging``'s business.
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
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from queue import Empty
from typing import Any

from service.work import Pool

F_SETPIPE_SZ = 1031  # Linux fcntl command (not exported by Python's fcntl module)
PIPE_BYTES = 1 << 20
MAGIC_BYTES = 16
_LENGTH = struct.Struct("!Q")
# what a message on an answer pipe carries: (kind, payload)
_ANSWERS = "answers"  # [(uid, response, ok), ...]
_DIED = "died"  # None: written by the main process once the worker is dead
log = logging.getLogger("digitserve")


class WorkerDied(Exception):
    """The worker that held this request died before answering it."""


def new_magic() -> bytes:
    return os.urandom(MAGIC_BYTES)


class MessageReader:
    """Cuts one pipe's byte stream into message payloads, resynchronising after a cut message.

    A message is delivered only when whole: its tail follows its payload, and no MAGIC starts
    inside it (a new writer's message right after one that was cut short), its own first bytes
    included: a MAGIC cut one byte short whose last byte is its first looks like a whole one, and
    the next writer's MAGIC begins inside it. A writer that died inside
    the tail, followed by a new writer whose MAGIC begins with the missing tail bytes (1 in 256 for
    one byte), passes the tail's check: its payload is whole and is delivered, and the new MAGIC,
    begun inside that tail, is found there (``_began_in_tail``) rather than its message dropped.
    """

    def __init__(self, magic: bytes):
        self.magic, self.tail = magic, _tail(magic)
        self.pending = bytearray()
        self.scanned = 1  # where the search for a MAGIC inside the current message resumes
        self.after_tail = False  # the buffer starts right after a delivered message's tail

    def feed(self, chunk: bytes) -> list[bytes]:
        self.pending += chunk
        magic, pending, payloads = self.magic, self.pending, []
        head = len(magic) + _LENGTH.size
        while pending:
            if not pending.startswith(magic):  # the rest of a message cut short, or one a dead reader began
                if self.after_tail and len(pending) < len(magic):
                    break  # too few bytes yet to tell where the next MAGIC begins
                if self._began_in_tail() or self._resync(0):
                    continue
                break
            if len(pending) < head:
                break
            end = head + _LENGTH.unpack_from(pending, len(magic))[0]
            inside = pending.find(magic, self.scanned, min(len(pending), end))
            if inside >= 0:
                self._resync(inside)
                continue
            if len(pending) < end + len(self.tail):
                self.scanned = max(1, min(end, len(pending)) - len(magic) + 1)
                break
            if pending[end:end + len(self.tail)] != self.tail:
                self._resync(1)
                continue
            payloads.append(bytes(pending[head:end]))
            del pending[:end + len(self.tail)]
            self.scanned = 1
            self.after_tail = True
        return payloads

    def _began_in_tail(self) -> bool:
        """Right after a delivered message, whether the next MAGIC began inside its tail (its writer died
        there): if so, the MAGIC's first bytes, taken for the tail's, are put back."""
        if not self.after_tail:
            return False
        self.after_tail = False
        joined = self.tail + bytes(self.pending[:len(self.magic)])
        found = joined.find(self.magic, 1)
        if not 0 < found < len(self.tail):
            return False
        self.pending[:0] = joined[found:len(self.tail)]
        return True

    def _resync(self, start: int) -> bool:
        """Drop what precedes the next MAGIC at or after ``start`` (all but a possible MAGIC's beginning
        when there is none yet). True when the buffer now starts with a MAGIC."""
        found = self.pending.find(self.magic, start)
        count = found if found >= 0 else max(0, len(self.pending) - len(self.magic) + 1)
        if count:
            log.warning("dropped %d bytes of a message cut short (a process died mid-transfer)", count)
            del self.pending[:count]
        self.scanned = 1
        self.after_tail = False
        return found >= 0


@functools.lru_cache
def _tail(magic: bytes) -> bytes:
    return bytes(b ^ 0xFF for b in magic)


def pack(magic: bytes, item: Any) -> bytes:
    """One message: ``item`` pickled between MAGIC + length and TAIL."""
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
        except Exception:  # a message that survived a cut intact only by its length: never expected
            log.exception("dropped a message that could not be unpickled")
    return items


def _pipes(rows: int, columns: int) -> tuple[list[list[Connection]], list[list[Connection]]]:
    """rows x columns one-way pipes (grown to 1 MiB): readers[r][c], writers[r][c]."""
    context = mp.get_context("spawn")
    pipes = [[context.Pipe(duplex=False) for _ in range(columns)] for _ in range(rows)]
    for row in pipes:
        for _, writer in row:
            _grow(writer)
    return [[r for r, _ in row] for row in pipes], [[w for _, w in row] for row in pipes]


def _grow(connection: Connection) -> None:
    """Grow a pipe to 1 MiB so bursts do not block a writer; keep the default where the system caps it."""
    try:
        fcntl.fcntl(connection.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        log.debug("could not grow a pipe to %d bytes", PIPE_BYTES)


@dataclass(slots=True)
class Pending:
    """Where one request's answer lands in its API server; ``event`` is set once it is there."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    answered: bool = False
    ok: bool = False
    response: Any = None
    then: Callable[[], None] | None = None  # called once the answer is there (a request given up on: its release)

    def deliver(self, response: Any, ok: bool) -> None:
        self.answered, self.ok, self.response = True, ok, response
        self.event.set()
        if self.then is not None:
            self.then()


class AnswerPipes:
    """Workers -> API servers. Worker slots number the pools' workers in order (the order the workers
    are started in): slot = the pool's offset + worker id."""

    def __init__(self, pools: dict[Pool, int], consumers: int, magic: bytes):
        self._offsets, offset = {}, 0
        for pool, size in pools.items():
            self._offsets[pool], offset = offset, offset + size
        self._readers, self._writers = _pipes(offset, consumers)
        self._magic = magic
        self._slot: int | None = None
        self._setstate_local()

    def _setstate_local(self) -> None:
        # request id -> (slot of the worker it was sent to, where its answer goes)
        self._held: dict[int, tuple[int, Pending]] = {}

    def slot(self, pool: Pool, worker_id: int) -> int:
        return self._offsets[pool] + worker_id

    def bind(self, pool: Pool, worker_id: int) -> None:
        """In a worker process: which worker this is, so that ``answer`` writes to its own pipes."""
        self._slot = self.slot(pool, worker_id)

    def answer(self, answers: list[tuple[int, int, Any, bool]]) -> None:
        """In a worker: ``(api_server, uid, response, ok)`` each; one message per API server."""
        assert self._slot is not None, "answer() before bind()"
        by_server: dict[int, list[tuple[int, Any, bool]]] = {}
        for server, uid, response, ok in answers:
            by_server.setdefault(server, []).append((uid, response, ok))
        for server, payload in by_server.items():
            _write_all(self._writers[self._slot][server].fileno(), pack(self._magic, (_ANSWERS, payload)))

    def sent(self, uid: int, pool: Pool, worker_id: int, pending: Pending) -> None:
        """In an API server: request ``uid`` went to this worker; its answer (or ``WorkerDied``, if that
        worker dies first) goes into ``pending``."""
        self._held[uid] = (self.slot(pool, worker_id), pending)

    def forget(self, uid: int) -> None:
        """In an API server: nobody waits for ``uid`` any more (it timed out); drop its answer if one comes.
        An answered request needs no call: its entry went when the answer was delivered."""
        self._held.pop(uid, None)

    def worker_died(self, pool: Pool, worker_id: int) -> None:
        """In the main process, after the worker died and before its replacement starts (so this is
        the pipes' only writer): tell every API server."""
        for writer in self._writers[self.slot(pool, worker_id)]:
            _write_all(writer.fileno(), pack(self._magic, (_DIED, None)))

    def watch(self, server: int) -> None:
        """In API server ``server``, on its event loop: answers go from the pipes straight to the
        request waiting for each, every message already there drained in one callback."""
        loop = asyncio.get_running_loop()
        for slot, row in enumerate(self._readers):
            fd = row[server].fileno()
            os.set_blocking(fd, False)
            loop.add_reader(fd, self._drain, fd, slot, MessageReader(self._magic))

    def _drain(self, fd: int, slot: int, messages: MessageReader) -> None:
        for kind, payload in _loads(messages.feed(_read_available(fd))):
            if kind == _ANSWERS:
                for uid, response, ok in payload:
                    if (held := self._held.pop(uid, None)) is not None:
                        held[1].deliver(response, ok)
            elif kind == _DIED:
                self._fail_held(slot)

    def _fail_held(self, slot: int) -> None:
        lost = [uid for uid, (held_by, _) in self._held.items() if held_by == slot]
        for uid in lost:
            self._held.pop(uid)[1].deliver(WorkerDied(), False)
        if lost:
            log.warning("answering %d requests held by a worker that died", len(lost))

    def close(self) -> None:
        for connection in [*_flat(self._readers), *_flat(self._writers)]:
            connection.close()

    def __getstate__(self) -> dict[str, Any]:
        """Workers get the pipes; the event-loop state stays in the API server."""
        return {k: self.__dict__[k] for k in ("_offsets", "_readers", "_writers", "_magic", "_slot")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setstate_local()


class RequestPipes:
    """API servers -> the workers of one pool.

    Each API server sends round-robin to the pool's workers that are up (to all when none is);
    its writes never block the event loop: what a full pipe does not take waits in a buffer
    that the loop flushes when the pipe drains. Requests put in one event-loop iteration go in
    one write, so the worker is woken once for them, not once each. A worker reads only its own pipes.
    """

    def __init__(self, workers: int, consumers: int, magic: bytes):
        self._readers, self._writers = _pipes(workers, consumers)
        self._magic = magic
        self._up = mp.get_context("spawn").RawArray("b", workers)  # 1 while worker w reads its pipes
        self._setstate_local()

    def _setstate_local(self) -> None:
        self._next = 0
        self._outgoing: dict[int, bytearray] = {}
        self._inbox: deque[Any] = deque()

    # ---- API-server side
    def put(self, item: tuple[int, int, float, Any], worker: int | None = None) -> int:
        """``item`` is (api_server, uid, queued_at, work), for ``worker`` or the next one up. Returns the worker."""
        worker = self._choose() if worker is None else worker
        fd = self._writers[worker][item[0]].fileno()
        out = self._outgoing.get(fd)
        if out is None:
            os.set_blocking(fd, False)
            out = self._outgoing[fd] = bytearray()
        if not out:  # the first request for this pipe in this event-loop iteration: write them all at its end
            asyncio.get_running_loop().call_soon(self._flush, fd)
        out += pack(self._magic, item)
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
        self._readers_by_fd: dict[int, MessageReader] = {}
        self._poll = select.poll()
        for reader in self._readers[worker_id]:
            os.set_blocking(reader.fileno(), False)
            self._readers_by_fd[reader.fileno()] = MessageReader(self._magic)
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

    def get_nowait(self) -> Any:
        return self.get(block=False)

    def _fill(self, timeout: float | None) -> None:
        for fd, _ in self._poll.poll(None if timeout is None else timeout * 1000):
            self._inbox.extend(_loads(self._readers_by_fd[fd].feed(_read_available(fd))))

    def __getstate__(self) -> dict[str, Any]:
        return {k: self.__dict__[k] for k in ("_readers", "_writers", "_magic", "_up")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._setstate_local()


def _flat(rows: list[list[Connection]]) -> list[Connection]:
    return [item for row in rows for item in row]
