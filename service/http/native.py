"""digitserve's own protocol (and KServe V1's, the same instances and answers): an ``Answer`` -> JSON.

One record per instance, in request order: ``label``, ``confidence``, ``probabilities``,
``typicality`` (None for a version without calibration), the framing's note (``box``) and
``flags``; /explain's records add the report of what was explained. A picture in which no digit
was found is a record too, ``no_digit`` (DESIGN.md, "Not a digit"), never a failed request.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from service.http.dataplane import Answer
from service.imaging import NO_DIGIT

# /explain's record of a picture without a digit: what is explained and how, with nothing to show for it
_EXPLAIN_NOTHING = {"target": None, "attributions": None, "input": None, "layers": None, "convergence_delta": None,
                    "heatmap_png": None}


def encode(answer: Answer, model: str, options: dict[str, Any]) -> bytes:
    """The answer's JSON body: ``{"model": {"name", "version"}, "predictions": [...]}``."""
    # orjson: an order of magnitude faster than json on a batch's floats (docs/performance.md)
    return orjson.dumps({"model": {"name": model, "version": answer.version}, "predictions": records(answer, options)})


def records(answer: Answer, options: dict[str, Any]) -> list[dict[str, Any]]:
    reports = iter(answer.reports or ())
    out: list[dict[str, Any]] = []
    no_digit = answer.no_digit.tolist()
    for i, row in enumerate(answer.rows.tolist()):  # one conversion, then plain Python: see answer_of
        if no_digit[i]:
            out.append(no_digit_record(options))
            continue
        probabilities, typicality = row[:-1], row[-1]
        confidence = max(probabilities)
        record: dict[str, Any] = next(reports) if answer.reports is not None else {}
        record.update(label=probabilities.index(confidence), confidence=confidence, probabilities=probabilities,
                      typicality=None if math.isnan(typicality) else typicality)
        if answer.notes is not None:
            record.update(answer.notes[i])
        if answer.notes is not None or answer.flags[i]:
            record["flags"] = answer.flags[i]
        out.append(record)
    return out


def no_digit_record(options: dict[str, Any]) -> dict[str, Any]:
    """The record of a picture without a digit; /explain's (its options name a ``method``) has its keys too."""
    record: dict[str, Any] = {"label": None, "confidence": None, "probabilities": None, "typicality": 0.0,
                              "box": None, "flags": [NO_DIGIT]}
    if "method" in options:
        record.update(method=options["method"], **_EXPLAIN_NOTHING)
    return record
