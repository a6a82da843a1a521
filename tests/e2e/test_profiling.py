"""``make profile`` (bench/profile.py): a real server under wrk, sampled by py-spy, every process accounted for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.server import ROOT
from service.config import Settings


@pytest.mark.slow
def test_profile_samples_every_process_of_the_default_server(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "bench.profile", "--workload", "predict-1img@8", "--seconds", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "summary.json").read_text())
    assert result["req_s"] > 0 and result["errors"] == 0

    by_role: dict[str, list[dict]] = {}
    for process in result["processes"]:
        by_role.setdefault(process["role"], []).append(process)
    defaults = Settings()
    assert len(by_role["main"]) == 1
    assert len(by_role["api server"]) == defaults.api_servers
    assert len(by_role["worker"]) == defaults.workers + defaults.explain_workers

    for api_server in by_role["api server"]:  # both take connections, so both decode and answer
        assert api_server["cpu_ms_per_request"] > 0
        assert (tmp_path / f"{api_server['pid']}.folded").stat().st_size > 0
        assert "Native.__call__ (service/http/endpoints.py)" in dict(api_server["inclusive"])
    busiest = max(by_role["worker"], key=lambda p: p["samples"])
    assert "PredictAPI.compute (service/worker/stages.py)" in dict(busiest["inclusive"])
    assert busiest["core_share"] > 0 and busiest["cpu_ms_per_request"] > 0

    summary = (tmp_path / "summary.md").read_text()
    assert summary == done.stdout
    assert summary.count("## api server") == defaults.api_servers


@pytest.mark.slow
def test_pair_loads_two_commits_side_by_side_and_cleans_up():
    """``make pair``: HEAD against this tree (the same code here, or nearly), both answering, their ratio
    printed, and the temporary worktree gone afterwards."""
    done = subprocess.run([sys.executable, "-m", "bench.pair", "HEAD", ".", "--workload", "predict-1img@8",
                           "--rounds", "2", "--seconds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [line for line in done.stdout.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 and all("errors" not in line for line in rounds), done.stdout
    ratio = float(done.stdout.strip().splitlines()[-1].split("after/before ")[1].split("x")[0])
    assert 0.3 < ratio < 3, done.stdout  # both served: a server that failed would have made it 0 or fail the run
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert "digitserve-pair-" not in worktrees
