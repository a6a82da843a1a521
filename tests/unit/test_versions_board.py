"""The shared board of versions and the shadow tally: what one process writes, another reads."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from service.versions import MAX_LOADED, Board, ShadowTally, State


def test_a_board_round_trips_serving_canary_and_shadow():
    board = Board(2)
    written = State(2, (2, 1, 3), canary=3, share=0.25, shadow=1, shadow_share=0.5)
    read = board.write(written)
    assert read == written
    assert (read.shadow, read.shadow_share, read.canary, read.share) == (1, 0.5, 3, 0.25)
    assert board.write(State(2, (2, 1))) == State(2, (2, 1)), "no shadow reads back as None, share 0"


def test_routing_ignores_the_shadow():
    state = State(2, (2, 1), shadow=1, shadow_share=1.0)
    assert {state.routed(None) for _ in range(100)} == {2}
    assert state.routed(1) == 1


def _add(tally: ShadowTally) -> None:
    for _ in range(100):
        tally.add(4, instances=2, agreeing=1, difference=0.5)


def test_the_tally_sums_every_process():
    tally = ShadowTally()
    context = mp.get_context("fork")
    workers = [context.Process(target=_add, args=(tally,)) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    tally.add(4, dropped=7)
    assert tally.read() == {4: {"instances": 600, "agreement": 0.5, "mean_abs_confidence_difference": 0.25,
                                "dropped": 7}}


def test_a_version_only_dropped_has_no_agreement_yet():
    tally = ShadowTally()
    tally.add(3, dropped=5)
    assert tally.read() == {3: {"instances": 0, "agreement": None, "mean_abs_confidence_difference": None,
                                "dropped": 5}}


def test_past_its_slots_the_least_seen_version_makes_room():
    tally = ShadowTally()
    slots = MAX_LOADED * 4
    for version in range(1, slots + 1):
        tally.add(version, instances=version)
    tally.add(slots + 1, instances=1000)
    versions = set(tally.read())
    assert 1 not in versions and slots + 1 in versions and len(versions) == slots


@pytest.mark.parametrize("share", [0.0, 0.000001, 0.5, 1.0])
def test_shares_keep_a_millionth(share):
    board = Board(1)
    assert board.write(State(1, (1, 2), shadow=2, shadow_share=share)).shadow_share == share
