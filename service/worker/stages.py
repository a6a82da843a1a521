"""The LitAPI stages that run in the model workers: setup, decode_request, batch, predict, unbatch, encode_response.

Requests arrive already validated and preprocessed by the API server (``service.http.inputs``):
each is a ``Work`` of float32 (n, 784) images in 0..1. A worker normalises them with its model's
own mean/std, merges several requests with different image counts into one forward pass and
splits the answers back in order.
"""

from __future__ import annotations

import gc
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np
import orjson
import torch

from service import metrics
from service.config import Settings
from service.imaging import normalize
from service.model import store
from service.model.fnn import INPUT_SIZE
from service.work import Work
from service.worker.explain import Explainer

log = logging.getLogger("digitserve")


@dataclass(slots=True)
class Batch:
    """Several requests' images in one tensor, and what is needed to split the answers back."""

    x: torch.Tensor
    counts: list[int]
    options: list[dict[str, Any]]
    arrivals: list[float]


class DigitAPI(ls.LitAPI):
    """Shared worker set-up: load the pinned version onto this worker's device and warm it up."""

    def __init__(self, settings: Settings, version: int, api_path: str):
        super().__init__(
            max_batch_size=settings.max_batch_size,
            batch_timeout=settings.batch_timeout_ms / 1000,
            api_path=api_path,
        )
        self.settings = settings
        self.version = version

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)  # one core per worker process; more workers, not more threads
        self.torch_device = torch.device(device)
        self.loaded = store.load(self.settings.store, self.settings.model, self.version, self.torch_device)
        self.model = self.loaded.model
        self.model_ref = {"name": self.loaded.name, "version": self.loaded.version}
        self.warm_up()
        gc.freeze()  # the model and the imports live as long as the worker (see service.__main__)
        metrics.MODEL_INFO.labels(self.loaded.name, str(self.loaded.version), self.torch_device.type).set(1)
        log.info("worker ready: %s v%d on %s", self.loaded.name, self.loaded.version, device)

    def warm_up(self) -> None:
        """One real inference before /health turns 200, so the first client never pays for it."""
        with torch.inference_mode():
            self.model(torch.zeros(2, INPUT_SIZE, device=self.torch_device))

    def decode_request(self, request: Work) -> Work:
        return request

    def batch(self, inputs: list[Work]) -> Batch:
        norm = self.loaded.metadata.normalization
        x = torch.from_numpy(normalize(np.concatenate([w.images for w in inputs]), norm.mean, norm.std))
        x = x.to(self.torch_device)
        return Batch(x, [len(w.images) for w in inputs], [w.options for w in inputs], [w.arrived for w in inputs])

    def unbatch(self, output: tuple[list[Any], list[int]]) -> list[tuple[list[Any], int]]:
        """Each request's own answers, with the size of the forward they were part of (for its log line)."""
        results, counts = output
        bounds = np.cumsum([0, *counts]).tolist()
        return [(results[a:b], len(results)) for a, b in itertools.pairwise(bounds)]

    def encode_response(self, output: tuple[list[Any], int]) -> tuple[bytes, int]:
        answers, batch_size = output
        # orjson: 20x faster than json on a 32-image answer's 320 floats, which cost the worker a quarter of its time
        return orjson.dumps({"model": self.model_ref, "predictions": answers}), batch_size


class PredictAPI(DigitAPI):
    """``/predict``: probabilities for every image, no hooks, under inference mode.

    A request whose options say ``"output": "tensor"`` (the Open Inference Protocol's, set by the API
    server) is answered with its raw float32 probabilities, which the API server encodes as V2
    tensors; every other gets the JSON of /predict."""

    def __init__(self, settings: Settings, version: int):
        super().__init__(settings, version, "/predict")

    def predict(self, batch: Batch) -> tuple[list[Any], list[int]]:
        started = time.monotonic()
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch.x), dim=1).cpu().numpy()
        version = str(self.version)
        metrics.observe_forward("predict", version, batch.arrivals, len(probs), started)
        metrics.observe_predictions(version, probs)
        rows = [(answer, row, options) for answer, row, options in
                zip(predictions(probs), probs, _per_image(batch.options, batch.counts))]
        return rows, batch.counts

    def encode_response(self, output: tuple[list[Any], int]) -> tuple[bytes, int]:
        rows, batch_size = output
        if rows and rows[0][2].get("output") == "tensor":
            return np.stack([row for _, row, _ in rows]).astype(np.float32).tobytes(), batch_size
        return super().encode_response(([answer for answer, _, _ in rows], batch_size))


class ExplainAPI(DigitAPI):
    """``/explain``: attributions and hooked activations, in its own worker pool so it never slows /predict."""

    def __init__(self, settings: Settings, version: int):
        super().__init__(settings, version, "/explain")

    def setup(self, device: str) -> None:
        super().setup(device)
        norm = self.loaded.metadata.normalization
        self.explainer = Explainer(self.model, norm.mean, norm.std)

    def predict(self, batch: Batch) -> tuple[list, list[int]]:
        """Requests that ask for the same computation share one batched explanation."""
        started = time.monotonic()
        bounds = np.cumsum([0, *batch.counts])
        groups: dict[tuple, list[int]] = {}  # computation -> the batch rows that ask for it
        for request, options in enumerate(batch.options):
            key = (options["method"], options["steps"], options["top_k"], options["heatmap"], options["quadrature"])
            groups.setdefault(key, []).extend(range(bounds[request], bounds[request + 1]))
        targets = [options["target"] for options, count in zip(batch.options, batch.counts) for _ in range(count)]
        reports: list[dict] = [{} for _ in range(len(batch.x))]
        for (method, steps, top_k, heatmap, quadrature), rows in groups.items():
            explained = self.explainer.explain(batch.x[rows], method, [targets[r] for r in rows], steps, top_k,
                                               heatmap, quadrature)
            for row, report in zip(rows, explained):
                reports[row] = report
        metrics.observe_forward("explain", str(self.version), batch.arrivals, len(batch.x), started)
        return reports, batch.counts


def _per_image(options: list[dict[str, Any]], counts: list[int]) -> list[dict[str, Any]]:
    return [request for request, count in zip(options, counts) for _ in range(count)]


def predictions(probs: np.ndarray) -> list[dict[str, Any]]:
    """Each image's answer: the label, its confidence and all ten probabilities."""
    labels = probs.argmax(1)
    confidences = probs[np.arange(len(probs)), labels]
    return [{"label": label, "confidence": confidence, "probabilities": p}
            for label, confidence, p in zip(labels.tolist(), confidences.tolist(), probs.tolist())]
