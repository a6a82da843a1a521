"""One log format for every line, ours, uvicorn's, LitServe's and the access log: ``--log-format``.

``text`` (the default) reads well in a terminal; ``json`` is one object per line for log collectors
(the compose and Kubernetes manifests choose it). uvicorn is started without its own logging set-up
(``service.seam``), so its records reach the root handler here like everyone else's.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import orjson

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's per-API-server life cycle: the ready line says the one thing that matters (service.ready)
_LIFE_CYCLE = ("Started server process", "Waiting for application", "Application startup complete",
               "Shutting down", "Application shutdown complete", "Finished server process")
# uvicorn and LitServe announce the wildcard address LitServe binds to prove the port free, not the
# address the API servers listen on (service.http.listeners): the ready line gives that
_MISLEADING = ("Uvicorn running on", "Swagger UI is available")


_style = "json"  # until configure(): what the harness and the tests read


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message"}``, the time as the access log writes it."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def configure(level: str, style: str) -> None:
    """The root handler (stderr) in ``style``, the access log's lines in the same style; idempotent."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if style == "json" else logging.Formatter(TEXT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    global _style
    _style = style
    raw = logging.StreamHandler()  # the access lines come formatted (service.metrics.RequestBook)
    raw.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("digitserve.access")
    access.handlers[:] = [raw]
    access.propagate = False
    for name in ("uvicorn.error", "litserve.server"):
        logger = logging.getLogger(name)
        logger.filters[:] = [_quiet]


def access_line(at: float, level: str, fields: dict[str, Any]) -> str:
    """One access-log line in the configured style: ``{"ts": "...", "log": {...}}`` or ``ts LEVEL
    digitserve.access: key=value ...``; the time as logging's default format writes it."""
    stamp = f"{_second(int(at))},{int(at % 1 * 1000):03d}"
    if _style == "json":
        return f'{{"ts": "{stamp}", "log": {orjson.dumps(fields).decode()}}}'
    pairs = " ".join(f"{k}={orjson.dumps(v).decode() if isinstance(v, str) and (' ' in v or not v) else v}"
                     for k, v in fields.items())
    return f"{stamp} {level} digitserve.access: {pairs}"


@functools.lru_cache(maxsize=4)
def _second(at: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def adopt_litserve() -> None:
    """LitServe gives its logger a handler of its own when it starts: its records go through ours instead."""
    logger = logging.getLogger("litserve")
    logger.handlers.clear()
    logger.propagate = True


def _quiet(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if message.startswith(_MISLEADING):
        return False
    return not message.startswith(_LIFE_CYCLE) or logging.getLogger().isEnabledFor(logging.DEBUG)
