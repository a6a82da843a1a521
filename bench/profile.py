"""``make profile``: where a server's time goes under load, process by process.

Starts a fresh server (default configuration), drives one of the benchmark's workloads with wrk and,
meanwhile, samples every process of the server with py-spy and reads its CPU time from /proc. Per
process: its role, CPU per request, its share of a core and its hottest functions. The folded stacks
(one ``frame;frame;... count`` line per stack, for flamegraph.pl or speedscope) and a summary
(``summary.json``, ``summary.md``, also printed) go to ``--out``. This is how the README's profiles
were taken; it measures, it never passes or fails.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import procs
from bench.data import mnist_pngs, write_bodies
from bench.load import LoadSettings, drive, totals
from bench.run import EXPLAIN_METHODS, RESULTS, WORKLOADS

TOP = 20  # functions listed per process and kind (self, inclusive)
OURS = ("service/", "bench/baselines/")  # inclusive shares: only our code, the stages a change would touch


def summarise(stacks: str) -> dict:
    """Samples, the functions most often on top of the stack (self), and our functions most often anywhere
    in it (inclusive: where each stage's time goes, callees included).
    A function is ``name (file)``: the line numbers are dropped so that one function is one entry."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in stacks.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = [frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") else frame for frame in stack.split(";")]
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            if frame.rpartition(" (")[2].startswith(OURS):
                anywhere[frame] += int(count)

    def shares(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(TOP)]

    return {"samples": total, "self": shares(own), "inclusive": shares(anywhere)}


def profile(server_name: str, workload_name: str, seconds: float, rate: int, out: Path) -> dict:
    workload = next(w for w in WORKLOADS if w.name == workload_name)
    search_path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    py_spy = shutil.which("py-spy", path=search_path)
    if py_spy is None:
        raise SystemExit("py-spy is not installed: make venv (it is in the test extra), or pip install py-spy")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.folded"):  # an earlier run's processes: other pids, not this run's
        old.unlink()
    settings = LoadSettings(warmup_s=2, duration_s=seconds + 3, wrk_threads=1, wrk_timeout_s=10)
    with tempfile.TemporaryDirectory(prefix="digitserve-profile-") as work:
        bodies = write_bodies(Path(work), mnist_pngs(1000)[0], **EXPLAIN_METHODS)[workload.bodies]
        server, _ = procs.start(server_name, Path(work))
        try:
            drive(server, workload, bodies, settings.warmup_s, settings)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                load = pool.submit(drive, server, workload, bodies, settings.duration_s, settings)
                time.sleep(1)  # sample the steady state, not wrk's first connections
                pids = procs.roles(server)
                before, started = {pid: procs.cpu_ticks(pid) for pid in pids}, time.monotonic()
                spies = {pid: subprocess.Popen([py_spy, "record", "--format", "raw", "--nonblocking",
                                                "--rate", str(rate), "--duration", f"{seconds:g}", "--pid", str(pid),
                                                "--output", str(out / f"{pid}.folded")],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                         for pid in pids}
                complaints = {pid: spy.communicate()[1].decode(errors="replace") for pid, spy in spies.items()}
                window = time.monotonic() - started
                after = {pid: procs.cpu_ticks(pid) for pid in pids}
                raw = load.result()
        finally:
            procs.stop(server, grace_s=15)
    req_s, errors = totals(raw)
    tick = os.sysconf("SC_CLK_TCK")
    processes = []
    for pid, kind in pids.items():
        cpu_s = (after[pid] - before[pid]) / tick
        stacks = folded.read_text() if (folded := out / f"{pid}.folded").exists() else ""
        sampled = summarise(stacks) if stacks else {"samples": 0, "self": [], "inclusive": [],
                                                    "error": complaints[pid].strip()[-500:]}
        processes.append({"pid": pid, "role": kind, "core_share": cpu_s / window,
                          "cpu_ms_per_request": 1000 * cpu_s / (req_s * window), **sampled})
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "server": server_name,
            "workload": workload_name, "seconds": seconds, "rate_hz": rate, "req_s": req_s,
            "images_s": req_s * workload.images_per_request, "p99_ms": raw["latency_p99_us"] / 1000,
            "errors": errors, "processes": processes}


def markdown(result: dict) -> str:
    lines = [f"{result['server']} under {result['workload']}: {result['req_s']:,.0f} req/s "
             f"({result['images_s']:,.0f} images/s), p99 {result['p99_ms']:.1f} ms, {result['errors']} errors; "
             f"py-spy at {result['rate_hz']} Hz for {result['seconds']:g} s", ""]
    for p in sorted(result["processes"], key=lambda p: -p["core_share"]):
        lines.append(f"## {p['role']} (pid {p['pid']}): {100 * p['core_share']:.0f}% of a core, "
                     f"{p['cpu_ms_per_request']:.3f} ms of CPU per request, {p['samples']} samples")
        if p.get("error"):
            lines.append(f"py-spy: {p['error']}")
        for kind in ("self", "inclusive"):
            if p[kind]:
                lines.append(f"{kind}: " + "; ".join(f"{share:g}% {name}" for name, share in p[kind]))
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="predict-32img@8", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--server", default="digitserve", choices=list(procs.SERVERS))
    parser.add_argument("--seconds", type=float, default=10, help="how long py-spy samples (default 10)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument("--out", type=Path, help="default bench/results/profile-<date>-<server>-<workload>/")
    args = parser.parse_args()
    out = args.out or RESULTS / f"profile-{datetime.date.today().isoformat()}-{args.server}-{args.workload}"
    try:
        result = profile(args.server, args.workload, args.seconds, args.rate, out)
    finally:
        procs.stop_all()
    (out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
