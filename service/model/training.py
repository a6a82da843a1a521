"""Train the FNN on real MNIST and pictures of digits, calibrate it, and write a new version into the store.

    python -m service.train --data-dir ../shared/datasets --store model_store

Read top to bottom, like pytorch/examples' mnist/main.py: arguments, data, ``train()`` and
``test()`` per epoch, then calibration and the store write (``docs/pictures.md``, ``docs/typicality.md``):

- real MNIST, elastically distorted and affinely jittered batch by batch (``augment``, Simard 2003);
- printed digits from the fonts on this machine and MNIST digits dressed as photographs (``synth``),
  framed by the service's own preprocessing, so the model learns on the frames it is served, and only
  affinely jittered (``--picture-elastic``: elastic distortion made print look like no print);
- non-digits (letters, symbols, shapes, scribbles, textures, photographs) kept at a low energy and
  digits at a high one (outlier exposure with energy margins, Liu et al. 2020), so that what is not a
  digit does not look like one;
- a calibration split of MNIST train, never fitted on, and those digits pictured, with printed ones in
  the calibration font groups, never trained on (``reference``): the temperature and the typicality
  reference.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.device import resolve_device
from service.model import augment, data, negatives, printed, reference, static, store, synth
from service.model.calibration import SCORES, Calibration, expected_calibration_error, mahalanobis_fit
from service.model.fnn import FNN, MNIST_MEAN, MNIST_STD, NUM_CLASSES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"), help="torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--name", default=store.DEFAULT_NAME, help="model name in the store")
    p.add_argument("--epochs", type=int, default=160, help="passes over the training split")
    p.add_argument("--quick", action="store_true",
                   help="a short run (tests, a first look): 2 epochs on 2,048 images and small picture sets")
    p.add_argument("--batch-size", type=int, default=128, help="training mini-batch size")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--hidden-size", type=int, default=500, help="hidden units")
    p.add_argument("--augment", type=float, default=1.0,
                   help="strength of random affine distortions (0 disables; 1 = +-10 deg, +-10%% scale, +-2 px)")
    p.add_argument("--elastic", type=float, default=24.0,
                   help="elastic distortion of the MNIST digits: Simard's alpha, pixels before smoothing (0 disables)")
    p.add_argument("--picture-elastic", type=float, default=0.0,
                   help="elastic alpha for the pictures (printed, dressed, non-digits), already varied as people "
                        "send them (0: the affine jitter alone)")
    p.add_argument("--elastic-sigma", type=float, default=4.0, help="elastic distortion: smoothing, pixels")
    p.add_argument("--printed", type=int, default=20000, help="printed digits from the training font groups")
    p.add_argument("--segments", type=int, default=0,
                   help="seven-segment digits (service.model.segments; docs/pictures.md measures 2000)")
    p.add_argument("--dressed", type=int, default=10000, help="MNIST training digits pictured as photographs")
    p.add_argument("--negatives", type=int, default=3000,
                   help=f"non-digit pictures of each kind ({', '.join(negatives.KINDS)})")
    p.add_argument("--outlier-loss", choices=["energy", "uniform"], default="energy",
                   help="outlier exposure: squared hinges on the energy, non-digits under --energy-out and "
                        "digits over --energy-in (Liu et al. 2020), or cross-entropy to a uniform answer on "
                        "non-digits (Hendrycks et al. 2019; versions 2-4, weight 0.3)")
    p.add_argument("--outlier-weight", type=float, default=0.1,
                   help="weight of the outlier-exposure loss on non-digits (0: no outlier exposure)")
    p.add_argument("--energy-out", type=float, default=2.5,
                   help="--outlier-loss energy: the logsumexp of the logits non-digits are pushed under "
                        "(a uniform answer of zero logits is log 10 = 2.3)")
    p.add_argument("--energy-in", type=float, default=4.0,
                   help="--outlier-loss energy: the logsumexp of the logits digits are pushed over")
    p.add_argument("--typicality-score", choices=SCORES, default="energy",
                   help="what typicality is computed from (docs/typicality.md)")
    add_reference_argument(p)
    p.add_argument("--workers", type=int, default=None, help="processes making the picture sets (default: cores)")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for per-epoch validation")
    p.add_argument("--limit", type=int, default=None, help="train on only this many images (fast runs, tests)")
    p.add_argument("--seed", type=int, default=1, help="random seed (runs on CPU are bit-for-bit repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: the committed versions used one, and a run repeats bit for bit only on "
                        "as many (two train about 1.4x faster on 2 cores; the pictures use --workers)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--static-graph", choices=["compiled", "exported", "none"], default="compiled",
                   help="write the version's static graph too (service.model.static): AOTInductor-compiled (where a "
                        "C++ compiler works, else exported), exported uncompiled, or none")
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.limit = min(args.epochs, 2), args.limit or 2048
    if args.limit is not None:  # picture sets in proportion to a small run
        args.printed, args.dressed = min(args.printed, args.limit // 2), min(args.dressed, args.limit // 4)
        args.segments = min(args.segments, args.limit // 16)
        args.negatives = min(args.negatives, args.limit // 8)
    for flag in ("epochs", "batch_size", "hidden_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def add_reference_argument(p: argparse.ArgumentParser) -> None:
    """``--reference``, the same for training and for ``service.calibrate``."""
    p.add_argument("--reference", type=reference.parse_kinds, default=reference.KINDS, metavar="KINDS",
                   help=f"what the calibration reference mixes, in equal shares (some of {','.join(reference.KINDS)}; "
                        "printed needs fonts)")


def uses_fonts(args: argparse.Namespace) -> bool:
    """Whether this run renders from fonts (``--printed 0 --negatives 0`` and a reference without printed
    digits need none, nor fontconfig)."""
    return args.printed > 0 or args.negatives > 0 or "printed" in args.reference


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) with the MNIST mean/std, as the server feeds the model."""
    return ((images.float() / 255.0) - MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)


@dataclass(frozen=True)
class Pictures:
    """The picture sets one epoch mixes into the MNIST batches: digits (label) and non-digits (uniform target)."""

    digits: torch.Tensor  # uint8 (N, 28, 28) frames
    labels: torch.Tensor
    others: torch.Tensor


def train(model: FNN, device: torch.device, x: torch.Tensor, y: torch.Tensor, pictures: Pictures,
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          args: argparse.Namespace, epoch: int, generator: torch.Generator) -> float:
    """One pass over MNIST; each batch also takes its share of the pictures, so an epoch sees each once."""
    model.train()
    order = torch.randperm(len(x), generator=generator)
    steps = math.ceil(len(x) / args.batch_size)
    digit_order = torch.randperm(len(pictures.digits), generator=generator)
    other_order = torch.randperm(len(pictures.others), generator=generator)
    per_digit, per_other = math.ceil(len(digit_order) / steps), math.ceil(len(other_order) / steps)
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=args.no_progress, leave=False)
    total = 0.0
    for step in bar:
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        pick = digit_order[step * per_digit:(step + 1) * per_digit]
        xb = torch.cat([x[idx], normalize(pictures.digits[pick])]).to(device)
        yb = torch.cat([y[idx], pictures.labels[pick]]).to(device)
        others = normalize(pictures.others[other_order[step * per_other:(step + 1) * per_other]]).to(device)
        xb = torch.cat([xb, others])
        if args.augment > 0 or args.elastic > 0 or args.picture_elastic > 0:
            xb = torch.cat([augment.distort(part, generator, args.augment, alpha, args.elastic_sigma)
                            for part, alpha in ((xb[:len(idx)], args.elastic), (xb[len(idx):], args.picture_elastic))])
        optimizer.zero_grad(set_to_none=True)
        logits = model(xb)
        loss = F.cross_entropy(logits[:len(yb)], yb, label_smoothing=args.label_smoothing)
        if len(others) and args.outlier_weight > 0:
            loss = loss + args.outlier_weight * outlier_loss(logits[:len(yb)], logits[len(yb):], args)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / len(x)


def outlier_loss(digits: torch.Tensor, others: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """Outlier exposure on one batch's logits: the non-digits' cross-entropy to the uniform distribution,
    or squared hinges that keep the energy (logsumexp of the logits) of non-digits low and of digits
    high, and leave those already past their margin alone."""
    if args.outlier_loss == "uniform":
        return -F.log_softmax(others, 1).mean()
    return (F.relu(torch.logsumexp(others, 1) - args.energy_out).pow(2).mean()
            + F.relu(args.energy_in - torch.logsumexp(digits, 1)).pow(2).mean())


def make_pictures(args: argparse.Namespace, digits: torch.Tensor, labels: torch.Tensor) -> tuple[Pictures, dict]:
    """The picture sets for this run (made once per seed and cached, ``synth``) and what they hold."""
    started = time.monotonic()
    printed, printed_labels = synth.build("printed", args.printed, args.seed, workers=args.workers)
    segmented, segmented_labels = synth.build("segments", args.segments, args.seed, workers=args.workers)
    dressed, dressed_labels = synth.build("dressed", args.dressed, args.seed,
                                          (digits[:args.dressed].numpy(), labels[:args.dressed].numpy()),
                                          workers=args.workers)
    others = [synth.build(kind, args.negatives, args.seed, workers=args.workers)[0] for kind in negatives.KINDS]
    counts = {"printed": len(printed), "segments": len(segmented), "dressed": len(dressed),
              **{kind: len(frames) for kind, frames in zip(negatives.KINDS, others)}}
    print(f"pictures ({time.monotonic() - started:.0f} s): " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    pictures = Pictures(torch.cat([printed, segmented, dressed]),
                        torch.cat([printed_labels, segmented_labels, dressed_labels]),
                        torch.cat(others) if others else torch.zeros(0, 28, 28, dtype=torch.uint8))
    return pictures, counts


@torch.inference_mode()
def features(model: FNN, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden layer and logits of normalised images, in chunks."""
    model.eval()
    parts = [model.features(x[i:i + 4096].to(device)) for i in range(0, len(x), 4096)]
    return torch.cat([h.cpu() for h, _ in parts]), torch.cat([z.cpu() for _, z in parts])


def calibrate(model: FNN, device: torch.device, fit: tuple[torch.Tensor, torch.Tensor],
              held: tuple[torch.Tensor, torch.Tensor], seed: int, score_name: str,
              kinds: tuple[str, ...] = reference.KINDS, workers: int | None = None) -> Calibration:
    """The score's parameters from training digits (``fit``, normalised), then T and the reference scores on
    the reference made from the calibration split (``held``: uint8 digits and labels) and ``seed``."""
    params: dict[str, torch.Tensor] = {}
    if score_name == "mahalanobis":
        params = mahalanobis_fit(features(model, fit[0], device)[0], fit[1], NUM_CLASSES)
    mix = reference.build(*held, seed, kinds, workers)
    hidden, logits = features(model, normalize(mix.frames), device)
    return Calibration.fit(score_name, params, hidden, logits, mix.labels, mix.composition)


def describe(calibration: Calibration) -> str:
    """The reference's make-up in a few words, e.g. ``4839 mnist + 4839 canvas + ...``."""
    pictures = calibration.composition.get("pictures", {})
    return " + ".join(f"{count} {kind}" for kind, count in pictures.items()) or f"{len(calibration.reference)} digits"


@torch.inference_mode()
def test(model: FNN, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Accuracy and the confusion matrix (rows: true label, columns: predicted)."""
    model.eval()
    preds = torch.cat([model(x[i:i + 4096].to(device)).argmax(1).cpu() for i in range(0, len(x), 4096)])
    confusion = torch.bincount(y * NUM_CLASSES + preds, minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    return (preds == y).float().mean().item(), confusion


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)
    device = resolve_device(args.device)

    try:
        train_images, train_labels = data.load_mnist(args.data_dir, train=True, download=args.download)
        test_images, test_labels = data.load_mnist(args.data_dir, train=False, download=args.download)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    val_idx, train_idx = reference.split(len(train_images), generator, args.val_size)
    if args.limit is not None:
        train_idx, val_idx = train_idx[:args.limit], val_idx[:max(1, min(len(val_idx), args.limit // 5))]
    x_train, y_train = normalize(train_images[train_idx]), train_labels[train_idx]
    x_val, y_val = normalize(train_images[val_idx]), train_labels[val_idx]
    x_test, y_test = normalize(test_images), test_labels
    print(f"MNIST from {args.data_dir}: train {len(x_train)}, calibration (validation) {len(x_val)}, "
          f"test {len(x_test)}; device {device}")
    pictures, picture_counts = make_pictures(args, train_images[train_idx], train_labels[train_idx])

    model = FNN(hidden_size=args.hidden_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    history = []
    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        loss = train(model, device, x_train, y_train, pictures, optimizer, scheduler, args, epoch, generator)
        val_accuracy, _ = test(model, device, x_val, y_val)
        epoch_test, _ = test(model, device, x_test, y_test)
        history.append({"epoch": epoch, "train_loss": round(loss, 6), "val_accuracy": round(val_accuracy, 6),
                        "test_accuracy": round(epoch_test, 6)})
        print(f"epoch {epoch}/{args.epochs}: train loss {loss:.4f}, validation accuracy {val_accuracy:.4%}, "
              f"test accuracy {epoch_test:.4%}", flush=True)
    training_seconds = time.monotonic() - started

    test_accuracy, confusion = test(model, device, x_test, y_test)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    print(f"test accuracy: {test_accuracy:.4%} on {len(x_test)} MNIST test images ({training_seconds:.1f} s training)")
    fit_digits = (torch.cat([x_train, normalize(pictures.digits)]), torch.cat([y_train, pictures.labels]))
    calibration = calibrate(model, device, fit_digits, (train_images[val_idx], y_val), args.seed,
                            args.typicality_score, args.reference, args.workers)
    _, test_logits = features(model, x_test, device)
    ece_before = expected_calibration_error(torch.softmax(test_logits, 1), y_test)
    ece_after = expected_calibration_error(calibration.probabilities(test_logits), y_test)
    print(f"calibration: temperature {calibration.temperature:.3f}; expected calibration error on MNIST test "
          f"{ece_before:.2%} before, {ece_after:.2%} after; typicality from {calibration.score_name} on "
          f"{describe(calibration)}")

    hyperparameters = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    metadata = {
        "architecture": model.architecture(),
        "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD},
        "metrics": {
            "test_accuracy": test_accuracy,
            "test_images": len(x_test),
            "per_class_accuracy": {str(c): a for c, a in enumerate(per_class)},
            "confusion_matrix": confusion.tolist(),
            "final_val_accuracy": history[-1]["val_accuracy"],
            "test_ece": {"before_temperature": round(ece_before, 6), "after_temperature": round(ece_after, 6)},
            "history": history,
        },
        "data": {"dataset": "MNIST", "train_images": len(x_train), "val_images": len(x_val),
                 "calibration_split": "the val_images: seed-split MNIST train, never fitted on",
                 "pictures": picture_counts, "sha256": data.raw_checksums(args.data_dir)},
        "training": {**hyperparameters, "optimizer": "SGD (Nesterov) + OneCycleLR", "device": str(device),
                     "recipe": "MNIST with elastic distortion and affine jitter (Simard 2003); printed digits "
                               "(training font groups) and dressed MNIST framed by service.imaging, affine "
                               "jitter and --picture-elastic; outlier exposure on non-digits (--outlier-loss); the "
                               "reference's printed digits from the calibration font groups",
                     "font_partitions": printed.summary() if uses_fonts(args) else None},
        "seed": args.seed,
        "torch_version": torch.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_seconds": round(training_seconds, 2),
        "command": shlex.join(["python", "-m", "service.train", *(sys.argv[1:] if argv is None else argv)]),
    }
    path = store.write_version(args.store, args.name, model.state_dict(), metadata, calibration)
    print(f"wrote {path}")
    if args.static_graph != "none":  # the version is complete without it: --runtime export then serves it eager
        record = static.export(args.store, args.name, int(path.name), test_images, device.type,
                               args.static_graph == "compiled")
        print(f"static graph: {record.kind}, {path / record.artifact.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
