"""Live model versions on the real server: load, canary, switch, roll back and watch the store, under
load, with real checkpoints written by ``service.model.store``, and zero failed requests.

Two versions whose answers differ (v2 shifts the output biases), so every answer can be checked
against the in-process model of the version it says computed it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton

from harness.server import Server, b64, encode, metric_samples, running
from service import imaging
from service.config import Limits
from service.model import store
from service.model.store import LoadedModel

ADMIN = {"X-Admin-Key": "adm-" + os.urandom(8).hex()}
MODEL = "mnist-fnn"


def write_version(root: Path, base: LoadedModel, shift: float, accuracy: float | None = None) -> int:
    """A new version through the store's own atomic write: ``base``'s weights, output biases shifted."""
    state = {k: v.clone() for k, v in base.model.state_dict().items()}
    state["fc2.bias"] += torch.linspace(-shift, shift, 10)
    metadata = {k: v for k, v in base.metadata.model_dump().items() if k not in ("name", "version", "sha256")}
    if accuracy is not None:
        metadata["metrics"] = {**metadata.get("metrics", {}), "test_accuracy": accuracy}
    return int(store.write_version(root, MODEL, state, metadata).name)


def corrupt_version(root: Path, base: LoadedModel) -> int:
    """A version written properly, then its weights truncated (the checksum no longer matches)."""
    version = write_version(root, base, 0.5)
    weights = root / MODEL / str(version) / store.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    return version


@pytest.fixture(scope="module")
def digits(mnist_test) -> tuple[list[bytes], np.ndarray]:
    images = mnist_test[0][:40].numpy()
    return [encode(image) for image in images], imaging.prepare([encode(i) for i in images], Limits())


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, default_model) -> tuple[Path, dict[int, LoadedModel]]:
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(default_model.path, root / MODEL / "1")
    write_version(root, default_model, 2.0)
    return root, {v: store.load(root, MODEL, v) for v in (1, 2)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, two_versions) -> Iterator[Server]:
    root, _ = two_versions
    args = ("--store", str(root), "--model-version", "1", "--workers", "2", "--max-loaded-versions", "2")
    with running(tmp_path_factory.mktemp("versions"), *args, env={"DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}) as s:
        yield s


def expected_labels(model: LoadedModel, frames: np.ndarray) -> np.ndarray:
    norm = model.metadata.normalization
    x = torch.from_numpy(imaging.normalize(frames.reshape(len(frames), -1), norm.mean, norm.std))
    with torch.inference_mode():
        return model.probabilities(x).numpy()


def admin(client: httpx.Client, path: str, **kwargs) -> dict:
    response = client.post(path, headers=ADMIN, **kwargs)
    assert response.status_code == 200, response.text
    return response.json()


def loaded(client: httpx.Client, *versions: int) -> None:
    """Make sure ``versions`` are loaded (the tests of this module share one server)."""
    for version in versions:
        if version not in client.get("/admin/versions", headers=ADMIN).json()["loaded"]:
            admin(client, f"/admin/versions/{version}/load")


class Load:
    """Client threads sending /predict and /explain until stopped; every answer kept with its version."""

    def __init__(self, server: Server, pngs: list[bytes], threads: int = 4):
        self.server, self.pngs, self.stop = server, pngs, threading.Event()
        self.answers: list[tuple[str, int, int, dict | str]] = []  # (route, image index, status, body)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _run(self, worker: int) -> None:
        with httpx.Client(base_url=self.server.url, timeout=30) as client:
            i = worker
            while not self.stop.is_set():
                index = i % len(self.pngs)
                route = "/explain" if i % 5 == 0 else "/predict"
                body = {"instances": [{"image_b64": b64(self.pngs[index])}]}
                if route == "/explain":
                    body["method"] = "saliency"
                response = client.post(route, json=body)
                self.answers.append((route, index, response.status_code,
                                     response.json() if response.status_code == 200 else response.text))
                i += len(self.threads)


def check_answers(answers, models: dict[int, LoadedModel], frames: np.ndarray) -> Counter:
    """Every answer 200, computed by one of the versions, and equal to that version's in-process answer."""
    expected = {v: expected_labels(m, frames) for v, m in models.items()}
    versions: Counter = Counter()
    for route, index, status, body in answers:
        assert status == 200, (route, status, body)
        version = body["model"]["version"]
        assert version in models, body["model"]
        probabilities = np.asarray(body["predictions"][0]["probabilities"])
        np.testing.assert_allclose(probabilities, expected[version][index], atol=1e-5, err_msg=f"{route} v{version}")
        versions[version] += 1
    return versions


def test_ten_switches_under_load_fail_nothing_and_every_answer_is_its_versions(server, two_versions, digits):
    _, models = two_versions
    pngs, frames = digits
    with server.client() as client:
        admin(client, "/admin/versions/2/load")
        with Load(server, pngs) as load:
            for switch in range(10):
                time.sleep(0.3)
                state = admin(client, "/admin/serve", json={"version": 2 if switch % 2 == 0 else 1})
                assert state["serving"] == (2 if switch % 2 == 0 else 1)
                # after the call returns, every new request is computed by the version now served
                answer = client.post("/predict", json={"instances": [{"image_b64": b64(pngs[0])}]}).json()
                assert answer["model"]["version"] == state["serving"]
            time.sleep(0.3)
        versions = check_answers(load.answers, models, frames)
    assert len(load.answers) > 100 and versions[1] > 10 and versions[2] > 10, versions


def test_a_canary_gets_its_share_and_promote_and_rollback_take_effect_at_once(server, two_versions, digits):
    pngs, _ = digits
    body = {"instances": [{"image_b64": b64(pngs[1])}]}
    with server.client() as client:
        admin(client, "/admin/versions/2/load")
        admin(client, "/admin/serve", json={"version": 1, "canary": {"version": 2, "share": 0.2}})
        versions = Counter(client.post("/predict", json=body).json()["model"]["version"] for _ in range(2000))
        assert abs(versions[2] / 2000 - 0.2) <= 0.04, versions
        listed = client.get("/admin/versions", headers=ADMIN).json()
        assert listed["canary"] == {"version": 2, "share": 0.2}
        assert admin(client, "/admin/canary/rollback")["canary"] is None
        assert {client.post("/predict", json=body).json()["model"]["version"] for _ in range(50)} == {1}
        admin(client, "/admin/serve", json={"version": 1, "canary": {"version": 2, "share": 0.5}})
        assert admin(client, "/admin/canary/promote")["serving"] == 2
        assert {client.post("/predict", json=body).json()["model"]["version"] for _ in range(50)} == {2}
        text = client.get("/metrics").text
        assert metric_samples(text, "digitserve_serving_version") == {(): 2.0}
        assert metric_samples(text, "digitserve_canary_share") == {(): 0.0}


def test_pinned_versions(server, digits):
    pngs, frames = digits
    body = {"instances": [{"image_b64": b64(pngs[2])}]}
    with server.client() as client:
        admin(client, "/admin/versions/2/load")
        for version in (1, 2):
            assert client.post(f"/predict?version={version}", json=body).json()["model"]["version"] == version
            explained = client.post(f"/explain?version={version}", json={**body, "method": "saliency"}).json()
            assert explained["model"]["version"] == version
        missing = client.post("/predict?version=7", json=body)
        assert missing.status_code == 404 and "not in the store" in missing.json()["detail"]
        assert client.post("/predict?version=x", json=body).status_code == 422
    v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
    pixels = triton.InferInput("pixels", [1, 784], "FP32")
    pixels.set_data_from_numpy(np.asarray(frames[2:3], np.float32).reshape(1, 784))
    assert v2.infer(MODEL, [pixels], model_version="1").get_response()["model_version"] == "1"
    assert v2.infer(MODEL, [pixels], model_version="2").get_response()["model_version"] == "2"


def test_a_version_that_fails_to_load_changes_nothing_served(server, two_versions, default_model, digits):
    root, _ = two_versions
    pngs, _ = digits
    body = {"instances": [{"image_b64": b64(pngs[3])}]}
    with server.client() as client:
        admin(client, "/admin/serve", json={"version": 2})
        bad = corrupt_version(root, default_model)
        shape = root / MODEL / str(write_version(root, default_model, 1.0)) / store.METADATA_FILE
        meta = json.loads(shape.read_text())
        shape.write_text(json.dumps({**meta, "architecture": {**meta["architecture"], "hidden_size": 400}}))
        for version, says in ((bad, "checksum mismatch"), (bad + 1, "architecture mismatch")):
            refused = client.post(f"/admin/versions/{version}/load", headers=ADMIN)
            assert refused.status_code == 409 and says in refused.json()["detail"], refused.text
            assert "nothing served changed" in refused.json()["detail"]
            listed = {v["version"]: v for v in client.get("/admin/versions", headers=ADMIN).json()["versions"]}
            assert says in listed[version]["last_failure"]["reason"] and not listed[version]["loaded"]
        assert client.post("/predict", json=body).json()["model"]["version"] == 2
        assert client.post(f"/admin/versions/{bad + 9}/load", headers=ADMIN).status_code == 404
        loads = metric_samples(client.get("/metrics").text, "digitserve_version_loads_total")
        assert loads[(("result", "failed"), ("version", str(bad)))] >= 1


def test_the_served_version_cannot_be_unloaded_and_repository_calls_work(server):
    with server.client() as client:
        loaded(client, 1, 2)
        admin(client, "/admin/serve", json={"version": 2})
        refused = client.post("/admin/versions/2/unload", headers=ADMIN)
        assert refused.status_code == 409 and "serve another one first" in refused.json()["detail"]
    repository = triton.InferenceServerClient(server.url.removeprefix("http://"))
    repository.unload_model(MODEL, headers=ADMIN)  # unloads what is not served
    index = {entry["version"]: entry["state"] for entry in repository.get_model_repository_index(headers=ADMIN)}
    assert index["2"] == "READY" and index["1"] == "UNAVAILABLE"
    with pytest.raises(triton.InferenceServerException) as unauthorised:
        repository.load_model(MODEL)
    assert unauthorised.value.status() == "401"


def test_the_admin_api_needs_its_key_and_does_not_exist_without_one(server, served):
    with server.client() as client:
        assert client.get("/admin/versions").status_code == 401
        assert client.get("/admin/versions", headers={"X-Admin-Key": "wrong"}).status_code == 403
        assert client.post("/admin/serve", headers={"Authorization": "Bearer wrong"}, json={"version": 1}
                           ).status_code == 403
    with served.client() as client:  # the suite's default server: no DIGITSERVE_ADMIN_KEY
        assert client.get("/admin/versions").status_code == 404
        assert client.post("/v2/repository/index").status_code in (404, 405)


def worker_pids(server: Server) -> list[int]:
    """The model workers: the spawned children of the service's main process (of any of its threads:
    LitServe's monitor thread starts the replacements)."""
    children = [pid for task in Path(f"/proc/{server.process.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    return [int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()]


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))


def test_a_worker_killed_after_switches_comes_back_with_what_is_served(server, digits):
    pngs, _ = digits
    with server.client() as client:
        loaded(client, 1, 2)
        admin(client, "/admin/serve", json={"version": 1})
        admin(client, "/admin/serve", json={"version": 2, "canary": {"version": 1, "share": 0.3}})
        killed = set(worker_pids(server))
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while set(worker_pids(server)) & killed or len(worker_pids(server)) < len(killed) or client.get(
                "/health").status_code != 200:
            assert time.monotonic() < deadline, "workers not replaced"
            time.sleep(0.2)
        seen = Counter()
        for i in range(200):
            answer = client.post("/predict", json={"instances": [{"image_b64": b64(pngs[i % 10])}]})
            assert answer.status_code == 200, answer.text
            seen[answer.json()["model"]["version"]] += 1
        assert set(seen) == {1, 2} and seen[2] > seen[1], seen  # the replacements hold the served and the canary
        admin(client, "/admin/serve", json={"version": 2})


def test_twenty_load_switch_unload_cycles_do_not_grow_the_workers(server, digits):
    pngs, _ = digits
    body = {"instances": [{"image_b64": b64(pngs[4])}]}
    with server.client() as client:
        loaded(client, 1, 2)
        admin(client, "/admin/serve", json={"version": 2})
        rss_after: list[dict[int, int]] = []
        for _ in range(20):
            admin(client, "/admin/serve", json={"version": 1})
            assert client.post("/predict", json=body).json()["model"]["version"] == 1
            admin(client, "/admin/versions/2/unload")
            admin(client, "/admin/versions/2/load")
            admin(client, "/admin/serve", json={"version": 2})
            assert client.post("/predict", json=body).json()["model"]["version"] == 2
            admin(client, "/admin/versions/1/unload")
            admin(client, "/admin/versions/1/load")
            rss_after.append({pid: rss_kb(pid) for pid in worker_pids(server)})
    first, last = rss_after[0], rss_after[-1]
    assert first.keys() == last.keys()
    for pid in first:
        assert last[pid] <= first[pid] * 1.05, (pid, first[pid], last[pid])


def test_the_store_watcher_serves_a_new_version_under_load_and_refuses_a_corrupt_one(
        tmp_path, default_model, digits):
    """Start-up skips a corrupt newest version (loudly); the watcher then serves a good new one, refuses a
    corrupt one once, and never serves one under --min-accuracy."""
    root = tmp_path / "store"
    shutil.copytree(default_model.path, root / MODEL / "1")
    skipped = corrupt_version(root, default_model)
    pngs, _ = digits
    args = ("--store", str(root), "--watch-store-s", "1", "--min-accuracy", "0.99")
    with running(tmp_path, *args) as server, server.client() as client:
        info = client.get("/info").json()
        assert info["model"]["version"] == 1 and "checksum mismatch" in info["versions"]["problems"][str(skipped)][
            "reason"]
        with Load(server, pngs, threads=3) as load:
            good = write_version(root, default_model, 1.5)
            deadline = time.monotonic() + 15
            while client.get("/info").json()["model"]["version"] != good:
                assert time.monotonic() < deadline, "the watcher did not switch"
                time.sleep(0.2)
            bad = corrupt_version(root, default_model)
            time.sleep(4)  # several polls
            info = client.get("/info").json()
            assert info["model"]["version"] == good and bad not in info["versions"]["loaded"]
            assert "checksum mismatch" in info["versions"]["problems"][str(bad)]["reason"]
            weak = write_version(root, default_model, 0.1, accuracy=0.97)
            time.sleep(3)
        assert all(status == 200 for _, _, status, _ in load.answers), Counter(s for _, _, s, _ in load.answers)
        info = client.get("/info").json()
        assert info["model"]["version"] == good
        assert "below --min-accuracy" in info["versions"]["problems"][str(weak)]["reason"]
        assert weak not in info["versions"]["loaded"]
    assert len(re.findall(rf"v{bad} was not loaded", server.output())) == 1  # refused once, not every poll
