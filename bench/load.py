"""Drive a server with wrk (bench/wrk/post.lua for JSON bodies, bench/wrk/binary.lua for binary V2 bodies) or,
for gRPC, bench/grpcload.py; turn their summary into the numbers we report, and check that V2 and gRPC answers
are right before they are timed."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import procs
from bench.data import digits_of, read_bodies
from bench.grpcload import MODEL_INFER, read_messages
from harness.server import Server

WRK = Path(__file__).resolve().parent / "wrk"
LUA = WRK / "post.lua"  # JSON bodies, one a line
LUA_BINARY = WRK / "binary.lua"  # length-prefixed binary records (bench.data.write_bodies' .bin files)
MIN_ACCURACY = 0.95  # of the labels against MNIST's; the committed model gets ~99% of the first 1,000 test digits


@dataclass(frozen=True)
class Workload:
    name: str
    path: str  # /predict, /explain, V2's /v2/models/mnist-fnn/infer, or gRPC's MODEL_INFER
    bodies: str  # which bodies file (bench.data.write_bodies kind; V2 kinds are binary records)
    connections: int  # gRPC: calls in flight
    images_per_request: int = 1
    servers: tuple[str, ...] = ("digitserve", "baseline")
    switch_every_s: float = 0.0  # digitserve: serve the other of versions 1 and 2 this often while measured
    shadow_share: float = 0.0  # digitserve: this share of served requests shadowed by version 2 while measured

    @property
    def grpc(self) -> bool:
        return self.path == MODEL_INFER


@dataclass(frozen=True)
class LoadSettings:
    warmup_s: float
    duration_s: float
    wrk_threads: int
    wrk_timeout_s: float  # gRPC: each call's deadline
    grpc_processes: int = 2  # bench/grpcload.py's processes


def wrk(url: str, bodies: Path, connections: int, seconds: float, s: LoadSettings) -> dict:
    """One wrk run; the Lua script's summary line as a dict (latencies in microseconds)."""
    threads = min(s.wrk_threads, connections)
    command = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(seconds))}s",
               "--timeout", f"{s.wrk_timeout_s:g}s", "--latency", "-s", str(script(bodies)), url, "--", str(bodies)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + s.wrk_timeout_s + 60)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return json.loads(line.removeprefix("BENCH_JSON "))


def grpc_load(address: str, bodies: Path, calls: int, seconds: float, s: LoadSettings) -> dict:
    """One bench/grpcload.py run (in processes of its own); its summary, as ``wrk``'s."""
    command = [sys.executable, "-m", "bench.grpcload", address, str(bodies), "--concurrency", str(calls),
               "--seconds", f"{seconds:g}", "--processes", str(s.grpc_processes), "--timeout", f"{s.wrk_timeout_s:g}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + s.wrk_timeout_s + 180)
    line = next((row for row in done.stdout.splitlines() if row.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"bench.grpcload failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    summary: dict = json.loads(line.removeprefix("BENCH_JSON "))
    return summary


def drive(server: Server, workload: Workload, bodies: Path, seconds: float, s: LoadSettings) -> dict:
    """Load ``server`` with ``workload`` for ``seconds``: wrk, or bench/grpcload.py on its gRPC port."""
    if workload.grpc:
        if server.grpc is None:
            raise RuntimeError(f"{workload.name}: the server has no gRPC port")
        return grpc_load(server.grpc, bodies, workload.connections, seconds, s)
    return wrk(f"{server.url}{workload.path}", bodies, workload.connections, seconds, s)


def script(bodies: Path) -> Path:
    """The wrk script for a bodies file: binary records (``.bin``) or JSON lines."""
    return LUA_BINARY if bodies.suffix == ".bin" else LUA


def totals(raw: dict) -> tuple[float, int]:
    """wrk's summary -> requests per second and errors of every kind (connect, read, write, timeout, status)."""
    return raw["requests"] / (raw["duration_us"] / 1e6), sum(v for k, v in raw.items() if k.startswith("errors_"))


def settle(port: int, path: str, bodies: Path, timeout: float) -> float:
    """POST one body and wait for its answer (seconds taken). wrk leaves requests in flight when a run ends;
    the server still answers them, so without this the warm-up's leftovers would eat into the measured run."""
    body, headers = next(read_bodies(bodies))
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body, headers)
        connection.getresponse().read()
    except (OSError, http.client.HTTPException):
        pass  # the measured run will show what is wrong
    finally:
        connection.close()
    return time.monotonic() - started


def measure(server: Server, name: str, workload: Workload, bodies: Path, s: LoadSettings) -> dict:
    """Warm up, let the server settle, then a measured run with the tree's PSS sampled meanwhile and its CPU
    time (every process of the tree) read before and after. Raises ServerDied if the server exited."""
    if s.warmup_s > 0:
        drive(server, workload, bodies, s.warmup_s, s)
    # bench/grpcload.py waits for its calls in flight: nothing is left to settle
    settle_s = 0.0 if workload.grpc else settle(server.port, workload.path, bodies, s.wrk_timeout_s + 30)
    procs.check_alive(server, name)
    ticks, started = procs.tree_cpu_ticks(server.process.pid), time.monotonic()
    with procs.PssSampler(server.process.pid, interval=max(0.5, s.duration_s / 4)) as pss:
        raw = drive(server, workload, bodies, s.duration_s, s)
    cpu_s = (procs.tree_cpu_ticks(server.process.pid) - ticks) / os.sysconf("SC_CLK_TCK")
    window_s = time.monotonic() - started
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
        # the whole server tree's CPU (API servers, workers, main...) over the run, per answered request
        "cpu_ms_per_req": None if stalled else 1000 * cpu_s / raw["requests"],
        "cpu_cores": cpu_s / window_s,
        # the load generator's own CPU per answered request (bench/grpcload.py's; wrk does not say)
        "client_cpu_ms_per_req": None if stalled or "client_cpu_s" not in raw
        else 1000 * raw["client_cpu_s"] / raw["requests"],
        "settle_s": settle_s,
        "wrk": raw,
    }


def verify_v2(port: int, path: str, bodies: Path, labels: list[int], batch: int = 32, timeout: float = 30) -> dict:
    """Send every body of a V2 bodies file once and read each answer with tritonclient's own parser
    (``verified`` says what is checked)."""
    import tritonclient.http as triton

    def answers() -> Iterator[Any]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            for body, headers in read_bodies(bodies):
                connection.request("POST", path, body, headers)
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200:
                    yield f"{response.status} {answer[:200]!r}"
                    continue
                length = response.getheader("Inference-Header-Content-Length")
                yield partial(triton.InferenceServerClient.parse_response_body, answer,
                              header_length=int(length) if length else None)
        finally:
            connection.close()

    return verified(answers(), bodies.name.removesuffix(".bin"), labels, batch, (OSError, http.client.HTTPException))


def verify_grpc(address: str, bodies: Path, labels: list[int], batch: int = 32, timeout: float = 30) -> dict:
    """Send every message of a gRPC bodies file once (``ModelInfer``) and read each answer with tritonclient.grpc's
    own classes (``verified`` says what is checked)."""
    import grpc
    import tritonclient.grpc as triton
    from tritonclient.grpc import service_pb2

    def answers() -> Iterator[Any]:
        with grpc.insecure_channel(address) as channel:
            infer = channel.unary_unary(MODEL_INFER)  # the very bytes the load sends
            for message in read_messages(bodies):
                try:
                    answer = infer(message, timeout=timeout)
                except grpc.RpcError as e:
                    yield f"{e.code().name} {str(e.details())[:200]}"  # a call's RpcError is a grpc.Call too
                    continue
                yield partial(lambda raw: triton.InferResult(service_pb2.ModelInferResponse.FromString(raw)), answer)

    return verified(answers(), bodies.name.removesuffix(".grpc"), labels, batch, (grpc.RpcError,))


def verified(answers: Iterable[Any], kind: str, labels: list[int], batch: int,
             transport: tuple[type[BaseException], ...]) -> dict:
    """Each answer (a refusal's text, or how to parse it into a tritonclient result) must have ``label`` INT64 [N]
    and ``probabilities`` FP32 [N,10] (rows summing to 1, argmax = label), every body must be answered, and the
    labels must match MNIST's for at least ``MIN_ACCURACY`` of the digits. ``{"ok", "bodies", "accuracy",
    "problems"}``; a benchmark of wrong answers proves nothing, so a workload that fails this is not timed."""
    import numpy as np

    expected = digits_of(kind, len(labels), batch)
    problems: list[str] = []
    right = total = sent = 0
    try:
        for answer, digits in zip(answers, expected):
            sent += 1
            if isinstance(answer, str):
                problems.append(f"body {sent - 1}: {answer}")
                continue
            try:
                result = answer()
                label, probabilities = result.as_numpy("label"), result.as_numpy("probabilities")
            except Exception as e:  # tritonclient raises its own exceptions, or a decoding error
                problems.append(f"body {sent - 1}: tritonclient cannot read the answer: {e!r}"[:300])
                continue
            n = len(digits)
            if (label is None or probabilities is None or label.dtype != np.int64 or label.shape != (n,)
                    or probabilities.dtype != np.float32 or probabilities.shape != (n, 10)
                    or not np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)
                    or not (probabilities.argmax(axis=1) == label).all()):
                problems.append(f"body {sent - 1}: outputs {result.get_output('label')} "
                                f"{result.get_output('probabilities')}"[:300])
                continue
            right += int((label == np.array([labels[i] for i in digits])).sum())
            total += n
    except transport as e:  # sending the next body, or reading its answer
        problems.append(f"body {sent}: {e!r}")
    accuracy = right / total if total else 0.0
    if sent != len(expected):
        problems.append(f"{sent} bodies sent of {len(expected)}")
    if accuracy < MIN_ACCURACY:
        problems.append(f"labels right for {accuracy:.1%} of {total} digits (at least {MIN_ACCURACY:.0%} expected)")
    return {"ok": not problems, "bodies": sent, "digits": total, "accuracy": accuracy, "problems": problems[:10]}
