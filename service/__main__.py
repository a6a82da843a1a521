"""``python -m service``: validate the configuration and the model store, then serve.

Start-up problems (a bad setting, a missing or corrupt model, ``cuda`` without a GPU) end
the process with one clear line and exit code 2, before any worker is spawned.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
import signal
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service import store
from service.config import Settings
from service.device import DeviceError, resolve_device
from service.metrics_dir import use_fresh_dir


def main() -> int:
    sys.setswitchinterval(0.0005)
    try:
        settings = Settings(_cli_parse_args=True)
        device = resolve_device(settings.accelerator)
        model = store.load(settings.store, settings.model, settings.version, "cpu")  # verify before spawning
    except ValidationError as e:
        print(f"error: invalid configuration: {e}", file=sys.stderr)
        return 2
    except (SettingsError, DeviceError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _json_access_log()
    metrics_dir = use_fresh_dir()
    # Imported only now: prometheus-client picks multiprocess mode when first imported.
    from service.server import build_server

    server = build_server(settings, model, device.type)
    # Everything imported so far lives as long as the process: keep the collector from walking it
    # again and again. A full collection over these ~220,000 objects takes ~150 ms on a small
    # machine, a stall that showed in p99 under load. The forked API servers inherit this.
    gc.freeze()
    signal.signal(signal.SIGTERM, functools.partial(_stop, os.getpid()))
    logging.getLogger("digitserve").info("serving %s v%d on %s at http://%s:%d", model.name, model.version,
                                         device, settings.host, settings.port)
    try:
        server.run(host=settings.host, port=settings.port, num_api_servers=settings.api_servers,
                   log_level=settings.log_level, generate_client_file=False, access_log=False)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if server.failure:
        print(f"error: {server.failure}", file=sys.stderr)
        return 1
    return 0


def _json_access_log() -> None:
    """One JSON object per line for request logs (uvicorn's own access log is off). The lines come
    whole, those of one event-loop iteration in one record (``service.metrics.RequestBook``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("digitserve.access")
    access.addHandler(handler)
    access.propagate = False


def _stop(main_pid: int, signum: int, frame: object) -> None:
    """SIGTERM (docker stop, Kubernetes) takes LitServe's Ctrl-C path, which runs our draining shutdown;
    a second SIGTERM must not cut that drain short. Processes forked from this one (LitServe's
    manager) inherit the handler: for them SIGTERM keeps its default meaning."""
    if os.getpid() != main_pid:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
