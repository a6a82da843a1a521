"""Metrics end to end: the real service (2 API servers, 2 predict workers, an explain worker) under
known traffic, scraped every second by a real Prometheus. What Prometheus stores must be exactly
what was sent; the Grafana dashboard's queries must find it."""

from __future__ import annotations

import http.client
import json
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from harness.server import ROOT, b64, encode, free_port, metric_samples, running
from tests.conftest import SERVED

# every endpoint label value there is (service/metrics.py): the protocols' routes, the page, and the refusals
# of connections before any request
ENDPOINTS = {"predict", "explain", "health", "info", "metrics", "other", "connection", "page", "v2_server", "v2_health",
             "v2_model", "v2_infer", "v1_model", "v1_predict", "v1_explain"}
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "digitserve.json"
# Paths outside the API: each must count under endpoint="other", never as a label of its own.
ODD_PATHS = ("/nope", "/predict/../x", "/predict/", "/PREDICT", "/metrics/../predict", "/predict%2F..%2Fx",
             "/" + "a" * 300)
LATENCY_HISTOGRAMS = ("digitserve_request_duration_seconds", "digitserve_queue_wait_seconds",
                      "digitserve_inference_duration_seconds")


# ---------------------------------------------------------------- Prometheus, the service, the traffic

class Prometheus:
    """A real Prometheus on loopback, read only through its HTTP API."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path):
        self.process, self.log = process, log
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} | ({"time": repr(at)} if at is not None else {})
        body = self.http.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def by(self, expr: str, label: str, at: float) -> dict[str, float]:
        """``{label value: sample value}`` for a vector query."""
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr, at)}

    def scalar(self, expr: str, at: float) -> float | None:
        result = self.query(expr, at)
        assert len(result) <= 1, (expr, result)
        return float(result[0]["value"][1]) if result else None

    def scrape_after(self, moment: float, timeout: float = 15) -> float:
        """The time of the first successful scrape of the service that started after ``moment``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            scraped = self.scalar('timestamp(up{job="digitserve"}) and up{job="digitserve"} == 1', time.time())
            if scraped is not None and scraped > moment:
                return scraped
            time.sleep(0.2)
        raise TimeoutError(f"no successful scrape after {moment} within {timeout} s:\n{self.log.read_text()[-3000:]}")


@dataclass
class Traffic:
    sent: Counter  # (endpoint, status) -> requests, including what was counted before the traffic
    images: Counter  # endpoint -> images answered (predict: classified; explain: explained)
    answered: Counter  # endpoint -> requests answered 200 by a worker
    odd: int  # requests to paths outside the API
    text: str  # /metrics once every count had landed
    at: float  # a Prometheus scrape taken after that


@pytest.fixture(scope="module")
def multiproc_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multiproc") / "samples"


@pytest.fixture(scope="module")
def service(tmp_path_factory, multiproc_dir):
    """Admits long queues (a wave's burst on a busy machine, TestInFlight's four slow explains): refusals
    are test_overload's."""
    with running(tmp_path_factory.mktemp("metrics"), "--workers", "2", "--api-servers", "2",
                 "--max-queue-wait-ms", "60000", "--explain-max-queue-wait-ms", "60000",
                 env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)}) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory, service):
    """Scrapes the service every second; killed at teardown."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: run `make system-deps` (.ci/system-deps.sh)"
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: digitserve\n    static_configs: [{{targets: ['127.0.0.1:{service.port}']}}]\n"
    )
    port, log = free_port(), folder / "prometheus.log"
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT,
    )
    prom = Prometheus(process, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, f"prometheus exited:\n{log.read_text()[-3000:]}"
            try:
                if prom.http.get("/-/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        prom.scrape_after(0)
        yield prom
    finally:
        prom.http.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def requests_by(text: str, *labels: str) -> Counter:
    """digitserve_requests_total summed by ``labels``, without the scrapes' own /metrics requests."""
    counts = Counter()
    for key, value in metric_samples(text, "digitserve_requests_total").items():
        label = dict(key)
        if label["endpoint"] != "metrics":
            counts[tuple(label[name] for name in labels)] += value
    return counts


def raw_get(port: int, path: str) -> int:
    """GET a path exactly as written (httpx would resolve ``..``); the status."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def wave(service, digits) -> tuple[Counter, Counter, Counter]:
    """One round of everything: good and bad /predict and /explain, info, health, odd paths, all at
    once on fresh connections so both API servers and both predict workers take part.
    (sent by (endpoint, status), images by endpoint, answered requests by endpoint)"""
    client = service.client(limits=httpx.Limits(max_keepalive_connections=0))  # a new connection per request
    pixels = [{"pixels": d.tolist()} for d in digits]
    pngs = [encode(d) for d in digits[:4]]

    def post(path: str, **kwargs):
        return lambda: client.post(path, **kwargs).status_code

    good = [("predict", post("/predict", json={"instances": pixels[i:i + 1 + i % 4]}), 1 + i % 4) for i in range(16)]
    good += [("predict", post("/predict", json={"instances": [{"image_b64": b64(p)} for p in pngs[:2]]}), 2),
             ("predict", post("/predict", files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)]),
              4),
             ("explain", post("/explain", json={"instances": pixels[:2], "method": "saliency"}), 2),
             ("explain", post("/explain", json={"instances": pixels[2:3], "steps": 8}), 1),
             ("explain", post("/explain", files=[("file", ("0.png", pngs[0], "image/png"))],
                              data={"method": "gradient_x_input"}), 1)]
    other = [
        ("predict", post("/predict", content=b"{not json", headers={"content-type": "application/json"})),  # 400
        ("predict", post("/predict", json={"instances": [{"image_b64": "***"}]})),  # 400
        ("predict", post("/predict", content=b"7", headers={"content-type": "text/plain"})),  # 415
        ("predict", post("/predict", json={"instances": [{"pixels": "seven"}]})),  # 422
        ("predict", post("/predict", json={"images": []})),  # 422
        ("predict", post("/predict", json={"instances": pixels[:1] * 65})),  # 413
        ("predict", lambda: client.get("/predict").status_code),  # 405
        ("explain", post("/explain", json={"instances": pixels[:1], "method": "magic"})),  # 422
        ("explain", post("/explain", json={"instances": [{"image_b64": "***"}]})),  # 400
        ("info", lambda: client.get("/info").status_code),
        ("health", lambda: client.get("/health").status_code),
        *[("other", lambda p=p: raw_get(service.port, p)) for p in ODD_PATHS],
    ]
    calls = [(endpoint, call) for endpoint, call, _ in good] + other
    with client, ThreadPoolExecutor(len(calls)) as pool:
        statuses = list(pool.map(lambda call: call[1](), calls))
    assert statuses[:len(good)] == [200] * len(good), [
        (endpoint, status) for (endpoint, _), status in zip(calls, statuses)]
    images, answered = Counter(), Counter()
    for endpoint, _, n in good:
        images[endpoint] += n
        answered[endpoint] += 1
    return Counter((endpoint, str(status)) for (endpoint, _), status in zip(calls, statuses)), images, answered


def read_metrics(service) -> str:
    with service.client() as client:
        return client.get("/metrics").text


def settled_metrics(service, expected: Counter | None, timeout: float = 10) -> str:
    """/metrics once the request counts equal ``expected`` (None: stop changing), since a response
    can reach its client a moment before the server has counted it; after ``timeout``, the last
    reading, for the tests to judge."""
    deadline = time.monotonic() + timeout
    previous = None
    while True:
        text = read_metrics(service)
        counts = requests_by(text, "endpoint", "status")
        if counts == (expected if expected is not None else previous) or time.monotonic() > deadline:
            return text
        previous = counts
        time.sleep(0.2)


@pytest.fixture(scope="module")
def traffic(service, prometheus, mnist_test) -> Traffic:
    """Two identical waves with a scrape between, so every series exists before it grows and
    rate() has something to see; then one more scrape taken after every count had landed."""
    digits = mnist_test[0][:64].numpy()
    sent = requests_by(settled_metrics(service, None), "endpoint", "status")  # /health while starting
    images, answered = Counter(), Counter()
    for _ in range(2):
        counts, n_images, n_answered = wave(service, digits)
        sent, images, answered = sent + counts, images + n_images, answered + n_answered
        text = settled_metrics(service, sent)
        at = prometheus.scrape_after(time.time())
    return Traffic(sent, images, answered, 2 * len(ODD_PATHS), text, at)


# ---------------------------------------------------------------- counts in Prometheus equal the traffic

class TestCounts:
    def test_requests_by_endpoint_and_status(self, prometheus, traffic):
        """Every request counted once, with the status its client got (bad requests included)."""
        stored = prometheus.query('sum by (endpoint, status) (digitserve_requests_total{endpoint!="metrics"})',
                                  traffic.at)
        assert Counter({(r["metric"]["endpoint"], r["metric"]["status"]): float(r["value"][1])
                        for r in stored}) == traffic.sent
        assert {status for endpoint, status in traffic.sent if endpoint == "predict"} >= {
            "200", "400", "405", "413", "415", "422"}
        assert {status for endpoint, status in traffic.sent if endpoint == "explain"} >= {"200", "400", "422"}

    def test_images_classified_equal_images_forwarded(self, prometheus, traffic):
        """Per-image metrics count images, not requests: predictions and confidences (/predict),
        batch sizes (every forward of both pools)."""
        assert prometheus.scalar("sum(digitserve_predictions_total)", traffic.at) == traffic.images["predict"]
        assert prometheus.scalar("sum(digitserve_prediction_confidence_count)", traffic.at) == traffic.images["predict"]
        assert prometheus.by("sum by (endpoint) (digitserve_batch_size_sum)", "endpoint", traffic.at) == traffic.images
        # real digits
        assert len(prometheus.by("sum by (label) (digitserve_predictions_total)", "label", traffic.at)) >= 5

    def test_one_forward_per_batch_and_one_wait_per_request(self, prometheus, traffic):
        """Batches hold whole requests: forwards <= requests; every answered request waited once."""
        forwards = prometheus.by("sum by (endpoint) (digitserve_batch_size_count)", "endpoint", traffic.at)
        timed = prometheus.by("sum by (endpoint) (digitserve_inference_duration_seconds_count)", "endpoint", traffic.at)
        assert timed == forwards and all(1 <= forwards[e] <= traffic.answered[e] for e in traffic.answered), forwards
        waited = prometheus.by("sum by (endpoint) (digitserve_queue_wait_seconds_count)", "endpoint", traffic.at)
        assert waited == traffic.answered

    def test_request_durations_count_every_request(self, prometheus, traffic):
        """The duration histogram and the request counter see the same requests, endpoint by endpoint."""
        stored = prometheus.by('sum by (endpoint) (digitserve_request_duration_seconds_count{endpoint!="metrics"})',
                               "endpoint", traffic.at)
        expected = Counter()
        for (endpoint, _), count in traffic.sent.items():
            expected[endpoint] += count
        assert stored == expected

    def test_in_flight_returns_to_zero(self, prometheus, traffic):
        """The in-flight gauge is a live sum over API servers: back to 0 once everything was answered."""
        in_flight = prometheus.by('sum by (endpoint) (digitserve_in_flight_requests{endpoint!="metrics"})', "endpoint",
                                  traffic.at)
        assert set(in_flight) >= {"predict", "other"} and set(in_flight.values()) == {0}, in_flight

    def test_model_info(self, prometheus, traffic):
        """Exactly one served model, one sample per pool (naming its runtime) whatever the number of workers."""
        result = prometheus.query("digitserve_model_info", traffic.at)
        assert sorted(({k: v for k, v in r["metric"].items() if k not in ("job", "instance")} for r in result),
                      key=lambda labels: labels["pool"]) == [
            {"__name__": "digitserve_model_info", "name": "mnist-fnn", "version": SERVED, "device": "cpu",
             "pool": pool, "runtime": "eager"} for pool in ("explain", "predict")]
        assert [float(r["value"][1]) for r in result] == [1, 1]


# ---------------------------------------------------------------- several processes, one sum

def per_process(multiproc_dir: Path, scratch: Path) -> dict[str, str]:
    """Each process's own samples (the files it wrote), rendered as Prometheus text."""
    pids = {re.sub(r"^.*_", "", f.stem) for f in multiproc_dir.glob("*.db")}
    texts = {}
    for pid in pids:
        folder = scratch / pid
        folder.mkdir()
        for f in multiproc_dir.glob(f"*_{pid}.db"):
            shutil.copy(f, folder)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(folder))
        texts[pid] = generate_latest(registry).decode()
    return texts


class TestMultiprocess:
    def test_sums_over_api_servers_and_workers(self, service, multiproc_dir, traffic, tmp_path):
        """Requests answered by 2 API-server processes and images run by 2 workers add up to what was sent."""
        sent_predict = sum(n for (endpoint, _), n in traffic.sent.items() if endpoint == "predict")
        predict_images = {"endpoint": "predict", "version": SERVED}.items()
        processes = per_process(multiproc_dir, tmp_path)
        answered = {pid: requests_by(text, "endpoint")[("predict",)] for pid, text in processes.items()}
        forwarded = {pid: metric_samples(text, "digitserve_batch_size_sum").get(tuple(sorted(predict_images)), 0)
                     for pid, text in processes.items()}
        api_servers = {pid for pid, n in answered.items() if n}
        workers = {pid for pid, n in forwarded.items() if n}
        assert len(api_servers) == 2 and len(workers) == 2 and not api_servers & workers, (answered, forwarded)
        assert sum(answered.values()) == sent_predict
        assert sum(forwarded.values()) == traffic.images["predict"]
        # and /metrics, read directly, is the sum
        text = read_metrics(service)
        assert requests_by(text, "endpoint")[("predict",)] == sent_predict
        batch_images = metric_samples(text, "digitserve_batch_size_sum")[tuple(sorted(predict_images))]
        assert batch_images == traffic.images["predict"]
        assert sum(metric_samples(text, "digitserve_predictions_total").values()) == traffic.images["predict"]


# ---------------------------------------------------------------- labels stay bounded

class TestLabels:
    def test_endpoint_label_values_are_bounded(self, prometheus, service, traffic):
        """Unknown and tricky paths all count as "other"; no path ever becomes a label value."""
        seen = set(prometheus.by('group by (endpoint) ({__name__=~"digitserve_.+", endpoint!=""})', "endpoint",
                                 traffic.at))
        assert {"predict", "explain", "other"} <= seen <= ENDPOINTS, seen
        assert prometheus.scalar('sum(digitserve_requests_total{endpoint="other"})', traffic.at) == traffic.odd
        text = read_metrics(service)
        direct = {s.labels["endpoint"] for f in text_string_to_metric_families(text) for s in f.samples
                  if "endpoint" in s.labels}
        assert direct <= ENDPOINTS, direct

    def test_every_series_carries_the_model_version(self, prometheus, traffic):
        """Every metric of a request or a model's work says which model version produced it (a canary and the
        old version side by side). The served version, the canary share and the shadow's metrics are the version
        state itself, as values or as their own served/shadow labels; processes, workers, refusals, capture and the
        wait estimate are the service's, not a version's."""
        state = ("digitserve_(serving_version|canary_share|shadow_.+|capture_.+|worker_restarts_total|refusals_total|"
                 "workers_ready|queue_wait_estimate_seconds|process_.+)")
        others = f'{{__name__=~"digitserve_.+", __name__!~"{state}", version!="{SERVED}"}}'
        assert prometheus.query(others, traffic.at) == []
        assert prometheus.query("digitserve_serving_version", traffic.at)[0]["value"][1] == SERVED


# ---------------------------------------------------------------- the exposition itself

class TestExposition:
    def test_latency_buckets_span_sub_millisecond_to_seconds(self, traffic):
        """Fast forwards and slow requests both land in a real bucket; buckets are cumulative."""
        families = {f.name: f for f in text_string_to_metric_families(traffic.text)}
        for name in LATENCY_HISTOGRAMS:
            bounds = sorted({float(s.labels["le"]) for s in families[name].samples if s.name.endswith("_bucket")})
            assert bounds[0] < 0.001 and bounds[-2] >= 2.5 and bounds[-1] == math.inf, (name, bounds)
        for family in families.values():
            if family.type != "histogram":
                continue
            series: dict[tuple, list] = {}
            counts = {}
            for s in family.samples:
                key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                if s.name.endswith("_bucket"):
                    series.setdefault(key, []).append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    counts[key] = s.value
            for key, buckets in series.items():
                values = [v for _, v in sorted(buckets)]
                assert values == sorted(values) and values[-1] == counts[key], (family.name, key, buckets)

    def test_promtool_lint_is_clean(self, traffic):
        """`promtool check metrics` finds nothing to complain about (naming, help, types)."""
        binary = shutil.which("promtool")
        assert binary, "promtool is not installed: run `make system-deps` (.ci/system-deps.sh)"
        lint = subprocess.run([binary, "check", "metrics"], input=traffic.text, capture_output=True, text=True,
                              timeout=30)
        assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


# ---------------------------------------------------------------- the Grafana dashboard reads real data

GRAFANA_INTERVALS = {"__rate_interval": "1m", "__interval": "5s", "__range": "5m"}


def dashboard_queries(path: Path) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, rows included, variables filled in."""
    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    def fill(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)(?::\w+)?\}?", lambda m: GRAFANA_INTERVALS.get(m[1], ".*"), expr)

    board = json.loads(path.read_text())
    return [(panel.get("title", "?"), fill(target["expr"]))
            for panel in panels(board.get("panels", [])) for target in panel.get("targets", []) if target.get("expr")]


class TestDashboard:
    def test_every_panel_query_returns_data(self, prometheus, traffic):
        """A panel that shows "No data" (or only NaN) after real traffic is a broken panel: wrong name,
        label or matcher, or a ratio without a fallback for an empty numerator."""
        queries = dashboard_queries(DASHBOARD)
        assert queries, f"no PromQL targets in {DASHBOARD}"
        empty = [(title, expr) for title, expr in queries
                 if all(math.isnan(float(r["value"][1])) for r in prometheus.query(expr, traffic.at))]
        assert empty == [], "\n".join(f"{title}: {expr}" for title, expr in empty)


class TestInFlight:
    def test_counts_requests_while_they_are_answered(self, service, traffic, mnist_test):
        """Not only back to 0: while slow explains (integrated gradients, 256 steps, 16 images each) are
        being answered, /metrics shows them in flight (the gauge is written once per event-loop iteration)."""
        body = {"instances": [{"pixels": d.tolist()} for d in mnist_test[0][:16].numpy()],
                "method": "integrated_gradients", "quadrature": "midpoint", "steps": 256}
        seen = 0.0
        with service.client() as client, ThreadPoolExecutor(4) as pool:
            pending = [pool.submit(client.post, "/explain", json=body) for _ in range(4)]
            deadline = time.monotonic() + 30
            while not seen and not all(f.done() for f in pending) and time.monotonic() < deadline:
                samples = metric_samples(read_metrics(service), "digitserve_in_flight_requests")
                seen = sum(value for labels, value in samples.items() if ("endpoint", "explain") in labels)
            statuses = [f.result().status_code for f in pending]
        assert statuses == [200] * 4, [f.result().text[:200] for f in pending]
        assert seen >= 1
