"""``make soak``: a few minutes of mixed traffic against the real service; does it stay correct and flat?

    python -m bench.soak [--minutes 3] [--port PORT] [--threads 4]

Starts ``python -m service`` with its default configuration (no ``DIGITSERVE_*`` setting but the
data dir), then a small thread pool sends, in a fixed rotation: good /predict (one and several
images, JSON and multipart), bad requests (every case of ``tests.test_errors.BAD_INPUTS``, in turn)
and /explain with each method. Every response is counted by endpoint and status; the RSS of every
process in the server's tree is sampled every ~10 s. At the end:

- ``digitserve_requests_total{endpoint,status}`` (its increase over the run, summed over versions)
  equals, for /predict and /explain, what was sent;
- every good request got a 200 with the right answer (so no 5xx), every bad one a 4xx;
- no process of the tree died or appeared, /health is still 200, SIGTERM ends the service cleanly;
- RSS is flat: each process grew < 10% from the end of the first minute (warm-up) to the end
  (for runs of 2 minutes or less, from the middle of the run). Growth from start is reported too.

Prints a summary, writes it as JSON to bench/results/soak-<date>.json and exits 1 if a check
failed. Not part of CI (it takes minutes).
"""

from __future__ import annotations

import argparse
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from bench import procs
from harness.server import ROOT, Server, free_port, metric_samples
from tests.e2e.test_errors import BAD_INPUTS, GOOD_PNG, seven

RESULTS = ROOT / "bench" / "results"
RSS_EVERY_S = 10.0
WARMUP_S = 60.0
FLAT_LIMIT = 0.10
METHODS = ("saliency", "gradient_x_input", "integrated_gradients")
SOAKED_ENDPOINTS = ("predict", "explain")


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

    def record(self, item: dict, status: int | str, seconds: float, problem: str | None = None, detail: str = ""):
        with self.lock:
            self.sent[(item["endpoint"], str(status))] += 1
            self.by_name[item["name"]][str(status)] += 1
            self.latencies[item["endpoint"] + (" good" if item["good"] else " bad")].append(seconds)
            if problem:
                self.problems[problem] += 1
                if len(self.examples[problem]) < 3:
                    self.examples[problem].append(f"{item['name']}: {status} {detail[:300]}")


def _send(client: httpx.Client, item: dict, tally: Tally) -> None:
    started = time.monotonic()
    try:
        response = client.post(f"/{item['endpoint']}", **item["request"])
    except httpx.HTTPError as e:
        tally.record(item, "transport", time.monotonic() - started, "no HTTP answer", f"{type(e).__name__}: {e}")
        return
    seconds, status = time.monotonic() - started, response.status_code
    problem, detail = None, response.text[:300]
    if item["good"]:
        if status >= 500:
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
    tally.record(item, status, seconds, problem, detail)


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


def rss_report(sampler: RssSampler, duration: float) -> tuple[dict, list[str]]:
    """Per process: RSS at start, at the end of warm-up, at the end; growth; and whether it is flat."""
    warm_at = min(WARMUP_S, duration / 2)
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
    text = client.get("/metrics").text
    totals = Counter()
    for labels, value in metric_samples(text, "digitserve_requests_total").items():
        labels = dict(labels)
        totals[(labels.get("endpoint"), labels.get("status"))] += value
    return totals


# ---------------------------------------------------------------- the run


def start_service(port: int | None, log_dir: Path) -> Server:
    """``python -m service --port PORT`` with its defaults: no DIGITSERVE_* from our environment but the data dir."""
    port = port or free_port()
    log = log_dir / f"soak-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIGITSERVE_") or k == "DIGITSERVE_DATA_DIR"}
    process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(process, port, log)
    try:
        server.wait_ready(timeout=180)
    except (RuntimeError, TimeoutError):
        server.stop(timeout=10)
        raise
    return server


def soak(minutes: float, port: int | None, threads: int) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="digitserve-soak-"))
    rotation = _traffic()
    tally = Tally()
    checks: dict[str, dict] = {}
    started_at = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    server = start_service(port, log_dir)
    print(f"service up on {server.url} after {time.monotonic() - t0:.1f} s (log: {server.log})", file=sys.stderr)
    try:
        with server.client() as client:
            before = requests_total(client)
        sampler = RssSampler(server)
        sampler.sample()
        sampler.start()
        deadline = time.monotonic() + minutes * 60
        counter, counter_lock = itertools.count(), threading.Lock()

        def worker() -> None:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                while time.monotonic() < deadline:
                    with counter_lock:
                        n = next(counter)
                    _send(client, rotation[n % len(rotation)], tally)

        soak_start = time.monotonic()
        last_report = soak_start
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
            after = requests_total(client)
    finally:
        stopping = time.monotonic()
        returncode = server.stop(timeout=40)  # > the default 30 s grace; then SIGKILL (returncode -9)
        shutdown_s = time.monotonic() - stopping

    # metric agreement for the endpoints we drove
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] - before.get(key, 0)}
    mismatches = []
    for endpoint in SOAKED_ENDPOINTS:
        statuses = {s for (e, s) in list(tally.sent) + list(delta) if e == endpoint}
        for status in sorted(statuses):
            sent, counted = tally.sent.get((endpoint, status), 0), delta.get((endpoint, status), 0)
            if sent != counted:
                mismatches.append(f"{endpoint} {status}: sent {sent}, metric says {counted:g}")
    rss, rss_failures = rss_report(sampler, duration)

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
    args = parser.parse_args(argv)
    result = soak(args.minutes, args.port, args.threads)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"soak-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print_summary(result, path)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
