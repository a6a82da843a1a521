"""A rolling update behind a real load balancer, for real (harness/cluster.py, issue 22).

Three replicas behind HAProxy from Debian, health-checked on /health every 250 ms, under constant /predict and
/explain load with real MNIST digits; each replica replaced in turn the way a Kubernetes rolling update does it,
then one killed with kill -9. Without the server's lame-duck phase (``--drain-delay-s``) a SIGTERMed replica
refuses work the load balancer still sends it until its next health check, and the first test fails.
"""

from __future__ import annotations

import shutil

import pytest

from harness.cluster import Report, rolling_update

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Report:
    assert shutil.which("haproxy"), "haproxy is missing: bash .ci/system-deps.sh installs it"
    # Paced clients (4 x 25 /predict and 25 /explain a second): the replicas share this machine's cores, and a
    # replica starting under a saturating load would take most of a minute to become ready.
    result = rolling_update(tmp_path_factory.mktemp("cluster"), replicas=3, predict_clients=4, explain_clients=1,
                            rate=25, steady_s=1.5)
    print(result.summary())
    return result


def test_no_request_fails_during_the_rolling_update(report: Report) -> None:
    update = report.during(report.update_window)
    assert len(update) > 1000 and {o.endpoint for o in update} == {"predict", "explain"}
    assert not report.update_failures, (f"{len(report.update_failures)} of {len(update)} requests failed during the "
                                        f"rolling update\n{report.summary()}")
    assert report.lame_duck


def test_a_kill_costs_only_retryable_answers(report: Report) -> None:
    """Requests the dead replica held are retried by HAProxy on another one (the clients see 200), or get a 503
    with Retry-After; no connection error, 502 or 504 reaches a client."""
    assert len(report.during(report.kill_window)) > 100
    assert not report.kill_failures, report.summary()


def test_load_balancer_and_replicas_agree_on_what_each_served(report: Report) -> None:
    """HAProxy's per-server response counts equal each replica's own digitserve_requests_total (every replica but
    the killed one, whose /metrics died with it), and its frontend's counts equal what the clients got."""
    assert not report.mismatches, report.summary()
    compared = [c for c in report.counts if c["replica"] is not None]
    assert len(compared) == 5 and all(c["haproxy"].get("2xx", 0) > 0 for c in compared), report.summary()


def test_every_replaced_replica_drained_and_exited_cleanly(report: Report) -> None:
    others = [p for p in report.problems if "exited with" in p or "could not read" in p]
    assert not others, report.summary()
