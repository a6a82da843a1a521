"""The conformal reference (``service.model.reference``): every kind of picture the service is sent, in equal
shares, drawn apart from training's and evaluation's pictures, and the one path ``service.calibrate`` and
training take. The pictures are stand-ins here (``synth.build`` replaced): the unit tier needs no fonts;
tests/e2e/test_train.py makes real ones."""

from __future__ import annotations

import json

import pytest
import torch

from bench import evaluate
from service import calibrate
from service.model import reference, store, synth
from service.model.fnn import FNN

SHORT = {"canvas": 0, "dressed": 2, "printed-calibration": 3}  # pictures each stand-in kind loses to the framing


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """``synth.build`` replaced by stand-ins: a kind's frames are filled with its own value, labels 0..9."""
    made: list[dict] = []

    def build(kind, count, seed, source=None, workers=None):
        made.append({"kind": kind, "count": count, "seed": seed, "source": source})
        kept = count - SHORT[kind]
        frames = torch.full((kept, 28, 28), 10 * (1 + sorted(SHORT).index(kind)), dtype=torch.uint8)
        return frames, torch.arange(kept) % 10

    monkeypatch.setattr(synth, "build", build)
    return made


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, 28, 28), 200, dtype=torch.uint8), torch.arange(n) % 10


def test_the_reference_holds_every_kind_in_equal_shares(calls):
    mix = reference.build(*_digits(40), seed=1)
    share = 40 - max(SHORT.values())
    assert mix.composition["pictures"] == {kind: share for kind in reference.KINDS}
    assert len(mix.frames) == len(mix.labels) == 4 * share
    values = mix.frames[:, 0, 0].tolist()
    for kind, value in (("mnist", 200), ("canvas", 10), ("dressed", 20), ("printed", 30)):
        assert values.count(value) == share, kind


def test_the_pictures_are_drawn_apart_from_training_and_evaluation(calls):
    digits, labels = _digits(40)
    composition = reference.build(digits, labels, seed=7).composition
    assert {c["kind"] for c in calls} == {"canvas", "dressed", "printed-calibration"}, "unseen fonts"
    for c in calls:
        assert c["seed"] == composition["picture_seed"] == reference.PICTURE_SEED + 7
        assert c["seed"] not in (7, 1000), "neither training's draw (its seed) nor bench.evaluate's (1000)"
        if c["kind"] == "printed-calibration":
            assert c["source"] is None
        else:
            assert (c["source"][0] == digits.numpy()).all(), "the calibration split's digits, pictured"


def test_kinds_can_be_chosen_but_not_invented():
    assert reference.parse_kinds("printed, mnist") == ("mnist", "printed")
    for wrong in ("mnist,photos", "", " , "):
        with pytest.raises(ValueError, match="reference kinds"):
            reference.parse_kinds(wrong)


def test_a_kind_the_framing_lost_entirely_is_an_error(calls):
    with pytest.raises(ValueError, match="no reference pictures"):
        reference.build(*_digits(3), seed=1, kinds=("mnist", "printed"))


@pytest.fixture
def version_1(tmp_path):
    """A store with one uncalibrated version whose training held out 60 digits (seed 1)."""
    model = FNN()
    meta = {"architecture": model.architecture(), "normalization": {"mean": 0.1307, "std": 0.3081},
            "training": {"seed": 1, "val_size": 60}, "evaluation": {"of": "version 1"}}
    store.write_version(tmp_path, store.DEFAULT_NAME, model.state_dict(), meta)
    return tmp_path


def test_calibrate_writes_a_version_calibrated_on_every_kind(version_1, data_dir, calls, capsys):
    assert calibrate.main(["--data-dir", str(data_dir), "--store", str(version_1), "--version", "1"]) == 0
    said = capsys.readouterr()
    assert "on 57 mnist + 57 canvas + 57 dressed + 57 printed" in said.out
    assert "predates the calibration font groups" in said.err, "version 1's training records no font partitions"
    loaded = store.load(version_1, store.DEFAULT_NAME, 2)
    assert loaded.calibration is not None and len(loaded.calibration.reference) == 4 * 57
    meta = json.loads((loaded.path / store.METADATA_FILE).read_text())
    assert meta["calibration"]["reference"]["pictures"] == {kind: 57 for kind in reference.KINDS}
    assert meta["calibration"]["reference_size"] == 4 * 57
    assert meta["calibrated_from"]["version"] == 1 and "evaluation" not in meta, "version 1's measurements stay its own"


def test_calibrate_on_mnist_alone_is_the_calibration_split(version_1, data_dir, calls):
    args = ["--data-dir", str(data_dir), "--store", str(version_1), "--version", "1", "--reference", "mnist"]
    assert calibrate.main(args) == 0 and calls == []
    loaded = store.load(version_1, store.DEFAULT_NAME, 2)
    assert loaded.calibration is not None and len(loaded.calibration.reference) == 60
    assert loaded.calibration.composition == {}, "read back, the make-up stays in metadata.json"
    assert loaded.metadata.calibration is not None
    assert (loaded.metadata.calibration.model_extra or {})["reference"]["pictures"] == {"mnist": 60}


def test_bench_evaluate_refits_the_scores_on_the_kinds_asked(version_1, data_dir, calls):
    calibrate.main(["--data-dir", str(data_dir), "--store", str(version_1), "--version", "1"])
    loaded = store.load(version_1, store.DEFAULT_NAME, 2)
    recorded = evaluate._reference(loaded, data_dir, None).composition["pictures"]
    assert recorded == {kind: 57 for kind in reference.KINDS}, "by default, as the version's calibration made it"
    asked = evaluate.parse_args(["--reference", "canvas,mnist"]).reference
    assert evaluate._reference(loaded, data_dir, asked).composition["pictures"] == {"mnist": 60, "canvas": 60}
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--reference", "photos"])
