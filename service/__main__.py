"""``python -m service``: validate the configuration and the model store, then serve.

Start-up problems (a mistyped flag, a bad setting, a port in use, a missing or corrupt model, ``cuda``
without a GPU) end the process with one clear line and exit code 2, before any worker is spawned.
Once /health answers 200, one line says so, with the page's address (``service.ready``).
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import signal
import sys
from types import FrameType

from pydantic import ValidationError

from service import cli, logs, ready
from service.config import Settings
from service.device import DeviceError, resolve_device
from service.http.listeners import check_free
from service.metrics_dir import use_fresh_dir
from service.model import store

log = logging.getLogger("digitserve")


def main(argv: list[str] | None = None) -> int:
    sys.setswitchinterval(0.0005)
    try:
        settings = cli.parse(sys.argv[1:] if argv is None else argv)
    except ValidationError as e:
        print(f"error: invalid configuration: {describe(e)}", file=sys.stderr)
        return 2
    except cli.CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for port, flag in ((settings.port, "--port (DIGITSERVE_PORT)"), (settings.grpc_port, "--grpc-port "
                                                                                         "(DIGITSERVE_GRPC_PORT)")):
        try:
            if port:
                check_free(settings.bind_address(), port)
        except OSError as e:
            print(f"error: {cannot_listen(settings, port, flag, e)}", file=sys.stderr)
            return 2
    try:
        device = resolve_device(settings.accelerator)
        if settings.model_version is None:  # verify before spawning anything
            model, skipped = store.load_best(settings.store, settings.model, settings.min_accuracy)
        else:
            model, skipped = store.load(settings.store, settings.model, settings.model_version, "cpu"), {}
    except (DeviceError, store.StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, settings.log_format)
    metrics_dir = use_fresh_dir()
    # Imported only now: prometheus-client picks multiprocess mode when first imported.
    from service.app import build

    server = build(settings, model, device.type, skipped)
    # Everything imported so far lives as long as the process: keep the collector from walking it
    # again and again (a full collection over it stalls the process long enough to show in p99 under
    # load: docs/performance.md). The forked API servers inherit this.
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
    log.info("starting %s v%d on %s: %d API servers, %d predict and %d explain workers", model.name,
             model.version, device, settings.api_servers, settings.workers, settings.explain_workers)
    try:
        server.serve(started=lambda: ready.announce_when_ready(settings))
    except OSError as e:  # taken in the moment since check_free
        print(f"error: {cannot_listen(settings, settings.port, '--port (DIGITSERVE_PORT)', e)}", file=sys.stderr)
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


def cannot_listen(settings: Settings, port: int, flag: str, error: OSError) -> str:
    """Why the service cannot listen where it was told to, and which setting (``flag``) changes that."""
    where = f"{settings.host}:{port}"
    if error.errno == errno.EADDRINUSE:
        return f"port {port} is already in use on {settings.host} (another digitserve?); choose another with {flag}"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {where}: not an address of this machine; change --host (DIGITSERVE_HOST)"
    return f"cannot listen on {where}: {error.strerror or error}; change --host or {flag.split()[0]}"


if __name__ == "__main__":
    sys.exit(main())
