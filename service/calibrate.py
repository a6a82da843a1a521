"""Calibrate an existing version anew (another reference or typicality score), written as a NEW version of
the same weights.

    python -m service.calibrate --data-dir ../shared/datasets --store model_store --version 2 --score energy

The reference is made as training makes it (``service.model.training.calibrate``): the calibration
split the version's training held out (its seed and ``val_size``), so no weight was fitted on it, and
those digits pictured, with printed ones (``--reference``). Mahalanobis' parameters are fitted on the
rest of MNIST train. Versions are immutable: the calibrated weights become the next version, whose
metadata names where they came from.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from service.model import data, reference, store
from service.model.calibration import SCORES, expected_calibration_error
from service.model.training import add_reference_argument, calibrate, describe, features, normalize


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"), help="torchvision MNIST root")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--name", default=store.DEFAULT_NAME, help="model name in the store")
    p.add_argument("--version", type=int, required=True, help="the version whose weights to calibrate")
    p.add_argument("--score", choices=SCORES, default="energy", help="what typicality is computed from")
    add_reference_argument(p)
    p.add_argument("--workers", type=int, default=None, help="processes making the reference's pictures")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        loaded = store.load(args.store, args.name, args.version)
        images, labels = data.load_mnist(args.data_dir, train=True)
        test_images, test_labels = data.load_mnist(args.data_dir, train=False)
    except (store.StoreError, data.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = loaded.metadata.model_dump()
    training = meta.get("training", {})
    held, fit = reference.version_split(training, len(images))
    if "printed" in args.reference and "font_partitions" not in training:
        print(f"note: version {args.version} predates the calibration font groups: it was trained on them, so the "
              "reference's printed digits are in fonts it has seen (docs/typicality.md)", file=sys.stderr)
    device = torch.device("cpu")
    calibration = calibrate(loaded.model, device, (normalize(images[fit]), labels[fit]), (images[held], labels[held]),
                            training.get("seed", 1), args.score, args.reference, args.workers)
    _, test_logits = features(loaded.model, normalize(test_images), device)
    ece = {"before_temperature": expected_calibration_error(torch.softmax(test_logits, 1), test_labels),
           "after_temperature": expected_calibration_error(calibration.probabilities(test_logits), test_labels)}
    print(f"temperature {calibration.temperature:.3f}; expected calibration error on MNIST test "
          f"{ece['before_temperature']:.2%} before, {ece['after_temperature']:.2%} after; typicality from "
          f"{args.score} on {describe(calibration)}")
    for key in ("name", "version", "sha256", "calibration", "export", "evaluation"):
        meta.pop(key, None)
    meta["metrics"] = {**meta.get("metrics", {}), "test_ece": ece}
    meta["calibrated_from"] = {"version": args.version, "command": shlex.join(
        ["python", "-m", "service.calibrate", *(sys.argv[1:] if argv is None else argv)])}
    path = store.write_version(args.store, args.name, loaded.model.state_dict(), meta, calibration)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
