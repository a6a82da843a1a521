"""A closed-loop gRPC load generator: what wrk is to ``make bench``'s HTTP rows, for its gRPC rows.

``--concurrency`` calls are in flight at all times (each answered call is followed at once by the next), spread
over ``--processes`` processes (one grpc.aio event loop each: one Python process is busy long before a server
is) and ``--connections`` HTTP/2 connections (default: one a call, as wrk's rows have one request in flight per
connection; the kernel spreads connections over digitserve's API servers). Each call sends the next of the
bodies file's messages, already serialized (bench/data.py writes them), and takes the answer's bytes as they
come: no protobuf work in the loop. Calls answered within the measured window count; every process starts it
together and lets its calls in flight finish, so nothing is left for the server after a run.

At the end, one line ``BENCH_JSON {...}`` with the keys of bench/wrk/*.lua's summary (latencies in us; a call
that ends with a status other than OK counts in ``errors_status``, as wrk counts an HTTP status >= 400) and
``client_cpu_s``, the generator's own CPU time in the window.

    python -m bench.grpcload 127.0.0.1:8001 grpc-fp32-single.grpc --concurrency 64 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import grpc
import numpy as np

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # each channel its own connection, not one shared by all
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def record(message: bytes) -> bytes:
    """One serialized message as a bodies file holds it: an ASCII line ``<bytes>\\n``, then the message."""
    return b"%d\n" % len(message) + message


def read_messages(path: Path) -> Iterator[bytes]:
    """The serialized messages of a bodies file of ``record``s."""
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        end = data.index(b"\n", offset)
        size = int(data[offset:end])
        yield data[end + 1:end + 1 + size]
        offset = end + 1 + size


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process: grpc's own included
    return usage.ru_utime + usage.ru_stime


async def _load(target: str, messages: list[bytes], calls: int, connections: int, seconds: float,
                timeout: float, first: int, barrier: Barrier) -> dict[str, Any]:
    channels = [grpc.aio.insecure_channel(target, options=_OPTIONS) for _ in range(connections)]
    try:
        # no (de)serializers: bytes go out and come back as they are
        infer = [channel.unary_unary(MODEL_INFER) for channel in channels]
        await asyncio.gather(*(asyncio.wait_for(channel.channel_ready(), timeout) for channel in channels))
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        latencies: list[float] = []
        codes: Counter[str] = Counter()
        received = 0
        started, cpu = time.perf_counter(), _cpu_s()
        stop = started + seconds

        async def caller(index: int) -> None:
            nonlocal received
            call, body = infer[index % connections], (first + index * 7919) % len(messages)
            while (sent := time.perf_counter()) < stop:
                try:
                    answer = await call(messages[body], timeout=timeout)
                    code = "OK"
                    received += len(answer)
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                if (answered := time.perf_counter()) <= stop:
                    latencies.append(answered - sent)
                    codes[code] += 1
                body = (body + 1) % len(messages)

        await asyncio.gather(*(caller(index) for index in range(calls)))
        return {"latencies": latencies, "codes": codes, "bytes": received, "cpu_s": _cpu_s() - cpu,
                "window_s": time.perf_counter() - started}
    finally:
        await asyncio.gather(*(channel.close() for channel in channels))


def _process(target: str, bodies: str, calls: int, connections: int, seconds: float, timeout: float, first: int,
             barrier: Barrier, results: Any) -> None:
    try:
        messages = list(read_messages(Path(bodies)))
        results.put(asyncio.run(_load(target, messages, calls, connections, seconds, timeout, first, barrier)))
    except Exception as e:  # said by the parent, which would otherwise wait for this process's part
        barrier.abort()
        results.put({"error": f"{type(e).__name__}: {e}"})


def _shares(total: int, parts: int) -> list[int]:
    """``total`` split as evenly as it goes into ``parts``."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(target: str, bodies: Path, concurrency: int, seconds: float, processes: int, connections: int,
        timeout: float) -> dict[str, Any]:
    """The run's summary, as wrk's Lua scripts print it (plus ``client_cpu_s`` and the codes seen)."""
    processes = max(1, min(processes, concurrency))
    connections = max(processes, min(connections, concurrency))
    context = mp.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=_process, args=(target, str(bodies), calls, links, seconds, timeout,
                                                      index * 104_729, barrier, results), daemon=True)
               for index, (calls, links) in enumerate(zip(_shares(concurrency, processes),
                                                          _shares(connections, processes)))]
    for worker in workers:
        worker.start()
    parts = [results.get(timeout=seconds + timeout + 120) for _ in workers]
    for worker in workers:
        worker.join()
    if failed := [part["error"] for part in parts if "error" in part]:
        raise RuntimeError(f"gRPC load on {target} failed: {'; '.join(failed)}")
    latencies_us = np.array([v for part in parts for v in part["latencies"]]) * 1e6
    codes: Counter[str] = sum((part["codes"] for part in parts), Counter())
    answered = len(latencies_us)

    def percentile(q: float) -> int:
        return int(np.percentile(latencies_us, q)) if answered else 0

    return {"duration_us": int(max(part["window_s"] for part in parts) * 1e6), "requests": answered,
            "bytes": sum(part["bytes"] for part in parts), "errors_connect": 0, "errors_read": 0, "errors_write": 0,
            "errors_timeout": codes["DEADLINE_EXCEEDED"], "errors_status": answered - codes["OK"]
            - codes["DEADLINE_EXCEEDED"], "latency_mean_us": float(latencies_us.mean()) if answered else 0.0,
            "latency_p50_us": percentile(50), "latency_p90_us": percentile(90), "latency_p99_us": percentile(99),
            "latency_max_us": int(latencies_us.max()) if answered else 0,
            "client_cpu_s": sum(part["cpu_s"] for part in parts), "codes": dict(codes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port of the gRPC server")
    parser.add_argument("bodies", type=Path, help="serialized ModelInferRequest records (bench/data.py)")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--connections", type=int, default=0, help="HTTP/2 connections in all (0: one a call)")
    parser.add_argument("--timeout", type=float, default=10, help="each call's deadline, s")
    args = parser.parse_args()
    summary = run(args.target, args.bodies, args.concurrency, args.seconds, args.processes,
                  args.connections or args.concurrency, args.timeout)
    print("BENCH_JSON " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
