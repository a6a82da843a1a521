"""Seven-segment digits for training (``service.model.segments``): the segments each digit lights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service.model import segments, synth


def lit(label: int, seed: int) -> np.ndarray:
    """The lit ink of one drawing (ghost segments are fainter than half)."""
    return segments.draw(label, np.random.default_rng(seed)) > 0.5


@pytest.mark.parametrize("seed", range(12))
def test_a_digit_lighting_more_segments_draws_more_ink(seed):
    # one seed draws the same size, stroke, gaps and slant: 8 lights 0's segments and the middle one,
    # 3's and 1's are inside 8's and 4's
    assert lit(8, seed).sum() > lit(0, seed).sum() > 0
    assert lit(8, seed).sum() > lit(3, seed).sum()
    assert lit(4, seed).sum() > lit(1, seed).sum() > 0


@pytest.mark.parametrize("label", range(10))
def test_the_ink_is_cropped_to_a_digit_taller_than_wide(label):
    for seed in range(8):
        ink = lit(label, seed)
        assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
        assert ink.shape[0] > ink.shape[1]


def test_a_1_is_two_segments_on_one_side_so_a_bar():
    for seed in range(8):
        height, width = lit(1, seed).shape
        assert width < height / 2
        assert lit(8, seed).shape[1] > 1.5 * width


def test_synth_frames_segmented_digits_as_the_service_frames_them(monkeypatch, tmp_path):
    """``synth.build("segments")``: pictured and framed like printed digits, labelled, and cached."""
    monkeypatch.setattr(synth, "CACHE", tmp_path)
    frames, labels = synth.build("segments", 40, seed=3, workers=1)
    assert frames.dtype == torch.uint8 and frames.shape[1:] == (28, 28)
    assert 30 <= len(frames) <= 40 and len(labels) == len(frames)  # those the framing lost are left out
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) >= 8
    assert all(int(frame.max()) > 200 for frame in frames)  # white ink on black, as MNIST
    again, _ = synth.build("segments", 40, seed=3, workers=1)
    assert torch.equal(again, frames) and len(list(tmp_path.iterdir())) == 1
