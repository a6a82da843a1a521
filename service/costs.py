"""What work costs a worker, in seconds, so that admission can tell how long a request would wait.

A batch's time is modelled as ``per_request x requests + per_image x images + per_unit x units``:
a fixed part per request (its answer), a part per image (a forward, or an explanation's report),
and a part per work unit beyond that (integrated gradients' steps). Each worker fits the three on
its own recent batches (least squares over sums that decay with busy time, so the fit follows
contention for the cores) and publishes them in shared memory; the API servers read them.
One rate per second would not do: a light explanation costs its report, a heavy one its steps, and
a rate learnt on the light ones would call a heavy one dozens of seconds long.
"""

from __future__ import annotations

import math
import multiprocessing as mp
from typing import Any

import numpy as np

MEMORY_S = 3.0  # batches older than about this much busy time are forgotten
_TERMS = 3  # per request, per image, per unit
_RIDGE = 1e-9  # keeps the fit defined when the terms move together (single-image requests only)


class Costs:
    """Each worker's fitted costs (seconds per request, per image, per unit), in shared memory."""

    def __init__(self, workers: int):
        self._shared: Any = mp.get_context("spawn").RawArray("d", workers * _TERMS)
        self.workers = workers

    def publish(self, worker: int, fitted: np.ndarray) -> None:
        self._shared[worker * _TERMS:(worker + 1) * _TERMS] = fitted.tolist()

    def seconds(self, requests: float, images: float, units: float) -> float:
        """How long the pool takes for this much work: its workers share it (those that fitted a model)."""
        fits = [self._shared[w * _TERMS:(w + 1) * _TERMS] for w in range(self.workers)]
        fits = [f for f in fits if any(f)]
        if not fits:
            return 0.0
        per_request, per_image, per_unit = (sum(f[i] for f in fits) / len(fits) for i in range(_TERMS))
        return (per_request * requests + per_image * images + per_unit * units) / len(fits)


class Fit:
    """A worker's own least-squares fit of its batches' times (local to the worker process)."""

    def __init__(self) -> None:
        self._xx = np.zeros((_TERMS, _TERMS))
        self._xt = np.zeros(_TERMS)

    def add(self, requests: int, images: int, units: float, seconds: float) -> np.ndarray | None:
        """Fold in one batch; the fitted costs, or None while there is nothing to fit."""
        if seconds <= 0 or requests <= 0:
            return None
        keep = math.exp(-seconds / MEMORY_S)
        x = np.array([requests, images, units], dtype=np.float64)
        self._xx = self._xx * keep + np.outer(x, x)
        self._xt = self._xt * keep + x * seconds
        ridge = _RIDGE * (np.trace(self._xx) + 1.0)
        fitted = np.linalg.solve(self._xx + ridge * np.eye(_TERMS), self._xt)
        if (fitted < 0).any():  # a negative cost fits noise: drop those terms and fit the rest
            keep_terms = fitted >= 0
            fitted = np.zeros(_TERMS)
            sub = np.ix_(keep_terms, keep_terms)
            fitted[keep_terms] = np.linalg.solve(self._xx[sub] + ridge * np.eye(int(keep_terms.sum())),
                                                 self._xt[keep_terms])
            fitted = np.maximum(fitted, 0.0)
        return fitted
