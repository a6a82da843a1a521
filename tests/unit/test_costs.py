"""The workers' cost model, in process: fitted on mixed batches, it tells light and heavy work apart."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from service.costs import REFIT_S, SETTLED_BATCHES, Costs, Fit

TRUE = np.array([0.001, 0.003, 0.00005])  # seconds per request, per image, per unit (an IG step)


def seconds(requests: int, images: int, units: float) -> float:
    return float(TRUE @ [requests, images, units])


def ticking() -> Fit:
    """A fit whose clock moves a second a batch: every batch is solved for."""
    return Fit(clock=itertools.count().__next__)


def test_a_fit_on_light_and_heavy_explanations_predicts_both():
    rng = np.random.default_rng(0)
    fit, fitted = ticking(), None
    for _ in range(60):
        requests = int(rng.integers(1, 6))
        images = requests * int(rng.integers(1, 9))
        units = images * 256 if rng.random() < 0.3 else 0.0  # some integrated gradients, most saliency
        fitted = fit.add(requests, images, units, seconds(requests, images, units) * rng.uniform(0.95, 1.05))
    assert fitted is not None
    costs = Costs(1)
    costs.publish(0, fitted)
    for work in ((1, 8, 8 * 256), (1, 1, 0.0), (4, 32, 0.0)):
        assert costs.seconds(*work) == pytest.approx(seconds(*work), rel=0.1), work


def test_when_the_terms_move_together_the_fit_still_predicts_that_mix():
    fit, fitted = ticking(), None
    for _ in range(30):  # single-image requests only: requests == images, no units
        fitted = fit.add(8, 8, 0.0, seconds(8, 8, 0.0))
    costs = Costs(1)
    assert fitted is not None and (fitted >= 0).all()
    costs.publish(0, fitted)
    assert costs.seconds(64, 64, 0.0) == pytest.approx(seconds(64, 64, 0.0), rel=0.01)


def test_a_pool_of_workers_shares_the_work_and_an_unfitted_pool_costs_nothing():
    costs = Costs(2)
    assert costs.seconds(10, 10, 0) == 0.0
    costs.publish(0, TRUE)
    costs.publish(1, TRUE)
    assert costs.seconds(10, 80, 1000) == pytest.approx(seconds(10, 80, 1000) / 2)


def test_the_fit_forgets_old_batches_so_it_follows_contention():
    fit = ticking()
    for _ in range(20):
        fit.add(1, 8, 2048, seconds(1, 8, 2048))
    slowed = None
    for _ in range(40):  # the cores are now shared: the same work takes three times as long
        slowed = fit.add(1, 8, 2048, 3 * seconds(1, 8, 2048))
    costs = Costs(1)
    assert slowed is not None
    costs.publish(0, slowed)
    assert costs.seconds(1, 8, 2048) == pytest.approx(3 * seconds(1, 8, 2048), rel=0.1)


def test_a_few_units_lost_in_noise_are_not_multiplied_into_a_heavy_request():
    """Light explanations of a few units each, on a busy core (their time off by milliseconds): no cost
    per unit is read off them, so a 4,096-unit request is not called seconds long; one heavy batch
    later, it is fitted."""
    rng = np.random.default_rng(1)
    fit, fitted = ticking(), None
    for _ in range(40):
        images = int(rng.integers(1, 4))
        units = float(images * 8) if rng.random() < 0.5 else 0.0
        fitted = fit.add(1, images, units, seconds(1, images, units) + rng.uniform(0, 0.02))
    costs = Costs(1)
    assert fitted is not None
    costs.publish(0, fitted)
    assert costs.seconds(1, 16, 4096) < seconds(1, 16, 4096)
    for _ in range(3):
        fitted = fit.add(1, 16, 4096, seconds(1, 16, 4096))
    costs.publish(0, fitted)
    assert costs.seconds(1, 16, 4096) == pytest.approx(seconds(1, 16, 4096), rel=0.3)


def test_light_traffic_after_heavy_keeps_what_a_unit_costs():
    """Heavy explanations, then a long run of light ones (no units): the next heavy request is still
    known to be heavy."""
    fit = ticking()
    for _ in range(5):
        fit.add(1, 8, 2048, seconds(1, 8, 2048))
    fitted = None
    for _ in range(500):  # 25 busy seconds: the heavy batches' sums have all but gone
        fitted = fit.add(2, 16, 0.0, seconds(2, 16, 0.0))
    costs = Costs(1)
    assert fitted is not None
    costs.publish(0, fitted)
    assert costs.seconds(1, 8, 2048) == pytest.approx(seconds(1, 8, 2048), rel=0.1)


def test_a_batch_the_worker_was_preempted_in_does_not_make_it_look_slow():
    """A batch that took 100 times its work (the worker preempted, paused) raises the estimate little;
    the first batch is fitted at once (a fresh worker's first burst is bounded too)."""
    fit = ticking()
    assert fit.add(2, 4, 0.0, seconds(2, 4, 0.0)) is not None
    for _ in range(SETTLED_BATCHES + 2):
        fit.add(2, 4, 0.0, seconds(2, 4, 0.0))
    fit.add(2, 4, 0.0, 100 * seconds(2, 4, 0.0))  # preempted
    fitted = fit.add(2, 4, 0.0, seconds(2, 4, 0.0))
    costs = Costs(1)
    assert fitted is not None
    costs.publish(0, fitted)
    assert costs.seconds(16, 40, 0.0) < 1.5 * seconds(16, 40, 0.0)


def test_light_batches_are_solved_for_at_most_every_refit_interval_heavy_ones_always():
    now = [0.0]
    fit = Fit(clock=lambda: now[0])
    assert all(fit.add(1, 1, 0.0, seconds(1, 1, 0.0)) is not None for _ in range(SETTLED_BATCHES))
    assert fit.add(1, 1, 0.0, seconds(1, 1, 0.0)) is None  # folded in, not solved for
    assert fit.add(1, 8, 2048, seconds(1, 8, 2048)) is not None  # heavy: solved at once
    now[0] += REFIT_S
    assert fit.add(1, 1, 0.0, seconds(1, 1, 0.0)) is not None
