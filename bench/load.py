"""Drive a server with wrk (bench/wrk/post.lua) and turn wrk's summary into the numbers we report."""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from harness.server import Server

LUA = Path(__file__).resolve().parent / "wrk" / "post.lua"


@dataclass(frozen=True)
class Workload:
    name: str
    path: str  # /predict or /explain
    bodies: str  # which bodies file (bench.data.write_bodies kind)
    connections: int
    images_per_request: int = 1
    servers: tuple[str, ...] = ("digitserve", "baseline")


@dataclass(frozen=True)
class LoadSettings:
    warmup_s: float
    duration_s: float
    wrk_threads: int
    wrk_timeout_s: float


def wrk(url: str, bodies: Path, connections: int, seconds: float, s: LoadSettings) -> dict:
    """One wrk run; the Lua script's summary line as a dict (latencies in microseconds)."""
    threads = min(s.wrk_threads, connections)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", f"{s.wrk_timeout_s:g}s", "--latency", "-s", str(LUA), url, "--", str(bodies)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + s.wrk_timeout_s + 60)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def totals(raw: dict) -> tuple[float, int]:
    """wrk's summary -> requests per second and errors of every kind (connect, read, write, timeout, status)."""
    return raw["requests"] / (raw["duration_us"] / 1e6), sum(v for k, v in raw.items() if k.startswith("errors_"))


def settle(port: int, path: str, bodies: Path, timeout: float) -> float:
    """POST one body and wait for its answer (seconds taken). wrk leaves requests in flight when a run ends;
    the server still answers them, so without this the warm-up's leftovers would eat into the measured run."""
    with bodies.open() as f:
        body = f.readline().strip()
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body, {"Content-Type": "application/json"})
        connection.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass  # the measured run will show what is wrong
    finally:
        connection.close()
    return time.monotonic() - started


def measure(server: Server, name: str, workload: Workload, bodies: Path, s: LoadSettings) -> dict:
    """Warm up, let the server settle, then a measured run with the tree's PSS sampled meanwhile.
    Raises ServerDied if the server exited."""
    url = f"{server.url}{workload.path}"
    if s.warmup_s > 0:
        wrk(url, bodies, workload.connections, s.warmup_s, s)
    settle_s = settle(server.port, workload.path, bodies, s.wrk_timeout_s + 30)
    procs.check_alive(server, name)
    with procs.PssSampler(server.process.pid, interval=max(0.5, s.duration_s / 4)) as pss:
        raw = wrk(url, bodies, workload.connections, s.duration_s, s)
    procs.check_alive(server, name)
    req_s, errors = totals(raw)
    stalled = raw["requests"] == 0  # no answer at all in the window (wrk counts a timeout only after --timeout)
    return {
        "req_s": req_s,
        "images_s": req_s * workload.images_per_request,
        "p50_ms": None if stalled else raw["latency_p50_us"] / 1000,
        "p99_ms": None if stalled else raw["latency_p99_us"] / 1000,
        "errors": errors,
        "stalled": stalled,
        "healthy_after": procs.healthy(server.port) if stalled else True,
        "pss_mb": pss.peak / 1e6,
        "settle_s": settle_s,
        "wrk": raw,
    }
