"""bench/grpcload.py, the benchmark's gRPC load generator, against a real server: it counts what the server
answered, no more, and counts refusals as errors by their code.

Must not import ``service.grpc`` (tests/e2e/grpc_calls.py says why): bench.data builds the messages with
tritonclient.grpc's classes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tritonclient.grpc import service_pb2

from bench.data import grpc_message
from bench.grpcload import record
from harness.server import ROOT, encode, metric_samples
from tests.e2e.grpc_calls import grpc_server

CALLS = 4


def load(address: str, messages: list[bytes], folder: Path) -> dict:
    bodies = folder / "bodies.grpc"
    bodies.write_bytes(b"".join(record(message) for message in messages))
    done = subprocess.run([sys.executable, "-m", "bench.grpcload", address, str(bodies), "--concurrency",
                           str(CALLS), "--seconds", "1", "--processes", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    summary: dict = json.loads(done.stdout.split("BENCH_JSON ", 1)[1])
    return summary


def answered(url: str, status: str) -> float:
    time.sleep(0.3)  # the API server books its answers at the end of an event-loop iteration
    samples = metric_samples(httpx.get(f"{url}/metrics", timeout=10).text, "digitserve_requests_total")
    return sum(value for labels, value in samples.items()
               if dict(labels)["endpoint"] == "grpc_infer" and dict(labels)["status"] == status)


@pytest.mark.slow
def test_the_generator_counts_what_the_server_answered(tmp_path, mnist_test):
    pngs = [encode(image.numpy()) for image in mnist_test[0][:20]]
    with grpc_server(tmp_path) as (server, address):
        summary = load(address, [grpc_message(pngs[i:i + 1]) for i in range(len(pngs))], tmp_path)
        assert summary["requests"] > 0 and summary["codes"] == {"OK": summary["requests"]}, summary
        assert summary["errors_status"] == summary["errors_timeout"] == 0
        assert summary["latency_p50_us"] <= summary["latency_p99_us"] <= summary["latency_max_us"]
        assert summary["client_cpu_s"] > 0
        # every call counted was answered; calls answered after the window (at most one per caller) are not counted
        served = answered(server.url, "200")
        assert summary["requests"] <= served <= summary["requests"] + CALLS, (summary["requests"], served)

        elsewhere = service_pb2.ModelInferRequest.FromString(grpc_message(pngs[:1]))
        elsewhere.model_name = "nope"
        unknown = load(address, [elsewhere.SerializeToString()], tmp_path)
        assert unknown["requests"] > 0 and unknown["codes"] == {"NOT_FOUND": unknown["requests"]}, unknown
        assert unknown["errors_status"] == unknown["requests"]
        assert unknown["requests"] <= answered(server.url, "404") <= unknown["requests"] + CALLS
