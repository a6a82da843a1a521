"""Calibration math (temperature, conformal typicality) and the store's checks on a calibration file (the
answers built from it: tests/unit/test_answers.py)."""

from __future__ import annotations

import pytest
import torch

from service.model import store
from service.model.calibration import (
    Calibration,
    calibrated,
    expected_calibration_error,
    fit_temperature,
    mahalanobis_fit,
    score,
)
from service.model.fnn import FNN


def _overconfident(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits three times too sharp for labels drawn from softmax(true logits)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(n, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(true, 1), 1, generator=g).squeeze(1)
    return true * 3, labels


def test_temperature_lowers_the_nll_and_the_calibration_error():
    logits, labels = _overconfident(3000, 0)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(3, rel=0.15)
    nll = torch.nn.functional.cross_entropy
    assert nll(logits / t, labels) < nll(logits, labels)
    test_logits, test_labels = _overconfident(3000, 1)  # fitted on one split, better on another
    before = expected_calibration_error(torch.softmax(test_logits, 1), test_labels)
    after = expected_calibration_error(torch.softmax(test_logits / t, 1), test_labels)
    assert after < before / 3 and after < 0.03


def _gaussian_digits(n: int, seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden layers of three 'classes' (Gaussian clusters), logits, labels; ``shift`` moves them away."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    centres = torch.eye(3, 16) * 4
    hidden = centres[labels] + torch.randn(n, 16, generator=g) + shift
    logits = hidden[:, :3] * 2
    return hidden, logits, labels


@pytest.mark.parametrize("name", ["mahalanobis", "energy", "max_logit"])
def test_typicality_is_uniform_on_held_out_digits(name):
    """The conformal promise: on inputs like the calibration split, P(typicality <= a) is about a."""
    params = mahalanobis_fit(*_gaussian_digits(4000, 0)[::2], num_classes=3) if name == "mahalanobis" else {}
    hidden, logits, labels = _gaussian_digits(2000, 1)
    calibration = Calibration.fit(name, params, hidden, logits, labels)
    p = calibration.typicality(*_gaussian_digits(10000, 2)[:2])
    assert float(p.min()) > 0 and float(p.max()) <= 1
    for a in (0.01, 0.05, 0.1, 0.5, 0.9):
        assert float((p <= a).float().mean()) == pytest.approx(a, abs=0.02 + a * 0.05), a


def test_mahalanobis_typicality_is_near_zero_far_from_the_digits():
    params = mahalanobis_fit(*_gaussian_digits(4000, 0)[::2], num_classes=3)
    hidden, logits, labels = _gaussian_digits(2000, 1)
    calibration = Calibration.fit("mahalanobis", params, hidden, logits, labels)
    far = calibration.typicality(*_gaussian_digits(500, 3, shift=3.0)[:2])
    assert float((far < 0.01).float().mean()) > 0.95
    assert float(far.min()) == pytest.approx(1 / 2001)


def test_mahalanobis_score_is_the_smallest_class_distance():
    hidden, _, labels = _gaussian_digits(3000, 0)
    params = mahalanobis_fit(hidden, labels, 3)
    x = hidden[:5]
    direct = torch.stack([((x - m) @ params["precision"] * (x - m)).sum(1) for m in params["means"]]).min(0).values
    assert torch.allclose(score("mahalanobis", x, torch.zeros(5, 3), params), direct, rtol=1e-3, atol=1e-3)


def test_an_uncalibrated_version_answers_plain_softmax_and_no_typicality():
    logits = torch.randn(4, 10)
    probabilities, typicality = calibrated(None, torch.zeros(4, 500), logits)
    assert torch.allclose(probabilities, torch.softmax(logits, 1)) and typicality is None


def _version(tmp_path, calibration: Calibration | None):
    model = FNN()
    meta = {"architecture": model.architecture(), "normalization": {"mean": 0.1307, "std": 0.3081}}
    return store.write_version(tmp_path, "m", model.state_dict(), meta, calibration)


def _calibration() -> Calibration:
    hidden, logits, labels = _gaussian_digits(500, 0)
    return Calibration.fit("energy", {}, hidden, logits, labels)


def test_the_store_round_trips_a_calibration(tmp_path):
    written = _calibration()
    path = _version(tmp_path, written)
    loaded = store.load(tmp_path, "m")
    assert loaded.calibration is not None and (path / store.CALIBRATION_FILE).is_file()
    assert loaded.calibration.temperature == written.temperature
    assert torch.equal(loaded.calibration.reference, written.reference)
    assert loaded.metadata.calibration is not None and loaded.metadata.calibration.score == "energy"


def test_a_version_without_calibration_loads_without_one(tmp_path):
    _version(tmp_path, None)
    loaded = store.load(tmp_path, "m")
    assert loaded.calibration is None and loaded.metadata.calibration is None


def test_the_store_refuses_a_tampered_calibration(tmp_path):
    path = _version(tmp_path, _calibration()) / store.CALIBRATION_FILE
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(store.StoreError, match=r"checksum mismatch for .*calibration\.pt"):
        store.load(tmp_path, "m")
    path.unlink()
    with pytest.raises(store.StoreError, match="calibration missing"):
        store.load(tmp_path, "m")


def test_the_store_refuses_a_calibration_that_is_not_one(tmp_path):
    """A file whose checksum matches but holds no reference (written so on purpose) is still refused."""
    version = _version(tmp_path, _calibration())
    path = version / store.CALIBRATION_FILE
    torch.save({"param.x": torch.zeros(2)}, path)
    meta = (version / store.METADATA_FILE).read_text().replace(
        store.read_metadata(version).calibration.sha256, store.sha256_file(path))  # type: ignore[union-attr]
    (version / store.METADATA_FILE).write_text(meta)
    with pytest.raises(store.StoreError, match="calibration corrupt or invalid"):
        store.load(tmp_path, "m")
