"""Fixtures the e2e tests share (the MNIST files and the committed model: tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def digits(mnist_test: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """The first 1,000 real MNIST test digits (uint8, N x 28 x 28) and their labels, as numpy."""
    images, labels = mnist_test
    return images[:1000].numpy(), labels[:1000].numpy()
