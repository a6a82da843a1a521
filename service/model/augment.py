"""Simard et al. (2003)'s distortions, on whole batches in torch: affine jitter and elastic deformation.

One ``grid_sample`` per batch: the affine map and a random displacement field (Simard's smoothed noise,
``_smooth_field``) are added into one sampling grid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from service.model.fnn import IMAGE_SIDE, MNIST_MEAN, MNIST_STD

BACKGROUND = -MNIST_MEAN / MNIST_STD  # a black MNIST pixel, normalised


def _smooth_field(n: int, side: int, alpha: float, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 2, side, side) displacement fields in pixels, as Simard's: uniform noise smoothed by a Gaussian of
    ``sigma`` and scaled by ``alpha``. Drawn on a coarse grid (one knot per ``sigma`` pixels) and upsampled,
    with the standard deviation the Gaussian smoothing would give, at a fraction of a convolution's cost."""
    knots = max(2, round(side / sigma))
    spread = alpha * math.sqrt(1 / 3) / (2 * math.sqrt(math.pi) * sigma)  # sd of uniform noise after the Gaussian
    coarse = torch.randn(n, 2, knots, knots, generator=generator) * spread
    return F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=True)


def affine_theta(n: int, strength: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(N, 2, 3) random rotation (+-10 deg), scale (+-10%), shear (+-0.1) and shift (+-2 px) at strength 1."""
    def u() -> torch.Tensor:
        return (torch.rand(n, generator=generator) * 2 - 1).to(device)

    angle = u() * math.radians(10) * strength
    scale = 1 + u() * 0.1 * strength
    shear = u() * 0.1 * strength
    shift = u() * (2 / 14) * strength, u() * (2 / 14) * strength
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin + shear, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1)


def distort(x: torch.Tensor, generator: torch.Generator, affine: float = 1.0, alpha: float = 34.0,
            sigma: float = 4.0) -> torch.Tensor:
    """Normalised (N, 1, 28, 28) images, affinely jittered and elastically deformed; shape and order kept.

    ``alpha`` and ``sigma`` are Simard's (pixels of displacement before smoothing, smoothing in pixels);
    ``alpha=0`` leaves the affine jitter alone, ``affine=0`` the elastic part alone.
    """
    n, _, h, w = x.shape
    if n == 0:  # a batch with no rows of this kind
        return x
    theta = affine_theta(n, affine, generator, x.device)
    grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
    if alpha > 0:
        field = _smooth_field(n, h, alpha, sigma, generator).to(x.device)
        grid = grid + field.permute(0, 2, 3, 1) * (2 / IMAGE_SIDE)  # pixels -> grid units
    return F.grid_sample(x - BACKGROUND, grid, align_corners=False, padding_mode="zeros") + BACKGROUND
