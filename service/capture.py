"""Capture: a sample of the frames the model saw and what it answered, for replay offline (docs/capture.md).

An API server calls ``Capture.record`` once per answered request with the frames of its instances that
have a digit; a share of the instances (``--capture-share``) is kept in memory and a background thread
writes them to ``--capture-dir`` in rotating files, oldest deleted first past ``--capture-max-mb`` summed
over every file there (several API server processes share the folder). ``python -m service.replay``
recomputes them with any stored version.

What ``record`` costs the event loop: a draw per instance, the kept frames rounded to uint8 (a copy, so
the caller may reuse its arrays) and a list append under a lock: a few microseconds. It never touches the
disk and never raises. The writer never grows memory past a bound (``BACKLOG_FILES`` files' worth of
records: past it, records are dropped and counted) and a failed write (a full disk, a folder gone) stops
capture, logged once: serving is never affected.

A file is ``capture-<time_ns>-<tag>-<pid>-<seq>.npz`` (names sort by the time they were written), written
as ``np.savez_compressed`` to a hidden temporary name, fsynced and renamed, so a reader never sees half a
file. Its arrays, one row per instance (``FIELDS``), need numpy alone (no pickle):

- ``frames`` uint8 (n, 28, 28): the frame in 0..255 (the model saw it / 255);
- ``probabilities`` float32 (n, 10), ``typicality`` float32 (n,) (NaN for a version without calibration),
  ``label`` int64 (n,) and ``confidence`` float32 (n,): the served answer;
- ``flags`` str (n,): the answer's flags joined by "," ("" for none);
- ``version`` int64 (n,), ``request_id`` str (n,), ``time`` float64 (n,): seconds since the epoch.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import functools
import itertools
import logging
import os
import random
import re
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service import metrics

log = logging.getLogger("digitserve")

PREFIX, SUFFIX = "capture-", ".npz"
PATTERN = f"{PREFIX}*{SUFFIX}"
FIELDS = ("frames", "probabilities", "typicality", "label", "confidence", "flags", "version", "request_id", "time")
RECORDS_PER_FILE = 4096  # a file is closed after this many records ...
ROTATE_S = 5.0  # ... or this long after its first record, whichever comes first
BACKLOG_FILES = 4  # records held in memory at most, in files' worth (4 x 4096 x ~900 bytes: ~15 MB)
RECORD_BYTES = 1024  # a record's size in a file, uncompressed, at most (784 of frame, 44 of answer, the strings)
STALE_TMP_S = 3600  # a temporary file this old is a crashed writer's: removed with the oldest files
_TAG = re.compile(r"[A-Za-z0-9_.]{1,64}")
_SIDE = 28


def files(directory: Path) -> list[Path]:
    """The complete capture files in ``directory``, oldest first (their names sort by time)."""
    return sorted(Path(directory).glob(PATTERN))


@dataclass
class _Chunk:
    """The kept instances of one ``record`` call."""

    frames: np.ndarray  # uint8 (k, 784)
    rows: np.ndarray  # float32 (k, 11)
    flags: list[str]
    version: int
    request_id: str
    when: float

    def split(self, at: int) -> tuple[_Chunk, _Chunk]:
        head = _Chunk(self.frames[:at], self.rows[:at], self.flags[:at], self.version, self.request_id, self.when)
        tail = _Chunk(self.frames[at:], self.rows[at:], self.flags[at:], self.version, self.request_id, self.when)
        return head, tail


class Capture:
    """Samples instances into memory; a daemon thread writes them to ``directory`` (docstring above).

    ``share`` 0..1 of the instances is kept (1: all, 0: none). ``max_bytes`` caps every capture file in
    ``directory`` together, whichever process wrote it. ``tag`` (e.g. ``api0``) and the pid name this
    process's files. The thread starts with the first kept record, and again in a process forked from
    this one (files then carry the child's pid). ``close()`` writes what is held; it is idempotent.

    Counters, read by anyone: ``records`` (written), ``dropped`` (kept but never written: the backlog was
    full, or a write failed) and ``failures`` (0 or 1: capture stopped). ``stopped`` says capture is off.
    """

    # the state shared with the writer thread, under _lock (made anew in a forked child: _fresh_state)
    _lock: threading.Lock
    _wake: threading.Event
    _pending: collections.deque[_Chunk]
    _held: int
    _oldest: float
    _seq: itertools.count[int]
    _thread: threading.Thread | None

    def __init__(self, directory: Path, share: float, max_bytes: int, tag: str, *,
                 records_per_file: int = RECORDS_PER_FILE, rotate_s: float = ROTATE_S,
                 backlog_files: int = BACKLOG_FILES) -> None:
        if not 0 <= share <= 1:
            raise ValueError(f"capture share must be within 0..1, not {share}")
        if max_bytes < 1:
            raise ValueError(f"capture max_bytes must be at least 1, not {max_bytes}")
        if not _TAG.fullmatch(tag):
            raise ValueError(f"capture tag {tag!r} must be 1 to 64 of A-Z a-z 0-9 _ . (it names files)")
        self.directory, self.share, self.max_bytes, self.tag = Path(directory), float(share), int(max_bytes), tag
        # a file is at most an eighth of the cap, so that the cap holds several and deletes little at a time
        self.records_per_file = max(1, min(records_per_file, self.max_bytes // (8 * RECORD_BYTES)))
        self.rotate_s = rotate_s
        self.max_held = backlog_files * records_per_file  # memory, whatever the cap: ~15 MB by default
        self.records = self.dropped = self.failures = 0
        self.stopped = self.closed = False
        self._published = {"backlog": 0, "failed": 0}
        self._dropped = {"backlog": 0, "failed": 0}
        self._warned_cap = self._warned_backlog = False
        self._random = random.Random().random
        self._fresh_state()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._stop(e)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=functools.partial(_call, ref, "_fresh_state"))
        atexit.register(_call, ref, "close")

    # ------------------------------------------------------------------ the event loop's side

    def record(self, frames: np.ndarray, rows: np.ndarray, flags: Sequence[Sequence[str]], version: int,
               request_id: str, when: float) -> None:
        """Keep a ``share`` of these instances (frames float32 (n, 784) in 0..1; rows float32 (n, 11): ten
        probabilities then the typicality; each one's flags) for the writer. Never blocks, never raises."""
        if self.stopped or self.closed:
            return
        try:
            share = self.share
            if share >= 1:
                keep: list[int] | None = None
                count = len(rows)
            elif share <= 0:
                return
            else:
                draw = self._random
                keep = [i for i in range(len(rows)) if draw() < share]
                count = len(keep)
            if not count:
                return
            frames = np.asarray(frames, dtype=np.float32).reshape(-1, _SIDE * _SIDE)
            rows = np.asarray(rows, dtype=np.float32)
            if keep is not None:
                frames, rows, flags = frames[keep], rows[keep], [flags[i] for i in keep]
            chunk = _Chunk(np.rint(np.clip(frames, 0, 1) * 255).astype(np.uint8), np.array(rows, copy=True),
                           [",".join(f) for f in flags], int(version), str(request_id), float(when))
            if len(chunk.frames) != count or chunk.rows.shape != (count, 11) or len(chunk.flags) != count:
                raise ValueError(f"record: frames {np.shape(frames)}, rows {np.shape(rows)} and {len(flags)} flags "
                                 "do not describe the same instances")
            if self._thread is None:
                self._start()
            with self._lock:
                held = self._held
                if held + count > self.max_held:
                    self._dropped["backlog"] += count
                    self.dropped += count
                    warn, self._warned_backlog = not self._warned_backlog, True
                    if warn:
                        log.warning("capture: the writer is behind (%d records held): records are dropped, counted "
                                    "in digitserve_capture_dropped_total{reason=\"backlog\"}", held)
                    return
                self._held = held + count
                first = not self._pending
                if first:
                    self._oldest = time.monotonic()
                self._pending.append(chunk)
            if first or held < self.records_per_file <= held + count:
                self._wake.set()
        except Exception as e:  # a caller's mistake must not fail its request: capture stops instead
            self._stop(e)

    def close(self) -> None:
        """Write what is held and stop the writer; later records are ignored. Idempotent."""
        if self.closed:
            return
        self.closed = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._wake.set()
            thread.join(timeout=60)

    # ------------------------------------------------------------------ the writer thread

    def _fresh_state(self) -> None:
        """No thread, nothing held: at construction, and in a forked child (whose copy of the parent's
        lock may be held and which has no writer thread)."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = collections.deque()
        self._held = 0
        self._oldest = 0.0
        self._seq = itertools.count()
        self._thread = None

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"capture-{self.tag}", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            closing = self.closed
            try:
                self._drain(force=closing)
            except Exception as e:  # a full disk, a folder gone or read-only, anything: capture stops
                self._stop(e)
            finally:
                self._publish()
            if closing or self.stopped:
                return
            self._wake.wait(self._timeout())
            self._wake.clear()

    def _timeout(self) -> float | None:
        with self._lock:
            if not self._pending:
                return None
            return max(0.0, self._oldest + self.rotate_s - time.monotonic())

    def _drain(self, force: bool) -> None:
        """Write every full file's worth held, and the rest once its oldest record is ``rotate_s`` old."""
        while True:
            with self._lock:
                if not self._held or (self._held < self.records_per_file and not force
                                      and time.monotonic() < self._oldest + self.rotate_s):
                    return
                taken: list[_Chunk] = []
                count = 0
                while self._pending and count < self.records_per_file:
                    chunk = self._pending.popleft()
                    room = self.records_per_file - count
                    if len(chunk.rows) > room:
                        chunk, rest = chunk.split(room)
                        self._pending.appendleft(rest)
                    taken.append(chunk)
                    count += len(chunk.rows)
                if self._pending:
                    self._oldest = time.monotonic()
            try:
                written = self._write(taken)
            except BaseException:
                with self._lock:
                    self._held -= count
                    self._dropped["failed"] += count
                    self.dropped += count
                raise
            with self._lock:
                self._held -= count
                self.records += count
            metrics.CAPTURE_RECORDS.inc(count)
            self._cap(written)

    def _write(self, chunks: list[_Chunk]) -> Path:
        name = f"{PREFIX}{time.time_ns():020d}-{self.tag}-{os.getpid()}-{next(self._seq):06d}{SUFFIX}"
        path, tmp = self.directory / name, self.directory / f".{name}.tmp"
        arrays = _arrays(chunks)
        try:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, allow_pickle=False, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return path

    def _cap(self, written: Path) -> None:
        """Delete the oldest capture files, any process's, until they are ``max_bytes`` or less in all."""
        found: list[tuple[str, int]] = []
        now = time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    if entry.name.startswith(PREFIX) and entry.name.endswith(SUFFIX):
                        found.append((entry.name, entry.stat().st_size))
                    elif entry.name.startswith("." + PREFIX) and now - entry.stat().st_mtime > STALE_TMP_S:
                        os.unlink(entry.path)
                except FileNotFoundError:  # another process deleted it meanwhile
                    continue
        found.sort()
        total = sum(size for _, size in found)
        for name, size in found:
            if total <= self.max_bytes:
                break
            (self.directory / name).unlink(missing_ok=True)
            total -= size
            if name == written.name and not self._warned_cap:
                self._warned_cap = True
                log.warning("capture: a file of %d records is larger than --capture-max-mb (%d bytes): nothing is "
                            "kept; raise the cap", self.records_per_file, self.max_bytes)

    def _stop(self, error: BaseException) -> None:
        """Capture off for good, once: what is held is dropped and counted, one warning says why."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
            lost, self._held = self._held, 0
            self._pending.clear()
            self.failures += 1
            self._dropped["failed"] += lost
            self.dropped += lost
        log.warning("capture stopped, serving goes on: %s: %s (%s); %d records written, %d dropped",
                    self.directory, error, type(error).__name__, self.records, self.dropped)
        self._wake.set()

    def _publish(self) -> None:
        """The drops since the last call, to ``digitserve_capture_dropped_total`` (from the writer thread only:
        the event loop never takes the metrics' locks)."""
        for reason, count in self._dropped.items():
            if count > self._published[reason]:
                metrics.labelled(metrics.CAPTURE_DROPPED, reason).inc(count - self._published[reason])
                self._published[reason] = count


def _arrays(chunks: list[_Chunk]) -> dict[str, np.ndarray]:
    """The chunks' records as the file's arrays (``FIELDS``)."""
    rows = np.concatenate([c.rows for c in chunks])
    probabilities = np.ascontiguousarray(rows[:, :10])
    label = probabilities.argmax(1).astype(np.int64)
    sizes = [len(c.rows) for c in chunks]
    return {
        "frames": np.concatenate([c.frames for c in chunks]).reshape(-1, _SIDE, _SIDE),
        "probabilities": probabilities,
        "typicality": np.ascontiguousarray(rows[:, 10]),
        "label": label,
        "confidence": probabilities[np.arange(len(label)), label],
        "flags": np.array([flag for c in chunks for flag in c.flags], dtype=np.str_),
        "version": np.repeat(np.array([c.version for c in chunks], dtype=np.int64), sizes),
        "request_id": np.repeat(np.array([c.request_id for c in chunks], dtype=np.str_), sizes),
        "time": np.repeat(np.array([c.when for c in chunks], dtype=np.float64), sizes),
    }


def _call(ref: weakref.ref[Capture], method: str) -> None:
    """``ref().method()`` while the capture lives (fork and exit hooks must not keep it alive)."""
    capture = ref()
    if capture is not None:
        getattr(capture, method)()
