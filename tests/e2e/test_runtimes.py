"""``--runtime export`` on the real server: a version's AOTInductor-compiled static graph, written by
``python -m service.export``, answers as the eager module through /predict and V2; an artifact that
is tampered with, or that does not match its weights, is never served (that version serves eager and
says so); and switching between a static and an eager version under load loses nothing.

One store for the module, compiled once (AOTInductor takes about a minute on a CPU):
v1 the committed model, exported; v2 shifted output biases, not exported (eager);
v3 v2's weights with v1's artifact and digits recorded with valid sha256 (parity fails);
v4 v1 exported, then one byte of its artifact changed (the sha256 check fails).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as triton

from harness.server import ROOT, Server, b64, encode, metric_samples, running
from service import imaging
from service.config import Limits
from service.model import static, store
from service.model.store import LoadedModel
from tests.e2e.test_versions import ADMIN, MODEL, Load, admin, check_answers, write_version

DIGITS = 1000


@pytest.fixture(scope="module")
def versions(tmp_path_factory, default_model, data_dir) -> tuple[Path, dict[int, LoadedModel]]:
    root = tmp_path_factory.mktemp("store")
    shutil.copytree(default_model.path, root / MODEL / "1")
    exported = subprocess.run([sys.executable, "-m", "service.export", "--store", str(root), "--version", "1",
                               "--data-dir", str(data_dir)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0 and "v1: aoti static graph for cpu" in exported.stdout, exported
    v1 = root / MODEL / "1"
    write_version(root, default_model, 2.0)  # v2
    v3 = root / MODEL / str(write_version(root, default_model, 2.0))
    for name in (static.ARTIFACT_FILE, static.PARITY_FILE):
        shutil.copy(v1 / name, v3 / name)
    store.record_export(v3, json.loads((v1 / store.METADATA_FILE).read_text())["export"])
    v4 = root / MODEL / "4"
    shutil.copytree(v1, v4)
    record = json.loads((v4 / store.METADATA_FILE).read_text())
    (v4 / store.METADATA_FILE).write_text(json.dumps({**record, "version": 4}))
    artifact = bytearray((v4 / static.ARTIFACT_FILE).read_bytes())
    artifact[len(artifact) // 2] ^= 0x01
    (v4 / static.ARTIFACT_FILE).write_bytes(bytes(artifact))
    return root, {v: store.load(root, MODEL, v) for v in (1, 2, 3, 4)}


@pytest.fixture(scope="module")
def server(tmp_path_factory, versions) -> Iterator[Server]:
    root, _ = versions
    args = ("--store", str(root), "--model-version", "1", "--runtime", "export", "--max-loaded-versions", "4",
            "--max-instances", "64")
    with running(tmp_path_factory.mktemp("runtimes"), *args, env={"DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}) as s:
        yield s


@pytest.fixture(scope="module")
def digits(mnist_test) -> tuple[list[bytes], np.ndarray]:
    images = mnist_test[0][:DIGITS].numpy()
    pngs = [encode(image) for image in images]
    return pngs, np.asarray(imaging.prepare(pngs, Limits())).reshape(DIGITS, -1)


def eager(model: LoadedModel, pixels: np.ndarray) -> np.ndarray:
    """The eager module's probabilities as the service answers them (calibrated), in this process, for
    (N, 784) pixels in 0..1."""
    norm = model.metadata.normalization
    x = torch.from_numpy(imaging.normalize(pixels.astype(np.float32), norm.mean, norm.std))
    with torch.inference_mode():
        return model.probabilities(x).numpy()


def runtimes(server: Server) -> dict[str, dict[str, dict]]:
    with server.client() as client:
        return client.get("/info").json()["serving"]["runtimes"]


def test_the_compiled_version_answers_as_eager_on_1000_digits_through_predict_and_v2(server, versions, digits):
    _, models = versions
    pngs, frames = digits
    want = eager(models[1], frames)
    assert runtimes(server)["/predict"]["1"] == {"runtime": "export", "fallback": None}
    with server.client() as client:
        got = []
        for start in range(0, DIGITS, 50):
            body = {"instances": [{"image_b64": b64(png)} for png in pngs[start:start + 50]]}
            answer = client.post("/predict", json=body).json()
            assert answer["model"]["version"] == 1
            got += [p["probabilities"] for p in answer["predictions"]]
    np.testing.assert_array_equal(np.argmax(got, 1), want.argmax(1))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    v2 = triton.InferenceServerClient(server.url.removeprefix("http://"))
    for start in range(0, DIGITS, 50):
        pixels = triton.InferInput("pixels", [50, 784], "FP32")
        pixels.set_data_from_numpy(frames[start:start + 50].astype(np.float32))
        answer = v2.infer(MODEL, [pixels])
        np.testing.assert_array_equal(answer.as_numpy("label"), want[start:start + 50].argmax(1))
        np.testing.assert_allclose(answer.as_numpy("probabilities"), want[start:start + 50], atol=1e-5, rtol=0)


def test_info_and_model_info_name_the_runtime_of_each_pool(server):
    with server.client() as client:
        info = client.get("/info").json()
        text = client.get("/metrics").text
    assert info["serving"]["runtime"] == "export" and info["model"]["static_graph"]["kind"] == "aoti"
    assert info["serving"]["runtimes"]["/explain"]["1"]["runtime"] == "eager"  # hooks need the dynamic graph
    samples = {dict(labels)["pool"]: (dict(labels)["runtime"], value)
               for labels, value in metric_samples(text, "digitserve_model_info").items()
               if dict(labels)["version"] == "1"}
    assert samples == {"predict": ("export", 1.0), "explain": ("eager", 1.0)}


@pytest.mark.parametrize(("version", "reason", "says"), [(4, "checksum", "checksum mismatch"),
                                                         (3, "parity", "differs from the eager module")])
def test_an_artifact_that_is_not_verified_or_not_equal_serves_eager_and_says_so(server, versions, digits, version,
                                                                                 reason, says):
    _, models = versions
    pngs, frames = digits
    with server.client() as client:
        admin(client, f"/admin/versions/{version}/load")
        record = runtimes(server)["/predict"][str(version)]
        assert record["runtime"] == "eager" and record["fallback"].startswith(f"{reason}: ") and says in record[
            "fallback"], record
        answer = client.post(f"/predict?version={version}", json={"instances": [{"image_b64": b64(pngs[0])}]}).json()
        np.testing.assert_allclose(answer["predictions"][0]["probabilities"], eager(models[version], frames[:1])[0],
                                   atol=1e-5, rtol=0)
        fallbacks = metric_samples(client.get("/metrics").text, "digitserve_runtime_fallback_total")
        admin(client, f"/admin/versions/{version}/unload")
    assert fallbacks[(("reason", reason), ("version", str(version)))] >= 1, fallbacks
    assert f"v{version} serves eager, not its static graph ({reason})" in server.output()


def test_switching_between_a_compiled_and_an_eager_version_under_load_loses_nothing(server, versions, digits):
    _, models = versions
    pngs, frames = digits
    with server.client() as client:
        admin(client, "/admin/versions/2/load")
        assert runtimes(server)["/predict"]["2"]["fallback"].startswith("absent: ")
        with Load(server, pngs[:40]) as load:
            for switch in range(8):
                time.sleep(0.3)
                assert admin(client, "/admin/serve", json={"version": 2 if switch % 2 == 0 else 1})["serving"] in (1, 2)
            time.sleep(0.3)
        admin(client, "/admin/serve", json={"version": 1})
    served = check_answers(load.answers, {v: models[v] for v in (1, 2)}, frames[:40])
    assert len(load.answers) > 50 and served[1] > 5 and served[2] > 5, served
