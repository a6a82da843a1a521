"""The unit of work an API server hands a model worker: one request's images, read and preprocessed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(slots=True)
class Work:
    """One request's images in MNIST's frame (float32 (n, 784) in 0..1), its options, when it arrived, and
    the model version that is to compute it (chosen by the API server: served, canary or pinned).

    Normalising with the mean/std is left to the worker: it holds the model, whose metadata says which.
    """

    images: np.ndarray
    options: dict[str, Any]
    arrived: float  # time.monotonic() at arrival (system-wide on Linux, so comparable across processes)
    version: int = 0
    units: float = 0.0  # its work units (``service.costs``): the worker fits its costs on them
    notes: list[dict[str, Any]] | None = None  # per image, what the framing found (box, flags): for the answer
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for the answer: not computed

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as raw bytes: 3-4x faster both ways than numpy's own pickling, on every request."""
        data = np.asarray(self.images, dtype=np.float32).tobytes()
        return _work, (data, len(self.images), self.options, self.arrived, self.version, self.units, self.notes,
                       self.deadline)


def _work(data: bytes, n: int, options: dict[str, Any], arrived: float, version: int, units: float,
          notes: list[dict[str, Any]] | None, deadline: float) -> Work:
    return Work(np.frombuffer(data, np.float32).reshape(n, -1), options, arrived, version, units, notes, deadline)


def work_units(images: int, options: dict[str, Any]) -> float:
    """The passes through the model a request needs beyond one per image (``service.costs``): integrated
    gradients by the midpoint rule ``steps`` per image; any other none (the exact path integral's two
    passes cost no more than a saliency map's report: its cost is the image's)."""
    if options.get("method") == "integrated_gradients" and options.get("quadrature") == "midpoint":
        return float(images * options.get("steps", 1))
    return 0.0


@dataclass(frozen=True, slots=True)
class Control:
    """An instruction to one worker, on the same pipe as requests: ``prepare`` (load and warm up) or ``drop``
    a version. The worker answers it like a request, between batches."""

    op: str
    version: int
