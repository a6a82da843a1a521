"""A real Triton Inference Server serving our checkpoint, for tests that compare digitserve's V2 answers with it.

    from tests.e2e.reference_triton import triton_reference

    with triton_reference() as triton:  # "127.0.0.1:PORT" each, the form tritonclient takes
        client = tritonclient.http.InferenceServerClient(triton.http)
        # or tritonclient.grpc.InferenceServerClient(triton.grpc): the same server on gRPC

The server is tests/e2e/triton_reference/serve.py running under .venv-triton (made by .ci/triton-venv.sh;
PyTriton pins numpy<2, so it cannot share the project's venv). Weights go from the model store to a .npz in
a temporary folder first (export.py, in this venv, since torch lives here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import tritonclient.http

from tests.e2e.triton_reference.export import export

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
SERVE = Path(__file__).resolve().parent / "triton_reference" / "serve.py"
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0


class Endpoints(NamedTuple):
    """Where the reference listens, as ``host:port``."""

    http: str
    grpc: str


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel had free (all held open together, so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def reference_env() -> dict[str, str]:
    """The environment with LD_LIBRARY_PATH led by .venv-triton's interpreter's LIBDIR.

    Without it Triton's Python stub loads the system's libpython and dies with
    "'_thread.RLock' object has no attribute '_recursion_count'".
    """
    libdir = subprocess.run(
        [str(TRITON_PYTHON), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    env = dict(os.environ)
    current = env.get("LD_LIBRARY_PATH")
    env["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir
    return env


def _wait_ready(process: subprocess.Popen[bytes], endpoints: Endpoints, log: Path, model: str) -> None:
    """Until the model is ready on HTTP and the gRPC port takes connections (tritonclient.grpc is not imported
    here: a module that imports this one may hold digitserve's own ``inference`` protobuf package)."""
    client = tritonclient.http.InferenceServerClient(endpoints.http)
    host, port = endpoints.grpc.rsplit(":", 1)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"Triton reference exited with {process.returncode}:\n{_tail(log)}")
            with contextlib.suppress(Exception):  # connection refused until it listens
                if client.is_server_ready() and client.is_model_ready(model):
                    socket.create_connection((host, int(port)), timeout=2).close()
                    return
            time.sleep(0.5)
    finally:
        client.close()
    raise TimeoutError(f"Triton reference not ready after {START_TIMEOUT_S:.0f} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole group (serve.py then stops tritonserver cleanly), SIGKILL what is left after a while."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):  # tritonserver and the stubs share serve.py's group
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # PyTriton names its shared-memory regions after serve.py's pid; a stopped Triton leaves some behind.
    for region in Path("/dev/shm").glob(f"pytrtion{process.pid}-*"):
        with contextlib.suppress(OSError):
            region.unlink()


@contextlib.contextmanager
def triton_reference(store: Path = ROOT / "model_store", model: str = "mnist-fnn") -> Iterator[Endpoints]:
    """Serve ``store``'s highest version of ``model`` through Triton; yields where its HTTP and gRPC APIs listen."""
    if not TRITON_PYTHON.exists():
        raise RuntimeError(
            f"{TRITON_PYTHON} is missing: run `bash .ci/triton-venv.sh` to make the Triton reference venv"
        )
    with tempfile.TemporaryDirectory(prefix="triton-reference-") as tmp:
        folder = Path(tmp)
        weights = export(folder / "weights.npz", store, model)
        http, grpc, metrics = free_ports(3)
        log = folder / "serve.log"
        command = [str(TRITON_PYTHON), str(SERVE), "--weights", str(weights), "--workspace", str(folder / "ws")]
        command += ["--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env=reference_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            endpoints = Endpoints(f"127.0.0.1:{http}", f"127.0.0.1:{grpc}")
            _wait_ready(process, endpoints, log, model)
            yield endpoints
        finally:
            _stop(process)
