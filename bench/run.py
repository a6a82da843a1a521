"""``make bench``: digitserve (default configuration) against the LitServe-README baseline, under wrk.

Each round starts the servers fresh, one after the other (the order flips every round), timing each
cold start, then runs every workload on one server and at once on the others (warm-up, then measured,
PSS of each process tree sampled and its CPU time read meanwhile), and stops them. Besides the baseline,
the ceiling (bench/ceiling.py: uvicorn answering a fixed /predict answer, no model) runs predict-1img@64,
and digitserve alone runs predict-1img@64 while it switches between two versions every 2 s (the
admin API; version 2 is version 1's weights written again through the store), while version 2 shadows
every served request (``POST /admin/shadow``, share 1.0), and the Open Inference
Protocol workloads: V2 REST (binary FP32 pixels and BYTES PNGs, under wrk) and gRPC (FP32 raw contents,
ModelInfer, under bench/grpcload.py; the ceiling runs grpc-fp32-1img@64 too), whose every body is sent once
first and its answer checked (tritonclient's parsers, labels against MNIST's).
Medians over rounds, the issue's targets (PASS/FAIL; the benchmark never fails the build) and a Markdown
table go to stdout and bench/results/<date>.md, progress to stderr, everything raw to bench/results/<date>.json
and a plot to bench/results/<date>.png (``<date>-quick.*`` for a smoke run).

Environment: BENCH_QUICK=1 (a ~3 min smoke run), BENCH_ROUNDS (3), BENCH_WARMUP_S (3),
BENCH_DURATION_S (10), BENCH_WRK_THREADS (1), BENCH_WRK_TIMEOUT_S (10), BENCH_IMAGES (1000),
BENCH_MICRO_S (2), BENCH_GRPC_PROCESSES (2: bench/grpcload.py's processes; BENCH_WRK_TIMEOUT_S is its calls'
deadline), DIGITSERVE_DATA_DIR (MNIST; default ../shared/datasets), BENCH_BEFORE (a commit: digitserve as it
was there runs every digitserve workload too, seconds apart from today's, from a temporary git worktree with
this venv; the report gives today/before by workload), BENCH_WORKLOADS
(comma-separated names: only those; results then go to <date>-some.*), BENCH_RUNTIMES (eager,export: with
export, digitserve-export, the same server with ``--runtime export`` serving the store's versions
AOTInductor-compiled, runs RUNTIME_WORKLOADS too, and the micro ceilings are taken for each runtime),
BENCH_TRACES (comma-separated shares of calls recorded, e.g. ``1,0.01``: for each, digitserve-traces-<share>,
the same server exporting the spans of that share of its calls to a receiver that discards them,
``harness.otlp`` in a process of its own, runs RUNTIME_WORKLOADS too: traces on against off).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import litserve
import torch

from bench import procs, report
from bench.data import data_dir, mnist_pngs, write_bodies
from bench.grpcload import MODEL_INFER
from bench.load import LoadSettings, Workload, measure, verify_grpc, verify_v2
from harness.server import ROOT, Server, free_port, metric_samples
from service.model import static, store
from service.work import METHODS

RESULTS = ROOT / "bench" / "results"
# every explanation method; integrated gradients with the 32 steps of its goal
EXPLAIN_METHODS = {m: {"method": m, **({"steps": 32} if m == "integrated_gradients" else {})} for m in METHODS}
V2_INFER = "/v2/models/mnist-fnn/infer"
MODEL = "mnist-fnn"
ONLY = set(filter(None, os.environ.get("BENCH_WORKLOADS", "").split(",")))  # empty: every workload
RUNTIMES = [r for r in os.environ.get("BENCH_RUNTIMES", "eager,export").split(",") if r and r != "eager"]
RUNTIME_WORKLOADS = ("predict-1img@64", "v2-fp32-1img@64", "predict-32img@8", "v2-fp32-32img@8")
TRACES = [share for share in os.environ.get("BENCH_TRACES", "").split(",") if share]
ADMIN_KEY = "bench-" + os.urandom(8).hex()
DS = ("digitserve",)
# Run in this order, so that each V2 workload runs seconds after the /predict one it is compared with, and each
# gRPC one seconds after its V2 REST twin.
WORKLOADS = [
    *(Workload(f"predict-1img@{c}", "/predict", "single", c) for c in (1, 8)),
    Workload("predict-1img@64", "/predict", "single", 64, servers=("digitserve", "baseline", "ceiling")),
    Workload("predict-1img@64-switching", "/predict", "single", 64, servers=DS, switch_every_s=2.0),
    Workload("predict-1img@64-shadow", "/predict", "single", 64, servers=DS, shadow_share=1.0),
    Workload("v2-fp32-1img@64", V2_INFER, "v2-fp32-single", 64, servers=DS),
    Workload("grpc-fp32-1img@64", MODEL_INFER, "grpc-fp32-single", 64, servers=("digitserve", "ceiling")),
    Workload("v2-png-1img@64", V2_INFER, "v2-png-single", 64, servers=DS),
    Workload("predict-1img@128", "/predict", "single", 128),
    Workload("predict-32img@8", "/predict", "batch", 8, images_per_request=32),
    Workload("v2-fp32-32img@8", V2_INFER, "v2-fp32-batch", 8, images_per_request=32, servers=DS),
    Workload("grpc-fp32-32img@8", MODEL_INFER, "grpc-fp32-batch", 8, images_per_request=32, servers=DS),
    Workload("v2-png-32img@8", V2_INFER, "v2-png-batch", 8, images_per_request=32, servers=DS),
    *(Workload(f"explain-{m}@1", "/explain", m, 1, servers=DS) for m in EXPLAIN_METHODS),
]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def env_number(name: str, default: float, quick: float) -> float:
    return float(os.environ.get(name) or (quick if os.environ.get("BENCH_QUICK") == "1" else default))


def machine_info() -> dict:
    def command(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()

    def field(name: str) -> str:
        return next((row.split(":", 1)[1].strip() for row in cpuinfo if row.startswith(name)), "")

    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": field("model name"),
        # Absolute figures move with the VM: the same code ran 2.7x faster on an AVX-512 Xeon than on
        # an AVX2 EPYC (2026-11-30 against 2026-11-28). The vector extensions say which kind ran.
        "cpu_simd": [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_tile") if f in field("flags").split()],
        "mem_total_kb": int(Path("/proc/meminfo").read_text().split()[1]),
        "load_average_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "litserve": litserve.__version__,
        "wrk": (command("wrk", "--version").splitlines() or [""])[0],
        "git_commit": command("git", "rev-parse", "HEAD"),
        "git_dirty": bool(command("git", "status", "--porcelain", "--untracked-files=no")),
    }


def two_versions(root: Path, static_graph: bool) -> Path:
    """The committed store's version 1, and its weights again as version 2 (through the store's own write);
    with ``static_graph``, version 1's compiled once (``python -m service.export``) and copied to version 2."""
    shutil.copytree(ROOT / "model_store" / MODEL / "1", root / MODEL / "1")
    base = store.load(root, MODEL, 1)
    metadata = {k: v for k, v in base.metadata.model_dump().items() if k not in ("name", "version", "sha256")}
    if static_graph:
        log("compiling version 1's static graph (python -m service.export) ...")
        subprocess.run([sys.executable, "-m", "service.export", "--store", str(root), "--version", "1",
                        "--data-dir", str(data_dir())], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        metadata["export"] = store.read_metadata(root / MODEL / "1").model_dump()["export"]
    v2 = store.write_version(root, MODEL, base.model.state_dict(), metadata)
    for name in (static.ARTIFACT_FILE, static.PARITY_FILE) if static_graph else ():
        shutil.copy(root / MODEL / "1" / name, v2 / name)
    return root


@contextlib.contextmanager
def switching(server: Server, every_s: float) -> Iterator[dict]:
    """Versions 1 and 2 loaded and 1 served, then 2 and 1 in turn every ``every_s`` while the block runs;
    yields the count of switches made and of admin calls that failed (the last failure's answer too)."""
    done, counts = threading.Event(), {"switches": 0, "failed": 0}
    with httpx.Client(base_url=server.url, headers={"X-Admin-Key": ADMIN_KEY}, timeout=30) as admin:
        for path, body in (("/admin/versions/1/load", None), ("/admin/versions/2/load", None),
                           ("/admin/serve", {"version": 1})):
            if (answer := admin.post(path, json=body)).status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")

        def switch() -> None:
            version = 2
            while not done.wait(every_s):
                answer = admin.post("/admin/serve", json={"version": version})
                if answer.status_code == 200 and answer.json().get("serving") == version:
                    counts["switches"] += 1
                else:
                    counts["failed"] += 1
                    counts["last_failure"] = f"{answer.status_code} {answer.text[:300]}"
                version = 3 - version

        thread = threading.Thread(target=switch, daemon=True)
        thread.start()
        try:
            yield counts
        finally:
            done.set()
            thread.join()
            admin.post("/admin/serve", json={"version": 1})


@contextlib.contextmanager
def shadowing(server: Server, share: float) -> Iterator[dict]:
    """Version 2 loaded and shadowing ``share`` of what version 1 serves while the block runs; yields the
    shadow comparisons made and the shadow work dropped in that time (from /metrics)."""
    counts: dict = {}
    with httpx.Client(base_url=server.url, headers={"X-Admin-Key": ADMIN_KEY}, timeout=30) as admin:
        for path, body in (("/admin/versions/1/load", None), ("/admin/versions/2/load", None),
                           ("/admin/serve", {"version": 1}), ("/admin/shadow", {"version": 2, "share": share})):
            if (answer := admin.post(path, json=body)).status_code != 200:
                raise RuntimeError(f"{path}: {answer.status_code} {answer.text[:300]}")
        first = _shadow_counts(admin)
        try:
            yield counts
        finally:
            time.sleep(0.5)  # the last shadow work answered
            last = _shadow_counts(admin)
            counts.update(shadowed=last[0] - first[0], shadow_dropped=last[1] - first[1])
            admin.post("/admin/shadow", json={"version": None})
            admin.post("/admin/versions/2/unload")


def _shadow_counts(client: httpx.Client) -> tuple[float, float]:
    """digitserve_shadow_total and digitserve_shadow_dropped_total, summed over their labels."""
    text = client.get("/metrics").text
    return (sum(metric_samples(text, "digitserve_shadow_total").values()),
            sum(metric_samples(text, "digitserve_shadow_dropped_total").values()))


@contextlib.contextmanager
def trace_receiver() -> Iterator[str | None]:
    """With ``BENCH_TRACES``, an OTLP/HTTP receiver that discards what it is sent, in a process of its own
    while the block runs; its endpoint (None without)."""
    if not TRACES:
        yield None
        return
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-m", "harness.otlp", "--port", str(port)], cwd=ROOT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        receiver.terminate()
        receiver.wait()


@contextlib.contextmanager
def before_tree(commit: str | None, work: Path, traces: str | None) -> Iterator[list[Workload]]:
    """The workloads to run: RUNTIME_WORKLOADS on each ``BENCH_RUNTIMES`` server too, and on each traced one
    (a ``BENCH_TRACES`` share, exporting to ``traces``); with ``commit``, every digitserve one on "before"
    (that commit) as well."""
    chosen = [w for w in WORKLOADS if not ONLY or w.name in ONLY]
    added = [procs.add_runtime(runtime) for runtime in RUNTIMES]
    added += [procs.add_variant(f"digitserve-traces-{share}", {
        "OTEL_EXPORTER_OTLP_ENDPOINT": traces, "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": share}) for share in TRACES if traces is not None]
    chosen = [dataclasses.replace(w, servers=(*w.servers, *added)) if w.name in RUNTIME_WORKLOADS else w
              for w in chosen]
    if not commit:
        yield chosen
        return
    with procs.checkout(commit, work / "before") as tree:
        procs.add_tree("before", tree)
        # not the switching and shadow workloads: an older commit may have no admin API or no shadow
        yield [dataclasses.replace(w, servers=(*w.servers, "before"))
               if "digitserve" in w.servers and not (w.switch_every_s or w.shadow_share) else w for w in chosen]


def bench_round(order: list[str], workloads: list[Workload], files: dict[str, Path], labels: list[int],
                log_dir: Path, s: LoadSettings) -> dict:
    """Every server started fresh (each cold start timed), then every workload on each in turn, back to back.
    This machine's speed drifts over minutes; a workload's runs are then seconds apart, not the
    minutes one server's whole set takes, so the drift moves them alike. A failure is recorded, never raised."""
    results: dict[str, dict] = {name: {"workloads": {}} for name in order}
    live: dict[str, Server] = {}
    try:
        for name in order:
            with _recorded_failure(name, results[name], live):
                _start(name, files, labels[0], log_dir, results[name], live)
        for w in workloads:
            for name in order:
                if name in w.servers and name in live:
                    with _recorded_failure(name, results[name], live):
                        _measure(name, w, files, labels, s, results[name], live)
    finally:
        for name, server in live.items():
            stopping = time.monotonic()
            procs.stop(server, grace_s=15)
            results[name]["stop_s"] = time.monotonic() - stopping
            results[name]["exit_code"] = server.process.returncode
            log(f"  {name}: stopped {results[name]['stop_s']:.1f} s after SIGTERM, "
                f"exit code {results[name]['exit_code']}")
    return results


@contextlib.contextmanager
def _recorded_failure(name: str, result: dict, live: dict[str, Server]) -> Iterator[None]:
    """A step that failed is recorded, not raised; its server is stopped and measured no further."""
    try:
        yield
    except (procs.ServerDied, RuntimeError, httpx.HTTPError, subprocess.TimeoutExpired) as e:
        result["error"] = str(e)[-4000:]
        log(f"  {name}: FAILED: {result['error']}")
        if (server := live.pop(name, None)) is not None:
            procs.stop(server, grace_s=15)
            result["exit_code"] = server.process.returncode


def _start(name: str, files: dict[str, Path], first_label: int, log_dir: Path, result: dict,
           live: dict[str, Server]) -> None:
    server, result["cold_start_s"] = procs.start(name, log_dir)
    live[name] = server
    log(f"  {name}: healthy after {result['cold_start_s']:.1f} s (pid {server.process.pid}, port {server.port})")
    body = files["single"].read_text().split("\n", 1)[0]
    answer = httpx.post(f"{server.url}/predict", content=body, headers={"content-type": "application/json"}, timeout=30)
    result["sanity"] = {"status": answer.status_code, "label_ok": answer.status_code == 200
                        and answer.json()["predictions"][0]["label"] == first_label}
    if name == "ceiling":
        result["sanity"]["fixed_answer"] = True  # the same answer whatever it is sent: its label proves nothing
    if not result["sanity"]["label_ok"]:
        log(f"  {name}: WARNING: first digit answered {answer.status_code} {answer.text[:200]}")


def _measure(name: str, w: Workload, files: dict[str, Path], labels: list[int], s: LoadSettings, result: dict,
             live: dict[str, Server]) -> None:
    server = live[name]
    if (w.path.startswith("/v2/") or w.grpc) and name != "ceiling":  # the ceiling answers a fixed answer
        if w.grpc:
            checked = verify_grpc(server.grpc or "", files[w.bodies], labels, timeout=s.wrk_timeout_s + 30)
        else:
            checked = verify_v2(server.port, w.path, files[w.bodies], labels, timeout=s.wrk_timeout_s + 30)
        result.setdefault("verified", {})[w.name] = checked
        if not checked["ok"]:
            log(f"  {name} {w.name}: NOT MEASURED, wrong answers: {'; '.join(checked['problems'])}")
            return
        log(f"  {name} {w.name}: {checked['bodies']} bodies checked, labels right for {checked['accuracy']:.1%}")
    around = (switching(server, w.switch_every_s) if w.switch_every_s else
              shadowing(server, w.shadow_share) if w.shadow_share else contextlib.nullcontext({}))
    with around as counted:
        m = result["workloads"][w.name] = measure(server, name, w, files[w.bodies], s)
    m.update(counted)
    if m["stalled"]:
        log(f"  {name} {w.name}: STALLED: not one answer in {s.duration_s:g} s "
            f"(/health afterwards: {'200' if m['healthy_after'] else 'not 200'})")
    else:
        log(f"  {name} {w.name}: {m['req_s']:,.0f} req/s, p50 {m['p50_ms']:.1f} ms, "
            f"p99 {m['p99_ms']:.1f} ms, {m['errors']} errors, CPU {m['cpu_ms_per_req']:.3f} ms/req "
            f"({m['cpu_cores']:.2f} cores), PSS {m['pss_mb']:,.0f} MB")


def main() -> int:
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM also takes the cleanup path
    quick = os.environ.get("BENCH_QUICK") == "1"
    s = LoadSettings(warmup_s=env_number("BENCH_WARMUP_S", 3, 1), duration_s=env_number("BENCH_DURATION_S", 10, 2),
                     wrk_threads=int(env_number("BENCH_WRK_THREADS", 1, 1)),
                     wrk_timeout_s=env_number("BENCH_WRK_TIMEOUT_S", 10, 10),
                     grpc_processes=int(env_number("BENCH_GRPC_PROCESSES", 2, 2)))
    n_rounds, n_images = int(env_number("BENCH_ROUNDS", 3, 3)), int(env_number("BENCH_IMAGES", 1000, 1000))
    started = time.monotonic()
    results: dict = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "quick": quick,
                     "settings": {**s.__dict__, "rounds": n_rounds, "images": n_images}, "machine": machine_info()}
    before = os.environ.get("BENCH_BEFORE")
    with tempfile.TemporaryDirectory(prefix="digitserve-bench-") as work, trace_receiver() as traces, \
            before_tree(before, Path(work), traces) as workloads:
        if before:
            results["machine"]["before_commit"] = subprocess.run(["git", "rev-parse", before], cwd=ROOT, text=True,
                                                                 capture_output=True).stdout.strip()
        procs.use_store(two_versions(Path(work) / "store", "export" in RUNTIMES), ADMIN_KEY)
        pngs, labels = mnist_pngs(n_images)
        files = write_bodies(Path(work), pngs, **EXPLAIN_METHODS)
        log(f"micro-benchmarks (1 core) over {n_images} MNIST test PNGs ...")
        micro = subprocess.run([sys.executable, "-m", "bench.micro", "--images", str(n_images),
                                "--seconds", str(env_number("BENCH_MICRO_S", 2, 1)),
                                "--store", str(Path(work) / "store"), "--runtimes", "eager", *RUNTIMES],
                               capture_output=True, text=True)
        results["micro"] = json.loads(micro.stdout) if micro.returncode == 0 else {}
        if micro.returncode != 0:
            log(f"  micro-benchmarks failed: {micro.stderr[-2000:]}")
        results["rounds"] = []
        try:
            for r in range(n_rounds):
                order = list(procs.SERVERS)[:: 1 if r % 2 == 0 else -1]
                log(f"round {r + 1}/{n_rounds}: {' then '.join(order)}")
                servers = bench_round(order, workloads, files, labels, Path(work), s)
                results["rounds"].append({"round": r + 1, "servers": servers})
        finally:
            procs.stop_all()
    results["medians"] = med = report.medians(results["rounds"], workloads)
    results["targets"] = checks = report.targets(med, results["rounds"])
    results["machine"]["load_average_end"] = os.getloadavg()
    results["elapsed_s"] = time.monotonic() - started

    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / (datetime.date.today().isoformat() + ("-quick" if quick else "") + ("-some" if ONLY else ""))
    tmp = stem.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(tmp, stem.with_suffix(".json"))
    report.plot(med, workloads, stem.with_suffix(".png"))
    table = report.markdown(med, workloads, checks, results["micro"], results["machine"])
    stem.with_suffix(".md").write_text(table + "\n")
    log(f"wrote {stem}.{{json,md,png}} ({results['elapsed_s']:.0f} s)")
    print(table)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every server started was stopped")
        sys.exit(130)
