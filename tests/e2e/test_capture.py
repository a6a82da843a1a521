"""Capture in a real server, then replay: what was served is what the files hold, and replay agrees.

The server captures every instance (share 1) of 1,000 real MNIST test digits sent over V2 REST twice: to the
served version (the committed default) and pinned to version 1. Once it has drained, the files hold each
request's frames (the digits' own bytes), answers, versions and request ids; ``python -m service.replay``
with the served version agrees fully with what it served, and with what version 1 served as often as the
two versions' answers over HTTP agreed. A capture folder that disappears under a running server stops
capture, not serving.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.server import ROOT, metric_samples, running
from service import capture
from tests.conftest import SERVED

MODEL = "mnist-fnn"
ADMIN = {"X-Admin-Key": "adm-" + os.urandom(8).hex()}
COUNT = 1000  # enough digits that version 1 and the default answer a few of them differently
SERVING = int(SERVED)  # the committed default, calibrated; version 1 is not


def infer(client, frames: np.ndarray, request_id: str, version: int | None = None) -> np.ndarray:
    """The labels a V2 REST request for float32 (n, 784) frames is answered."""
    path = f"/v2/models/{MODEL}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(frames.shape),
                        "data": frames.ravel().tolist()}], "outputs": [{"name": "label"}]}
    response = client.post(path, json=body, headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"])


@pytest.fixture(scope="module")
def captured(mnist_test, tmp_path_factory) -> Iterator[dict]:
    """The capture folder after a drained server served 1,000 digits with its default and again pinned to v1,
    and what each request was answered (request id -> labels)."""
    images = mnist_test[0].numpy()[:COUNT].reshape(COUNT, 784)
    frames = (images / 255).astype(np.float32)
    directory = tmp_path_factory.mktemp("captured")
    args = ("--capture-dir", str(directory), "--capture-share", "1", "--max-loaded-versions", "2")
    answered: dict[str, tuple[int, np.ndarray, np.ndarray]] = {}
    with running(tmp_path_factory.mktemp("capture-server"), *args,
                 env={"DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}) as server, server.client() as client:
        assert client.post("/admin/versions/1/load", headers=ADMIN).status_code == 200
        sizes = np.random.default_rng(3).integers(1, 9, COUNT)
        start = 0
        while start < COUNT:
            end = min(COUNT, start + int(sizes[start]))
            for version in (SERVING, 1):
                request_id = f"v{version}-{start}"
                labels = infer(client, frames[start:end], request_id, version if version == 1 else None)
                answered[request_id] = (version, images[start:end], labels)
            start = end
    yield {"directory": directory, "answered": answered, "log": server.output()}


def read(directory: Path) -> dict[str, np.ndarray]:
    """Every capture file's arrays, concatenated in file order, with numpy alone."""
    parts: dict[str, list[np.ndarray]] = {}
    for path in capture.files(directory):
        with np.load(path, allow_pickle=False) as f:
            for name in capture.FIELDS:
                parts.setdefault(name, []).append(f[name])
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}


def test_the_files_hold_every_instance_as_it_was_served(captured):
    records = read(captured["directory"])
    answered = captured["answered"]
    assert len(records["label"]) == 2 * COUNT, "share 1: every instance, once, written at the drain at the latest"
    for request_id, (version, images, labels) in answered.items():
        mine = records["request_id"] == request_id
        assert mine.sum() == len(labels), request_id
        assert (records["version"][mine] == version).all()
        np.testing.assert_array_equal(records["label"][mine], labels, err_msg=request_id)
        np.testing.assert_array_equal(records["frames"][mine].reshape(len(labels), 784), images,
                                      err_msg="the frame the model saw: the digit's own bytes")
        assert np.isfinite(records["typicality"][mine]).all() == (version == SERVING), "the default is calibrated"
    np.testing.assert_allclose(records["probabilities"].sum(1), 1, atol=1e-5)
    assert not list(captured["directory"].glob(".*.tmp")), "no half-written file left"


def test_replay_agrees_with_what_each_version_served(captured):
    done = subprocess.run([sys.executable, "-m", "service.replay", str(captured["directory"]), "--version", SERVED,
                           "--json", "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    served = {v: np.concatenate([labels for version, _, labels in captured["answered"].values() if version == v])
              for v in (1, SERVING)}
    between = float((served[1] == served[SERVING]).mean())
    assert 0.9 < between < 1, "the two committed versions differ on a few of these digits"
    assert report["records"] == 2 * COUNT
    assert report["by_served_version"] == {
        "1": {"records": COUNT, "agreement": pytest.approx(between, abs=1e-12)},
        SERVED: {"records": COUNT, "agreement": 1.0}}


def test_a_capture_folder_that_goes_away_stops_capture_not_serving(mnist_test, tmp_path):
    directory = tmp_path / "capture"
    frames = (mnist_test[0].numpy()[:64].reshape(64, 784) / 255).astype(np.float32)
    args = ("--capture-dir", str(directory), "--capture-share", "1", "--api-servers", "1")
    with running(tmp_path, *args) as server, server.client() as client:
        shutil.rmtree(directory)
        directory.write_text("a file where the folder was: every write fails")
        for i in range(0, 64, 8):
            infer(client, frames[i:i + 8], f"gone-{i}")
        server.stop()  # the drain writes what is held: that write fails
        log = server.output()
    assert server.process.returncode == 0, log[-3000:]
    assert "capture stopped" in log and "Traceback" not in log
    assert directory.read_text().startswith("a file"), "nothing wrote over it"


def test_capture_counts_in_metrics(mnist_test, tmp_path):
    frames = (mnist_test[0].numpy()[:40].reshape(40, 784) / 255).astype(np.float32)
    directory = tmp_path / "capture"
    with running(tmp_path, "--capture-dir", str(directory), "--capture-share", "1", "--api-servers", "1") as server, \
            server.client() as client:
        for i in range(0, 40, 10):
            infer(client, frames[i:i + 10], f"m-{i}")
        written = 0.0
        for _ in range(100):  # the writer rotates its file 5 s after its first record
            written = sum(metric_samples(client.get("/metrics").text, "digitserve_capture_records_total").values())
            if written:
                break
            time.sleep(0.1)
        assert written == 40
    assert len(read(directory)["label"]) == 40
