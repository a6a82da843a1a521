"""How sure, and how typical: temperature scaling and a conformal typicality, applied after the forward pass.

Both are fitted on a reference no weight was fitted on: the calibration split of MNIST train and the same
digits pictured, with printed ones, as people send them (``service.model.reference``, ``docs/typicality.md``):

- ``temperature``: the T minimising the negative log-likelihood of softmax(logits / T) there;
- ``typicality``: a conformal p-value. A *score* says how atypical an input looks to the model (from the
  hidden layer and the logits, both from one forward pass); the reference is the scores of those
  digits, and an input's typicality is the share of them at least as atypical as it,
  ``(1 + #{reference >= s}) / (n + 1)``. On digits drawn like them it is uniform on 0..1; a threshold of
  a flags about a of them, and non-digits, scored as atypical as few digits are, sit near 0.

A ``Calibration`` is a handful of tensors, saved weights-only next to the weights (``store``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

SCORES = ("mahalanobis", "energy", "max_logit")


def mahalanobis_fit(hidden: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, torch.Tensor]:
    """Class means and the shared precision of the hidden layer (Lee et al., 2018), from training digits."""
    hidden = hidden.double()
    means = torch.stack([hidden[labels == c].mean(0) for c in range(num_classes)])
    centred = hidden - means[labels]
    covariance = centred.T @ centred / len(hidden)
    covariance += torch.eye(len(covariance), dtype=covariance.dtype) * 1e-3 * covariance.diagonal().mean()
    precision = torch.linalg.inv(covariance)
    return {"means": means.float(), "precision": precision.float(),
            "means_precision": (means @ precision).float(), "offsets": ((means @ precision) * means).sum(1).float()}


def score(name: str, hidden: torch.Tensor, logits: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Atypicality of each input (higher = less like the calibration digits)."""
    if name == "energy":
        return -torch.logsumexp(logits, 1)
    if name == "max_logit":
        return -logits.max(1).values
    if name == "mahalanobis":
        projected = hidden @ params["precision"]
        squared = (projected * hidden).sum(1, keepdim=True) - 2 * hidden @ params["means_precision"].T
        return (squared + params["offsets"]).min(1).values
    raise ValueError(f"unknown typicality score {name!r} (known: {', '.join(SCORES)})")


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature minimising the NLL of the reference digits (Guo et al., 2017): a golden-section
    search over log T in [-3, 3] (the NLL is convex in 1/T, so it has one minimum)."""
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), labels))

    low, high = -3.0, 3.0
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-5:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def expected_calibration_error(probabilities: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy, over equal-width confidence bins."""
    confidence, predicted = probabilities.max(1)
    correct = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            ece += inside.double().mean().item() * abs(confidence[inside].double().mean().item()
                                                       - correct[inside].mean().item())
    return ece


def calibrated(calibration: Calibration | None, hidden: torch.Tensor,
               logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a version answers from one forward's (hidden, logits): its probabilities (tempered where it is
    calibrated) and each input's typicality (None for a version without calibration)."""
    if calibration is None:
        return torch.softmax(logits, 1), None
    return calibration.probabilities(logits), calibration.typicality(hidden, logits)


@dataclass(frozen=True)
class Calibration:
    """What a version needs to calibrate its answers: T, the score's name and parameters, the reference."""

    temperature: float
    score_name: str
    params: dict[str, torch.Tensor]
    reference: torch.Tensor  # the reference digits' scores, ascending
    composition: dict[str, Any] = field(default_factory=dict)  # what the reference holds (metadata.json only)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits / self.temperature, 1)

    def typicality(self, hidden: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Conformal p-values in (0, 1], one per input."""
        s = score(self.score_name, hidden.float(), logits.float(), self.params)
        n = len(self.reference)
        at_least = n - torch.searchsorted(self.reference, s.contiguous(), side="left")
        return (at_least + 1).float() / (n + 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file's content (``calibration.pt``); the temperature and the score's name go in metadata.json."""
        return {"reference": self.reference, **{f"param.{k}": v for k, v in self.params.items()}}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], temperature: float, score_name: str) -> Calibration:
        if score_name not in SCORES or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"calibration needs a known score and a positive temperature, "
                             f"not {score_name!r} and {temperature}")
        reference = tensors["reference"].float()
        if reference.ndim != 1 or not len(reference) or not bool((reference[1:] >= reference[:-1]).all()):
            raise ValueError("calibration reference must be a non-empty ascending 1-D tensor")
        params = {k.removeprefix("param."): v.float() for k, v in tensors.items() if k.startswith("param.")}
        return cls(temperature, score_name, params, reference)

    @classmethod
    def fit(cls, score_name: str, params: dict[str, torch.Tensor], hidden: torch.Tensor, logits: torch.Tensor,
            labels: torch.Tensor, composition: dict[str, Any] | None = None) -> Calibration:
        """Fit on the reference digits: the temperature, and their scores."""
        reference = score(score_name, hidden.float(), logits.float(), params).sort().values
        return cls(fit_temperature(logits, labels), score_name, params, reference, composition or {})
