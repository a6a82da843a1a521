"""Training tests: real MNIST subsets into temporary stores, versions, reproducibility, and process behaviour."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.server import ROOT
from service.model import printed, reference, static, store
from service.model import training as train

LIMIT = 256


def train_args(data_dir: Path, root: Path, seed: int = 1, *extra: str) -> list[str]:
    """Command-line arguments for a fast one-epoch run on a small real subset (its static graph uncompiled)."""
    return ["--static-graph", "exported", "--data-dir", str(data_dir), "--store", str(root), "--epochs", "1",
            "--limit", str(LIMIT), "--batch-size", "16", "--seed", str(seed), *extra]


def run_in_process(args: list[str]) -> tuple[int, str, str]:
    """service.train.main(args) in this process; returns (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = train.main(args)
    return code, out.getvalue(), err.getvalue()


def run_process(*args: str, prelude: str = "") -> subprocess.CompletedProcess:
    """``python -m service.train ARGS`` as a real process, after running ``prelude`` in it."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['service.train', *{list(args)!r}]\n" \
           "runpy.run_module('service.train', run_name='__main__', alter_sys=True)"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_runs(data_dir, tmp_path_factory):
    """The same seed-1 run twice into one fresh store: versions 1 and 2."""
    root = tmp_path_factory.mktemp("store")
    first = run_in_process(train_args(data_dir, root))            # with progress bars
    second = run_in_process(train_args(data_dir, root, 1, "--no-progress"))
    return root, first, second


# ---------------------------------------------------------------- versions written by training

def test_first_run_writes_version_1_and_second_run_version_2(two_runs):
    root, first, second = two_runs
    assert first[0] == 0 and second[0] == 0
    assert f"wrote {root / store.DEFAULT_NAME / '1'}" in first[1]
    assert f"wrote {root / store.DEFAULT_NAME / '2'}" in second[1]
    assert store.list_versions(root, store.DEFAULT_NAME) == [1, 2]


def test_both_versions_load_latest_by_default(two_runs):
    root = two_runs[0]
    latest = store.load(root)
    pinned = store.load(root, version=1)
    assert (latest.version, pinned.version) == (2, 1)
    assert latest.model(torch.zeros(1, 784)).shape == (1, 10)


def test_progress_and_final_accuracy_are_printed(two_runs):
    """Per-epoch progress (tqdm bar and summary line) and the final test accuracy, which is also stored."""
    root, (_, out, err), _ = two_runs
    assert "epoch 1/1" in err and "batch" in err  # the tqdm bar
    assert re.search(r"^epoch 1/1: train loss [\d.]+, validation accuracy [\d.]+%, test accuracy [\d.]+%$", out, re.M)
    printed = re.search(r"^test accuracy: ([\d.]+)% on 10000 MNIST test images", out, re.M)
    assert printed, out
    stored = store.load(root, version=1).test_accuracy
    assert float(printed.group(1)) == pytest.approx(100 * stored, abs=5e-5)
    assert 0.3 < stored < 1.0  # 256 real images, 16 steps: far above chance (0.1; 0.15 untrained), not perfect


def test_no_progress_hides_the_bars(two_runs):
    _, _, (_, out, err) = two_runs
    assert "batch" not in err
    assert "test accuracy:" in out


def test_metadata_records_this_run(two_runs, data_dir):
    """The run's own settings, data sizes and command line are in its metadata."""
    root = two_runs[0]
    meta = json.loads((root / store.DEFAULT_NAME / "2" / store.METADATA_FILE).read_text())
    assert meta["training"]["limit"] == LIMIT and meta["training"]["epochs"] == 1
    assert meta["training"]["no_progress"] is True and meta["seed"] == 1
    assert meta["data"]["train_images"] == LIMIT
    assert len(meta["data"]["sha256"]) == 4
    assert meta["command"].endswith(f"--limit {LIMIT} --batch-size 16 --seed 1 --no-progress")
    assert meta["metrics"]["history"][0]["epoch"] == 1


def test_training_writes_the_static_graph(two_runs):
    """The version comes with its static graph, recorded in its metadata, and it answers as the eager module."""
    root, (_, out, _), _ = two_runs
    loaded, cpu = store.load(root, store.DEFAULT_NAME, 1), torch.device("cpu")
    assert loaded.metadata.export is not None and loaded.metadata.export.kind == "exported"
    assert f"static graph: exported, {root / store.DEFAULT_NAME / '1' / static.ARTIFACT_FILE}" in out
    static.check_parity(loaded, static.FeatureNet(loaded.model), static.load(loaded, cpu), cpu)


def test_seven_segment_digits_join_the_training_pictures_on_request(data_dir, tmp_path):
    """``--segments N`` (scaled to the small run as the other picture sets are) trains on seven-segment digits;
    the metadata counts those framed."""
    code, out, _ = run_in_process(train_args(data_dir, tmp_path, 1, "--no-progress", "--segments", "1000",
                                             "--static-graph", "none"))
    assert code == 0, out
    meta = json.loads((tmp_path / store.DEFAULT_NAME / "1" / store.METADATA_FILE).read_text())
    assert meta["training"]["segments"] == LIMIT // 16
    assert LIMIT // 32 <= meta["data"]["pictures"]["segments"] <= LIMIT // 16
    assert re.search(rf"^pictures \(\d+ s\): printed \d+, segments {meta['data']['pictures']['segments']}, ", out, re.M)


# ---------------------------------------------------------------- reproducibility

def test_same_seed_gives_identical_weights(two_runs):
    """Two CPU runs with the same seed produce bit-for-bit the same tensors."""
    root = two_runs[0]
    one, two = (store.load(root, version=v).model.state_dict() for v in (1, 2))
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


def test_different_seed_gives_different_weights(two_runs, data_dir, tmp_path):
    root = two_runs[0]
    code, _, _ = run_in_process(train_args(data_dir, tmp_path, 2, "--no-progress"))
    assert code == 0
    seed1 = store.load(root, version=1).model.state_dict()
    seed2 = store.load(tmp_path).model.state_dict()
    for key in ("fc1.weight", "fc2.weight"):
        assert not torch.equal(seed1[key], seed2[key]), key


# ---------------------------------------------------------------- process behaviour

def test_missing_mnist_is_a_clear_error_not_a_traceback(tmp_path):
    """An empty --data-dir: non-zero exit, a message naming the folder, nothing written."""
    empty, root = tmp_path / "empty", tmp_path / "store"
    empty.mkdir()
    result = run_process("--data-dir", str(empty), "--store", str(root), "--epochs", "1")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "MNIST not found" in result.stderr and str(empty.resolve()) in result.stderr
    assert not root.exists()


# The writer's first os.fsync comes right after model.pt is written into the temporary folder;
# os.rename is the last step, with model.pt and metadata.json both complete. The process kills
# itself with SIGKILL at that call, exactly as an outside kill at that moment would.
@pytest.mark.parametrize("os_call", ["fsync", "rename"])
def test_process_killed_during_save_leaves_no_version(data_dir, tmp_path, os_call):
    prelude = (f"import os, signal\n"
               f"os.{os_call} = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)")
    result = run_process(*train_args(data_dir, tmp_path, 1, "--no-progress"), prelude=prelude)
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert "test accuracy:" in result.stdout and "wrote" not in result.stdout
    model_dir = tmp_path / store.DEFAULT_NAME
    leftovers = list(model_dir.iterdir())
    assert [p.name.startswith(".tmp-") for p in leftovers] == [True]  # killed mid-save: only the temp folder
    assert (leftovers[0] / store.WEIGHTS_FILE).is_file()
    assert (leftovers[0] / store.METADATA_FILE).is_file() == (os_call == "rename")
    assert store.list_versions(tmp_path, store.DEFAULT_NAME) == []
    with pytest.raises(store.StoreError, match="no versions"):
        store.load(tmp_path)


def test_a_version_carries_its_calibration_and_picture_counts(two_runs):
    """Training calibrates what it trained (temperature, typicality reference on the held-out split and those
    digits pictured, with printed ones in the calibration font groups: service.model.reference) and says what
    pictures and font partitions it used."""
    root = two_runs[0]
    loaded = store.load(root, version=1)
    assert loaded.calibration is not None and (loaded.path / store.CALIBRATION_FILE).is_file()
    made_of = loaded.metadata.calibration.model_extra["reference"]["pictures"]  # type: ignore[union-attr]
    share = made_of["mnist"]
    assert made_of == {kind: share for kind in reference.KINDS}
    assert 0.8 * loaded.metadata.model_extra["data"]["val_images"] < share <= loaded.metadata.model_extra["data"][
        "val_images"], "the framing drops few pictures"
    assert loaded.calibration.temperature > 0 and len(loaded.calibration.reference) == 4 * share
    pictures = loaded.metadata.model_extra["data"]["pictures"]
    assert pictures["printed"] > 0 and pictures["dressed"] > 0 and pictures["letters"] > 0
    fonts = loaded.metadata.model_extra["training"]["font_partitions"]
    assert fonts["calibration"]["families"] > 0 and set(fonts["calibration"]["groups"]) <= printed.CALIBRATION_GROUPS
    assert loaded.metadata.calibration.model_extra["reference"]["printed_groups"] == sorted(  # type: ignore[union-attr]
        printed.CALIBRATION_GROUPS), "the reference's printed digits are in fonts training never drew"
    assert "after_temperature" in loaded.metadata.model_extra["metrics"]["test_ece"]
