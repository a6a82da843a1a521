"""Overload bounded in time, slow clients that cannot starve the service, and a start-up that cannot
loop: the real server under real bursts, dribbling connections and broken checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.server import ROOT, Server, b64, encode, free_port, metric_samples, running

EXPLAIN_WAIT_S = 2.0
READ_TIMEOUT_S = 6  # the 192 burst clients share the machine: they may take seconds to send a body


@pytest.fixture(scope="module")
def pictures(mnist_test) -> list[bytes]:
    return [encode(image) for image in mnist_test[0][:64].numpy()]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    args = ("--explain-max-queue-wait-ms", str(EXPLAIN_WAIT_S * 1000), "--read-timeout-s", str(READ_TIMEOUT_S))
    with running(tmp_path_factory.mktemp("overload"), *args) as s:
        yield s


def latencies(server: Server, endpoint: str, statuses: set[int], since: int = 0) -> list[float]:
    """Seconds from arrival to answer of every ``endpoint`` request answered with one of ``statuses``, as
    the server saw them (its access log, from its ``since``-th character)."""
    found = []
    for line in server.output()[since:].splitlines():
        if line.startswith('{"ts"') and f'"endpoint":"{endpoint}"' in line:
            entry = json.loads(line)["log"]
            if entry["status"] in statuses:
                found.append(entry["latency_ms"] / 1000)
    return found


def p99(values: list[float]) -> float:
    return float(np.percentile(values, 99)) if values else 0.0


class Steady:
    """One client thread sending single-image /predict requests back to back; latencies by time."""

    def __init__(self, server: Server, pictures: list[bytes]):
        self.server, self.pictures, self.stop = server, pictures, threading.Event()
        self.samples: list[tuple[float, float, int]] = []  # (sent at, seconds, status)
        self.thread = threading.Thread(target=self._run)

    def __enter__(self) -> Steady:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            i = 0
            while not self.stop.is_set():
                body = {"instances": [{"image_b64": b64(self.pictures[i % len(self.pictures)])}]}
                sent = time.monotonic()
                status = client.post("/predict", json=body).status_code
                self.samples.append((sent, time.monotonic() - sent, status))
                i += 1

    def between(self, start: float, end: float) -> list[float]:
        return [seconds for sent, seconds, status in self.samples if start <= sent < end and status == 200]


def raw_post(path: str, body: bytes) -> bytes:
    """A whole JSON POST as bytes on the wire, to be sent in one write."""
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path.encode(), len(body))) + body


async def burst(port: int, body: dict, clients: int, each: int) -> list[tuple[int, float, str | None]]:
    """``clients`` concurrent clients, each sending ``each`` /explain requests one after another on a
    keep-alive connection (a new one where the server ends it). Each request leaves in one write, as
    wrk and hey send them: httpx writes a body apart from its headers and, with 192 coroutines ready
    before it, sent some bodies 0.6 s late, which the server's log counts as its own time."""
    request = raw_post("/explain", json.dumps(body).encode())

    async def one_client() -> list[tuple[int, float, str | None]]:
        results: list[tuple[int, float, str | None]] = []
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for _ in range(each):
            if connection is None:
                connection = await asyncio.open_connection("127.0.0.1", port)
            reader, writer = connection
            sent = time.monotonic()
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:] if line)}
            await reader.readexactly(int(fields["content-length"]))
            results.append((int(head[0].split(" ")[1]), time.monotonic() - sent, fields.get("retry-after")))
            if fields.get("connection", "").lower() == "close":
                writer.close()
                connection = None
        if connection is not None:
            connection[1].close()
        return results

    return [r for rs in await asyncio.gather(*(one_client() for _ in range(clients))) for r in rs]


def test_a_burst_of_heavy_explanations_is_refused_fast_instead_of_queued_for_seconds(server, pictures):
    """192 clients x 4 integrated-gradients explanations (256 steps, 8 images), during a steady /predict
    load: served explanations within the queue-wait limit plus a service time, the rest a quick 503 with
    Retry-After, /predict barely disturbed, nothing but 200 and 503, healthy after."""
    body = {"instances": [{"image_b64": b64(p)} for p in pictures[:8]], "method": "integrated_gradients",
            "steps": 256, "quadrature": "midpoint"}
    with server.client() as client:
        started = time.monotonic()
        assert client.post("/explain", json=body).status_code == 200  # also teaches the worker its rate
        service_s = time.monotonic() - started
    with Steady(server, pictures) as steady:
        time.sleep(4)
        calm_end = time.monotonic()
        results = asyncio.run(burst(server.port, body, clients=192, each=4))
        burst_end = time.monotonic()
        time.sleep(1)
    statuses = Counter(status for status, _, _ in results)
    served, refused = latencies(server, "explain", {200})[1:], latencies(server, "explain", {503})
    calm, during = steady.between(0, calm_end), steady.between(calm_end, burst_end)
    print(f"\nburst: {statuses[200]} served, p99 {p99(served):.2f} s (one alone: {service_s:.2f} s); {statuses[503]} "
          f"refused, median {statistics.median(refused or [0]) * 1000:.1f} ms, p99 {p99(refused) * 1000:.0f} ms; "
          f"/predict p99 {p99(calm) * 1000:.0f} ms calm, {p99(during) * 1000:.0f} ms during")
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[200] >= 1 and statuses[503] >= 1, statuses
    assert all(after is not None and int(after) >= 1 for status, _, after in results if status == 503)
    # The times as the server saw them (its access log: arrival to answer). The 192 clients share this
    # machine's 2 cores with the server, so what they measure is mostly their own queueing.
    assert len(refused) == statuses[503] and len(served) == statuses[200]
    # Bounded by the limit (the wait before a request's computation starts) plus its own service time,
    # and some slack for the estimate: the explain worker's share of the 2 cores shrinks as the burst's
    # clients and the API servers take theirs (without admission by time this p99 was 14 s; measured
    # 1.2-1.8 s, and 2.3-2.8 s with a CPU hog on one core).
    assert p99(served) <= EXPLAIN_WAIT_S + 1.5 + service_s, (p99(served), min(served), service_s)
    # at once: most before their body is even read (measured p99 4-6 ms, with or without the hog)
    assert statistics.median(refused) < 0.01 and p99(refused) < 0.05, (statistics.median(refused), p99(refused))
    assert calm and during and all(status in (200, 503) for _, _, status in steady.samples)
    assert p99(during) <= max(1.5 * p99(calm), p99(calm) + 0.05), (p99(calm), p99(during))
    with server.client() as client:
        assert client.get("/health").status_code == 200
        refusals = metric_samples(client.get("/metrics").text, "digitserve_refusals_total")
    assert refusals[(("endpoint", "explain"), ("reason", "queue_wait"))] == statuses[503]


def test_a_lone_heavy_explanation_after_light_ones_is_served(server, pictures):
    """The cost model tells a light explanation (its report) from a heavy one (its steps): after many
    light ones, an idle pool still takes a heavy one."""
    heavy = {"instances": [{"image_b64": b64(p)} for p in pictures[:8]], "method": "integrated_gradients",
             "steps": 256, "quadrature": "midpoint"}
    with server.client() as client:
        for picture in pictures[:15]:
            light = client.post("/explain", json={"instances": [{"image_b64": b64(picture)}], "method": "saliency"})
            assert light.status_code == 200
        answer = client.post("/explain", json=heavy)
        assert answer.status_code == 200, answer.text


def explain_wait_estimate(metrics: str) -> float:
    return metric_samples(metrics, "digitserve_queue_wait_estimate_seconds").get((("pool", "explain"),), 0.0)


def test_a_client_deadline_it_cannot_meet_is_refused_at_once(server, pictures):
    """A heavy explanation admitted (under the pool's 2 s limit: /metrics' wait estimate says so), then a
    light one whose client gives it 10 ms: refused at once, for its deadline. Explanations first teach
    the worker what they cost (``service.costs``). How heavy "heavy" must be depends on how busy the
    machine is: a size the pool refuses, or computes before the estimate is seen, is tried again
    halved or doubled."""
    light = {"instances": [{"image_b64": b64(pictures[0])}], "method": "saliency"}

    def heavy(images: int) -> dict:
        return {"instances": [{"image_b64": b64(p)} for p in pictures[:images]], "method": "integrated_gradients",
                "steps": 256, "quadrature": "midpoint"}

    with server.client() as client:
        for body in (light, heavy(8)):
            assert client.post("/explain", json=body).status_code == 200

    async def crowd(images: int) -> tuple[int, httpx.Response, float] | int:
        """The heavy explanation's status and the hurried light one, or how the heavy one was answered
        before it was seen admitted (503: too heavy for the limit; 200: too light to be seen queued)."""
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            queued = asyncio.create_task(client.post("/explain", json=heavy(images)))
            while explain_wait_estimate((await client.get("/metrics")).text) < 0.05:
                if queued.done():
                    return (await queued).status_code
            sent = time.monotonic()
            hurried = await client.post("/explain", json=light, headers={"X-Request-Timeout-Ms": "10"})
            waited = time.monotonic() - sent
            return (await queued).status_code, hurried, waited

    images, tried = 8, []
    while not isinstance(outcome := asyncio.run(crowd(images)), tuple):
        tried.append((images, outcome))
        assert outcome in (200, 503) and len(tried) < 5, tried
        images = images // 2 if outcome == 503 else images * 2
        assert 1 <= images <= 64, tried
    status, hurried, waited = outcome
    assert status in (200, 503)
    assert hurried.status_code == 503 and "deadline" in hurried.json()["detail"] and waited < 0.5, hurried.text[:300]
    with server.client() as client:
        assert client.post("/predict", json={"instances": [{"image_b64": b64(pictures[0])}]},
                           headers={"X-Request-Timeout-Ms": "soon"}).status_code == 400


def test_single_images_at_512_connections_stay_bounded_in_time(server, tmp_path, pictures):
    """Served p99 (as the server measures it: arrival to answer) about the 200 ms queue-wait limit plus a
    service time, refusals at once, nothing but 200 and 503. (wrk shares the 2 cores: its own p99 adds
    the time requests wait in the kernel before an API server reads them.)"""
    bodies = tmp_path / "single.jsonl"
    bodies.write_text("".join(f'{{"instances": [{{"image_b64": "{b64(p)}"}}]}}\n' for p in pictures))
    lua = ROOT / "bench" / "wrk" / "post.lua"
    since = len(server.output())
    result = subprocess.run(["wrk", "-t", "2", "-c", "512", "-d", "6s", "--timeout", "10s", "-s", str(lua),
                             f"{server.url}/predict", "--", str(bodies)], capture_output=True, text=True, timeout=60)
    stats = dict(re.findall(r'"(\w+)": (\d+(?:\.\d+)?)', result.stdout.split("BENCH_JSON", 1)[1]))
    assert int(stats["requests"]) > 500 and int(stats["errors_timeout"]) == 0, result.stdout
    time.sleep(0.5)  # the last access-log lines
    served, refused = latencies(server, "predict", {200}, since), latencies(server, "predict", {503}, since)
    assert len(served) + len(refused) == len(latencies(server, "predict", set(range(600)), since))
    assert p99(served) <= 0.2 * 2 + 0.2, p99(served)
    assert not refused or p99(refused) < 0.05, p99(refused)
    with server.client() as client:
        text = client.get("/metrics").text
        statuses = {dict(k)["status"] for k in metric_samples(text, "digitserve_requests_total")
                    if dict(k)["endpoint"] == "predict"}
        assert statuses <= {"200", "503", "400", "422"} and "200" in statuses, statuses
        assert client.get("/health").status_code == 200


def test_slow_clients_cannot_starve_the_service(server, pictures):
    """520 connections that send a request's headers and one byte of its body, then nothing: everyone
    else's /predict is still answered, and every slow connection is closed within the read timeout."""
    slow = []
    for _ in range(520):
        connection = socket.create_connection(("127.0.0.1", server.port))
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 100000\r\n\r\n{")
        slow.append(connection)
    opened = time.monotonic()
    with server.client() as client:
        for i in range(20):
            answer = client.post("/predict", json={"instances": [{"image_b64": b64(pictures[i])}]})
            assert answer.status_code == 200, answer.text
    timed_out = 0
    for connection in slow:
        connection.settimeout(15)
        head = connection.recv(200)
        assert head == b"" or head.startswith(b"HTTP/1.1 408"), head
        timed_out += head.startswith(b"HTTP/1.1 408")
        connection.close()
    assert time.monotonic() - opened < READ_TIMEOUT_S + 5, "slow connections were not closed within the read timeout"
    time.sleep(0.5)  # the last requests booked
    with server.client() as client:  # each counted as what it was told, 408, not as a client that left (499)
        statuses = {dict(k)["status"]: v for k, v in metric_samples(client.get("/metrics").text,
                                                                    "digitserve_requests_total").items()
                    if dict(k)["endpoint"] == "predict"}
    assert timed_out and statuses.get("408") == timed_out and "499" not in statuses, (timed_out, statuses)


CAPPED_KEEP_ALIVE_S, CAPPED_READ_TIMEOUT_S = 6.5, 2


@pytest.fixture(scope="module")
def capped(tmp_path_factory) -> Iterator[Server]:
    """One API server holding at most 40 connections, 10 from one address, with short keep-alive and
    read timeouts."""
    with running(tmp_path_factory.mktemp("capped"), "--api-servers", "1", "--max-connections", "40",
                 "--max-connections-per-client", "10", "--keep-alive-s", str(CAPPED_KEEP_ALIVE_S),
                 "--read-timeout-s", str(CAPPED_READ_TIMEOUT_S)) as s:
        s.wait_for("ready:")  # the service's own /health poller is done: it would count as a connection
        yield s


def request(picture: bytes) -> bytes:
    """A raw /predict request for one picture."""
    return raw_post("/predict", json.dumps({"instances": [{"image_b64": b64(picture)}]}).encode())


def connect(server: Server, address: str = "127.0.0.1") -> socket.socket:
    """A connection from ``address``: every 127.x.y.z is this machine's, so each is a client of its own."""
    return socket.create_connection(("127.0.0.1", server.port), source_address=(address, 0))


def refusals_of(server: Server, reason: str) -> float:
    with server.client() as client:
        assert client.get("/health").status_code == 200
        refusals = metric_samples(client.get("/metrics").text, "digitserve_refusals_total")
    return refusals[(("endpoint", "connection"), ("reason", reason))]


def test_connections_past_the_cap_are_refused_at_once(capped):
    held = [connect(capped, f"127.0.0.{10 + i // 10}") for i in range(60)]  # 10 from each of 6 addresses
    refused = 0
    for connection in held[40:]:
        connection.settimeout(5)
        refused += connection.recv(200).startswith(b"HTTP/1.1 503")
    assert refused == 20
    for connection in held:
        connection.close()
    time.sleep(0.5)
    assert refusals_of(capped, "too_many_connections") == 20


def test_connections_past_the_cap_for_one_address_are_refused_and_others_served(capped, pictures):
    crowd = [connect(capped, "127.0.0.3") for _ in range(12)]
    for connection in crowd[:10]:
        connection.sendall(request(pictures[0]))
        connection.settimeout(5)
        assert connection.recv(4096).startswith(b"HTTP/1.1 200")
    for connection in crowd[10:]:
        connection.settimeout(5)
        head = connection.recv(4096)
        assert head.startswith(b"HTTP/1.1 503") and b"too many connections from 127.0.0.3" in head, head
        assert b"retry-after: 1" in head
    with connect(capped, "127.0.0.4") as other:
        other.sendall(request(pictures[1]))
        other.settimeout(5)
        assert other.recv(4096).startswith(b"HTTP/1.1 200")
    for connection in crowd:
        connection.close()
    time.sleep(0.5)
    assert refusals_of(capped, "too_many_from_client") == 2
    with connect(capped, "127.0.0.3") as again:  # closed ones no longer count
        again.sendall(request(pictures[2]))
        again.settimeout(5)
        assert again.recv(4096).startswith(b"HTTP/1.1 200")


def test_an_idle_connection_outlasts_the_clients_keep_alive_then_closes(capped, pictures):
    """Idle for longer than clients keep one (httpx: 5 s), a connection is still open: a server that
    closed first would race a client reusing it, which then gets no answer (seen as httpx.ReadError
    with uvicorn's 5 s). Idle past ``--keep-alive-s``, it is closed."""
    with connect(capped) as connection:
        connection.settimeout(5)
        for idle in (0, 5.2):
            time.sleep(idle)
            connection.sendall(request(pictures[0]))
            assert connection.recv(4096).startswith(b"HTTP/1.1 200"), f"closed after {idle} s idle"
        time.sleep(CAPPED_KEEP_ALIVE_S + 1)
        assert connection.recv(4096) == b"", "an idle connection was not closed after --keep-alive-s"


def test_a_body_that_keeps_coming_after_an_early_answer_is_cut_off(capped):
    """A request refused on its headers (413: Content-Length over the limit) whose client keeps
    sending the body: the connection is closed within the read timeout, not held for as long as the
    client dribbles."""
    with connect(capped) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 50000000\r\n\r\n")
        connection.settimeout(5)
        assert connection.recv(4096).startswith(b"HTTP/1.1 413")
        sent = time.monotonic()
        connection.settimeout(0.2)
        closed = False
        while not closed and time.monotonic() - sent < CAPPED_READ_TIMEOUT_S + 5:
            try:
                connection.sendall(b"x" * 100)
                closed = connection.recv(100) == b""
            except TimeoutError:
                continue
            except OSError:  # reset: the server closed it while bytes were still arriving
                closed = True
        assert closed, f"still open {time.monotonic() - sent:.1f} s after its answer"


def test_operators_see_processes_workers_restarts_and_refusal_reasons(server):
    with server.client() as client:
        bad = client.post("/predict", json={"instances": []})
        assert bad.status_code == 422
        text = client.get("/metrics").text
    ready = metric_samples(text, "digitserve_workers_ready")
    assert ready == {(("pool", "predict"),): 1.0, (("pool", "explain"),): 1.0}
    memory = metric_samples(text, "digitserve_process_resident_memory_bytes")
    roles = Counter(dict(labels)["process"] for labels in memory)
    assert roles["main"] == 1 and roles["worker"] == 2 and roles["forked"] >= 3, roles  # 2 API servers, a manager
    assert all(v > 0 for v in metric_samples(text, "digitserve_process_open_fds").values())
    assert set(metric_samples(text, "digitserve_queue_wait_estimate_seconds")) == {
        (("pool", "predict"),), (("pool", "explain"),)}
    line = next(line for line in reversed(server.output().splitlines()) if '"status":422' in line)
    assert '"detail":"instances' in line and "image_b64" not in line.split('"detail"')[0]


def process_group_alive(pgid: int) -> list[int]:
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    alive.append(int(entry.name))
            except OSError:
                continue
    return alive


def test_a_checkpoint_broken_after_verification_stops_start_up_cleanly(tmp_path, default_model):
    """Verified by the main process, then truncated before the workers load it: a bounded number of
    worker restarts, then exit code 1 with one line naming the cause, and no process left behind."""
    store = tmp_path / "store"
    shutil.copytree(default_model.path, store / "mnist-fnn" / "1")
    weights = store / "mnist-fnn" / "1" / "model.pt"
    log = tmp_path / "server.log"
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), "--store", str(store),
                                "--drain-delay-s", "0"], cwd=ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "starting mnist-fnn v1" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline and process.poll() is None, log.read_text()
            time.sleep(0.05)
        weights.write_bytes(weights.read_bytes()[:1000])
        started = time.monotonic()
        returncode = process.wait(timeout=240)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    output = log.read_text(errors="replace")
    assert returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "failed to start 3 times" in errors[0] and "checksum mismatch" in errors[0], errors
    assert took < 240
    deadline = time.monotonic() + 10
    while (left := process_group_alive(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in left]
