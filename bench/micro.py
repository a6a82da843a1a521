"""In-process ceilings on one core: preprocessing (decode_image + to_mnist over real PNGs, 1 and 32 per request) and the
model's forward at batch 1 and 64 (one torch thread, inference mode), in images/s.

    python -m bench.micro [--seconds 2] [--images 1000]    # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import torch

from bench.data import mnist_pngs
from harness.server import ROOT
from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from service.model import store


def images_per_s(step: Callable[[], int], seconds: float) -> float:
    """Call ``step`` (which returns how many images it handled) for about ``seconds``, after one warm-up call."""
    step()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        count += step()
    return count / elapsed


def run(seconds: float, n_images: int) -> dict[str, float]:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    pngs, _ = mnist_pngs(n_images)
    limits = Limits()
    loaded = store.load(ROOT / "model_store", store.DEFAULT_NAME)
    norm = loaded.metadata.normalization
    images = to_mnist([decode_image(png, limits) for png in pngs])
    x = torch.from_numpy(normalize(images, norm.mean, norm.std)).reshape(len(images), -1)

    def preprocess(per_request: int) -> Callable[[], int]:
        """As the API server does it for requests of ``per_request`` images: decode each, frame them together."""
        requests = [pngs[i:i + per_request] for i in range(0, len(pngs) - per_request + 1, per_request)]

        def step() -> int:
            for request in requests:
                to_mnist([decode_image(png, limits) for png in request])
            return len(requests) * per_request
        return step

    def forward(batch: int) -> Callable[[], int]:
        chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]

        def step() -> int:
            with torch.inference_mode():
                for chunk in chunks:
                    loaded.model(chunk)
            return len(chunks) * batch
        return step

    return {
        "preprocess_images_s": images_per_s(preprocess(1), seconds),
        "preprocess_32_images_s": images_per_s(preprocess(32), seconds),
        "model_b1_images_s": images_per_s(forward(1), seconds),
        "model_b64_images_s": images_per_s(forward(64), seconds),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.images)))
