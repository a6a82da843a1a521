"""Real MNIST as uint8 tensors, read through torchvision from a folder in its layout."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torchvision.datasets import MNIST


class DataError(Exception):
    """The MNIST files are not where we were told to look."""


def load_mnist(data_dir: Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of the train or test split."""
    try:
        dataset = MNIST(str(data_dir), train=train, download=download)
    except RuntimeError as e:
        raise DataError(
            f"MNIST not found under {Path(data_dir).resolve()} (expected {Path(data_dir) / 'MNIST' / 'raw'} "
            f"with the four idx files); pass --download where the internet is reachable. ({e})"
        ) from None
    return dataset.data, dataset.targets


def raw_checksums(data_dir: Path) -> dict[str, str]:
    """sha256 of each raw file, recorded in the metadata so a model names the exact data it saw."""
    raw = Path(data_dir) / "MNIST" / "raw"
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(raw.iterdir())
        if p.is_file() and p.name.endswith("ubyte")
    }
