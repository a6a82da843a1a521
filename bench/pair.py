"""``make pair``: two commits of digitserve loaded side by side, the fairest before/after on a shared machine.

    python -m bench.pair 2875244 HEAD --workload predict-1img@64

Sequential runs (``BENCH_BEFORE``) compare servers seconds apart, and on a shared VM the machine
changes in between: rounds of the same code drift by 10% and more. Here both servers run at once,
pinned to the same CPUs (``--server-cpus``), each loaded by its own wrk (or gRPC generator) pinned
elsewhere (``--load-cpus``): whatever else the machine does slows both alike, and the scheduler gives
their processes equal shares, so the ratio of their throughputs is the ratio of their costs per
request. Each runs from a temporary worktree of its commit with its committed default model and
default settings. It measures; it never passes or fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

from bench import procs
from bench.data import mnist_pngs, write_bodies
from bench.load import LoadSettings, drive, totals
from bench.run import EXPLAIN_METHODS, WORKLOADS
from harness.server import ROOT


def cpu_list(text: str) -> set[int]:
    """``0`` or ``0,2`` or ``0-3`` -> CPU numbers (argparse's ``type``)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pair(before: str, after: str, workload_name: str, rounds: int, seconds: float, server_cpus: set[int],
         load_cpus: set[int]) -> list[tuple[float, float]]:
    """Each round's (before, after) requests a second, both loaded at once."""
    workload = next(w for w in WORKLOADS if w.name == workload_name)
    os.sched_setaffinity(0, load_cpus)  # the load generators are this process's children
    settings = LoadSettings(warmup_s=2, duration_s=seconds, wrk_threads=1, wrk_timeout_s=10)
    with tempfile.TemporaryDirectory(prefix="digitserve-pair-") as temp, contextlib.ExitStack() as trees:
        work = Path(temp)
        # ``.``: this working tree as it is, not a checkout
        paths = [ROOT if commit == "." else trees.enter_context(procs.checkout(commit, work / f"tree-{i}"))
                 for i, commit in enumerate((before, after))]
        bodies = write_bodies(work, mnist_pngs(1000)[0], **EXPLAIN_METHODS)[workload.bodies]
        names = ["before", "after"]
        for name, tree in zip(names, paths, strict=True):
            procs.add_tree(name, tree)
        servers = [procs.start(name, work, cpus=server_cpus)[0] for name in names]
        rates = []
        with contextlib.ExitStack() as stack, concurrent.futures.ThreadPoolExecutor(len(servers)) as pool:
            for server in servers:  # stopped before their worktrees go
                stack.callback(procs.stop, server)
            list(pool.map(lambda server: drive(server, workload, bodies, settings.warmup_s, settings), servers))
            for number in range(rounds):
                raw = list(pool.map(lambda server: drive(server, workload, bodies, seconds, settings), servers))
                (was, now), errors = [totals(r)[0] for r in raw], sum(totals(r)[1] for r in raw)
                rates.append((was, now))
                print(f"round {number + 1}: before {was:,.0f} req/s, after {now:,.0f} req/s: {now / was:.3f}x"
                      + (f" ({errors} errors)" if errors else ""), flush=True)
        return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", help="a commit")
    parser.add_argument("after", nargs="?", default=".", help="a commit, or . for this working tree (the default)")
    parser.add_argument("--workload", default="predict-1img@64", choices=[w.name for w in WORKLOADS])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6, help="each round's length (default 6)")
    parser.add_argument("--server-cpus", type=cpu_list, default={0}, help="the CPUs both servers share (default 0)")
    parser.add_argument("--load-cpus", type=cpu_list, default={1 if (os.cpu_count() or 1) > 1 else 0},
                        help="the load generators' CPUs (default 1, or 0 on a one-CPU machine)")
    args = parser.parse_args()
    try:
        rates = pair(args.before, args.after, args.workload, args.rounds, args.seconds, args.server_cpus,
                     args.load_cpus)
    finally:
        procs.stop_all()
    ratios = [now / was for was, now in rates]
    print(f"{args.workload}: after/before {statistics.median(ratios):.3f}x (median of {len(ratios)} rounds, "
          f"{min(ratios):.3f}-{max(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
