"""Shared fixtures: the real MNIST files and the committed default model.

The data location is one setting, ``DIGITSERVE_DATA_DIR`` (the Makefile points it at
../shared/datasets); without it, MNIST is downloaded once into ~/.cache/digitserve.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from service.model import data, store

ROOT = Path(__file__).resolve().parent.parent
# Servers the tests start serve no gRPC unless a test gives them a --grpc-port (tests/e2e/test_grpc.py):
# several run at once, and the default port (8001, as Triton's) is one port for all of them.
os.environ.setdefault("DIGITSERVE_GRPC_PORT", "0")
MODEL_STORE = ROOT / "model_store"
SERVED = str(max(store.list_versions(MODEL_STORE, store.DEFAULT_NAME)))  # the version a plain server serves


def _data_dir() -> tuple[Path, bool]:
    configured = os.environ.get("DIGITSERVE_DATA_DIR")
    if configured:
        return Path(configured), False
    return Path.home() / ".cache" / "digitserve", True


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path, download = _data_dir()
    if download:
        data.load_mnist(path, train=False, download=True)
        data.load_mnist(path, train=True, download=True)
    return path


@pytest.fixture(scope="session")
def mnist_test(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 real MNIST test images (uint8, N x 28 x 28) and labels."""
    return data.load_mnist(data_dir, train=False)


@pytest.fixture(scope="session")
def default_model() -> store.LoadedModel:
    """The committed default model, loaded on the CPU through the store."""
    return store.load(MODEL_STORE, store.DEFAULT_NAME)


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory):
    """One real service for the HTTP tests: 2 predict workers, batching on, a 2 MB payload limit."""
    from harness.server import running

    args = ("--workers", "2", "--max-batch-size", "32", "--batch-timeout-ms", "5", "--max-payload-bytes", "2000000")
    with running(tmp_path_factory.mktemp("served"), *args) as server:
        yield server
