"""In-process ceilings on one core: preprocessing (decode_image + to_mnist over real PNGs, 1 and 32 per request) and the
forward the predict worker calls (``Held.features``: hidden layer and logits) at batch 1, 32 and 64 for each runtime
(one torch thread, inference mode; the runtimes timed in turns, the median of 5), in images/s.

Runtimes: ``eager`` (the module), ``export`` (version 1's static graph as stored, parity-checked: ``python -m
service.export`` it first; ``make bench`` passes its store, where it did) and ``exported`` (the same ``torch.export``
program run uncompiled: what ``export`` serves where no C++ compiler works).

    python -m bench.micro [--seconds 2] [--images 1000] [--store S] [--runtimes eager export exported]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.data import mnist_pngs
from harness.server import ROOT
from service.config import Limits
from service.imaging import decode_image, normalize, to_mnist
from service.model import static, store

TURNS = 5  # each runtime's forward is timed in this many turns, interleaved with the others'; the median counts


def images_per_s(step: Callable[[], int], seconds: float) -> float:
    """Call ``step`` (which returns how many images it handled) for about ``seconds``, after one warm-up call."""
    step()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        count += step()
    return count / elapsed


def features(loaded: store.LoadedModel, runtime: str) -> static.Features:
    """What the predict worker would call for ``loaded`` under ``runtime``."""
    eager = static.FeatureNet(loaded.model).eval()
    if runtime == "eager":
        return eager
    if runtime == "exported":
        batch = torch.export.Dim("batch", min=1, max=static.MAX_BATCH)
        program = torch.export.export(eager, (torch.zeros(2, loaded.model.input_size),), dynamic_shapes=({0: batch},))
        module: static.Features = program.module()
        return module
    compiled = static.load(loaded, torch.device("cpu"))
    static.check_parity(loaded, eager, compiled, torch.device("cpu"))
    return compiled


def run(seconds: float, n_images: int, store_dir: Path, runtimes: list[str]) -> dict[str, float]:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    pngs, _ = mnist_pngs(n_images)
    limits = Limits()
    loaded = store.load(store_dir, store.DEFAULT_NAME, 1)
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

    def forward(model: static.Features, batch: int) -> Callable[[], int]:
        chunks = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]

        def step() -> int:
            with torch.inference_mode():
                for chunk in chunks:
                    model(chunk)
            return len(chunks) * batch
        return step

    ceilings = {
        "preprocess_images_s": images_per_s(preprocess(1), seconds),
        "preprocess_32_images_s": images_per_s(preprocess(32), seconds),
    }
    models = {runtime: features(loaded, runtime) for runtime in runtimes}
    turns: dict[str, list[float]] = {}
    for _ in range(TURNS):  # the runtimes in turn, so that a neighbour's load moves them alike
        for batch in (1, 32, 64):
            for runtime, model in models.items():
                turns.setdefault(f"{runtime}_b{batch}_images_s", []).append(
                    images_per_s(forward(model, batch), seconds / TURNS))
    return {**ceilings, **{name: statistics.median(values) for name, values in turns.items()}}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--store", type=Path, default=ROOT / "model_store", help="the store whose version 1 runs")
    parser.add_argument("--runtimes", nargs="+", choices=["eager", "export", "exported"], default=["eager"])
    args = parser.parse_args()
    print(json.dumps(run(args.seconds, args.images, args.store, args.runtimes)))
