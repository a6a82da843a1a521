"""``--watch-store-s``: poll the model store and serve a new highest version with no call at all.

Runs in one API server (the first). A new highest version that passes ``--min-accuracy`` is loaded
(making room by unloading the oldest version that is neither served nor the canary) and served; one
that fails to verify or load is noted on the board and tried again only once its files change, so a
half-copied or corrupt version is refused once, not every poll, and serving goes on as before.
"""

from __future__ import annotations

import asyncio
import logging

from service.config import Settings
from service.errors import HttpError
from service.http.versioning import VersionControl, files_signature, metadata_of
from service.model import store

log = logging.getLogger("digitserve")


class StoreWatcher:
    def __init__(self, settings: Settings, versions: VersionControl):
        self.settings, self.versions = settings, versions
        self._served_up_to = 0  # the newest version this watcher served: an admin who unloads it is not overruled

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.watch_store_s)
            try:
                await self.check()
            except Exception:  # a bug of ours must not stop the watching
                log.exception("the store watcher failed; it will look again")

    async def check(self) -> None:
        """Serve the store's highest version if it is new, passes the gate, and was not refused as it is now."""
        settings, board = self.settings, self.versions.board
        try:
            versions = await asyncio.to_thread(store.list_versions, settings.store, settings.model)
        except store.StoreError:
            return
        newest = versions[-1] if versions else 0
        if newest <= max(self._served_up_to, *board.read().loaded):
            return
        signature = files_signature(settings.store, settings.model, newest)
        note = board.notes().get(str(newest))
        if note is not None and note.get("files") == signature:
            return  # refused before, and its files have not changed since
        accuracy = metadata_of(settings.store, settings.model, newest).get("metrics", {}).get("test_accuracy")
        if accuracy is not None and accuracy < settings.min_accuracy:
            board.note(newest, f"test accuracy {accuracy:.4f} is below --min-accuracy {settings.min_accuracy}",
                       files=signature)
            log.warning("store watcher: v%d not served: test accuracy %.4f < --min-accuracy", newest, accuracy)
            return
        try:
            await self.versions.load(newest, make_room=True)
            await self.versions.serve(newest)
        except HttpError as e:
            log.warning("store watcher: v%d not served: %s", newest, e.detail)
            return
        self._served_up_to = newest
        log.info("store watcher: now serving v%d", newest)
