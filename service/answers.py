"""The answer rows no model computes: pictures in which no digit is found (DESIGN.md, "Not a digit").

Such a picture is answered per instance, not by failing its request: the API server leaves it out
of the images a worker computes (``service.http.prepare``) and keeps its note, and the rows are put
back in request order here: by the worker for the JSON it writes, by the API server where no
picture of a request has a digit (no worker is asked) and for V2's tensors.
"""

from __future__ import annotations

from typing import Any

NO_DIGIT = "no_digit"
# /explain's no_digit row: what is explained and how, with nothing to show for it
_EXPLAIN_NOTHING = {"target": None, "attributions": None, "input": None, "layers": None, "convergence_delta": None,
                    "heatmap_png": None}


def no_digit(note: dict[str, Any] | None) -> bool:
    return note is not None and NO_DIGIT in note["flags"]


def no_digit_row(options: dict[str, Any]) -> dict[str, Any]:
    """The row of a picture without a digit; /explain's (its options name a ``method``) has its keys too."""
    row: dict[str, Any] = {"label": None, "confidence": None, "probabilities": None, "typicality": 0.0,
                           "box": None, "flags": [NO_DIGIT]}
    if "method" in options:
        row.update(method=options["method"], **_EXPLAIN_NOTHING)
    return row


def found(notes: list[dict[str, Any]] | None) -> list[int]:
    """The indexes of the instances with a digit (all when there are no notes)."""
    return [i for i, note in enumerate(notes or ()) if not no_digit(note)]


def spliced(rows: list[dict[str, Any]], notes: list[dict[str, Any]] | None, options: dict[str, Any]
            ) -> list[dict[str, Any]]:
    """The computed rows (one per instance with a digit) with each note merged in (its flags before the
    model's, e.g. ``not_a_digit``), and the no_digit rows in their places: one row per instance, in
    request order."""
    if not notes:
        return rows
    computed = iter(rows)
    out = []
    for note in notes:
        if no_digit(note):
            out.append(no_digit_row(options))
        else:
            row = next(computed)
            row.update(note, flags=[*note["flags"], *row.get("flags", ())])  # the framing's, then the model's
            out.append(row)
    return out
