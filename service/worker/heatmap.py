"""Render an attribution map over the image the model saw, as a PNG a person can read.

Positive attribution paints red, negative paints blue, over the dimmed digit; the colour's
opacity is the attribution's share of the map's largest magnitude, so each map uses the full
scale. The 28x28 result is enlarged with nearest-neighbour so pixels stay crisp.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

SCALE = 10  # 28x28 -> 280x280
_BACKGROUND_BRIGHTNESS = 0.6  # dim the digit so the colours stand out on it
_RED = np.array([1.0, 0.0, 0.0], dtype=np.float32)
_BLUE = np.array([0.0, 0.0, 1.0], dtype=np.float32)


def overlay(attributions: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(H, W) attributions and (H, W) image in 0..1 -> (H, W, 3) RGB in 0..1."""
    peak = float(np.abs(attributions).max())
    strength = np.abs(attributions) / peak if peak > 0 else np.zeros_like(attributions)
    alpha = strength.astype(np.float32)[..., None]
    gray = np.clip(image, 0.0, 1.0).astype(np.float32)[..., None] * _BACKGROUND_BRIGHTNESS
    colour = np.where((attributions > 0)[..., None], _RED, _BLUE)
    return gray * (1.0 - alpha) + colour * alpha


def render_png(attributions: np.ndarray, image: np.ndarray, scale: int = SCALE) -> bytes:
    """PNG bytes of :func:`overlay`, enlarged ``scale`` times."""
    rgb = np.round(overlay(attributions, image) * 255.0).astype(np.uint8)
    height, width = rgb.shape[:2]
    picture = Image.fromarray(rgb).resize((width * scale, height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
