"""/predict over HTTP against the real service: equality with the model, batching, real-world images."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress

import numpy as np
import pytest
import torch
from PIL import Image

from harness.server import b64, encode, metric_samples, running
from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from tests.conftest import SERVED


def in_process(model, images01: np.ndarray) -> np.ndarray:
    """The probabilities the loaded model gives for (N, 28, 28) images in 0..1."""
    norm = model.metadata.normalization
    x = torch.from_numpy(normalize(images01.astype(np.float32), norm.mean, norm.std).reshape(len(images01), -1))
    with torch.inference_mode():
        return model.probabilities(x).numpy()


def probabilities(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([p["probabilities"] for p in response.json()["predictions"]])


class TestEquality:
    def test_pixels_equal_in_process_model(self, served, default_model, mnist_test):
        images = mnist_test[0][:64].numpy()
        with served.client() as client:
            response = client.post("/predict", json={"instances": [{"pixels": im.tolist()} for im in images]})
        body = response.json()
        assert body["model"] == {"name": "mnist-fnn", "version": default_model.version}
        np.testing.assert_allclose(probabilities(response), in_process(default_model, images / 255.0), atol=1e-5)
        labels = [p["label"] for p in body["predictions"]]
        assert labels == in_process(default_model, images / 255.0).argmax(1).tolist()
        for p in body["predictions"]:
            assert p["confidence"] == pytest.approx(max(p["probabilities"]))

    def test_png_equals_same_preprocessing_in_process(self, served, default_model, mnist_test):
        pngs = [encode(im) for im in mnist_test[0][100:132].numpy()]
        expected = in_process(default_model, to_mnist([decode_image(p, Limits()) for p in pngs]))
        with served.client() as client:
            response = client.post("/predict", json={"instances": [{"image_b64": b64(p)} for p in pngs]})
            multipart = client.post("/predict",
                                    files=[("file", (f"{i}.png", p, "image/png")) for i, p in enumerate(pngs)])
        np.testing.assert_allclose(probabilities(response), expected, atol=1e-5)
        np.testing.assert_allclose(probabilities(multipart), expected, atol=1e-5)


class TestBatching:
    def test_concurrent_requests_get_their_own_answers_in_order(self, served, default_model, mnist_test):
        """200 concurrent requests of 1..8 images: no cross-talk, order kept, and the model saw batches > 1."""
        images = mnist_test[0].numpy()
        rng = np.random.default_rng(0)
        requests = []
        for _ in range(200):
            idx = rng.choice(len(images), size=rng.integers(1, 9), replace=False)
            body = json.dumps({"instances": [{"pixels": images[i].tolist()} for i in idx]})
            requests.append((idx, body))
        expected = in_process(default_model, images / 255.0)
        with served.client() as client:
            before = metric_samples(client.get("/metrics").text, "digitserve_batch_size_bucket")

            def send(item):
                idx, body = item
                return idx, client.post("/predict", content=body, headers={"content-type": "application/json"})

            with ThreadPoolExecutor(32) as pool:
                results = list(pool.map(send, requests))
            after = metric_samples(client.get("/metrics").text, "digitserve_batch_size_bucket")
        for idx, response in results:
            np.testing.assert_allclose(probabilities(response), expected[idx], atol=1e-5)
        key = lambda le: tuple(sorted({"endpoint": "predict", "le": le, "version": SERVED}.items()))  # noqa: E731
        forwards = after[key("+Inf")] - before.get(key("+Inf"), 0)
        single = after[key("1.0")] - before.get(key("1.0"), 0)
        images_sent = sum(len(idx) for idx, _ in requests)
        assert forwards < 200, f"{forwards} forwards for 200 requests: requests were never merged"
        assert forwards - single > 0 and images_sent > forwards


def dress(digit: np.ndarray, style: str, rng: np.random.Generator) -> bytes:
    """A real MNIST digit as a client would send it: bigger, off-centre, other colours, other formats."""
    scale = int(rng.integers(2, 6))
    big = Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    canvas_w, canvas_h = 28 * scale + int(rng.integers(20, 120)), 28 * scale + int(rng.integers(20, 120))
    x, y = int(rng.integers(0, canvas_w - 28 * scale)), int(rng.integers(0, canvas_h - 28 * scale))
    ink = np.zeros((canvas_h, canvas_w), np.uint8)
    ink[y:y + 28 * scale, x:x + 28 * scale] = np.asarray(big)
    alpha = ink.astype(np.float32)[..., None] / 255
    if style == "dark_on_light":
        return encode(255 - ink)
    if style == "rgb":
        paper, pen = np.array([250, 240, 200]), np.array([20, 40, 160])
        return encode((paper * (1 - alpha) + pen * alpha).astype(np.uint8))
    if style == "rgba":
        rgba = np.zeros((canvas_h, canvas_w, 4), np.uint8)
        rgba[..., 3] = ink  # black pen on a transparent canvas
        return encode(rgba)
    if style == "jpeg":
        return encode(255 - ink, "JPEG", quality=75)
    if style == "light_on_dark":
        return encode(ink)
    raise ValueError(style)


STYLES = ("dark_on_light", "rgb", "rgba", "jpeg", "light_on_dark")


def test_dressed_digits_are_classified(served, mnist_test):
    """Real test digits upscaled, moved, recoloured, transparent or JPEG: at least 97% right."""
    images, labels = mnist_test
    rng = np.random.default_rng(7)
    picks = rng.choice(len(images), size=400, replace=False)
    dressed = [dress(images[i].numpy(), STYLES[n % len(STYLES)], rng) for n, i in enumerate(picks)]
    predicted = []
    with served.client() as client:
        for start in range(0, len(dressed), 25):
            chunk = dressed[start:start + 25]
            response = client.post("/predict", json={"instances": [{"image_b64": b64(d)} for d in chunk]})
            assert response.status_code == 200, response.text
            predicted += [p["label"] for p in response.json()["predictions"]]
    correct = np.array(predicted) == labels[picks].numpy()
    per_style = {s: correct[n::len(STYLES)].mean() for n, s in enumerate(STYLES)}
    assert correct.mean() >= 0.97, f"accuracy {correct.mean():.4f} per style {per_style}"


@pytest.mark.parametrize("fmt,mode", [("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB"), ("TIFF", "L"), ("PNG", "I;16"),
                                      ("PNG", "LA")])
def test_image_formats_and_modes(served, mnist_test, fmt, mode):
    digit = mnist_test[0][0].numpy()  # a 7
    if mode == "I;16":
        image = Image.fromarray((255 - digit).astype(np.uint16) * 257)
    elif mode == "LA":
        image = Image.fromarray(np.stack([np.zeros_like(digit), digit], -1), "LA")
    else:
        image = Image.fromarray(255 - digit).convert(mode)
    with served.client() as client:
        response = client.post("/predict", files=[("file", (f"seven.{fmt.lower()}", encode(image, fmt), "image/*"))])
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["label"] == 7


def test_info_describes_the_served_model(served, default_model):
    with served.client() as client:
        response = client.get("/info")
    info = response.json()
    assert "server" not in response.headers  # the software behind it is nobody's business
    assert info["model"]["name"] == "mnist-fnn"
    assert info["model"]["version"] == default_model.version
    assert info["model"]["sha256"] == default_model.metadata.sha256
    assert info["model"]["test_accuracy"] >= 0.985
    assert info["serving"]["device"] == "cpu"
    assert info["serving"]["max_batch_size"] == 32 and info["serving"]["workers"]["/predict"] == 2


def test_pinned_version_is_served(tmp_path, default_model):
    """With two versions in a store, the highest is served unless one is pinned."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(default_model.path, store / "mnist-fnn" / "1")
    shutil.copytree(default_model.path, store / "mnist-fnn" / "2")
    meta = json.loads((store / "mnist-fnn" / "2" / "metadata.json").read_text())
    (store / "mnist-fnn" / "2" / "metadata.json").write_text(json.dumps({**meta, "version": 2}))
    for pin, expected in ((None, 2), ("1", 1)):
        args = ["--store", str(store)] + (["--model-version", pin] if pin else [])
        with running(tmp_path, *args) as server, server.client() as client:
            assert client.get("/info").json()["model"]["version"] == expected
            pixels = np.zeros((28, 28))
            pixels[5:23, 13:15] = 255
            answer = client.post("/predict", json={"instances": [{"pixels": pixels.tolist()}]})
            assert answer.json()["model"]["version"] == expected


def test_health_is_503_until_every_worker_is_ready(tmp_path):
    """Polled from process start: never 200 before all workers are up, 503 while some are not, then 200."""
    import httpx

    from harness.server import spawn

    server = spawn(tmp_path, "--workers", "3")
    seen = []
    try:
        with server.client(timeout=5) as poll:
            while not seen or seen[-1] != 200:
                assert server.process.poll() is None, server.output()
                with suppress(httpx.TransportError):  # not listening yet
                    seen.append(poll.get("/health").status_code)
        with server.client() as client:
            answer = client.post("/predict", json={"instances": [{"pixels": [[0] * 28] * 27 + [[255] * 28]}]})
            assert answer.status_code == 200
    finally:
        server.stop()
    assert set(seen) <= {200, 503}
    assert 503 in seen, f"never saw 503 while workers started: {seen[:20]}"
