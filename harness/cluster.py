"""Several real digitserve replicas behind a real HAProxy, updated one by one under load.

What a Kubernetes rolling update does, on one machine with real parts: start a new replica, wait until
it is ready, put it in rotation, SIGTERM an old one, let it drain, go on to the next; then kill -9 one
replica's whole process group. The load balancer learns that a replica is leaving only from its own
health checks (``GET /health`` every 250 ms, ``fall 1 rise 2``), as any load balancer outside
Kubernetes does, and retries on connection failures and empty responses only (never on a status).

    python -m harness.cluster --rolling-update     # prints requests, statuses, p99 during the update

The report compares three views of the same traffic: what the clients got, what HAProxy counted per
server (stats socket, ``show stat``) and what each replica counted itself (``/metrics``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ENDPOINTS = ("predict", "explain")
HEALTH_INTERVAL_MS = 250
CHECK_FALL, CHECK_RISE = 1, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def supports_drain_delay(root: Path = ROOT) -> bool:
    """Whether the server at ``root`` has the lame-duck setting (``--drain-delay-s``): ask its own --help."""
    result = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=root, capture_output=True, text=True,
                            timeout=60)
    return "--drain-delay-s" in result.stdout


def mnist_pngs(count: int = 256) -> list[str]:
    """The first ``count`` real MNIST test digits as base64 PNGs."""
    from torchvision.datasets import MNIST

    dataset = MNIST(os.environ.get("DIGITSERVE_DATA_DIR", "/work/shared/datasets"), train=False)
    encoded = []
    for i in range(count):
        buffer = io.BytesIO()
        dataset[i][0].save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode())
    return encoded


def requests_by_status(metrics_text: str) -> collections.Counter[str]:
    """``digitserve_requests_total`` of the client endpoints, by status, summed over endpoint and version."""
    counts: collections.Counter[str] = collections.Counter()
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "digitserve_requests_total" and sample.labels.get("endpoint") in CLIENT_ENDPOINTS:
                counts[sample.labels["status"]] += int(sample.value)
    return counts


class Replica:
    """One ``python -m service`` tree in a process group of its own, like a pod's container."""

    def __init__(self, name: str, log_dir: Path, args: list[str], root: Path = ROOT):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}-{self.port}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port), *args],
                                            cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()
        self.final_counts: collections.Counter[str] | None = None

    def wait_ready(self, timeout: float = 180) -> float:
        """Poll /health as a kubelet's readiness probe would; the seconds it took from the start."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return time.monotonic() - self.started
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.tail()}")

    def counts(self) -> collections.Counter[str]:
        return requests_by_status(httpx.get(f"{self.url}/metrics", timeout=5).text)

    def terminate(self) -> None:
        """SIGTERM to the main process only, as tini forwards it in the image; it stops its own workers."""
        self.process.send_signal(signal.SIGTERM)

    def kill_group(self) -> None:
        """kill -9 of every process of the tree at once: what an OOM kill or a lost node looks like."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            return self.process.wait()

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:]


class HAProxy:
    """HAProxy from Debian in the foreground, with ``slots`` servers in one backend and an admin stats socket.

    Slots stand for endpoints: a replica's address is set into a free slot when it is ready, and the
    slot is put in maintenance once its replica is gone. Health checks alone take a leaving replica
    out of rotation, the way a load balancer outside Kubernetes learns it.
    """

    def __init__(self, workdir: Path, slots: int):
        self.workdir = workdir
        self.port = free_port()
        self.socket_path = workdir / "haproxy.sock"
        self.slots = [f"s{i + 1}" for i in range(slots)]
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(self.render())
        self.log = workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    def render(self) -> str:
        servers = "\n".join(f"    server {slot} 127.0.0.1:1 disabled" for slot in self.slots)
        return f"""\
global
    stats socket {self.socket_path} mode 600 level admin
    log stdout format raw local0
    nbthread 1
    maxconn 1024

defaults
    mode http
    log global
    option httplog
    timeout connect 1s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    timeout http-keep-alive 10s
    # Connection failures and empty responses only (a server that closed or died before answering),
    # never a status: what most load balancers are set up to do. Our /predict and /explain are pure
    # functions of the request, so replaying one is safe; each retry goes to another server.
    retries 3
    retry-on conn-failure empty-response
    option redispatch 1
    # Only a request held whole can be replayed: wait for the body before sending it on. Without this
    # a request cut off by a dying server is not retried, and the client's connection is closed unanswered.
    option http-buffer-request

frontend digitserve
    bind 127.0.0.1:{self.port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk GET /health
    default-server check inter {HEALTH_INTERVAL_MS}ms fall {CHECK_FALL} rise {CHECK_RISE}
{servers}
"""

    def start(self) -> None:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"haproxy did not start:\n{self.log.read_text(errors='replace')}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """``show stat`` of the backend's servers and the frontend, by name."""
        text = self.command("show stat").removeprefix("# ")
        rows = csv.DictReader(io.StringIO(text))
        return {row["svname"]: row for row in rows if row["pxname"] in ("replicas", "digitserve")}

    def admit(self, slot: str, port: int) -> None:
        """Point a slot at a ready replica and leave maintenance; it serves once ``rise`` checks pass."""
        self.command(f"set server replicas/{slot} addr 127.0.0.1 port {port}")
        self.command(f"enable server replicas/{slot}")

    def retire(self, slot: str) -> None:
        self.command(f"disable server replicas/{slot}")

    def wait_status(self, slot: str, up: bool, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.stats()[slot]["status"]
            if (status == "UP") == up and not status.startswith(("UP ", "DOWN ")):
                return
            time.sleep(0.01)
        raise TimeoutError(f"haproxy: {slot} still {self.stats()[slot]['status']} after {timeout} s")

    def wait_idle(self, slot: str, timeout: float = 10) -> None:
        """Out of rotation and no request of ours still on it (sessions and queue both empty)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.stats()[slot]
            if row["status"] != "UP" and row["scur"] == "0" and row["qcur"] in ("0", ""):
                return
            time.sleep(0.01)
        raise TimeoutError(f"haproxy: {slot} not idle after {timeout} s: {self.stats()[slot]}")


@dataclass
class Outcome:
    endpoint: str
    started: float
    elapsed: float
    status: int | None
    retry_after: str | None = None
    error: str | None = None


class Load:
    """Clients through the load balancer: single-image /predict and /explain, real MNIST PNGs.

    Each client sends ``rate`` requests a second (0: back to back). Paced, so that a replica starting on
    this machine's shared cores gets some CPU, as a new pod on its own node would.
    """

    def __init__(self, url: str, images: list[str], predict_clients: int, explain_clients: int, rate: float = 0):
        self.url = url
        self.images = images
        self.rate = rate
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        plan = ["predict"] * predict_clients + ["explain"] * explain_clients
        self._threads = [threading.Thread(target=self._client, args=(endpoint, i), daemon=True)
                         for i, endpoint in enumerate(plan)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _client(self, endpoint: str, offset: int) -> None:
        mine: list[Outcome] = []
        with httpx.Client(base_url=self.url, timeout=30) as client:
            i = offset
            due = time.monotonic()
            while not self._stop.is_set():
                if self.rate:
                    due = max(due + 1 / self.rate, time.monotonic() - 1)  # never a burst to catch up
                    self._stop.wait(max(0.0, due - time.monotonic()))
                body = {"instances": [{"image_b64": self.images[i % len(self.images)]}]}
                i += 1
                started = time.monotonic()
                try:
                    response = client.post(f"/{endpoint}", json=body)
                except httpx.HTTPError as e:
                    mine.append(Outcome(endpoint, started, time.monotonic() - started, None, error=repr(e)))
                    continue
                outcome = Outcome(endpoint, started, time.monotonic() - started, response.status_code,
                                  response.headers.get("retry-after"))
                if response.status_code == 200 and len(response.json().get("predictions", ())) != 1:
                    outcome.error = "200 without one prediction"
                mine.append(outcome)
        with self._lock:
            self.outcomes.extend(mine)


@dataclass
class Report:
    """Everything one run saw; ``problems`` is empty when every check held."""

    lame_duck: bool
    workdir: Path | None = None  # haproxy's config and log, every replica's log
    outcomes: list[Outcome] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    update_window: tuple[float, float] = (0.0, 0.0)  # load start to the kill: no request may fail
    replacing: tuple[float, float] = (0.0, 0.0)  # the first new replica's start to the last old one's exit
    kill_window: tuple[float, float] = (0.0, 0.0)  # the kill -9 to the end of the load
    counts: list[dict] = field(default_factory=list)  # per slot: haproxy's view against the replica's
    retries: int = 0
    redispatches: int = 0
    update_failures: list[Outcome] = field(default_factory=list)  # anything but a 200 before the kill
    kill_failures: list[Outcome] = field(default_factory=list)  # after it, anything but a 200 or a retryable 503
    mismatches: list[str] = field(default_factory=list)  # haproxy's counts against the replicas' and the clients'
    problems: list[str] = field(default_factory=list)  # all of the above, and anything else that went wrong

    def during(self, window: tuple[float, float]) -> list[Outcome]:
        return [o for o in self.outcomes if window[0] <= o.started < window[1]]

    @staticmethod
    def statuses(outcomes: list[Outcome]) -> dict[str, int]:
        return dict(collections.Counter(str(o.status) if o.error is None else f"error {o.error[:60]}"
                                        for o in outcomes))

    @staticmethod
    def p99_ms(outcomes: list[Outcome]) -> float:
        latencies = sorted(o.elapsed for o in outcomes)
        return 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else 0.0

    def figures(self) -> dict:
        update, replacing, kill = (self.during(w) for w in (self.update_window, self.replacing, self.kill_window))
        return {
            "lame_duck": self.lame_duck, "requests": len(self.outcomes),
            "update_requests": len(update), "update_statuses": self.statuses(update),
            "replacing_requests": len(replacing), "replacing_s": self.replacing[1] - self.replacing[0],
            "replacing_p99_ms": {e: self.p99_ms([o for o in replacing if o.endpoint == e]) for e in CLIENT_ENDPOINTS},
            "kill_requests": len(kill), "kill_statuses": self.statuses(kill),
            "retries": self.retries, "redispatches": self.redispatches, "counts": self.counts,
            "problems": self.problems,
        }

    def summary(self) -> str:
        figures = self.figures()
        t0 = self.events[0][0] if self.events else 0.0
        lines = [
            f"lame duck (--drain-delay-s): {'on' if self.lame_duck else 'not available in this server'}",
            f"requests: {figures['requests']} in all, {figures['update_requests']} before the kill -9 "
            f"({figures['replacing_requests']} while replicas were replaced, {figures['replacing_s']:.1f} s), "
            f"{figures['kill_requests']} after it",
            f"rolling update: statuses {figures['update_statuses']}; while replacing, p99 "
            f"{figures['replacing_p99_ms']['predict']:.1f} ms (predict), "
            f"{figures['replacing_p99_ms']['explain']:.1f} ms (explain)",
            f"after the kill -9: statuses {figures['kill_statuses']}, "
            f"haproxy retried {self.retries} and redispatched {self.redispatches} requests",
            "per replica, haproxy's responses / the replica's own digitserve_requests_total (predict + explain):",
        ]
        for c in self.counts:
            ours = "not read" if c["replica"] is None else json.dumps(c["replica"], sort_keys=True)
            lines.append(f"  {c['slot']} {c['name']}: haproxy {json.dumps(c['haproxy'], sort_keys=True)}, "
                         f"replica {ours}")
        lines.append("events:")
        lines += [f"  {t - t0:6.2f} s  {text}" for t, text in self.events]
        failures = self.update_failures + self.kill_failures
        if failures:
            lines.append(f"failed requests ({len(failures)}; the first 10, by start):")
            lines += [f"  {o.started - t0:6.2f} s  {o.endpoint} {o.status or o.error} after {o.elapsed:.3f} s"
                      for o in sorted(failures, key=lambda o: o.started)[:10]]
        if self.workdir:
            lines.append(f"logs: {self.workdir}")
        lines.append("problems: " + ("none" if not self.problems else ""))
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def _kill_all(replicas: list[Replica]) -> None:
    for replica in replicas:
        replica.kill_group()


def _haproxy_counts(row: dict[str, str]) -> dict[str, int]:
    keys = {"2xx": "hrsp_2xx", "4xx": "hrsp_4xx", "5xx": "hrsp_5xx", "other": "hrsp_other"}
    return {k: int(row[v] or 0) for k, v in keys.items() if int(row[v] or 0)}


def _by_class(counts: collections.Counter[str]) -> dict[str, int]:
    classes: collections.Counter[str] = collections.Counter()
    for status, n in counts.items():
        classes[f"{status[0]}xx"] += n
    return {k: n for k, n in classes.items() if n}


def rolling_update(workdir: Path, replicas: int = 3, predict_clients: int = 6, explain_clients: int = 1,
                   rate: float = 50, steady_s: float = 2.0, root: Path = ROOT, drain_delay_s: float = 2.0) -> Report:
    """Run the whole exercise and check it; see the module docstring."""
    lame_duck = supports_drain_delay(root)
    args = ["--api-servers", "1", "--workers", "1", "--explain-workers", "1"]
    if lame_duck:
        args += ["--drain-delay-s", str(drain_delay_s)]
    report = Report(lame_duck=lame_duck, workdir=workdir)
    images = mnist_pngs()

    def note(text: str) -> None:
        report.events.append((time.monotonic(), text))

    with ExitStack() as stack:
        live: dict[str, Replica] = {}  # slot -> replica
        everyone: list[Replica] = []
        stack.callback(_kill_all, everyone)  # whatever happens, no replica outlives this
        haproxy = HAProxy(workdir, slots=2 * replicas)
        stack.callback(haproxy.stop)

        def start(name: str) -> Replica:
            replica = Replica(name, workdir, args, root)
            everyone.append(replica)
            return replica

        first = [start(f"old-{i + 1}") for i in range(replicas)]
        for replica in first:
            replica.wait_ready()
        haproxy.start()
        for slot, replica in zip(haproxy.slots, first):
            haproxy.admit(slot, replica.port)
            live[slot] = replica
        for slot in live:
            haproxy.wait_status(slot, up=True)
        haproxy.command("clear counters all")
        note(f"{replicas} replicas up behind haproxy; load starts")

        with Load(f"http://127.0.0.1:{haproxy.port}", images, predict_clients, explain_clients, rate) as load:
            load_started = time.monotonic()
            time.sleep(steady_s)
            update_started = time.monotonic()
            for i, (old_slot, new_slot) in enumerate(zip(haproxy.slots[:replicas], haproxy.slots[replicas:])):
                new = start(f"new-{i + 1}")
                ready_s = new.wait_ready()
                note(f"{new.name} ready after {ready_s:.1f} s; into rotation as {new_slot}")
                haproxy.admit(new_slot, new.port)
                haproxy.wait_status(new_slot, up=True)
                live[new_slot] = new
                old = live.pop(old_slot)
                note(f"{new_slot} UP in haproxy; SIGTERM {old.name}")
                old.terminate()
                haproxy.wait_status(old_slot, up=False)
                note(f"{old_slot} ({old.name}) DOWN in haproxy")
                try:
                    haproxy.wait_idle(old_slot)
                    old.final_counts = old.counts()
                except (httpx.HTTPError, TimeoutError) as e:
                    report.problems.append(f"{old.name}: could not read its /metrics once out of rotation ({e!r})")
                code = old.wait(timeout=120)
                haproxy.retire(old_slot)
                note(f"{old.name} exited with {code} after {time.monotonic() - old.started:.1f} s of life")
                if code != 0:
                    report.problems.append(f"{old.name} exited with {code}, not 0")
            report.replacing = (update_started, time.monotonic())
            time.sleep(steady_s)

            victim_slot = haproxy.slots[replicas]
            victim = live[victim_slot]
            killed = time.monotonic()
            report.update_window = (load_started, killed)
            report.kill_window = (killed, float("inf"))
            note(f"kill -9 of {victim.name}'s process group")
            victim.kill_group()
            victim.wait(timeout=10)
            haproxy.wait_status(victim_slot, up=False)
            note(f"{victim_slot} ({victim.name}) DOWN in haproxy")
            time.sleep(steady_s)
        note(f"load stopped: {len(load.outcomes)} requests")
        report.outcomes = sorted(load.outcomes, key=lambda o: o.started)

        stats = haproxy.stats()
        for replica in live.values():
            if replica is not victim:
                replica.final_counts = replica.counts()
        for slot, replica in zip(haproxy.slots, everyone):
            ours = None if replica.final_counts is None else _by_class(replica.final_counts)
            theirs = _haproxy_counts(stats[slot])
            report.counts.append({"slot": slot, "name": replica.name, "haproxy": theirs, "replica": ours})
            if replica is not victim and ours != theirs:
                report.mismatches.append(f"{slot} ({replica.name}): haproxy counted {theirs}, the replica {ours}")
        report.retries = sum(int(stats[s]["wretr"] or 0) for s in haproxy.slots)
        report.redispatches = sum(int(stats[s]["wredis"] or 0) for s in haproxy.slots)
        frontend = _haproxy_counts(stats["FRONTEND"])
        clients = _by_class(collections.Counter(str(o.status) for o in report.outcomes if o.status is not None))
        if frontend != clients:
            report.mismatches.append(f"haproxy's frontend counted {frontend}, the clients got {clients}")
    _check(report)
    return report


def _check(report: Report) -> None:
    """Zero failures during the update; after the kill only retryable 503s (or what haproxy retried)."""
    report.update_failures = [o for o in report.during(report.update_window) if o.status != 200 or o.error]
    report.kill_failures = [o for o in report.during(report.kill_window)
                            if o.error or not (o.status == 200 or (o.status == 503 and o.retry_after))]
    found = []
    if report.update_failures:
        found.append(f"{len(report.update_failures)} of {len(report.during(report.update_window))} requests failed "
                     f"during the rolling update: {Report.statuses(report.update_failures)}")
    if report.kill_failures:
        found.append(f"after the kill -9, {len(report.kill_failures)} requests failed other than a 503 with "
                     f"Retry-After: {Report.statuses(report.kill_failures)}")
    if not report.during(report.update_window) or not report.during(report.kill_window):
        found.append("no load during one of the phases")
    report.problems[:0] = found + report.mismatches


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m harness.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rolling-update", action="store_true", required=True,
                        help="replicas behind HAProxy, replaced one by one under load, then one kill -9")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=6, help="closed-loop /predict clients")
    parser.add_argument("--explain-clients", type=int, default=1, help="closed-loop /explain clients")
    parser.add_argument("--rate", type=float, default=50, help="requests a second per client (0: back to back)")
    parser.add_argument("--steady-s", type=float, default=2.0, help="load before, between and after the phases")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose server to run (another commit)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--keep-logs", type=Path, help="copy haproxy's and every replica's log and config here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="digitserve-cluster-") as tmp:
        report = rolling_update(Path(tmp), args.replicas, args.clients, args.explain_clients, args.rate,
                                args.steady_s, args.root.resolve())
        report.workdir = args.keep_logs
        if args.keep_logs:
            shutil.copytree(tmp, args.keep_logs, ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True)
    print(report.summary())
    if args.json:
        args.json.write_text(json.dumps(report.figures(), indent=2))
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
