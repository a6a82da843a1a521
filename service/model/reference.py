"""The conformal reference: held-out digits of every kind the service is sent, in equal shares.

A typicality is a conformal p-value, exact for inputs exchangeable with the reference
(``docs/typicality.md``). Pictures as people send them, framed by ``service.imaging``, look less
typical to the model than MNIST's scans, so a reference of MNIST digits alone flags them far above
the nominal rate. The reference therefore mixes, one share each:

- ``mnist``: the calibration split, MNIST training-file digits no weight was fitted on;
- ``canvas`` and ``dressed``: those same digits on clean paper and dressed as photographs;
- ``printed``: digits from the *calibration* font groups (``printed.CALIBRATION_GROUPS``): fonts the model
  was never trained on and evaluation never uses, so that this share is exchangeable with printed digits
  in fonts the model has not seen (a version trained before those groups were kept out, such as version
  3's weights, has seen them).

The pictures are drawn with their own seed (``PICTURE_SEED`` + the version's seed): training draws
with the seed itself and ``bench.evaluate`` with 1000, so no reference picture is a training or an
evaluation one. Each kind is cut to the smallest kind's count (the framing drops some pictures), so
the shares are equal and the reference stays a plain sorted list of scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from service.model import printed, synth

KINDS = ("mnist", "canvas", "dressed", "printed")
SYNTH_KINDS = {"canvas": "canvas", "dressed": "dressed", "printed": "printed" + synth.CALIBRATION}  # synth's kind
PICTURE_SEED = 10_000  # the reference's pictures use PICTURE_SEED + the version's seed
MADE_OF = ("mnist: the calibration split (seed-split MNIST train, never fitted on); canvas, dressed: those digits "
           "pictured; printed: the calibration font groups (never trained on, never evaluated on); pictures "
           "framed by service.imaging.prepare")


def split(count: int, generator: torch.Generator, held: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The seed split of MNIST train: (the calibration split's indices, the training indices)."""
    order = torch.randperm(count, generator=generator)
    return order[:held], order[held:]


def version_split(training: dict[str, Any], count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The split a version's training made (from its metadata's ``training``: seed and val_size)."""
    return split(count, torch.Generator().manual_seed(training.get("seed", 1)), training.get("val_size", 5000))


def parse_kinds(text: str) -> tuple[str, ...]:
    """``mnist,canvas,...`` -> the kinds, in KINDS' order (argparse's ``type``)."""
    kinds = {k.strip() for k in text.split(",") if k.strip()}
    unknown = kinds - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"reference kinds are some of {', '.join(KINDS)}, not {text!r}")
    return tuple(k for k in KINDS if k in kinds)


@dataclass(frozen=True)
class Reference:
    """The reference's pictures (uint8 (N, 28, 28) frames, as the service frames them), labels and make-up."""

    frames: torch.Tensor
    labels: torch.Tensor
    composition: dict[str, Any]


def build(digits: torch.Tensor, labels: torch.Tensor, seed: int, kinds: tuple[str, ...] = KINDS,
          workers: int | None = None) -> Reference:
    """The reference of a version whose calibration split is ``digits`` (uint8 (N, 28, 28)) and seed ``seed``."""
    picture_seed = PICTURE_SEED + seed
    source = (digits.numpy(), labels.numpy())
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for kind in kinds:
        if kind == "mnist":
            parts[kind] = (digits, labels)
        else:
            parts[kind] = synth.build(SYNTH_KINDS[kind], len(digits), picture_seed,
                                      None if kind == "printed" else source, workers=workers)
    share = min(len(frames) for frames, _ in parts.values())
    if share == 0:
        counts = ", ".join(f"{kind} {len(frames)}" for kind, (frames, _) in parts.items())
        raise ValueError(f"no reference pictures of some kind ({counts})")
    composition: dict[str, Any] = {"pictures": {kind: share for kind in parts}, "picture_seed": picture_seed,
                                   "picture_recipe": synth.RECIPE, "made_of": MADE_OF}
    if "printed" in parts:
        composition["printed_groups"] = sorted(printed.CALIBRATION_GROUPS)
    return Reference(torch.cat([frames[:share] for frames, _ in parts.values()]),
                     torch.cat([kind_labels[:share] for _, kind_labels in parts.values()]), composition)
