"""``python -m service``: validate the configuration and the model store, then serve.

Start-up problems (a bad setting, a missing or corrupt model, ``cuda`` without a GPU) end the
process with one clear line and exit code 2, before any worker is spawned.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import signal
import sys
from types import FrameType

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.config import Settings
from service.device import DeviceError, resolve_device
from service.metrics_dir import use_fresh_dir
from service.model import store

log = logging.getLogger("digitserve")


def main(argv: list[str] | None = None) -> int:
    sys.setswitchinterval(0.0005)
    try:
        settings = Settings(_cli_parse_args=sys.argv[1:] if argv is None else argv)  # type: ignore[call-arg]
        device = resolve_device(settings.accelerator)
        if settings.version is None:  # verify before spawning anything
            model, skipped = store.load_best(settings.store, settings.model, settings.min_accuracy)
        else:
            model, skipped = store.load(settings.store, settings.model, settings.version, "cpu"), {}
    except ValidationError as e:
        print(f"error: invalid configuration: {describe(e)}", file=sys.stderr)
        return 2
    except (SettingsError, DeviceError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _json_access_log()
    _quiet_wildcard_addresses()
    metrics_dir = use_fresh_dir()
    # Imported only now: prometheus-client picks multiprocess mode when first imported.
    from service.app import build

    server = build(settings, model, device.type, skipped)
    # Everything imported so far lives as long as the process: keep the collector from walking it
    # again and again (a full collection over ~220,000 objects stalls a small machine for ~150 ms,
    # which showed in p99 under load). The forked API servers inherit this.
    gc.freeze()
    main_pid = os.getpid()

    def stop(signum: int, frame: FrameType | None) -> None:
        """SIGTERM (docker stop, Kubernetes) and Ctrl-C take LitServe's KeyboardInterrupt path, which runs
        our shutdown (``service.supervisor``); a second signal must not cut that short. Processes forked
        from this one (LitServe's manager) inherit the handler: for them the signal keeps its meaning."""
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        server.parts.supervisor.signal = signal.Signals(signum).name
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving %s v%d on %s at http://%s:%d", model.name, model.version, device,
             f"[{settings.host}]" if ":" in settings.host else settings.host, settings.port)
    try:
        server.serve()
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    if server.parts.supervisor.failure:
        print(f"error: {server.parts.supervisor.failure}", file=sys.stderr)
        return 1
    return 0


def describe(error: ValidationError) -> str:
    """Pydantic's errors as one line that names each setting as a flag: ``--port: Input should be ...``."""
    parts = []
    for err in error.errors():
        where = ".".join(str(p) for p in err["loc"])
        flag = f"--{where.replace('_', '-')} (DIGITSERVE_{where.upper()})" if where else "settings"
        parts.append(f"{flag}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _quiet_wildcard_addresses() -> None:
    """uvicorn and LitServe announce the wildcard address LitServe binds to prove the port free, not the
    address the API servers listen on (``service.http.listeners``): our own start-up line says that."""

    def misleading(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Uvicorn running on") or message.startswith("Swagger UI is available"))

    for name in ("uvicorn.error", "litserve.server"):
        logging.getLogger(name).addFilter(misleading)


def _json_access_log() -> None:
    """One JSON object per line for request logs (uvicorn's own access log is off). The lines come
    whole, those of one event-loop iteration in one record (``service.metrics.RequestBook``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("digitserve.access")
    access.addHandler(handler)
    access.propagate = False


if __name__ == "__main__":
    sys.exit(main())
