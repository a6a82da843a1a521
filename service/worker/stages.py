"""The LitAPI stages that run in the model workers: setup, decode_request, batch, predict, unbatch, encode_response.

Requests arrive already validated and preprocessed by the API server (``service.http.prepare``):
each is a ``Work`` of float32 (n, 784) images in 0..1 and the model version to compute it. A
worker merges the requests of one version into one forward pass (a batch holds one group per
version; a switch happens between batches, so usually there is one), normalises them with that
version's own mean/std, and splits the answers back in order. An answer is numbers (``Computed``:
a row of probabilities and typicality per image, and an explanation's report), with the version
that computed it; what a protocol makes of them is its codec's business, in the API server.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import signal
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import litserve as ls
import numpy as np
import torch

from service import logs, metrics, tracing
from service.config import Settings
from service.imaging import normalize
from service.versions import Board, Runtimes, SetupFailures
from service.work import ROW, Computed, Control, Pool, Work
from service.worker.models import Held, Models

log = logging.getLogger("digitserve")
EXPLAIN_NICENESS = 5


@dataclass(slots=True)
class Group:
    """The requests of a batch that one version computes: their images in one tensor, and where they are."""

    held: Held
    x: torch.Tensor
    requests: list[int]  # their indexes in the batch


@dataclass(slots=True)
class Batch:
    groups: list[Group]
    inputs: list[Work]
    started: float  # time.monotonic() when its stages began: where its requests' queue wait ended


class DigitAPI(ls.LitAPI):
    """Shared worker set-up: hold the board's versions on this worker's device, warmed up."""

    explains = False

    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, setup_failures: SetupFailures,
                 api_path: str):
        super().__init__(max_batch_size=settings.max_batch_size, batch_timeout=settings.batch_timeout_ms / 1000,
                         api_path=api_path)
        self.settings, self.board, self.runtimes, self.setup_failures = settings, board, runtimes, setup_failures

    def setup(self, device: str) -> None:
        logs.configure(self.settings.log_level, self.settings.log_format)  # a spawned process starts bare
        # Ctrl+C in a terminal reaches the whole process group: the main process stops the workers, in
        # order (service.supervisor), rather than each dying with a KeyboardInterrupt traceback.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        torch.set_num_threads(1)  # one core per worker process; more workers, not more threads
        tracing.start()  # when the environment asks for traces
        tracing.stop_on(signal.SIGTERM)  # the server stops a worker with SIGTERM: its last spans are sent first
        if self.explains:  # a burst of explanations yields the CPU to predictions (and to the API servers)
            os.nice(EXPLAIN_NICENESS)
        self.models = Models(self.settings, self.board, self.runtimes, self.api_path, torch.device(device),
                             self.explains)
        try:
            self.models.sync(strict=True)
        except Exception as e:  # the main process says this when the restarts run out
            self.setup_failures.record(self.api_path, f"{type(e).__name__}: {e}")
            raise
        gc.freeze()  # the imports live as long as the worker (see service.__main__); models are freed by refcount
        log.debug("worker ready on %s, holding %s", device, sorted(self.models.held))  # the ready line says it

    def control(self, command: Control) -> str:
        return self.models.control(command)

    def decode_request(self, request: Work) -> Work:
        """Refuse (409) a request for a version this worker does not hold: pinned to one just unloaded."""
        self.models.get(request.version)
        return request

    def batch(self, inputs: list[Work]) -> Batch:
        started = time.monotonic()
        self.models.sync()
        by_version: dict[int, list[int]] = {}
        for index, work in enumerate(inputs):
            by_version.setdefault(work.version, []).append(index)
        groups = []
        for version, requests in by_version.items():
            held = self.models.get(version)
            norm = held.loaded.metadata.normalization
            images = np.concatenate([inputs[i].images for i in requests])
            x = torch.from_numpy(normalize(images, norm.mean, norm.std)).to(self.models.device)
            groups.append(Group(held, x, requests))
        return Batch(groups, inputs, started)

    def predict(self, batch: Batch) -> list[Computed]:
        started = time.monotonic()
        done: list[Computed | None] = [None] * len(batch.inputs)
        size = sum(len(g.x) for g in batch.groups)
        for group in batch.groups:
            version = group.held.loaded.version
            forward = time.monotonic()
            rows, reports = self.compute(group, [batch.inputs[i] for i in group.requests])
            if tracing.on():
                self.trace(batch, group, size, (forward, time.monotonic()))
            bounds = np.cumsum([0, *(len(batch.inputs[i].images) for i in group.requests)]).tolist()
            for i, (a, b) in zip(group.requests, itertools.pairwise(bounds)):
                done[i] = Computed(rows[a:b], version, size, None if reports is None else reports[a:b])
            arrivals = [batch.inputs[i].arrived for i in group.requests]
            metrics.observe_forward(self.endpoint, str(version), arrivals, len(group.x), started)
        return [answer for answer in done if answer is not None]

    def trace(self, batch: Batch, group: Group, size: int, forward: tuple[float, float]) -> None:
        """Each traced request of ``group``: its queue wait, its batch and the forward (``service.tracing``).
        A batch serves many requests, each of its own trace: each gets a batch span of its own, alike."""
        attributes = {"digitserve.batch.size": size, "digitserve.batch.requests": len(batch.inputs),
                      "digitserve.model.version": group.held.loaded.version, "digitserve.pool": self.endpoint}
        for i in group.requests:
            work = batch.inputs[i]
            if work.trace is not None:
                tracing.batch(work.trace, work.queued, batch.started, forward, attributes)

    def unbatch(self, output: list[Computed]) -> list[Computed]:
        return output

    def encode_response(self, output: Computed) -> Computed:
        """Numbers, as computed: each protocol's codec encodes them in the API server."""
        return output

    endpoint = ""  # the metrics' endpoint label of this pool

    @abstractmethod
    def compute(self, group: Group, requests: list[Work]) -> tuple[np.ndarray, list[dict[str, Any]] | None]:
        """One version's requests -> a ``ROW`` per image, in order (and an explain worker's reports)."""

    def rows(self, group: Group) -> np.ndarray:
        """float32 (n, ``ROW``): each image's probabilities, then its typicality (NaN without calibration)."""
        with torch.inference_mode():
            probs, typicality = group.held.outputs(group.x)
        rows = np.empty((len(probs), ROW), dtype=np.float32)
        rows[:, :-1] = probs
        rows[:, -1] = np.nan if typicality is None else typicality
        return rows


class PredictAPI(DigitAPI):
    """``/predict`` (and every protocol's inference): probabilities and typicality, no hooks, under inference mode."""

    endpoint = "predict"

    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, setup_failures: SetupFailures):
        super().__init__(settings, board, runtimes, setup_failures, Pool.PREDICT)

    def compute(self, group: Group, requests: list[Work]) -> tuple[np.ndarray, None]:
        rows = self.rows(group)
        version = str(group.held.loaded.version)
        metrics.observe_predictions(version, rows[:, :-1])
        if group.held.loaded.calibration is not None:
            metrics.observe_typicality(version, rows[:, -1])
        return rows, None


class ExplainAPI(DigitAPI):
    """``/explain``: attributions and hooked activations, in its own worker pool so it never slows /predict."""

    endpoint, explains = "explain", True

    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, setup_failures: SetupFailures):
        super().__init__(settings, board, runtimes, setup_failures, Pool.EXPLAIN)

    def compute(self, group: Group, requests: list[Work]) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Requests that ask for the same computation share one batched explanation."""
        explainer = group.held.explainer
        assert explainer is not None
        counts = [len(work.images) for work in requests]
        bounds = np.cumsum([0, *counts]).tolist()
        kinds: dict[tuple[Any, ...], list[int]] = {}  # computation -> the group's rows that ask for it
        for (a, b), work in zip(itertools.pairwise(bounds), requests):
            o = work.options
            kind = (o["method"], o["steps"], o["top_k"], o["heatmap"], o["quadrature"])
            kinds.setdefault(kind, []).extend(range(a, b))
        targets = [work.options["target"] for work in requests for _ in range(len(work.images))]
        reports: list[Any] = [None] * len(group.x)
        for (method, steps, top_k, heatmap, quadrature), rows in kinds.items():
            explained = explainer.explain(group.x[rows], method, [targets[r] for r in rows], steps, top_k, heatmap,
                                          quadrature)
            for row, report in zip(rows, explained):
                reports[row] = report
        return self.rows(group), reports
