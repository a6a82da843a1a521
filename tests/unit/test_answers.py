"""Answers, whatever the protocol: a worker's numbers put back among the request's instances (no_digit
rows in their places, flags), the native JSON records made from them, and what crosses the pipe."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from service.http import native
from service.http.dataplane import NOT_A_DIGIT, answer_of
from service.imaging import NO_DIGIT
from service.work import ROW, Computed


def _rows(probs: np.ndarray, typicality: list[float] | None) -> np.ndarray:
    column = np.full(len(probs), np.nan) if typicality is None else np.asarray(typicality)
    return np.column_stack([probs, column]).astype(np.float32)


def _probs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(10), n).astype(np.float32)


def test_rows_of_instances_without_a_digit_are_put_back_in_place_as_zeros():
    probs = _probs(2)
    notes = [{"box": [0, 0, 5, 5], "flags": []}, {"box": None, "flags": [NO_DIGIT]},
             {"box": [1, 1, 4, 4], "flags": ["low_contrast"]}, {"box": None, "flags": [NO_DIGIT]}]
    answer = answer_of(4, Computed(_rows(probs, [0.5, 0.7]), 2, 8), notes, below=0.01)
    assert answer.rows.shape == (4, ROW) and answer.no_digit.tolist() == [False, True, False, True]
    np.testing.assert_array_equal(answer.rows[[0, 2], :10], probs)
    assert not answer.rows[[1, 3]].any()
    assert answer.flags == [[], [NO_DIGIT], ["low_contrast"], [NO_DIGIT]]
    assert (answer.version, answer.batch_size) == (2, 8)


def test_not_a_digit_follows_the_framings_flags_below_the_threshold_only():
    notes = [{"box": [0, 0, 5, 5], "flags": ["low_contrast"]}, {"box": [0, 0, 5, 5], "flags": []}]
    answer = answer_of(2, Computed(_rows(_probs(2), [0.001, 0.5]), 1, 2), notes, below=0.01)
    assert answer.flags == [["low_contrast", NOT_A_DIGIT], []]
    uncalibrated = answer_of(2, Computed(_rows(_probs(2), None), 1, 2), None, below=0.01)
    assert uncalibrated.flags == [[], []]  # NaN typicality is never "below"


def test_native_records_carry_label_confidence_typicality_box_and_flags():
    probs = _probs(2, seed=3)
    notes = [{"box": [0, 0, 5, 5], "flags": []}, {"box": None, "flags": [NO_DIGIT]},
             {"box": [2, 2, 9, 9], "flags": []}]
    answer = answer_of(3, Computed(_rows(probs, [0.004, 0.5]), 2, 3), notes, below=0.01)
    first, missing, third = native.records(answer, {})
    assert first["label"] == int(probs[0].argmax()) and first["confidence"] == pytest.approx(float(probs[0].max()))
    assert first["probabilities"] == pytest.approx(probs[0].tolist())
    assert first["typicality"] == pytest.approx(0.004) and first["flags"] == [NOT_A_DIGIT]
    assert first["box"] == [0, 0, 5, 5]
    assert missing == {"label": None, "confidence": None, "probabilities": None, "typicality": 0.0, "box": None,
                       "flags": [NO_DIGIT]}
    assert third["label"] == int(probs[1].argmax()) and third["box"] == [2, 2, 9, 9] and third["flags"] == []


def test_frames_answer_without_box_and_flags_unless_flagged_and_null_typicality_without_calibration():
    answer = answer_of(2, Computed(_rows(_probs(2), None), 1, 2), None, below=0.01)
    records = native.records(answer, {})
    assert all(record["typicality"] is None and "box" not in record and "flags" not in record
               for record in records)


def test_explain_records_merge_each_report_with_its_prediction():
    reports = [{"method": "saliency", "target": 3, "attributions": [0.0] * 784}]
    notes = [{"box": None, "flags": [NO_DIGIT]}, {"box": [0, 0, 3, 3], "flags": []}]
    answer = answer_of(2, Computed(_rows(_probs(1), [0.5]), 1, 1, reports), notes, below=0.01)
    nothing, explained = native.records(answer, {"method": "saliency"})
    assert nothing["method"] == "saliency" and nothing["attributions"] is None and nothing["flags"] == [NO_DIGIT]
    assert explained["target"] == 3 and explained["method"] == "saliency" and "label" in explained


def test_a_computed_answer_crosses_the_pipe_intact():
    computed = Computed(_rows(_probs(3), [0.1, float("nan"), 0.9]), 4, 17, None)
    back = pickle.loads(pickle.dumps(computed))
    np.testing.assert_array_equal(back.rows[:, :10], computed.rows[:, :10])
    assert math.isnan(back.rows[1, -1]) and (back.version, back.batch_size, back.reports) == (4, 17, None)
