"""Model versions, live: which version computes a request, and loading, serving and unloading them
across every worker of both pools while the served version keeps answering.

A version is verified here first (sha256, shapes, ``weights_only``), then every worker is asked to
prepare it (load and warm up) over its own request pipe; it is *ready*, and on the board, only once
every worker holds it. A failure on the way changes nothing served: the workers that prepared it
drop it again, and the reason is noted on the board and counted. Switching (serve, canary,
promote, rollback, shadow) is one write of the board, which every API server reads per request, so every
request admitted after the call returns is routed by the new state. One change at a time: a
second while one runs gets 409.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from service import metrics
from service.config import Settings
from service.errors import HttpError
from service.http.dispatch import Dispatcher
from service.model import store
from service.versions import Board, ShadowTally, State
from service.work import Control

log = logging.getLogger("digitserve")


class VersionControl:
    def __init__(self, settings: Settings, board: Board, dispatcher: Dispatcher, tally: ShadowTally):
        self.settings, self.board, self.dispatcher, self.tally = settings, board, dispatcher, tally

    # ---- per request

    def route(self, pinned: int | None) -> int:
        """The version that computes a request; a pinned one must be ready (404 unknown, 409 not loaded)."""
        state = self.board.read()
        if pinned is None or pinned in state.loaded:
            return state.routed(pinned)
        raise self._not_ready(pinned, state)

    def _not_ready(self, version: int, state: State) -> HttpError:
        if version in self._store_versions():
            return HttpError(409, f"version {version} is in the store but not loaded (loaded: {list(state.loaded)}); "
                                  "load it with the admin API, or do not pin")
        return HttpError(404, f"version {version} of {self.settings.model!r} is not in the store "
                              f"(loaded: {list(state.loaded)})")

    # ---- changes

    async def load(self, version: int, make_room: bool = False) -> State:
        """Verify ``version``, have every worker prepare it, then put it on the board."""
        async with self._change() as state:
            if version in state.loaded:
                return state
            await self._verify(version)
            if len(state.loaded) >= self.settings.max_loaded_versions:
                if not make_room:
                    raise HttpError(409, f"{len(state.loaded)} versions are loaded, the most --max-loaded-versions "
                                         f"allows: unload one first (loaded: {list(state.loaded)})")
                state = await self._unload(state, self._evictable(state))
            failures = await self._tell_every_worker(Control("prepare", version))
            if failures:
                await self._tell_every_worker(Control("drop", version))
                raise self._failed(version, "; ".join(failures))
            state = self.board.write(replace(state, loaded=(*state.loaded, version)))
            self.board.note(version, None)
            metrics.labelled(metrics.VERSION_LOADS, str(version), "loaded").inc()
            log.info("v%d is loaded in every worker (loaded: %s)", version, list(state.loaded))
            return state

    async def serve(self, version: int, canary: int | None = None, share: float = 0.0) -> State:
        """Serve ``version`` (and ``canary`` for ``share`` of the requests): one write of the board."""
        async with self._change() as state:
            for needed in (version, canary):
                if needed is not None and needed not in state.loaded:
                    raise self._not_ready(needed, state)
            if canary is not None and not 0 < share < 1:
                raise HttpError(422, f"canary share must lie between 0 and 1 (exclusive), got {share}")
            if canary == version:
                canary = None
            shadow = None if state.shadow == version else state.shadow  # the served version shadows nothing
            state = self.board.write(replace(state, serving=version, canary=canary, share=share if canary else 0.0,
                                             shadow=shadow, shadow_share=state.shadow_share if shadow else 0.0))
            metrics.SERVING.set(version)
            metrics.CANARY_SHARE.set(state.share)
            log.info("serving v%d%s", version, f", canary v{canary} at {share:.0%}" if canary else "")
            return state

    async def unload(self, version: int) -> State:
        async with self._change() as state:
            if version not in state.loaded:
                raise self._not_ready(version, state)
            if version in (state.serving, state.canary):
                role = "the canary" if version == state.canary else "served"
                raise HttpError(409, f"version {version} is {role}: serve another one first")
            if version == state.shadow:
                raise HttpError(409, f"version {version} is the shadow: stop the shadow first")
            return await self._unload(state, version)

    async def shadow(self, version: int | None, share: float) -> State:
        """``version`` also computes ``share`` of the served version's requests (``service.http.shadow``);
        None stops it."""
        async with self._change() as state:
            if version is not None:
                if version not in state.loaded:
                    raise self._not_ready(version, state)
                if version == state.serving:
                    raise HttpError(409, f"version {version} is served: shadow another version")
            state = self.board.write(replace(state, shadow=version, shadow_share=share if version else 0.0))
            metrics.SHADOW_SHARE.set(state.shadow_share)
            log.info("shadow: %s", f"v{version} at {share:.0%}" if version else "off")
            return state

    async def _unload(self, state: State, version: int) -> State:
        state = self.board.write(replace(state, loaded=tuple(v for v in state.loaded if v != version)))
        await self._tell_every_worker(Control("drop", version))  # frees its memory now, not at the next batch
        log.info("v%d unloaded (loaded: %s)", version, list(state.loaded))
        return state

    @staticmethod
    def _evictable(state: State) -> int:
        """The oldest loaded version that is neither served nor the canary (there is one: max >= 2 or
        only the served one, which the caller replaces)."""
        spare = [v for v in state.loaded if v not in (state.serving, state.canary, state.shadow)]
        if not spare:
            raise HttpError(409, "every loaded version is being served: raise --max-loaded-versions")
        return min(spare)

    @asynccontextmanager
    async def _change(self) -> AsyncIterator[State]:
        if not self.board.lock.acquire(block=False):
            raise HttpError(409, "another version change is in progress; retry when it is done")
        try:
            yield self.board.read()
        finally:
            self.board.lock.release()

    async def _verify(self, version: int) -> None:
        try:
            await asyncio.to_thread(store.load, self.settings.store, self.settings.model, version, "cpu")
        except store.StoreError as e:
            if version not in self._store_versions():
                raise HttpError(404, str(e)) from None
            raise self._failed(version, str(e)) from None

    def _failed(self, version: int, reason: str) -> HttpError:
        self.board.note(version, reason, files=files_signature(self.settings.store, self.settings.model, version))
        metrics.labelled(metrics.VERSION_LOADS, str(version), "failed").inc()
        log.warning("v%d was not loaded: %s", version, reason)
        return HttpError(409, f"version {version} was not loaded; nothing served changed: {reason}")

    async def _tell_every_worker(self, command: Control) -> list[str]:
        """Send ``command`` to every worker of every pool and wait for each; the failures, by worker."""
        sent = [(pool, worker, self.dispatcher.submit_to(pool, worker, command))
                for pool, size in self.settings.pools().items() for worker in range(size)]
        failures = []
        for pool, worker, (uid, pending) in sent:
            try:
                await asyncio.wait_for(pending.event.wait(), self.settings.request_timeout_s)
            except TimeoutError:
                self.dispatcher.forget(uid)
                failures.append(f"{pool} worker {worker}: no answer within {self.settings.request_timeout_s:g} s")
                continue
            if not pending.ok:
                detail = getattr(pending.response, "detail", None) or "it died while loading"
                failures.append(f"{pool} worker {worker}: {detail}")
        return failures

    # ---- what is there

    def listing(self) -> dict[str, Any]:
        """The admin API's list: every version in the store, which are loaded, served, canary, shadow (and
        how its answers agree with the served ones), and problems."""
        state, notes, tallies = self.board.read(), self.board.notes(), self.tally.read()
        versions = []
        for version in self._store_versions():
            metadata = metadata_of(self.settings.store, self.settings.model, version)
            versions.append({
                "version": version,
                "test_accuracy": metadata.get("metrics", {}).get("test_accuracy"),
                "created_at": metadata.get("created_at"),
                "loaded": version in state.loaded,
                "serving": version == state.serving,
                "canary_share": state.share if version == state.canary else None,
                "shadow_share": state.shadow_share if version == state.shadow else None,
                "shadowed": tallies.get(version),
                "last_failure": notes.get(str(version)),
            })
        return {**described(state), "model": self.settings.model, "versions": versions}

    def _store_versions(self) -> list[int]:
        try:
            return store.list_versions(self.settings.store, self.settings.model)
        except store.StoreError:
            return []


def described(state: State) -> dict[str, Any]:
    """What is served (the version, those loaded, the canary and the shadow with their shares): the one
    description that the admin API's answers and /info's ``versions`` share."""
    return {"serving": state.serving, "loaded": list(state.loaded),
            "canary": None if state.canary is None else {"version": state.canary, "share": state.share},
            "shadow": None if state.shadow is None else {"version": state.shadow, "share": state.shadow_share}}


@lru_cache(maxsize=64)
def _metadata(version_dir: Path, mtime_ns: int) -> dict[str, Any]:
    try:
        return store.read_metadata(version_dir).model_dump()
    except store.StoreError:
        return {}


def metadata_of(store_dir: Path, name: str, version: int) -> dict[str, Any]:
    """A version's metadata as recorded (read once per change of its file); {} when unreadable."""
    version_dir = Path(store_dir) / name / str(version)
    try:
        mtime = (version_dir / store.METADATA_FILE).stat().st_mtime_ns
    except OSError:
        return {}
    return _metadata(version_dir, mtime)


def files_signature(store_dir: Path, name: str, version: int) -> list[list[int]]:
    """Size and mtime of a version's files: a failed version is retried by the watcher once these change."""
    version_dir = Path(store_dir) / name / str(version)
    signature = []
    for file in (store.WEIGHTS_FILE, store.METADATA_FILE, store.CALIBRATION_FILE):
        try:
            stat = (version_dir / file).stat()
            signature.append([stat.st_size, stat.st_mtime_ns])
        except OSError:
            signature.append([-1, -1])
    return signature
