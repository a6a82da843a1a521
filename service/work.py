"""What crosses between an API server and a model worker: the pools, a unit of work, the explanation
methods it may ask for, its computed answer (numbers, never a protocol's bytes), and controls."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, get_args

import numpy as np

# Per image, what a predict worker computes: ten (calibrated) probabilities, then the typicality (NaN for
# a version without calibration). Every protocol's codec reads its answers from these rows.
ROW: Final = 11

# The explanation methods and integrated gradients' quadratures, each listed here only: the request schema
# (and so the OpenAPI document), the explain worker and the page's method buttons (checked by a test) read them.
Method = Literal["saliency", "gradient_x_input", "integrated_gradients"]
METHODS: Final[tuple[Method, ...]] = get_args(Method)
DEFAULT_METHOD: Final[Method] = "integrated_gradients"
Quadrature = Literal["midpoint", "exact"]
QUADRATURES: Final[tuple[Quadrature, ...]] = get_args(Quadrature)
DEFAULT_QUADRATURE: Final[Quadrature] = "exact"


class Pool(StrEnum):
    """A pool of model workers. Its value is the LitServe ``api_path`` that names the pool."""

    PREDICT = "/predict"
    EXPLAIN = "/explain"

    @property
    def label(self) -> str:
        """Its name in metrics, logs and /info: ``predict``, ``explain``."""
        return self.value[1:]


@dataclass(slots=True)
class Work:
    """One request's images in MNIST's frame (float32 (n, 784) in 0..1), what the worker needs of its
    options (an explanation's method, steps...), when it arrived, the model version that is to
    compute it (chosen by the API server: served, canary or pinned), and where its spans go when traced.

    Normalising with the mean/std is left to the worker: it holds the model, whose metadata says which.
    """

    images: np.ndarray
    options: dict[str, Any]
    arrived: float  # time.monotonic() at arrival (system-wide on Linux, so comparable across processes)
    version: int = 0
    units: float = 0.0  # its work units (``service.costs``): the worker fits its costs on them
    deadline: float = float("inf")  # time.monotonic() past which nobody waits for the answer: not computed
    trace: str | None = None  # the W3C traceparent of the span its worker's spans go under (service.tracing)
    queued: float = 0.0  # time.monotonic() when it was put on a worker's pipe: set by the worker, from the message

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickled as raw bytes: faster both ways than numpy's own pickling, on every request
        (docs/performance.md)."""
        data = np.asarray(self.images, dtype=np.float32).tobytes()
        return _work, (data, len(self.images), self.options, self.arrived, self.version, self.units, self.deadline,
                       self.trace)


def _work(data: bytes, n: int, options: dict[str, Any], arrived: float, version: int, units: float,
          deadline: float, trace: str | None) -> Work:
    return Work(np.frombuffer(data, np.float32).reshape(n, -1), options, arrived, version, units, deadline, trace)


@dataclass(slots=True)
class Computed:
    """A worker's answer to one ``Work``: a ``ROW`` of numbers per image, the version that computed them,
    the size of the forward they were part of, and (explain workers) each image's report: its
    attributions and hooked activations, plain numbers and lists."""

    rows: np.ndarray
    version: int
    batch_size: int
    reports: list[dict[str, Any]] | None = None

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        rows = np.asarray(self.rows, dtype=np.float32)
        return _computed, (rows.tobytes(), self.version, self.batch_size, self.reports)


def _computed(data: bytes, version: int, batch_size: int, reports: list[dict[str, Any]] | None) -> Computed:
    return Computed(np.frombuffer(data, np.float32).reshape(-1, ROW), version, batch_size, reports)


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
