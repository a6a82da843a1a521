"""Train the FNN on real MNIST and write a new version into the model store.

    python -m service.train --data-dir ../shared/datasets --store model_store

Read top to bottom, like pytorch/examples' mnist/main.py: arguments, data, ``train()`` and
``test()`` per epoch, then the store write. Augmentation (small random affine distortions,
applied to whole batches with ``affine_grid``) and a one-cycle LR schedule are what take a
784-500-10 net past the classic 98.4% of plain training.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from service.device import resolve_device
from service.model import data, static, store
from service.model.fnn import FNN, MNIST_MEAN, MNIST_STD, NUM_CLASSES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m service.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=Path("../shared/datasets"), help="torchvision MNIST root")
    p.add_argument("--download", action="store_true", help="download MNIST into --data-dir if missing")
    p.add_argument("--store", type=Path, default=Path("model_store"), help="model store folder")
    p.add_argument("--name", default=store.DEFAULT_NAME, help="model name in the store")
    p.add_argument("--epochs", type=int, default=40, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=128, help="training mini-batch size")
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (Nesterov) momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty")
    p.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    p.add_argument("--hidden-size", type=int, default=500, help="hidden units")
    p.add_argument("--augment", type=float, default=1.0,
                   help="strength of random affine distortions (0 disables; 1 = +-10 deg, +-10%% scale, +-2 px)")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for per-epoch validation")
    p.add_argument("--limit", type=int, default=None, help="train on only this many images (fast runs, tests)")
    p.add_argument("--seed", type=int, default=1, help="random seed (runs on CPU are bit-for-bit repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument("--static-graph", choices=["compiled", "exported", "none"], default="compiled",
                   help="write the version's static graph too (service.model.static): AOTInductor-compiled (where a "
                        "C++ compiler works, else exported), exported uncompiled, or none")
    args = p.parse_args(argv)
    for flag in ("epochs", "batch_size", "hidden_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.limit is not None and args.limit < 1:
        p.error("--limit must be at least 1")
    return args


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) with the MNIST mean/std, as the server feeds the model."""
    return ((images.float() / 255.0) - MNIST_MEAN).div_(MNIST_STD).unsqueeze(1)


def distort(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Random rotation, scale, shear and shift of a normalised batch (background stays background)."""
    n = x.shape[0]
    u = lambda: torch.rand(n, generator=generator, device=x.device) * 2 - 1  # noqa: E731
    angle = u() * math.radians(10) * strength
    scale = 1 + u() * 0.1 * strength
    shear = u() * 0.1 * strength
    shift = u() * (2 / 14) * strength, u() * (2 / 14) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)
    background = -MNIST_MEAN / MNIST_STD
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def train(model: FNN, device: torch.device, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
          scheduler: torch.optim.lr_scheduler.LRScheduler, args: argparse.Namespace, epoch: int,
          generator: torch.Generator) -> float:
    model.train()
    order = torch.randperm(len(x), generator=generator)
    batches = range(0, len(x), args.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", disable=args.no_progress, leave=False)
    total = 0.0
    for start in bar:
        idx = order[start:start + args.batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        if args.augment > 0:
            xb = distort(xb, args.augment, generator)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xb), yb, label_smoothing=args.label_smoothing)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(idx)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / len(x)


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
    torch.use_deterministic_algorithms(True)
    generator = torch.Generator().manual_seed(args.seed)
    device = resolve_device(args.device)

    try:
        train_images, train_labels = data.load_mnist(args.data_dir, train=True, download=args.download)
        test_images, test_labels = data.load_mnist(args.data_dir, train=False, download=args.download)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    split = torch.randperm(len(train_images), generator=generator)
    val_idx, train_idx = split[:args.val_size], split[args.val_size:]
    if args.limit is not None:
        train_idx, val_idx = train_idx[:args.limit], val_idx[:max(1, min(len(val_idx), args.limit // 5))]
    x_train, y_train = normalize(train_images[train_idx]), train_labels[train_idx]
    x_val, y_val = normalize(train_images[val_idx]), train_labels[val_idx]
    x_test, y_test = normalize(test_images), test_labels
    print(f"MNIST from {args.data_dir}: train {len(x_train)}, validation {len(x_val)}, test {len(x_test)}; "
          f"device {device}")

    model = FNN(hidden_size=args.hidden_size).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                    steps_per_epoch=steps_per_epoch)
    history = []
    started = time.monotonic()
    for epoch in range(1, args.epochs + 1):
        loss = train(model, device, x_train, y_train, optimizer, scheduler, args, epoch, generator)
        val_accuracy, _ = test(model, device, x_val, y_val)
        history.append({"epoch": epoch, "train_loss": round(loss, 6), "val_accuracy": round(val_accuracy, 6)})
        print(f"epoch {epoch}/{args.epochs}: train loss {loss:.4f}, validation accuracy {val_accuracy:.4%}")
    training_seconds = time.monotonic() - started

    test_accuracy, confusion = test(model, device, x_test, y_test)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    print(f"test accuracy: {test_accuracy:.4%} on {len(x_test)} MNIST test images ({training_seconds:.1f} s training)")

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
            "history": history,
        },
        "data": {"dataset": "MNIST", "train_images": len(x_train), "val_images": len(x_val),
                 "sha256": data.raw_checksums(args.data_dir)},
        "training": {**hyperparameters, "optimizer": "SGD (Nesterov) + OneCycleLR", "device": str(device)},
        "seed": args.seed,
        "torch_version": torch.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "training_seconds": round(training_seconds, 2),
        "command": shlex.join(["python", "-m", "service.train", *(sys.argv[1:] if argv is None else argv)]),
    }
    path = store.write_version(args.store, args.name, model.state_dict(), metadata)
    print(f"wrote {path}")
    if args.static_graph != "none":  # the version is complete without it: --runtime export then serves it eager
        record = static.export(args.store, args.name, int(path.name), test_images, device.type,
                               args.static_graph == "compiled")
        print(f"static graph: {record.kind}, {path / record.artifact.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
