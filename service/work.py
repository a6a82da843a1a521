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
    units: float = 0.0  # its work units (``service.http.admission``): the worker measures its rate in them

    def __reduce__(self) -> tuple[Any, tuple[bytes, int, dict[str, Any], float, int, float]]:
        """Pickled as raw bytes: 3-4x faster both ways than numpy's own pickling, on every request."""
        data = self.images.astype(np.float32, copy=False).tobytes()
        return _work, (data, len(self.images), self.options, self.arrived, self.version, self.units)


def _work(data: bytes, n: int, options: dict[str, Any], arrived: float, version: int, units: float) -> Work:
    return Work(np.frombuffer(data, np.float32).reshape(n, -1), options, arrived, version, units)


def work_units(images: int, options: dict[str, Any]) -> float:
    """The passes through the model a request needs beyond one per image (``service.costs``): integrated
    gradients by the midpoint rule ``steps`` per image, the exact path integral two, any other none."""
    if options.get("method") == "integrated_gradients":
        return float(images * (options.get("steps", 1) if options.get("quadrature") == "midpoint" else 2))
    return 0.0


@dataclass(frozen=True, slots=True)
class Control:
    """An instruction to one worker, on the same pipe as requests: ``prepare`` (load and warm up) or ``drop``
    a version. The worker answers it like a request, between batches."""

    op: str
    version: int
