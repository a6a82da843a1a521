"""The LitAPI stages that run in the model workers: setup, decode_request, batch, predict, unbatch, encode_response.

Requests arrive already validated and preprocessed by the API server (``service.http.prepare``):
each is a ``Work`` of float32 (n, 784) images in 0..1 and the model version to compute it. A
worker merges the requests of one version into one forward pass (a batch holds one group per
version; a switch happens between batches, so usually there is one), normalises them with that
version's own mean/std, and splits the answers back in order. Every answer says the version that
computed it.
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
import orjson
import torch

from service import answers, logs, metrics
from service.config import Settings
from service.imaging import normalize
from service.versions import Board, Runtimes, SetupFailures
from service.work import Control, Work
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


@dataclass(slots=True)
class Answer:
    """One request's answer rows (one per image) and the version that computed them."""

    rows: list[Any]
    version: int
    batch_size: int
    options: dict[str, Any]
    notes: list[dict[str, Any]] | None = None  # every instance's, those without a digit included


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
        return Batch(groups, inputs)

    def predict(self, batch: Batch) -> list[Answer]:
        started = time.monotonic()
        done: list[Answer | None] = [None] * len(batch.inputs)
        size = sum(len(g.x) for g in batch.groups)
        for group in batch.groups:
            version = group.held.loaded.version
            rows = self.compute(group, [batch.inputs[i] for i in group.requests])
            bounds = np.cumsum([0, *(len(batch.inputs[i].images) for i in group.requests)]).tolist()
            for i, (a, b) in zip(group.requests, itertools.pairwise(bounds)):
                done[i] = Answer(rows[a:b], version, size, batch.inputs[i].options, batch.inputs[i].notes)
            arrivals = [batch.inputs[i].arrived for i in group.requests]
            metrics.observe_forward(self.endpoint, str(version), arrivals, len(group.x), started)
        return [answer for answer in done if answer is not None]

    def unbatch(self, output: list[Answer]) -> list[Answer]:
        return output

    def encode_response(self, output: Answer) -> tuple[bytes, int, int]:
        """The JSON answer, the size of the forward it was part of, and the version (for the log and metrics)."""
        held = self.models.held.get(output.version)
        ref = held.ref if held is not None else {"name": self.settings.model, "version": output.version}
        rows = answers.spliced(output.rows, output.notes, output.options)
        # orjson: 20x faster than json on a 32-image answer's 320 floats, which cost the worker a quarter of its time
        return orjson.dumps({"model": ref, "predictions": rows}), output.batch_size, output.version

    endpoint = ""  # the metrics' endpoint label of this pool

    @abstractmethod
    def compute(self, group: Group, requests: list[Work]) -> list[Any]:
        """One version's requests -> one answer row per image, in order."""


class PredictAPI(DigitAPI):
    """``/predict``: probabilities for every image, no hooks, under inference mode.

    A request whose options say ``"output": "tensor"`` (the Open Inference Protocol's, set by the API
    server) is answered with raw float32 rows of ``TENSOR_ROW`` values per image (the probabilities, then
    the typicality, NaN where the version has none), which the API server encodes as V2 tensors; every
    other gets the JSON of /predict."""

    endpoint = "predict"

    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, setup_failures: SetupFailures):
        super().__init__(settings, board, runtimes, setup_failures, "/predict")

    def compute(self, group: Group, requests: list[Work]) -> list[Any]:
        with torch.inference_mode():
            probs, typicality = group.held.outputs(group.x)
        version = str(group.held.loaded.version)
        metrics.observe_predictions(version, probs)
        metrics.observe_typicality(version, typicality, self.settings.not_a_digit_below)
        for work in requests:  # no_digit is counted where it is answered (service.http.dataplane)
            metrics.observe_flags(version, [flag for note in work.notes or () if not answers.no_digit(note)
                                            for flag in note["flags"]])
        tensors = tensor_rows(probs, typicality)
        if all(work.options.get("output") == "tensor" for work in requests):  # V2's: rows only, no JSON to build
            return list(zip(itertools.repeat(None), tensors))
        return list(zip(predictions(probs, typicality, self.settings.not_a_digit_below), tensors))

    def encode_response(self, output: Answer) -> tuple[bytes, int, int]:
        if output.options.get("output") == "tensor":  # the request's rows, float32, one after the other
            rows = [row for _, row in output.rows]
            one = len(rows) == 1  # np.stack costs 4 us for one row, 19 us for 32; this 0.4 and 6
            tensor = rows[0].astype(np.float32, copy=False) if one else np.concatenate(rows, dtype=np.float32)
            return tensor.tobytes(), output.batch_size, output.version
        return super().encode_response(Answer([answer for answer, _ in output.rows], output.version,
                                              output.batch_size, output.options, output.notes))


class ExplainAPI(DigitAPI):
    """``/explain``: attributions and hooked activations, in its own worker pool so it never slows /predict."""

    endpoint, explains = "explain", True

    def __init__(self, settings: Settings, board: Board, runtimes: Runtimes, setup_failures: SetupFailures):
        super().__init__(settings, board, runtimes, setup_failures, "/explain")

    def compute(self, group: Group, requests: list[Work]) -> list[Any]:
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
        with torch.inference_mode():  # the answer's part of the report, as /predict gives it
            probs, typicality = group.held.outputs(group.x)
        for report, answer in zip(reports, predictions(probs, typicality, self.settings.not_a_digit_below)):
            report.update(answer)
        return reports


NOT_A_DIGIT = "not_a_digit"
TENSOR_ROW = 11  # values per image in a tensor answer: ten probabilities and the typicality


def predictions(probs: np.ndarray, typicality: np.ndarray | None = None, below: float = 0.0) -> list[dict[str, Any]]:
    """Each image's answer: the label, its confidence, all ten probabilities, and its typicality (None for
    a version without calibration), flagged ``not_a_digit`` below the threshold."""
    labels = probs.argmax(1)
    confidences = probs[np.arange(len(probs)), labels]
    typical = [None] * len(probs) if typicality is None else typicality.tolist()
    answers = []
    for label, confidence, p, t in zip(labels.tolist(), confidences.tolist(), probs.tolist(), typical):
        answer = {"label": label, "confidence": confidence, "probabilities": p, "typicality": t}
        if t is not None and t < below:
            answer["flags"] = [NOT_A_DIGIT]
        answers.append(answer)
    return answers


def tensor_rows(probs: np.ndarray, typicality: np.ndarray | None) -> np.ndarray:
    """float32 (n, TENSOR_ROW): each image's probabilities, then its typicality (NaN without calibration)."""
    rows = np.empty((len(probs), TENSOR_ROW), dtype=np.float32)
    rows[:, :-1] = probs
    rows[:, -1] = np.nan if typicality is None else typicality
    return rows
