"""Measure a model version on every set the pictures and typicality issues name, reproducibly.

    python -m bench.evaluate [--store model_store] [--version N] [--count 2000] [--seed 1000] [--out FILE]

Digit sets (accuracy, expected calibration error before/after the temperature, share flagged
``not_a_digit``): real MNIST test; MNIST test digits on clean canvases and dressed as photographs
(``service.model.synth``);
photo-like pictures of MNIST test digits (``tests/photos.py``, another generator than training's);
printed digits from the font families held out of training. Non-digit sets, per kind, drawn from the
held-out fonts and photographs (``-heldout`` kinds): share recognised (flagged, or no digit found).
Every picture goes through ``service.imaging.prepare``, as the server does. Typicality scores are
compared on the same sets: each score's reference is made as the version's was (``service.model.reference``:
its calibration split, and the pictured and printed kinds its metadata names), or of the kinds
``--reference`` names, to measure another make-up without a new version. Nothing here is fitted on the
evaluation sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from service.config import Limits
from service.errors import InputError
from service.imaging import normalize, prepare
from service.model import data, negatives, reference, store, synth
from service.model.calibration import SCORES, Calibration, expected_calibration_error
from tests import photos


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", type=Path, default=Path("model_store"))
    p.add_argument("--name", default=store.DEFAULT_NAME)
    p.add_argument("--version", type=int, default=None, help="default: the highest")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("DIGITSERVE_DATA_DIR", "../shared/datasets")))
    p.add_argument("--count", type=int, default=2000, help="pictures per generated digit set")
    p.add_argument("--photos", type=int, default=500, help="photo-like pictures (tests/photos.py)")
    p.add_argument("--negatives", type=int, default=500, help="non-digit pictures per kind")
    p.add_argument("--seed", type=int, default=1000, help="seed of the generated sets (training uses others)")
    p.add_argument("--below", type=float, default=0.01, help="the not_a_digit threshold")
    p.add_argument("--reference", type=reference.parse_kinds, default=None, metavar="KINDS",
                   help="the compared scores' reference kinds (mnist,canvas,dressed,printed); default: the version's")
    p.add_argument("--out", type=Path, default=None, help="also write the results here as JSON")
    return p.parse_args(argv)


def _photo_frames(digits: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Photo-like pictures framed as the server frames them; one the framing refuses counts as wrong (label -1)."""
    frames, truth = [], []
    for photo in photos.photos(digits, labels, count, seed):
        try:
            frames.append(np.asarray(prepare([photo.data], Limits()))[0])  # type: ignore[call-arg]
            truth.append(photo.label)
        except InputError:
            frames.append(np.zeros((28, 28), np.float32))
            truth.append(-1)
    return torch.from_numpy(np.round(np.stack(frames) * 255).astype(np.uint8)), torch.tensor(truth)


@torch.inference_mode()
def _features(loaded: store.LoadedModel, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    norm = loaded.metadata.normalization
    x = torch.from_numpy(normalize(frames.numpy().astype(np.float32) / 255, norm.mean, norm.std))
    return loaded.model.features(x.reshape(len(frames), -1))


def _reference(loaded: store.LoadedModel, data_dir: Path, kinds: tuple[str, ...] | None) -> reference.Reference:
    """The version's reference pictures, made again as its calibration made them (a version calibrated on
    MNIST alone records no make-up: its calibration split), of ``kinds`` if given."""
    training = (loaded.metadata.model_extra or {}).get("training", {})
    images, labels = data.load_mnist(data_dir, train=True)
    held, _ = reference.version_split(training, len(images))
    if kinds is None:
        record = loaded.metadata.calibration
        recorded = ",".join((record.model_extra or {}).get("reference", {}).get("pictures", {})) if record else ""
        kinds = reference.parse_kinds(recorded or "mnist")
    return reference.build(images[held], labels[held], training.get("seed", 1), kinds)


def evaluate(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    loaded = store.load(args.store, args.name, args.version)
    calibration = loaded.calibration
    test_images, test_labels = data.load_mnist(args.data_dir, train=False)
    digits_np, labels_np = test_images.numpy(), test_labels.numpy()
    digit_sets = {
        "mnist_test": (test_images, test_labels),
        "canvas": synth.build("canvas", args.count, args.seed, (digits_np[:args.count], labels_np[:args.count])),
        "dressed": synth.build("dressed", args.count, args.seed, (digits_np[:args.count], labels_np[:args.count])),
        "photo_like": _photo_frames(digits_np, labels_np, args.photos, args.seed),
        "printed_heldout_fonts": synth.build("printed" + synth.HELD_OUT, args.count, args.seed),
    }
    other_sets = {kind: synth.build(kind + synth.HELD_OUT, args.negatives, args.seed)[0] for kind in negatives.KINDS}

    # every score's reference on the version's reference pictures; Mahalanobis' parameters are the stored ones
    pictures = _reference(loaded, args.data_dir, args.reference)
    cal_hidden, cal_logits = _features(loaded, pictures.frames)
    params = calibration.params if calibration is not None and calibration.score_name == "mahalanobis" else None
    candidates = {name: Calibration.fit(name, params or {}, cal_hidden, cal_logits, pictures.labels)
                  for name in SCORES if name != "mahalanobis" or params is not None}

    results: dict = {"version": loaded.version, "below": args.below, "served_score": None if calibration is None
                     else calibration.score_name, "reference": pictures.composition["pictures"],
                     "digits": {}, "non_digits": {}, "scores": {}}
    flagged: dict[str, dict[str, float]] = {name: {} for name in candidates}
    for name, (frames, labels) in digit_sets.items():
        hidden, logits = _features(loaded, frames)
        known = labels >= 0
        raw = torch.softmax(logits, 1)
        entry = {"images": len(frames), "accuracy": float((raw.argmax(1) == labels).float().mean()),
                 "ece_before": expected_calibration_error(raw[known], labels[known])}
        if calibration is not None:
            entry["ece_after"] = expected_calibration_error(calibration.probabilities(logits)[known], labels[known])
            entry["flagged"] = float((calibration.typicality(hidden, logits) < args.below).float().mean())
        results["digits"][name] = entry
        for score_name, candidate in candidates.items():
            flagged[score_name][name] = float((candidate.typicality(hidden, logits) < args.below).float().mean())
    recognised: dict[str, dict[str, float]] = {name: {} for name in candidates}
    for kind, frames in other_sets.items():
        asked = args.negatives
        blank = asked - len(frames)  # no digit found: answered no_digit (or left out as a person's "1")
        hidden, logits = _features(loaded, frames)
        entry = {"pictures": asked, "framed": len(frames)}
        if calibration is not None:
            hits = int((calibration.typicality(hidden, logits) < args.below).sum())
            entry["recognised"] = (hits + blank) / asked
        results["non_digits"][kind] = entry
        for score_name, candidate in candidates.items():
            hits = int((candidate.typicality(hidden, logits) < args.below).sum())
            recognised[score_name][kind] = (hits + blank) / asked
    for score_name in candidates:
        results["scores"][score_name] = {"digits_flagged": flagged[score_name],
                                         "non_digits_recognised": recognised[score_name]}
    return results


def _table(results: dict) -> str:
    lines = [f"version {results['version']}, typicality from {results['served_score']}, not_a_digit below "
             f"{results['below']}; the compared scores' reference: "
             + " + ".join(f"{n} {kind}" for kind, n in results["reference"].items()), "",
             "| digit set | images | accuracy | ECE before | ECE after | flagged |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, e in results["digits"].items():
        lines.append(f"| {name} | {e['images']} | {e['accuracy']:.2%} | {e['ece_before']:.2%} | "
                     f"{e.get('ece_after', float('nan')):.2%} | {e.get('flagged', float('nan')):.2%} |")
    lines += ["", "| non-digit kind | pictures | recognised |", "| --- | --- | --- |"]
    for kind, e in results["non_digits"].items():
        lines.append(f"| {kind} | {e['pictures']} | {e.get('recognised', float('nan')):.1%} |")
    lines += ["", "| score | " + " | ".join(results["digits"]) + " | " + " | ".join(results["non_digits"]) + " |",
              "| --- " * (1 + len(results["digits"]) + len(results["non_digits"])) + "|"]
    for name, s in results["scores"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.2%}" for v in s["digits_flagged"].values()) + " | "
                     + " | ".join(f"{v:.1%}" for v in s["non_digits_recognised"].values()) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = evaluate(args)
    print(_table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
