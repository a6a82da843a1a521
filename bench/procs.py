"""Start the servers under test in their own sessions, time their cold start, measure their
memory (PSS of the whole process tree) and make sure none of them outlives the benchmark."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from harness.server import ROOT, Server, free_port

# server name -> the module ``python -m`` runs; each gets only ``--port`` (and a gRPC port), so each runs its
# defaults. The ceiling is no model server: the HTTP (and gRPC) stack alone, answering a fixed /predict answer
# (bench/ceiling.py).
SERVERS = {"digitserve": "service", "baseline": "bench.baselines.litserve_readme", "ceiling": "bench.ceiling"}
# server name -> the source tree it runs from, where not this one (``BENCH_BEFORE``: an earlier commit)
TREES: dict[str, Path] = {}
# server name -> the settings it runs with besides the defaults (``BENCH_RUNTIMES``: digitserve-export;
# ``BENCH_TRACES``: digitserve-traces)
SETTINGS: dict[str, dict[str, str]] = {}
_live: set[Server] = set()


# digitserve's store and admin key in the benchmark (``use_store``): two versions, so that a workload can
# switch between them; the store is the committed one plus a second version, the key a random one
_digitserve: dict[str, str] = {}


def use_store(store: Path, admin_key: str) -> None:
    _digitserve.update(DIGITSERVE_STORE=str(store), DIGITSERVE_ADMIN_KEY=admin_key)


def add_tree(name: str, tree: Path) -> None:
    """One more digitserve, run from ``tree`` (a checkout of another commit) with this venv."""
    SERVERS[name], TREES[name] = "service", tree


@contextlib.contextmanager
def checkout(commit: str, tree: Path) -> Iterator[Path]:
    """A detached git worktree of ``commit`` at ``tree`` (a server of another commit runs from it:
    ``add_tree``), removed afterwards."""
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), commit], cwd=ROOT, check=True)
    try:
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)


def add_variant(name: str, settings: dict[str, str]) -> str:
    """One more digitserve, this tree with ``settings`` (environment variables) added; its name."""
    SERVERS[name], SETTINGS[name] = "service", settings
    return name


def add_runtime(runtime: str) -> str:
    """One more digitserve, this tree with ``--runtime runtime``; its name."""
    return add_variant(f"digitserve-{runtime}", {"DIGITSERVE_RUNTIME": runtime})


class ServerDied(RuntimeError):
    """A server under test exited while it was being measured."""


def start(name: str, log_dir: Path, ready_timeout: float = 180, cpus: set[int] | None = None
          ) -> tuple[Server, float]:
    """Start a fresh server on a free port; return it and its cold start (process start to /health 200, s).
    With ``cpus``, the server and every process it starts run on those CPUs only (``bench.pair``).
    The environment carries no ``DIGITSERVE_*`` setting but the store and the admin key (``use_store``), and
    no ``OTEL_*`` one, so digitserve runs its default configuration, traces off (and a variant's settings,
    for ``add_variant``'s), and a free gRPC port of its own: with the default (8001) every digitserve of a
    run would share one, through SO_REUSEPORT."""
    port = free_port()
    log = log_dir / f"{name}-{port}.log"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIGITSERVE_", "OTEL_")) or k == "DIGITSERVE_DATA_DIR"}
    args = ["--port", str(port)]
    grpc_port = None
    if SERVERS[name] == "service":
        grpc_port = free_port()
        env.update(_digitserve, **SETTINGS.get(name, {}), DIGITSERVE_GRPC_PORT=str(grpc_port))
    elif SERVERS[name] == "bench.ceiling":
        grpc_port = free_port()
        args += ["--grpc-port", str(grpc_port)]
    tree = TREES.get(name, ROOT)
    if name in TREES:  # its ``service`` package, ahead of the venv's editable install of this tree
        env["PYTHONPATH"] = str(tree)
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", SERVERS[name], *args], cwd=tree, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus))
    server = Server(process, port, log, grpc_port)
    _live.add(server)
    while not healthy(port):
        exited = process.poll() is not None
        if exited or time.monotonic() - started > ready_timeout:
            problem = f"exited with {process.returncode}" if exited else f"not healthy after {ready_timeout:g} s"
            stop(server, grace_s=5)
            raise ServerDied(f"{name} {problem}:\n{_tail(server)}")
        time.sleep(0.05)
    return server, time.monotonic() - started


def healthy(port: int) -> bool:
    """GET /health == 200, with http.client: cheap enough to poll often without slowing the start it times
    (an ``httpx.get`` builds an SSL context each call, ~0.1 s of CPU)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        connection.request("GET", "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def _tail(server: Server, lines: int = 30) -> str:
    """The end of the server's log, without per-request lines (uvicorn's access log, digitserve's request log)."""
    kept = [line for line in server.output().splitlines() if '"POST /' not in line and '"request_id"' not in line]
    return "\n".join(kept[-lines:])


def check_alive(server: Server, name: str) -> None:
    if server.process.poll() is not None:
        raise ServerDied(f"{name} exited with {server.process.returncode}:\n{_tail(server)}")


def stop(server: Server, grace_s: float = 30) -> None:
    """SIGTERM, a bounded wait, SIGKILL to the whole process group (tests.server.Server.stop), and wait
    until the group is gone, so the next server starts on a quiet machine."""
    server.stop(timeout=grace_s)
    _live.discard(server)
    deadline = time.monotonic() + 10
    while any(pgrp == server.process.pid and state != "Z" for _, _, pgrp, state in _stats()):
        if time.monotonic() > deadline:
            raise ServerDied(f"processes of group {server.process.pid} survived SIGKILL")
        time.sleep(0.05)


def stop_all() -> None:
    """Cleanup after an interruption: short grace, then SIGKILL."""
    for server in list(_live):
        stop(server, grace_s=5)


def _stat_fields(stat: Path) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses): field 3 onwards."""
    return stat.read_text().rsplit(")", 1)[1].split()


def _stats() -> Iterator[tuple[int, int, int, str]]:
    """(pid, parent pid, process group, state) of every process, from /proc/<pid>/stat."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent, pgrp = _stat_fields(stat)[:3]
        except (OSError, ValueError):
            continue  # gone meanwhile
        yield int(stat.parent.name), int(parent), int(pgrp), state


def cpu_ticks(pid: int) -> int:
    """User + system time of ``pid`` in clock ticks (/proc/<pid>/stat fields 14 and 15)."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return int(fields[11]) + int(fields[12])


def tree_cpu_ticks(pid: int) -> int:
    """User + system time of ``pid`` and all its descendants, in clock ticks: each live process's own time
    (/proc/<pid>/stat fields 14, 15) plus that of its children that exited and were reaped (16, 17)."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = _stat_fields(Path(f"/proc/{p}/stat"))
        except OSError:
            continue  # gone meanwhile
        total += sum(int(v) for v in fields[11:15])
    return total


def roles(server: Server) -> dict[int, str]:
    """Each live process of the server's tree by what it does: main, api server (digitserve logs their pids
    once they are forked; a plain uvicorn, bench.ceiling, each one's at its start), worker (LitServe spawns
    them), manager (forked like the API servers, but not one), resource tracker."""
    pid_lists = re.findall(r"API servers started \(pids ([\d, ]+)\)|Started server process \[(\d+)\]",
                           server.output())
    api_servers = {int(pid) for found in pid_lists for pid in ", ".join(filter(None, found)).split(", ")}
    main, main_command = server.process.pid, b""
    named = {}
    for pid in process_tree(main):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile
        if pid == main:
            named[pid], main_command = "main", command
        elif pid in api_servers:
            named[pid] = "api server"
        elif b"multiprocessing.resource_tracker" in command:
            named[pid] = "resource tracker"
        elif b"multiprocessing.spawn" in command:
            named[pid] = "worker"
        elif command == main_command:
            named[pid] = "manager"
        else:
            named[pid] = command.replace(b"\0", b" ").decode(errors="replace")[:50]
    return named


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from the parent ids in /proc."""
    children: dict[int, list[int]] = defaultdict(list)
    for child, parent, _, _ in _stats():
        children[parent].append(child)
    tree = [pid]
    for p in tree:
        tree.extend(children[p])
    return tree


def pss_bytes(pid: int) -> int:
    """Proportional set size of the whole tree: shared pages are counted once in all, not per process."""
    total = 0
    for p in process_tree(pid):
        try:
            rollup = Path(f"/proc/{p}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:"))
    return total


class PssSampler:
    """Samples the tree's PSS every ``interval`` seconds in a thread while in the ``with`` block; ``peak`` in bytes."""

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, pss_bytes(self.pid))

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
