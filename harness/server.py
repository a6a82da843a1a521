"""Start the real service (``python -m service``) on a free port and talk HTTP to it."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path, grpc_port: int | None = None):
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.grpc = f"127.0.0.1:{grpc_port}" if grpc_port else None  # host:port, as gRPC clients take it
        self.log = log

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60, **kwargs})

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def access_log(self) -> list[dict]:
        """The access log's entries so far (the JSON log format: ``{"ts": ..., "log": {...}}`` lines)."""
        return [json.loads(line)["log"] for line in self.output().splitlines() if line.startswith('{"ts"')
                and '"log": {' in line]

    def wait_ready(self, timeout: float = 120) -> None:
        """Poll /health with one client: a fresh httpx call per poll builds an SSL context (~90 ms of CPU)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.output()[-4000:]}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.output()[-4000:]}")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        """Wait until ``text`` is in the log; the log so far. (The ready line, ``ready:``, comes once the
        service's own poll of /health, one connection every 0.2 s, has seen 200: a test that counts
        connections starts after it.)"""
        deadline = time.monotonic() + timeout
        while text not in (output := self.output()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged after {timeout} s:\n{output[-4000:]}")
            time.sleep(0.05)
        return output

    def stop(self, timeout: float = 40) -> int:
        """SIGTERM and wait for the drain; then make sure no process of its group outlives the test."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.returncode


def spawn(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    """Start the service without waiting for it; its stdout/stderr go to a log file in ``log_dir``.

    Without a ``--drain-delay-s`` of the caller's, the lame-duck phase is off (0 s): a test that stops
    its server does not wait 5 s for load balancers that are not there. The log is JSON (the access
    lines are what tests read) unless the caller's ``--log-format`` or ``env`` says otherwise."""
    port = free_port()
    log = log_dir / f"server-{port}.log"
    drain = () if "--drain-delay-s" in args else ("--drain-delay-s", "0")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), *drain, *args],
        cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "DIGITSERVE_LOG_FORMAT": "json", **(env or {})},
    )
    return Server(process, port, log)


@contextmanager
def running(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    server = spawn(log_dir, *args, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def encode(image: np.ndarray | Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims any size, with almost no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def metric_samples(text: str, name: str) -> dict[tuple, float]:
    """``{(label=value, ...): value}`` for one metric name in a Prometheus text exposition."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                samples[tuple(sorted(sample.labels.items()))] = sample.value
    return samples
