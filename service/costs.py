"""What work costs a worker, in seconds, so that admission can tell how long a request would wait.

A batch's time is modelled as ``per_request x requests + per_image x images + per_unit x units``:
a fixed part per request (its answer), a part per image (a forward, or an explanation's report),
and a part per work unit beyond that (integrated gradients' steps). Each worker fits the three on
its own recent batches (least squares over sums that decay with busy time, so the fit follows
contention for the cores) and publishes them in shared memory; the API servers read them.
One rate per second would not do: a light explanation costs its report, a heavy one its steps, and
a rate learnt on the light ones would call a heavy one dozens of seconds long. For the same reason
the per-unit cost is fitted only while batches of ``FIT_UNITS`` units or so are remembered: a few
units' time is lost in the noise of a busy core, and a cost per unit read off it would be
multiplied by thousands of units. Otherwise the last cost per unit fitted is kept (0 at first), so
light traffic in between does not make the next heavy request look free.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import numpy as np

MEMORY_S = 3.0  # batches older than about this much busy time are forgotten ...
MEMORY_BATCHES = 200  # ... or than about this many batches, whichever comes first
OUTLIER = 4.0  # a batch counts as taking at most this many times what the fit predicted for it ...
SETTLED_BATCHES = 8  # ... once this many were fitted (a rougher fit cannot tell an outlier)
REFIT_S = 0.02  # light batches are folded in at once but solved for at most this often: a solve costs
#                 more than a small batch's forward, and admission needs no fresher estimate
_TERMS = 3  # per request, per image, per unit
_RIDGE = 1e-9  # keeps the fit defined when the terms move together (single-image requests only)
FIT_UNITS = 256.0  # the root of the remembered batches' summed squared units needed to fit a cost per unit


class Costs:
    """Each worker's fitted costs (seconds per request, per image, per unit), in shared memory."""

    def __init__(self, workers: int):
        self._shared: Any = mp.get_context("spawn").RawArray("d", workers * _TERMS)
        self.workers = workers

    def publish(self, worker: int, fitted: np.ndarray) -> None:
        self._shared[worker * _TERMS:(worker + 1) * _TERMS] = fitted.tolist()

    def seconds(self, requests: float, images: float, units: float) -> float:
        """How long the pool takes for this much work: its workers share it (those that fitted a model)."""
        values = self._shared[:]  # one read of the shared array
        fitted, per_request, per_image, per_unit = 0, 0.0, 0.0, 0.0
        for at in range(0, len(values), _TERMS):
            request_s, image_s, unit_s = values[at:at + _TERMS]
            if request_s or image_s or unit_s:
                fitted += 1
                per_request, per_image, per_unit = per_request + request_s, per_image + image_s, per_unit + unit_s
        if not fitted:
            return 0.0
        # the fitted workers' mean costs, the work shared among them
        return (per_request * requests + per_image * images + per_unit * units) / (fitted * fitted)


class Fit:
    """A worker's own least-squares fit of its batches' times (local to the worker process)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._xx = np.zeros((_TERMS, _TERMS))
        self._xt = np.zeros(_TERMS)
        self._per_unit = 0.0  # the last cost per unit the remembered batches could tell
        self._batches = 0  # batches fitted
        self._fitted: np.ndarray | None = None
        self._clock, self._due = clock, 0.0

    def add(self, requests: int, images: int, units: float, seconds: float) -> np.ndarray | None:
        """Fold in one batch; newly fitted costs, or None when there is nothing new to publish (nothing to
        fit, or the last solve is recent and the batch light). A batch that took far longer than
        predicted (the worker was preempted, swapped, paused) counts as ``OUTLIER`` times the
        prediction: contention that lasts raises the fit by that much a batch."""
        if seconds <= 0 or requests <= 0:
            return None
        fitted = self._fitted
        # not while the first heavy batches teach what a unit costs
        if self._batches >= SETTLED_BATCHES and (units == 0 or self._per_unit > 0) and fitted is not None:
            predicted = fitted[0] * requests + fitted[1] * images + fitted[2] * units
            if predicted > 0:
                seconds = min(seconds, OUTLIER * predicted)
        keep = min(math.exp(-seconds / MEMORY_S), 1 - 1 / MEMORY_BATCHES)
        x = np.array([requests, images, units], dtype=np.float64)
        self._xx *= keep
        self._xx += np.outer(x, x)
        self._xt *= keep
        self._xt += x * seconds
        self._batches += 1
        now = self._clock()
        if units == 0 and self._batches > SETTLED_BATCHES and now < self._due:
            return None
        self._due = now + REFIT_S
        self._fitted = self._fit()
        return self._fitted

    def _fit(self) -> np.ndarray:
        """The three costs from the remembered sums: per unit only where units tell it, none negative."""
        ridge = _RIDGE * (np.trace(self._xx) + 1.0)
        if self._xx[2, 2] >= FIT_UNITS ** 2:
            fitted = self._solve(np.ones(_TERMS, bool), ridge, 0.0)
            self._per_unit = fitted[2] = max(fitted[2], 0.0)
        else:  # too few units remembered to tell their cost: keep the last one told (0 at first)
            fitted = self._solve(np.array([True, True, False]), ridge, self._per_unit)
        if (fitted[:2] < 0).any():  # a negative cost fits noise: drop that term and fit the other
            fitted = self._solve(np.array([*(fitted[:2] >= 0), False]), ridge, fitted[2])
        return np.maximum(fitted, 0.0)

    def _solve(self, terms: np.ndarray, ridge: float, per_unit: float) -> np.ndarray:
        """Least squares on the chosen terms, given the cost per unit where it is not one of them; the
        other terms cost 0."""
        fitted = np.zeros(_TERMS)
        if not terms[2]:
            fitted[2] = per_unit
        xt = self._xt - self._xx[:, 2] * fitted[2]
        sub = np.ix_(terms, terms)
        fitted[terms] = np.linalg.solve(self._xx[sub] + ridge * np.eye(int(terms.sum())), xt[terms])
        return fitted
