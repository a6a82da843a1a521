"""Which model versions are loaded, which one is served, the canary and the shadow: shared by every process.

The board lives in shared memory made before anything forks or spawns. The API servers read it on
every request (which version computes it), the workers on every batch (which versions to hold),
and one writer at a time changes it (the admin API or the store watcher, in an API server, holding
``lock``). A sequence counter makes each change atomic for readers, who take no lock: it is odd
while a change is written, and a reader that saw it odd or changing reads again.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import random
from dataclasses import dataclass, field
from typing import Any

MAX_LOADED = 8  # the most versions --max-loaded-versions may ask for
_NOTES_BYTES = 8192
_SEQ, _SERVING, _CANARY, _SHARE, _SHADOW, _SHADOW_SHARE, _LOADED = range(7)  # slots of the integer array
_SHARE_SCALE = 1_000_000  # the canary's and the shadow's shares in millionths


@dataclass(frozen=True)
class State:
    """One consistent reading of the board."""

    serving: int
    loaded: tuple[int, ...]
    canary: int | None = None
    share: float = 0.0  # of requests that go to the canary
    shadow: int | None = None  # also computes a share of the served version's requests, after they are answered
    shadow_share: float = 0.0
    seq: int = field(default=0, compare=False)

    def routed(self, pinned: int | None) -> int:
        """The version that computes a request: the pinned one, the canary for its share, else the served one."""
        if pinned is not None:
            return pinned
        if self.canary is not None and random.random() < self.share:
            return self.canary
        return self.serving


class Board:
    def __init__(self, serving: int):
        context = mp.get_context("spawn")
        self._ints = context.RawArray("q", _LOADED + MAX_LOADED)
        self._notes = context.RawArray("c", _NOTES_BYTES)
        self.lock = context.Lock()  # held by whoever changes the board (never on a request's path)
        self._cached = State(serving, (serving,), seq=-1)
        self.write(State(serving, (serving,)))

    def read(self) -> State:
        """The board now; one shared-memory read when nothing changed since the last call."""
        ints = self._ints
        while True:
            seq = ints[_SEQ]
            if seq == self._cached.seq:
                return self._cached
            if seq % 2 == 0:
                count = sum(1 for v in ints[_LOADED:] if v)
                state = State(ints[_SERVING], tuple(ints[_LOADED:_LOADED + count]),
                              ints[_CANARY] or None, ints[_SHARE] / _SHARE_SCALE,
                              ints[_SHADOW] or None, ints[_SHADOW_SHARE] / _SHARE_SCALE, seq)
                if ints[_SEQ] == seq:
                    self._cached = state
                    return state

    def write(self, state: State) -> State:
        """Publish ``state`` (the caller holds ``lock``, or is the main process before anything started)."""
        if len(state.loaded) > MAX_LOADED or state.serving not in state.loaded:
            raise ValueError(f"inconsistent board: {state}")
        ints = self._ints
        ints[_SEQ] += 1  # odd: being written
        ints[_SERVING], ints[_CANARY] = state.serving, state.canary or 0
        ints[_SHARE] = round(state.share * _SHARE_SCALE)
        ints[_SHADOW], ints[_SHADOW_SHARE] = state.shadow or 0, round(state.shadow_share * _SHARE_SCALE)
        ints[_LOADED:] = [*state.loaded, *[0] * (MAX_LOADED - len(state.loaded))]
        ints[_SEQ] += 1
        return self.read()

    def notes(self) -> dict[str, Any]:
        """What went wrong with which version (failed loads, versions skipped at start), by version."""
        raw = bytes(self._notes.raw).rstrip(b"\0")
        return json.loads(raw) if raw else {}

    def note(self, version: int, reason: str | None, **extra: Any) -> None:
        """Record (or, with ``reason`` None, clear) a version's problem; the oldest notes go when full."""
        notes = self.notes()
        notes.pop(str(version), None)
        if reason is not None:
            notes[str(version)] = {"reason": reason[:500], **extra}
        data = json.dumps(notes).encode()
        while len(data) >= _NOTES_BYTES and notes:
            notes.pop(next(iter(notes)))
            data = json.dumps(notes).encode()
        self._notes.raw = data.ljust(_NOTES_BYTES, b"\0")


class ShadowTally:
    """Per shadowed version, every API server's shadow pairs so far: instances compared, agreeing labels,
    the summed |confidence difference| and instances dropped (no spare capacity). Written after answers
    have left, under a lock; read by ``/admin/versions``. Kept across shadow stops, until restart."""

    _FIELDS = 5  # version, instances, agreeing, confidence difference sum, dropped

    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self._raw = context.RawArray("d", MAX_LOADED * 4 * self._FIELDS)
        self._lock = context.Lock()

    def add(self, version: int, instances: int = 0, agreeing: int = 0, difference: float = 0.0,
            dropped: int = 0) -> None:
        with self._lock:
            raw, width = self._raw, self._FIELDS
            slots = range(0, len(raw), width)
            at = next((i for i in slots if raw[i] == version), None)
            if at is None:
                free = [i for i in slots if raw[i] == 0]
                at = free[0] if free else min(slots, key=lambda i: raw[i + 1] + raw[i + 4])  # the least seen goes
                raw[at:at + width] = [version, 0, 0, 0, 0]
            for offset, value in enumerate((instances, agreeing, difference, dropped), 1):
                raw[at + offset] += value

    def read(self) -> dict[int, dict[str, Any]]:
        """``{version: {"instances", "agreement", "mean_abs_confidence_difference", "dropped"}}``."""
        with self._lock:
            raw = list(self._raw)
        tallies = {}
        for i in range(0, len(raw), self._FIELDS):
            version, instances, agreeing, difference, dropped = raw[i:i + self._FIELDS]
            if version:
                tallies[int(version)] = {
                    "instances": int(instances), "agreement": agreeing / instances if instances else None,
                    "mean_abs_confidence_difference": difference / instances if instances else None,
                    "dropped": int(dropped)}
        return tallies


class SetupFailures:
    """Why a pool's worker failed to start, written by the worker as it fails, read by the main process:
    the one line the service exits with when the restarts run out."""

    def __init__(self, pools: list[str]):
        context = mp.get_context("spawn")
        self._reasons = {pool: context.RawArray("c", 1024) for pool in pools}

    def record(self, pool: str, reason: str) -> None:
        self._reasons[pool].raw = reason.encode("utf-8", "replace")[:1023].ljust(1024, b"\0")

    def reason(self, pool: str) -> str:
        return bytes(self._reasons[pool].raw).rstrip(b"\0").decode("utf-8", "replace") or "no reason recorded"


class Runtimes:
    """The runtime each pool serves each version with, and why not the static graph where it fell back:
    written by the workers as they load a version, read by /info. Every worker of a pool reaches the same
    result for a version (same files, same check), so one record per pool and version."""

    def __init__(self) -> None:
        context = mp.get_context("spawn")
        self._raw = context.RawArray("c", _NOTES_BYTES)
        self._lock = context.Lock()

    def read(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{pool: {version: {"runtime": ..., "fallback": reason or None}}}``."""
        with self._lock:
            raw = bytes(self._raw.raw).rstrip(b"\0")
        return json.loads(raw) if raw else {}

    def record(self, pool: str, version: int, runtime: str | None, fallback: str | None = None) -> None:
        """Record what ``pool`` serves ``version`` with (``runtime`` None: it no longer holds it)."""
        with self._lock:
            raw = bytes(self._raw.raw).rstrip(b"\0")
            records = json.loads(raw) if raw else {}
            versions = records.setdefault(pool, {})
            versions.pop(str(version), None)
            if runtime is not None:
                versions[str(version)] = {"runtime": runtime, "fallback": fallback and fallback[:300]}
            data = json.dumps(records).encode()
            while len(data) >= _NOTES_BYTES and versions:
                versions.pop(next(iter(versions)))
                data = json.dumps(records).encode()
            self._raw.raw = data.ljust(_NOTES_BYTES, b"\0")
