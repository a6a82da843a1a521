"""Shadow traffic in a real server: the committed default version serves, version 1 shadows it.

What the shadow says is checked against what the two versions answer over HTTP when asked directly
(pinned requests, which are never shadowed); under load, every served answer still comes from the served
version and equals its answer without a shadow, and every shadowed instance is counted once, as compared
or as dropped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from harness.server import Server, metric_samples, running
from tests.conftest import SERVED

MODEL = "mnist-fnn"
ADMIN = {"X-Admin-Key": "adm-" + os.urandom(8).hex()}
SERVING = int(SERVED)  # the committed default


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    args = ("--workers", "2", "--max-loaded-versions", "3", "--max-batch-size", "16")
    with running(tmp_path_factory.mktemp("shadow"), *args, env={"DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}) as s:
        with s.client() as client:
            assert client.post("/admin/versions/1/load", headers=ADMIN).status_code == 200
        yield s


def infer(client, frames: np.ndarray, version: int | None = None) -> tuple[str, np.ndarray, np.ndarray]:
    """The version, labels and confidences a V2 REST request for float32 (n, 784) frames is answered."""
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(frames.shape),
                        "data": frames.ravel().tolist()}], "outputs": [{"name": "label"}, {"name": "confidence"}]}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    outputs = {o["name"]: np.array(o["data"]) for o in answer["outputs"]}
    return answer["model_version"], outputs["label"], outputs["confidence"]


def shadow(client, version: int | None, share: float = 1.0) -> dict:
    response = client.post("/admin/shadow", json={"version": version, "share": share}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return response.json()


def tally(client) -> dict:
    """Version 1's shadow tally from /admin/versions (zeros before any)."""
    listed = client.get("/admin/versions", headers=ADMIN).json()
    v1 = next(v for v in listed["versions"] if v["version"] == 1)
    return v1["shadowed"] or {"instances": 0, "dropped": 0, "agreement": None, "mean_abs_confidence_difference": None}


def counted(client) -> dict[str, float]:
    text = client.get("/metrics").text
    pairs = metric_samples(text, "digitserve_shadow_total")
    agree = {dict(labels)["agree"]: value for labels, value in pairs.items() if dict(labels)["shadow"] == "1"}
    return {"true": agree.get("true", 0.0), "false": agree.get("false", 0.0),
            "dropped": sum(metric_samples(text, "digitserve_shadow_dropped_total").values())}


def settled(client, expected: int, timeout: float = 30) -> dict:
    """The tally once ``expected`` instances are accounted for (compared or dropped)."""
    deadline = time.monotonic() + timeout
    while True:
        now = tally(client)
        if now["instances"] + now["dropped"] >= expected or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.fixture(scope="module")
def chosen(server, mnist_test) -> dict[str, np.ndarray]:
    """60 MNIST test digits, 20 on which the versions' labels differ, with each version's direct answers."""
    frames = (mnist_test[0].numpy()[:3000].reshape(3000, 784) / 255).astype(np.float32)
    with server.client() as client:
        v1 = np.concatenate([infer(client, frames[i:i + 60], 1)[1] for i in range(0, 3000, 60)])
        default = np.concatenate([infer(client, frames[i:i + 60], SERVING)[1] for i in range(0, 3000, 60)])
    differ, same = np.flatnonzero(v1 != default), np.flatnonzero(v1 == default)
    assert len(differ) >= 20, "the committed versions differ on enough of these digits"
    picked = np.random.default_rng(4).permutation(np.concatenate([differ[:20], same[:40]]))
    return {"frames": frames[picked], "same": (v1 == default)[picked]}


def test_the_shadow_agrees_as_often_as_the_versions_do(server, chosen):
    frames = chosen["frames"]
    with server.client() as client:
        direct = {v: [infer(client, frames[i:i + 6], v) for i in range(0, 60, 6)] for v in (1, SERVING)}
        before = tally(client)
        state = shadow(client, 1, 1.0)
        assert state["shadow"] == {"version": 1, "share": 1.0} and state["serving"] == SERVING
        for n, i in enumerate(range(0, 60, 6)):
            version, labels, confidence = infer(client, frames[i:i + 6])
            assert version == SERVED, "the served version answers"
            np.testing.assert_array_equal(labels, direct[SERVING][n][1])
            np.testing.assert_allclose(confidence, direct[SERVING][n][2], atol=1e-6)
            settled(client, before["instances"] + before["dropped"] + i + 6)  # one at a time: none dropped
        after = tally(client)
        shadow(client, None)
    assert after["dropped"] == before["dropped"], "an idle server has spare capacity for every shadow"
    compared = after["instances"] - before["instances"]
    assert compared == 60
    agreeing = after["agreement"] * after["instances"] - (before["agreement"] or 0) * before["instances"]
    assert round(agreeing) == int(chosen["same"].sum()) == 40
    differences = np.concatenate([np.abs(d1[2] - d2[2]) for d1, d2 in zip(direct[1], direct[SERVING], strict=True)])
    mean_before = before["mean_abs_confidence_difference"] or 0
    summed = after["mean_abs_confidence_difference"] * after["instances"] - mean_before * before["instances"]
    assert summed == pytest.approx(differences.sum(), abs=1e-4)


def test_under_load_served_answers_are_unchanged_and_every_shadow_is_counted(server, mnist_test):
    frames = (mnist_test[0].numpy()[3000:3640].reshape(640, 784) / 255).astype(np.float32)
    with server.client() as client:
        alone = np.concatenate([infer(client, frames[i:i + 4])[1] for i in range(0, 640, 4)])
        before, metrics_before = tally(client), counted(client)
        shadow(client, 1, 1.0)

    def send(start: int) -> list[tuple[int, str, np.ndarray]]:
        with server.client() as own:
            return [(i, *infer(own, frames[i:i + 4])[:2]) for i in range(start, 640, 32)]

    with ThreadPoolExecutor(8) as pool:
        answers = [answer for part in pool.map(send, range(0, 32, 4)) for answer in part]
    with server.client() as client:
        after = settled(client, before["instances"] + before["dropped"] + 640)
        metrics_after = counted(client)
        shadow(client, None)
    assert len(answers) == 160 and {version for _, version, _ in answers} == {SERVED}
    for i, _, labels in answers:
        np.testing.assert_array_equal(labels, alone[i:i + 4], err_msg="shadowing changed no served answer")
    accounted = (after["instances"] - before["instances"]) + (after["dropped"] - before["dropped"])
    assert accounted == 640, "each instance once: compared or dropped"
    in_metrics = sum(metrics_after.values()) - sum(metrics_before.values())
    assert in_metrics == 640, "the metrics count the same instances as /admin/versions"


def test_pinned_and_unshadowed_requests_are_not_shadowed(server, mnist_test):
    frames = (mnist_test[0].numpy()[:8].reshape(8, 784) / 255).astype(np.float32)
    with server.client() as client:
        before = tally(client)
        shadow(client, 1, 1.0)
        infer(client, frames, SERVING)  # pinned: not shadowed
        shadow(client, None)
        infer(client, frames)  # no shadow
        time.sleep(1)
        assert tally(client) == before


def test_admin_shadow_refusals(server):
    with server.client() as client:
        def status(body: dict) -> tuple[int, str]:
            response = client.post("/admin/shadow", json=body, headers=ADMIN)
            return response.status_code, response.text

        assert status({"version": 9})[0] == 404
        code, text = status({"version": SERVING})
        assert code == 409 and "served" in text
        assert status({"version": 1, "share": 0})[0] == 422
        assert status({"version": 1, "share": 1.5})[0] == 422
        assert status({"share": 0.5})[0] == 422, "the version is required (null to stop)"
        assert client.post("/admin/shadow", json={"version": 1}).status_code == 401
        shadow(client, 1, 0.5)
        assert client.post("/admin/versions/1/unload", headers=ADMIN).status_code == 409, "the shadow stays loaded"
        served = client.post("/admin/serve", json={"version": 1}, headers=ADMIN).json()
        assert served["serving"] == 1 and served["shadow"] is None, "the served version shadows nothing"
        assert client.post("/admin/serve", json={"version": SERVING}, headers=ADMIN).json()["serving"] == SERVING
