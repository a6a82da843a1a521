"""``make soak``: a few minutes of mixed traffic against the real service; does it stay correct and flat?

    python -m bench.soak [--minutes 3] [--port PORT] [--threads 4] [--read-timeout-s S] [--no-phases]

Starts ``python -m service`` with its default configuration (no ``DIGITSERVE_*`` setting but the
data dir; ``--read-timeout-s`` if given), then a small thread pool sends, in a fixed rotation: good
/predict (one and several images, JSON and multipart), bad requests (every case of
``tests.test_errors.BAD_INPUTS``, in turn) and /explain with each method. Every response is counted
by endpoint and status; the RSS of every process in the server's tree is sampled every ~10 s.

While that traffic goes on, two phases try what a careful user would (runs of a minute or more;
``--no-phases`` leaves them out):

- **overload** (from 10 s): first three lone heavy explains (integrated gradients, midpoint rule, 256
  steps, 8 PNG images), which must be served: the explain pool holds only the rotation's work. Then 64
  clients, from a process of their own, each send 4 of them back to back, on fresh connections. Each
  must get 200 with the right answer or 503 with ``Retry-After`` (some of each); as the server saw
  them (its access log, as tests/e2e/test_overload.py judges them) refusals within 50 ms (p99) and
  served explains within ``--explain-max-queue-wait-ms`` plus twice the fastest one plus 0.5 s (p99);
  every refusal counted in ``digitserve_refusals_total``; /predict unharmed (every request 200 and
  right, p99 within 1.5x, or 50 ms more, of its p99 in windows as long outside the phases); /health 200
  again within 5 s. The rotation's own explains may be refused (503 with ``Retry-After``) while the
  burst lasts: that is what admission is for.
- **slow clients** (after the overload): 200 connections dribble a /predict request's headers (a byte
  a second) and 200 send a body's first bytes (``Content-Length: 100000``) then nothing. The server
  must answer each 408 and close it within the read timeout (plus 2 s of slack), count each in
  ``digitserve_refusals_total{endpoint="connection",reason="read_timeout"}``, and keep answering
  /predict 200 for everyone else, new connections included (one every 0.25 s).

At the end:

- ``digitserve_requests_total{endpoint,status}`` (its increase over the run, summed over versions)
  equals, for /predict and /explain, what was sent;
- every good request got a 200 with the right answer (so no 5xx), every bad one a 4xx;
- no process of the tree died or appeared, /health is still 200, SIGTERM ends the service cleanly;
- RSS is flat: each process grew < 10% from the end of the first minute (warm-up) to the end
  (for runs of 2 minutes or less, from the middle of the run; and never before the phases have
  ended: their high-water marks are not a leak). Growth from start is reported too;
- the phases' checks above.

Prints a summary, writes it as JSON to bench/results/soak-<date>.json and exits 1 if a check
failed. Not part of CI (it takes minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import httpx
import numpy as np

from bench import procs
from harness.server import ROOT, Server, free_port, metric_samples
from service.config import Settings
from service.work import METHODS
from tests.e2e.test_errors import BAD_INPUTS, GOOD_PNG, seven

RESULTS = ROOT / "bench" / "results"
RSS_EVERY_S = 10.0
WARMUP_S = 60.0
FLAT_LIMIT = 0.10
SOAKED_ENDPOINTS = ("predict", "explain")
DEFAULTS = {name: f.default for name, f in Settings.model_fields.items()}  # the service's own defaults

# the phases (seconds from the start of the traffic; the slow clients follow the overload)
PHASES_MIN_S = 50.0  # shorter runs leave them out
OVERLOAD_AT_S = 10.0
OVERLOAD_CLIENTS, OVERLOAD_EACH, OVERLOAD_IMAGES, OVERLOAD_STEPS = 64, 4, 8, 256
REFUSAL_P99_S = 0.050  # a refusal is only useful if it is fast
HEALTHY_AFTER_S = 5.0
SLOW_HEADERS, SLOW_BODIES = 200, 200
SLOW_SLACK_S = 2.0  # the server's timer starts at its accept; its event loop may be busy for a moment
FRESH_EVERY_S = 0.25
PREDICT_RATIO_GOAL = 1.5


# ---------------------------------------------------------------- the traffic


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _traffic() -> list[dict]:
    """One round of the rotation: each item a request, what it is, and what it must get."""
    seven_pixels = seven().tolist()
    good_json = lambda instances, **options: {"json": {"instances": instances, **options}}  # noqa: E731
    png = {"image_b64": _b64(GOOD_PNG)}
    good = [
        ("predict", "good json one png", good_json([png]), 1),
        ("predict", "good json one pixels", good_json([{"pixels": seven_pixels}]), 1),
        ("predict", "good json 8 mixed", good_json([png, {"pixels": seven_pixels}] * 4), 8),
        ("predict", "good multipart one", {"files": [("file", ("7.png", GOOD_PNG, "image/png"))]}, 1),
        ("predict", "good multipart 4",
         {"files": [("file", (f"{i}.png", GOOD_PNG, "image/png")) for i in range(4)]}, 4),
    ]
    explain = [("explain", f"explain {method}", good_json([{"pixels": seven_pixels}], method=method), 1)
               for method in METHODS]
    explain.append(("explain", "explain multipart heatmap",
                    {"files": [("file", ("7.png", GOOD_PNG, "image/png"))],
                     "data": {"method": "saliency", "heatmap": "true"}}, 1))
    bad = [("predict", f"bad: {name}", {"content": body, "headers": {"content-type": content_type}}, status)
           for name, ((body, content_type), status, _) in BAD_INPUTS.items()]
    items = []
    for endpoint, name, request, expect in good + explain:
        items.append({"endpoint": endpoint, "name": name, "request": request, "good": True, "images": expect})
    for endpoint, name, request, status in bad:
        items.append({"endpoint": endpoint, "name": name, "request": request, "good": False, "expected_status": status})
    # interleave: good, bad, explain spread over the rotation instead of in blocks
    goods = [i for i in items if i["good"] and i["endpoint"] == "predict"]
    explains = [i for i in items if i["endpoint"] == "explain"]
    bads = [i for i in items if not i["good"]]
    rotation = []
    for n, bad_item in enumerate(bads):
        rotation += [goods[n % len(goods)], bad_item, goods[(n + 2) % len(goods)]]
        if n % 2 == 0:
            rotation.append(explains[(n // 2) % len(explains)])
    return rotation


class Tally:
    """Every response, counted; every broken promise, kept (the first few of each kind in full)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = Counter()  # (endpoint, status) -> n; status "transport" for no HTTP answer
        self.by_name = defaultdict(Counter)  # request name -> status -> n
        self.problems = Counter()  # kind -> n
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.latencies = defaultdict(list)
        self.timeline: list[tuple[float, float, str, int | str]] = []  # good /predict: (sent, answered, name, status)
        self.refused_in_overload = Counter()  # rotation's explains refused (503 + Retry-After) while overloaded

    def record(self, item: dict, status: int | str, seconds: float, problem: str | None = None, detail: str = "",
               sent_at: float | None = None):
        with self.lock:
            self.sent[(item["endpoint"], str(status))] += 1
            self.by_name[item["name"]][str(status)] += 1
            self.latencies[item["endpoint"] + (" good" if item["good"] else " bad")].append(seconds)
            if sent_at is not None and item["good"] and item["endpoint"] == "predict":
                self.timeline.append((sent_at, sent_at + seconds, item["name"], status))
            if problem:
                self.problems[problem] += 1
                if len(self.examples[problem]) < 3:
                    self.examples[problem].append(f"{item['name']}: {status} {detail[:300]}")


def _send(client: httpx.Client, item: dict, tally: Tally, phases: Phases | None = None) -> None:
    started = time.monotonic()
    try:
        response = client.post(f"/{item['endpoint']}", **item["request"])
    except httpx.HTTPError as e:
        tally.record(item, "transport", time.monotonic() - started, "no HTTP answer", f"{type(e).__name__}: {e}",
                     sent_at=started)
        return
    seconds, status = time.monotonic() - started, response.status_code
    problem, detail = None, response.text[:300]
    if item["good"]:
        if (status == 503 and item["endpoint"] == "explain" and phases is not None and phases.overloaded(started)
                and _retry_after(response.headers.get("retry-after")) is not None):
            with tally.lock:  # admission doing its job: the explain pool is full of the burst's work
                tally.refused_in_overload[item["name"]] += 1
        elif status >= 500:
            problem = "good request got 5xx"
        elif status != 200:
            problem = "good request got non-200"
        else:
            predictions = response.json().get("predictions", [])
            if len(predictions) != item["images"] or any(p.get("label") != 7 for p in predictions):
                problem, detail = "good request got a wrong answer", json.dumps(predictions)[:300]
    else:
        if not 400 <= status < 500:
            problem = "bad request got non-4xx"
        else:
            try:
                body = response.json()
                if not (isinstance(body.get("detail"), str) and body["detail"]):
                    problem = "bad request: no JSON detail"
            except ValueError:
                problem = "bad request: no JSON detail"
            if problem is None and status != item["expected_status"]:
                problem = f"bad request: {status}, tests expect {item['expected_status']} (informational)"
    tally.record(item, status, seconds, problem, detail, sent_at=started)


def _retry_after(value: str | None) -> int | None:
    """A Retry-After of whole seconds (what the service sends), or None."""
    return int(value) if value is not None and value.strip().isdigit() and int(value) >= 1 else None


# ---------------------------------------------------------------- the phases: overload, slow clients


def _request(path: str, body: bytes, port: int, request_id: str | None = None) -> bytes:
    """A POST on a connection of its own; ``request_id`` finds it in the server's access log."""
    tag = f"X-Request-ID: {request_id}\r\n" if request_id else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n{tag}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one HTTP/1.1 response read to EOF; ValueError if it is not one."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks, rest = bytearray(), body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if not size:
                break
            chunks += rest[:size]
            rest = rest[size + 2:]
        body = bytes(chunks)
    return int(parts[1]), headers, body


async def _exchange(port: int, request: bytes, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection, read to EOF: a raw client costs little CPU, so what it
    measures is the server rather than the client."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(request)
        return _parse_response(await asyncio.wait_for(reader.read(-1), timeout))
    finally:
        writer.close()


def _overload_body() -> bytes:
    """The burst's request: OVERLOAD_IMAGES pictures (PNG, as clients send them), explained by integrated
    gradients with the midpoint rule and OVERLOAD_STEPS steps (the costliest explain there is)."""
    body = {"instances": [{"image_b64": _b64(GOOD_PNG)}] * OVERLOAD_IMAGES, "method": "integrated_gradients",
            "quadrature": "midpoint", "steps": OVERLOAD_STEPS}
    return json.dumps(body).encode()


def _explained(body: bytes) -> bool:
    """A 200 of the burst: every image explained by integrated gradients, and classified a 7."""
    try:
        predictions = json.loads(body)["predictions"]
    except (ValueError, KeyError, TypeError):
        return False
    return len(predictions) == OVERLOAD_IMAGES and all(
        p.get("label") == 7 and p.get("method") == "integrated_gradients" for p in predictions)


def _classified(body: bytes) -> bool:
    try:
        return [p.get("label") for p in json.loads(body)["predictions"]] == [7]
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def _overload_burst(port: int, clients: int, each: int) -> list[dict]:
    """Run in a process of its own (its CPU and GIL are not the rotation's): ``clients`` clients each
    sending ``each`` heavy explains back to back, as a burst does (no waiting for Retry-After)."""
    body = _overload_body()

    async def client(n: int, results: list[dict]) -> None:
        for i in range(each):
            request_id = f"soak-burst-{n}-{i}"
            started = time.monotonic()
            try:
                status, headers, answer = await _exchange(port, _request("/explain", body, port, request_id), 120)
            except (TimeoutError, OSError, ValueError) as e:
                results.append({"id": request_id, "status": "transport", "seconds": time.monotonic() - started,
                                "detail": f"{type(e).__name__}: {e}"})
                continue
            results.append({"id": request_id, "status": status, "seconds": time.monotonic() - started,
                            "retry_after": headers.get("retry-after"),
                            "right": _explained(answer) if status == 200 else None,
                            "detail": "" if status == 200 else answer[:200].decode(errors="replace")})

    async def burst() -> list[dict]:
        results: list[dict] = []
        await asyncio.gather(*(client(n, results) for n in range(clients)))
        return results

    return asyncio.run(burst())


async def _slow_clients(port: int, read_timeout_s: float) -> dict:
    """SLOW_HEADERS connections dribbling a /predict request's headers (a byte a second, never the
    blank line that ends them) and SLOW_BODIES sending the headers and a body's first bytes, then
    nothing; meanwhile a /predict on a fresh connection every FRESH_EVERY_S. Each slow connection:
    the status it was answered (or why none) and how long after it connected the server closed it."""
    head = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    give_up_s = read_timeout_s + 15

    async def slow(kind: str) -> dict:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
        except (TimeoutError, OSError) as e:
            return {"kind": kind, "status": "no connection", "closed_after_s": None, "detail": repr(e)}
        connected = time.monotonic()

        async def send() -> None:
            try:
                if kind == "headers":
                    for i in range(len(head) - 2):
                        writer.write(head[i:i + 1])
                        await writer.drain()
                        await asyncio.sleep(1.0)
                else:
                    writer.write(head + b'{"instances": [')
                    await writer.drain()
            except OSError:  # the server closed it: what the reader is waiting for
                pass

        sending = asyncio.create_task(send())
        raw, closed, detail = b"", None, ""
        try:
            while chunk := await asyncio.wait_for(reader.read(65536),
                                                  max(0.1, connected + give_up_s - time.monotonic())):
                raw += chunk
            closed = time.monotonic() - connected
        except TimeoutError:
            detail = f"still open after {give_up_s:g} s"
        except OSError as e:
            closed, detail = time.monotonic() - connected, repr(e)
        sending.cancel()
        writer.close()
        try:
            status: int | str = _parse_response(raw)[0] if raw else ("reset" if closed is not None else "open")
        except ValueError:
            status = "malformed"
        return {"kind": kind, "status": status, "closed_after_s": closed, "detail": detail}

    fresh_request = _request("/predict", json.dumps({"instances": [{"pixels": seven().tolist()}]}).encode(), port)
    fresh: list[dict] = []
    stop = asyncio.Event()

    async def fresh_clients() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                status, _, body = await _exchange(port, fresh_request, timeout=30)
                fresh.append({"status": status, "seconds": time.monotonic() - started,
                              "right": status == 200 and _classified(body)})
            except (TimeoutError, OSError, ValueError) as e:
                fresh.append({"status": "transport", "seconds": time.monotonic() - started, "right": False,
                              "detail": repr(e)})
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), FRESH_EVERY_S)

    prober = asyncio.create_task(fresh_clients())
    slow_ones = await asyncio.gather(*(slow("headers") for _ in range(SLOW_HEADERS)),
                                     *(slow("body") for _ in range(SLOW_BODIES)))
    stop.set()
    await prober
    return {"slow": slow_ones, "fresh": fresh}


@dataclass
class Phases:
    """When each phase ran (monotonic), what it saw, and when the service was left alone again."""

    explain_max_wait_s: float
    read_timeout_s: float
    overload: tuple[float, float | None] | None = None
    slow: tuple[float, float | None] | None = None
    calm_from: float | None = None
    lone_explain_s: list[float] = field(default_factory=list)
    lone_statuses: list[str] = field(default_factory=list)
    lone_details: list[str] = field(default_factory=list)
    burst: list[dict] = field(default_factory=list)
    healthy_after_s: float | None = None
    slow_results: dict = field(default_factory=dict)
    sent: Counter = field(default_factory=Counter)  # (endpoint, status) the phases sent, for metrics_agree
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def overloaded(self, t: float) -> bool:
        """May the explain pool refuse a request sent at ``t``: the burst is on, or its queue is still draining."""
        if self.overload is None:
            return False
        start, end = self.overload
        return t >= start and (end is None or t <= end + self.explain_max_wait_s + 1)


def run_phases(server: Server, phases: Phases, soak_start: float, burst_pool: ProcessPoolExecutor) -> None:
    """The overload, then the slow clients, while the rotation goes on; ``phases.done`` when over."""
    try:
        time.sleep(max(0.0, soak_start + OVERLOAD_AT_S - time.monotonic()))
        heavy = _overload_body()
        for i in range(3):  # a lone heavy explain: the explain pool holds only the rotation's work
            started = time.monotonic()
            status, _, body = asyncio.run(_exchange(server.port, _request("/explain", heavy, server.port,
                                                                          f"soak-lone-{i}"), 120))
            phases.sent[("explain", str(status))] += 1
            right = status == 200 and _explained(body)
            phases.lone_statuses.append(str(status) if status != 200 or right else "200 wrong")
            if right:
                phases.lone_explain_s.append(time.monotonic() - started)
            else:
                phases.lone_details.append(f"{status} {body[:200].decode(errors='replace')}")
        phases.overload = (time.monotonic(), None)
        phases.burst = burst_pool.submit(_overload_burst, server.port, OVERLOAD_CLIENTS, OVERLOAD_EACH).result()
        ended = time.monotonic()
        phases.overload = (phases.overload[0], ended)
        phases.sent.update(("explain", str(r["status"])) for r in phases.burst if r["status"] != "transport")
        with httpx.Client(base_url=server.url, timeout=5) as client:
            while time.monotonic() - ended < HEALTHY_AFTER_S:
                try:
                    if client.get("/health").status_code == 200:
                        phases.healthy_after_s = time.monotonic() - ended
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        time.sleep(max(0.0, ended + phases.explain_max_wait_s + 1 - time.monotonic()))  # the queue drained

        phases.slow = (time.monotonic(), None)
        phases.slow_results = asyncio.run(_slow_clients(server.port, phases.read_timeout_s))
        phases.slow = (phases.slow[0], time.monotonic())
        phases.sent.update(("predict", str(r["status"])) for r in phases.slow_results["fresh"]
                           if r["status"] != "transport")
        phases.sent.update(("predict", str(r["status"])) for r in phases.slow_results["slow"]
                           if r["kind"] == "body" and isinstance(r["status"], int))  # a request, counted as one
    except Exception as e:  # the checks say what went wrong; the rotation must not hang
        phases.error = f"{type(e).__name__}: {e}"
    finally:
        phases.calm_from = time.monotonic()
        phases.done.set()


def _quantiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "max_ms": round(float(ms.max()), 1)}


def _within(timeline: list[tuple[float, float, str, int | str]], window: tuple[float, float | None] | None
            ) -> list[tuple[float, float, str, int | str]]:
    """The rotation's good /predict requests in flight at some moment of ``window``."""
    if window is None or window[1] is None:
        return []
    return [r for r in timeline if r[1] >= window[0] and r[0] <= window[1]]


def access_log(path: Path, prefix: str) -> dict[str, tuple[int, float]]:
    """Request id -> (status, seconds from arrival to answer) for each request whose id starts with
    ``prefix``, as the server's access log has it."""
    found = {}
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith('{"ts"') and prefix in line:
            try:
                entry = json.loads(line)["log"]
            except (ValueError, KeyError, TypeError):
                continue
            if str(entry.get("request_id", "")).startswith(prefix):
                found[entry["request_id"]] = (entry["status"], entry["latency_ms"] / 1000)
    return found


def _window_p99(requests: list[tuple[float, float, str, int | str]], window: tuple[float, float | None] | None
                ) -> float | None:
    """The median, over windows as long as ``window`` (back to back, from the first request), of the p99
    latency (ms) of the requests sent in each (windows of fewer than 5 left out)."""
    if not requests or window is None or window[1] is None:
        return None
    length = max(window[1] - window[0], 0.5)
    start = min(sent for sent, _, _, _ in requests)
    buckets: dict[int, list[float]] = defaultdict(list)
    for sent, answered, _, _ in requests:
        buckets[int((sent - start) // length)].append(answered - sent)
    p99s = [float(np.percentile(v, 99)) * 1000 for v in buckets.values() if len(v) >= 5]
    return round(float(np.median(p99s)), 1) if p99s else None


def phase_checks(phases: Phases, tally: Tally, refusals: Counter, logged: dict[str, tuple[int, float]]
                 ) -> tuple[dict, dict]:
    """The phases' checks and figures. ``refusals``: digitserve_refusals_total's increase over the run,
    by (endpoint, reason); ``logged``: the server's view of the phases' requests (``access_log``).

    Latencies of the burst are judged as the server saw them (arrival to answer, its access log), as
    tests/e2e/test_overload.py does: 64 clients share the machine's cores with the server, so what
    they measure includes their own queueing (reported beside it)."""
    checks, report = {}, {}
    if phases.error:
        checks["phases_ran"] = {"ok": False, "error": phases.error}
    # ---- overload
    burst = phases.burst
    statuses = Counter(str(r["status"]) for r in burst)
    served = [r for r in burst if r["status"] == 200]
    refused = [r for r in burst if r["status"] == 503]
    wrong = [r for r in served if not r["right"]]
    no_retry = [r for r in refused if _retry_after(r.get("retry_after")) is None]
    other = [r for r in burst if r["status"] not in (200, 503)]
    examples = [f"{r['status']} {r.get('detail', '')[:200]}" for r in (other + wrong + no_retry)[:3]]
    checks["overload_only_200_or_503_retry_after"] = {
        "ok": bool(served) and bool(refused) and not (wrong or no_retry or other),
        "statuses": dict(statuses), "wrong_answers": len(wrong), "503_without_retry_after": len(no_retry),
        "examples": examples}
    lone_statuses = Counter(phases.lone_statuses)
    checks["overload_lone_explain_served"] = {  # before the burst: the explain pool holds only the rotation's
        "ok": lone_statuses == Counter({"200": len(phases.lone_statuses)}) and bool(phases.lone_statuses),
        "statuses": dict(lone_statuses), "examples": phases.lone_details[:2]}
    unlogged = [r["id"] for r in burst if r["status"] != "transport" and r["id"] not in logged]
    refused_server = [logged[r["id"]][1] for r in refused if r["id"] in logged]
    served_server = [logged[r["id"]][1] for r in served if r["id"] in logged]
    refusal_q, refusal_client_q = _quantiles(refused_server), _quantiles([r["seconds"] for r in refused])
    checks["overload_refusals_fast"] = {
        "ok": bool(refused_server) and not unlogged and refusal_q["p99_ms"] <= REFUSAL_P99_S * 1000,
        "limit_p99_ms": REFUSAL_P99_S * 1000, "server": refusal_q, "client": refusal_client_q,
        "not_in_access_log": len(unlogged)}
    lone = float(np.median(phases.lone_explain_s)) if phases.lone_explain_s else None
    served_q, served_client_q = _quantiles(served_server), _quantiles([r["seconds"] for r in served])
    # one service time as it is during the burst (the cores are shared with the clients): the fastest answer
    bound_s = phases.explain_max_wait_s + 2 * min(served_server) + 0.5 if served_server else None
    checks["overload_served_bounded"] = {
        "ok": bound_s is not None and not unlogged and served_q["p99_ms"] <= bound_s * 1000,
        "limit_p99_ms": round(bound_s * 1000, 1) if bound_s is not None else None,
        "server": served_q, "client": served_client_q,
        "lone_explain_ms": round(lone * 1000, 1) if lone is not None else None}
    explain_refused = sum(n for (endpoint, _), n in refusals.items() if endpoint == "explain")
    explain_503 = tally.sent.get(("explain", "503"), 0) + phases.sent.get(("explain", "503"), 0)
    predict_refused = sum(n for (endpoint, _), n in refusals.items() if endpoint == "predict")
    checks["overload_refusals_counted"] = {
        "ok": explain_refused == explain_503 and predict_refused == 0,
        "explain_503": explain_503, "explain_refusals_metric": explain_refused,
        "predict_refusals_metric": predict_refused,
        "by_reason": {f"{e} {r}": n for (e, r), n in sorted(refusals.items()) if n}}
    during = _within(tally.timeline, phases.overload)
    busy = [w for w in (phases.overload, phases.slow) if w is not None]
    calm = [r for r in tally.timeline if not any(r[1] >= w[0] and (w[1] is None or r[0] <= w[1]) for w in busy)]
    during_q, calm_q = _quantiles([b - a for a, b, _, _ in during]), _quantiles([b - a for a, b, _, _ in calm])
    not_200 = Counter(str(status) for _, _, _, status in during if status != 200)
    # as tests/e2e/test_overload.py has it: within 1.5x of the p99 without the burst, or 50 ms more. "Without":
    # the median p99 of windows as long as the burst outside the phases, so that both p99s come from as many
    # requests (the p99 of a few dozen is about their maximum, above the p99 of thousands even when unharmed)
    calm_p99 = _window_p99(calm, phases.overload)
    limit_ms = max(PREDICT_RATIO_GOAL * calm_p99, calm_p99 + 50) if calm_p99 is not None else None
    ratio = during_q["p99_ms"] / calm_p99 if during and calm_p99 else None
    checks["overload_predict_unharmed"] = {
        "ok": bool(during) and limit_ms is not None and not not_200 and during_q["p99_ms"] <= limit_ms,
        "not_200": dict(not_200), "limit_p99_ms": round(limit_ms, 1) if limit_ms is not None else None,
        "during": during_q, "calm_windows_p99_ms": calm_p99, "outside_phases": calm_q,
        "p99_ratio": round(ratio, 2) if ratio is not None else None}
    checks["overload_healthy_after"] = {
        "ok": phases.healthy_after_s is not None, "seconds": round(phases.healthy_after_s, 2)
        if phases.healthy_after_s is not None else None, "limit_s": HEALTHY_AFTER_S}
    report["overload"] = {
        "clients": OVERLOAD_CLIENTS, "requests_each": OVERLOAD_EACH, "images": OVERLOAD_IMAGES,
        "steps": OVERLOAD_STEPS, "quadrature": "midpoint",
        "seconds": round(phases.overload[1] - phases.overload[0], 1)
        if phases.overload and phases.overload[1] else None,
        "statuses": dict(statuses), "served_server": served_q, "served_client": served_client_q,
        "refused_server": refusal_q, "refused_client": refusal_client_q,
        "rotation_explains_refused": dict(tally.refused_in_overload)}
    # ---- slow clients
    slow = phases.slow_results.get("slow", [])
    fresh = phases.slow_results.get("fresh", [])
    limit_s = phases.read_timeout_s + SLOW_SLACK_S
    late = [r for r in slow if r["closed_after_s"] is None or r["closed_after_s"] > limit_s]
    not_408 = Counter(f"{r['kind']} {r['status']}" for r in slow if r["status"] != 408)
    closed = [r["closed_after_s"] for r in slow if r["closed_after_s"] is not None]
    by_kind = {kind: Counter(str(r["status"]) for r in slow if r["kind"] == kind) for kind in ("headers", "body")}
    checks["slow_clients_closed_408_in_time"] = {
        "ok": len(slow) == SLOW_HEADERS + SLOW_BODIES and not late and not not_408,
        "connections": len(slow), "not_408": dict(not_408), "late_or_open": len(late),
        "limit_s": limit_s, "closed_after_s": {"min": round(min(closed), 2), "max": round(max(closed), 2)}
        if closed else None}
    timed_out = refusals.get(("connection", "read_timeout"), 0)
    checks["slow_clients_counted"] = {"ok": timed_out == len(slow) and bool(slow), "connections": len(slow),
                                      "read_timeout_refusals_metric": timed_out}
    rotation = _within(tally.timeline, phases.slow)
    fresh_bad = Counter(str(r["status"]) for r in fresh if not r["right"])
    rotation_bad = Counter(str(status) for _, _, _, status in rotation if status != 200)
    fresh_q, rotation_q = _quantiles([r["seconds"] for r in fresh]), _quantiles([b - a for a, b, _, _ in rotation])
    checks["slow_clients_others_served"] = {
        "ok": bool(fresh) and bool(rotation) and not fresh_bad and not rotation_bad,
        "fresh_connections": fresh_q, "fresh_not_200_or_wrong": dict(fresh_bad),
        "rotation_predict": rotation_q, "rotation_not_200": dict(rotation_bad)}
    report["slow_clients"] = {
        "dribbling_headers": SLOW_HEADERS, "stalled_bodies": SLOW_BODIES, "read_timeout_s": phases.read_timeout_s,
        "seconds": round(phases.slow[1] - phases.slow[0], 1) if phases.slow and phases.slow[1] else None,
        "statuses": {kind: dict(c) for kind, c in by_kind.items()},
        "closed_after_s": checks["slow_clients_closed_408_in_time"]["closed_after_s"],
        "fresh_predict": fresh_q, "rotation_predict": rotation_q}
    return checks, report


# ---------------------------------------------------------------- memory of the process tree


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    def __init__(self, server: Server, every: float = RSS_EVERY_S):
        super().__init__(daemon=True)
        self.server, self.root_pid, self.every = server, server.process.pid, every
        self.samples: list[tuple[float, dict[int, int]]] = []
        self.names: dict[int, str] = {}
        self.stop_event = threading.Event()
        self.started = time.monotonic()

    def sample(self) -> None:
        now = time.monotonic() - self.started
        reading = {}
        for pid in procs.process_tree(self.root_pid):
            kib = rss_kib(pid)
            if kib is not None:
                reading[pid] = kib
        if reading.keys() - self.names.keys():
            self.names.update((pid, f"{pid} {role}") for pid, role in procs.roles(self.server).items()
                              if pid not in self.names)
        self.samples.append((now, reading))

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.sample()

    def stop(self) -> None:
        self.stop_event.set()
        self.join()
        self.sample()


def rss_report(sampler: RssSampler, duration: float, calm_from: float = 0.0) -> tuple[dict, list[str]]:
    """Per process: RSS at start, at the end of warm-up, at the end; growth; and whether it is flat.
    The warm-up lasts at least until ``calm_from`` (seconds from the sampler's start: the phases' end)."""
    warm_at = max(min(WARMUP_S, duration / 2), calm_from)
    first_t, first = sampler.samples[0]
    warm_t, warm = next(((t, s) for t, s in sampler.samples if t >= warm_at), sampler.samples[-1])
    last_t, last = sampler.samples[-1]
    report, failures = {}, []
    for pid in sorted(set(first) | set(last)):
        name = sampler.names.get(pid, str(pid))
        if pid not in last:
            failures.append(f"process {name} died during the soak")
            report[name] = {"start_kib": first.get(pid), "end_kib": None}
            continue
        if pid not in first:
            failures.append(f"process {name} appeared during the soak")
        start, base, end = first.get(pid), warm.get(pid), last[pid]
        growth = (end - base) / base if base else None
        flat = growth is not None and growth < FLAT_LIMIT
        report[name] = {
            "start_kib": start, "after_warmup_kib": base, "end_kib": end,
            "growth_from_start_pct": round(100 * (end - start) / start, 1) if start else None,
            "growth_after_warmup_pct": round(100 * growth, 1) if growth is not None else None,
            "flat": flat,
        }
        if not flat:
            failures.append(f"RSS of {name} grew {report[name]['growth_after_warmup_pct']}% after warm-up "
                            f"({base} -> {end} KiB); the limit is {FLAT_LIMIT:.0%}")
    timeline = [{"t_s": round(t, 1), "kib": {sampler.names.get(p, str(p)): k for p, k in s.items()}}
                for t, s in sampler.samples]
    return {"warmup_sample_t_s": round(warm_t, 1), "first_sample_t_s": round(first_t, 1),
            "last_sample_t_s": round(last_t, 1), "processes": report, "timeline": timeline}, failures


# ---------------------------------------------------------------- metrics


def requests_total(client: httpx.Client) -> Counter:
    """digitserve_requests_total by (endpoint, status), summed over model versions."""
    return counted(client)[0]


def counted(client: httpx.Client) -> tuple[Counter, Counter]:
    """digitserve_requests_total by (endpoint, status), summed over model versions, and
    digitserve_refusals_total by (endpoint, reason), from one scrape."""
    text = client.get("/metrics").text
    totals, refusals = Counter(), Counter()
    for labels, value in metric_samples(text, "digitserve_requests_total").items():
        labels = dict(labels)
        totals[(labels.get("endpoint"), labels.get("status"))] += value
    for labels, value in metric_samples(text, "digitserve_refusals_total").items():
        labels = dict(labels)
        refusals[(labels.get("endpoint"), labels.get("reason"))] += value
    return totals, refusals


# ---------------------------------------------------------------- the run


def start_service(port: int | None, log_dir: Path, args: tuple[str, ...] = ()) -> Server:
    """``python -m service --port PORT [ARGS]`` with its defaults: no DIGITSERVE_* from our environment but the
    data dir, and a JSON log (``access_log`` reads it)."""
    port = port or free_port()
    log = log_dir / f"soak-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSERVE_") or k == "DIGITSERVE_DATA_DIR"}
    env["DIGITSERVE_LOG_FORMAT"] = "json"
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port), *args], cwd=ROOT, env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, port, log)
    try:
        server.wait_ready(timeout=180)
    except (RuntimeError, TimeoutError):
        server.stop(timeout=10)
        raise
    return server


def soak(minutes: float, port: int | None, threads: int, read_timeout_s: float | None = None,
         with_phases: bool = True) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="digitserve-soak-"))
    rotation = _traffic()
    tally = Tally()
    checks: dict[str, dict] = {}
    started_at = datetime.datetime.now().astimezone()
    with_phases = with_phases and minutes * 60 >= PHASES_MIN_S
    phases = Phases(explain_max_wait_s=DEFAULTS["explain_max_queue_wait_ms"] / 1000,
                    read_timeout_s=read_timeout_s or DEFAULTS["read_timeout_s"])
    if not with_phases:
        phases.done.set()
    burst_pool = ProcessPoolExecutor(1, mp_context=get_context("spawn")) if with_phases else None
    if burst_pool is not None:
        burst_pool.submit(os.getpid).result()  # started now, not in the middle of the run
    t0 = time.monotonic()
    server = start_service(port, log_dir, ("--read-timeout-s", f"{read_timeout_s:g}") if read_timeout_s else ())
    print(f"service up on {server.url} after {time.monotonic() - t0:.1f} s (log: {server.log})", file=sys.stderr)
    try:
        with server.client() as client:
            before, refusals_before = counted(client)
        sampler = RssSampler(server)
        sampler.sample()
        sampler.start()
        deadline = time.monotonic() + minutes * 60
        counter, counter_lock = itertools.count(), threading.Lock()

        def worker() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while time.monotonic() < deadline or not phases.done.is_set():
                    with counter_lock:
                        n = next(counter)
                    _send(client, rotation[n % len(rotation)], tally, phases)

        soak_start = time.monotonic()
        last_report = soak_start
        director = threading.Thread(target=run_phases, args=(server, phases, soak_start, burst_pool), daemon=True)
        if with_phases:
            director.start()
        with ThreadPoolExecutor(threads) as pool:
            futures = [pool.submit(worker) for _ in range(threads)]
            while not all(f.done() for f in futures):
                time.sleep(1)
                if time.monotonic() - last_report >= 30:
                    last_report = time.monotonic()
                    print(f"  {last_report - soak_start:5.0f} s: {sum(tally.sent.values())} requests, "
                          f"{sum(tally.problems.values())} problems", file=sys.stderr)
            for f in futures:
                f.result()
        duration = time.monotonic() - soak_start
        sampler.stop()
        time.sleep(0.5)  # the middleware counts after the response is sent
        with server.client() as client:
            health = client.get("/health").status_code
            after, refusals_after = counted(client)
    finally:
        if burst_pool is not None:
            burst_pool.shutdown(cancel_futures=True)
        stopping = time.monotonic()
        returncode = server.stop(timeout=40)  # > the default 30 s grace; then SIGKILL (returncode -9)
        shutdown_s = time.monotonic() - stopping

    # metric agreement for the endpoints we drove (the rotation and the phases)
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0)}
    sent_all = tally.sent + phases.sent
    mismatches = []
    for endpoint in SOAKED_ENDPOINTS:
        statuses = {s for (e, s) in list(sent_all) + list(delta) if e == endpoint}
        for status in sorted(statuses):
            sent, counted_n = sent_all.get((endpoint, status), 0), delta.get((endpoint, status), 0)
            if sent != counted_n:
                mismatches.append(f"{endpoint} {status}: sent {sent}, metric says {counted_n:g}")
    calm_from = phases.calm_from - sampler.started + 1 if with_phases and phases.calm_from else 0.0
    rss, rss_failures = rss_report(sampler, duration, calm_from)

    informational = {k: v for k, v in tally.problems.items() if "(informational)" in k}
    hard = {k: v for k, v in tally.problems.items() if "(informational)" not in k}
    good = sum(n for name, c in tally.by_name.items() if not name.startswith("bad:") for n in c.values())
    bad = sum(n for name, c in tally.by_name.items() if name.startswith("bad:") for n in c.values())
    checks["metrics_agree"] = {"ok": not mismatches, "mismatches": mismatches}
    checks["good_no_5xx"] = {"ok": not tally.problems["good request got 5xx"],
                             "count": tally.problems["good request got 5xx"]}
    checks["good_all_200_and_right"] = {
        "ok": not (tally.problems["good request got non-200"] or tally.problems["good request got a wrong answer"]),
        "non_200": tally.problems["good request got non-200"],
        "wrong": tally.problems["good request got a wrong answer"]}
    bad_problems = sum(v for k, v in hard.items() if k.startswith("bad request"))
    checks["bad_all_4xx_with_detail"] = {"ok": not bad_problems, "count": bad_problems}
    checks["no_transport_errors"] = {"ok": not tally.problems["no HTTP answer"],
                                     "count": tally.problems["no HTTP answer"]}
    checks["rss_flat_and_no_process_died"] = {"ok": not rss_failures, "failures": rss_failures}
    checks["healthy_at_end"] = {"ok": health == 200, "status": health}
    checks["clean_shutdown"] = {"ok": returncode == 0, "returncode": returncode, "seconds": round(shutdown_s, 1)}
    phase_report: dict = {"ran": with_phases}
    if with_phases:
        refusals = Counter({key: refusals_after[key] - refusals_before.get(key, 0) for key in refusals_after})
        more, phase_report = phase_checks(phases, tally, refusals, access_log(server.log, "soak-"))
        checks.update(more)
        phase_report = {"ran": True, **phase_report,
                        "requests_sent": {f"{e} {st}": n for (e, st), n in sorted(phases.sent.items())}}
    else:
        phase_report["why_not"] = "--no-phases" if minutes * 60 >= PHASES_MIN_S else f"runs under {PHASES_MIN_S:g} s"

    def pct(values, q):
        return round(float(np.percentile(values, q)) * 1000, 1) if values else None

    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "minutes": minutes, "duration_s": round(duration, 1), "threads": threads,
        "service": {"url": server.url, "args": "defaults (python -m service --port PORT)", "log": str(server.log)},
        "requests": {"total": sum(tally.sent.values()), "good": good, "bad": bad,
                     "per_second": round(sum(tally.sent.values()) / duration, 1),
                     "by_endpoint_status": {f"{e} {s}": n for (e, s), n in sorted(tally.sent.items())},
                     "by_request": {name: dict(c) for name, c in sorted(tally.by_name.items())}},
        "latency_ms": {kind: {"p50": pct(v, 50), "p99": pct(v, 99), "max": pct(v, 100)}
                       for kind, v in sorted(tally.latencies.items())},
        "errors": {"failing": hard, "informational": informational, "examples": dict(tally.examples)},
        "metrics": {"requests_total_increase": {f"{e} {s}": v for (e, s), v in sorted(delta.items(), key=str)}},
        "rss": rss,
        "phases": phase_report,
        "checks": checks,
        "ok": all(c["ok"] for c in checks.values()),
    }


def print_summary(result: dict, path: Path) -> None:
    r = result["requests"]
    print(f"\nsoak: {result['duration_s']} s, {result['threads']} threads, {r['total']} requests "
          f"({r['per_second']}/s; {r['good']} good, {r['bad']} bad)")
    for key, n in r["by_endpoint_status"].items():
        print(f"  {key:<22} {n}")
    print("latency (ms):")
    for kind, q in result["latency_ms"].items():
        print(f"  {kind:<14} p50 {q['p50']}  p99 {q['p99']}  max {q['max']}")
    if result["errors"]["failing"] or result["errors"]["informational"]:
        print("errors by kind:")
        for kind, n in {**result["errors"]["failing"], **result["errors"]["informational"]}.items():
            print(f"  {n:>6}  {kind}")
            for ex in result["errors"]["examples"].get(kind, []):
                print(f"          e.g. {ex}")
    phases = result["phases"]
    if phases["ran"]:
        o, sc = phases["overload"], phases["slow_clients"]
        print(f"overload: {o['clients']} clients x {o['requests_each']} explains (IG {o['quadrature']}, {o['steps']} "
              f"steps, {o['images']} images) in {o['seconds']} s: {o['statuses']}")
        for kind in ("served", "refused"):
            print(f"  {kind:<7} as the server saw them {o[kind + '_server']}, the clients {o[kind + '_client']}")
        print(f"  the rotation's explains refused meanwhile: {o['rotation_explains_refused'] or 0}")
        print(f"slow clients: {sc['dribbling_headers']} dribbling headers, {sc['stalled_bodies']} stalled bodies, "
              f"read timeout {sc['read_timeout_s']:g} s, {sc['seconds']} s: {sc['statuses']}, closed after "
              f"{sc['closed_after_s']} s")
        print(f"  fresh /predict {sc['fresh_predict']}\n  rotation /predict {sc['rotation_predict']}")
    else:
        print(f"phases: not run ({phases['why_not']})")
    rss = result["rss"]
    print(f"RSS (KiB) at t={rss['first_sample_t_s']} s / after warm-up t={rss['warmup_sample_t_s']} s / "
          f"end t={rss['last_sample_t_s']} s:")
    for name, p in rss["processes"].items():
        print(f"  {name[:40]:<40} {p.get('start_kib')} / {p.get('after_warmup_kib')} / {p.get('end_kib')}  "
              f"growth {p.get('growth_from_start_pct')}% from start, {p.get('growth_after_warmup_pct')}% after warm-up"
              f"  {'flat' if p.get('flat') else 'NOT FLAT'}")
    print("checks:")
    for name, check in result["checks"].items():
        extra = {k: v for k, v in check.items() if k != "ok" and v not in ([], 0)}
        print(f"  {'PASS' if check['ok'] else 'FAIL'}  {name}  {json.dumps(extra) if extra else ''}")
    print(f"{'OK' if result['ok'] else 'FAILED'} -> {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long to drive traffic (default 3)")
    parser.add_argument("--port", type=int, default=None, help="port for the service (default: a free one)")
    parser.add_argument("--threads", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--read-timeout-s", type=float, default=None,
                        help=f"the service's --read-timeout-s (default: its own, {DEFAULTS['read_timeout_s']:g})")
    parser.add_argument("--no-phases", action="store_true", help="leave out the overload and slow-client phases")
    args = parser.parse_args(argv)
    result = soak(args.minutes, args.port, args.threads, args.read_timeout_s, not args.no_phases)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result, path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
