"""The one line that says the service is ready, once /health first answers 200: where the page and the
OpenAPI document are (no Swagger page: it would load a CDN's script), and how to stop it. Until then the
service answers 503 (workers still loading)."""

from __future__ import annotations

import http.client
import logging
import threading
import time

from service.config import Settings

log = logging.getLogger("digitserve")
POLL_S = 0.2


def base_url(settings: Settings) -> str:
    """The URL a browser on this machine opens: the configured host, or loopback for a wildcard."""
    address = settings.bind_address()
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, settings.host)
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def announce_when_ready(settings: Settings) -> threading.Thread:
    """Poll /health in a daemon thread (started after the API servers are forked); log the ready line
    once. The thread ends after it."""
    url = base_url(settings)

    def wait() -> None:
        host = url.removeprefix("http://").rsplit(":", 1)[0].strip("[]")
        while not _healthy(host, settings.port):
            time.sleep(POLL_S)
        log.info("ready: the page is %s/ and the API's OpenAPI document %s/openapi.json; Ctrl+C stops", url, url)

    thread = threading.Thread(target=wait, name="digitserve-ready", daemon=True)
    thread.start()
    return thread


def _healthy(host: str, port: int) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()
