"""The one place that turns an accelerator choice into a torch device."""

from __future__ import annotations

from typing import Literal

import torch

Accelerator = Literal["auto", "cpu", "cuda"]


class DeviceError(Exception):
    """The requested accelerator is not available on this machine."""


def resolve_device(accelerator: Accelerator) -> torch.device:
    """``auto`` takes CUDA when a GPU is visible; ``cuda`` without one is an error, never a silent CPU."""
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise DeviceError("accelerator 'cuda' was requested but no CUDA GPU is visible "
                          "(torch.cuda.is_available() is False)")
    return torch.device(accelerator)
