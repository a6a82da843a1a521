"""Capture, then replay: 1,000 real MNIST test digits answered by version 2 of the committed store, written by
the real ``Capture``, replayed by ``python -m service.replay`` as a real process.

Replayed with version 2 every label agrees; with version 1, agreement is what the two stored versions give
on those frames, computed here from the store directly; with ``--labels``, the accuracies are the
digits' own. The served rows are computed the way a worker computes them (``service.worker.models``:
the version's normalisation, its features, ``calibrated``), in batches of 64 as a worker's forward.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness.server import ROOT
from service import capture, replay
from service.imaging import normalize
from service.model import store
from service.model.calibration import calibrated
from tests.conftest import MODEL_STORE

COUNT = 1000
BELOW = 0.01


def served(version: int, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Probabilities and typicality of ``version`` for float32 (n, 784) frames in 0..1, 64 at a time."""
    loaded = store.load(MODEL_STORE, store.DEFAULT_NAME, version)
    norm = loaded.metadata.normalization
    probabilities, typicality = [], []
    with torch.inference_mode():
        for start in range(0, len(frames), 64):
            x = torch.from_numpy(normalize(frames[start:start + 64], norm.mean, norm.std))
            p, t = calibrated(loaded.calibration, *loaded.model.features(x))
            probabilities.append(p.numpy())
            typicality.append(None if t is None else t.numpy())
    return np.concatenate(probabilities), None if typicality[0] is None else np.concatenate(typicality)


@pytest.fixture(scope="module")
def captured(mnist_test, tmp_path_factory):
    """A capture folder of 1,000 MNIST test digits served by v2, in requests of 1 to 5 instances over several
    files; the digits' true labels and the two versions' answers, in capture order."""
    images, labels = mnist_test
    chosen = np.random.default_rng(33).choice(len(images), COUNT, replace=False)
    frames = images.numpy()[chosen].reshape(COUNT, 784).astype(np.float32) / 255
    probabilities, typicality = served(2, frames)
    assert typicality is not None, "version 2 is calibrated"
    rows = np.concatenate([probabilities, typicality[:, None]], axis=1).astype(np.float32)
    flags = [["not_a_digit"] if t < BELOW else [] for t in typicality.tolist()]
    directory = tmp_path_factory.mktemp("capture")
    writer = capture.Capture(directory, 1.0, 256 << 20, "api0", records_per_file=300)
    sizes = np.random.default_rng(1).integers(1, 6, COUNT)
    start = 0
    ids = []
    while start < COUNT:
        end = min(COUNT, start + int(sizes[start]))
        writer.record(frames[start:end], rows[start:end], flags[start:end], 2, f"req{start}", 1.7e9 + start)
        ids += [f"req{start}"] * (end - start)
        start = end
    writer.close()
    assert writer.records == COUNT and writer.dropped == 0
    paths = capture.files(directory)
    assert len(paths) == 4
    names = []
    for path in paths:
        with np.load(path, allow_pickle=False) as f:
            names += [(path.name, row, rid) for row, rid in enumerate(f["request_id"].tolist())]
    assert [rid for _, _, rid in names] == ids, "records in capture order"
    v1, _ = served(1, frames)
    return {"directory": directory, "truth": labels.numpy()[chosen], "v2": probabilities, "v1": v1,
            "flags": flags, "where": [(name, row) for name, row, _ in names]}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.replay", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def report_of(*args: str) -> dict:
    done = run(*args, "--json")
    assert done.returncode == 0, done.stderr
    assert "replay with v" in done.stderr, "a progress bar on stderr"
    return json.loads(done.stdout)


def by_label(served_labels: np.ndarray, agree: np.ndarray) -> dict[str, dict]:
    return {str(d): {"records": int((served_labels == d).sum()),
                     "agreement": float(agree[served_labels == d].mean()) if (served_labels == d).any() else None}
            for d in range(10)}


def test_replayed_with_the_version_that_served_every_label_agrees(captured):
    report = report_of(str(captured["directory"]), "--store", str(MODEL_STORE), "--version", "2")
    v2 = captured["v2"]
    assert (report["records"], report["files"], report["agreeing"], report["agreement"]) == (COUNT, 4, COUNT, 1.0)
    assert report["mean_abs_confidence_difference"] < 1e-5
    assert report["by_served_version"] == {"2": {"records": COUNT, "agreement": 1.0}}
    assert report["by_served_label"] == by_label(v2.argmax(1), np.ones(COUNT, bool))
    flagged = sum(f == ["not_a_digit"] for f in captured["flags"])
    assert report["not_a_digit"] == {"served": flagged, "replayed": flagged}
    assert report["by_served_flag"]["none"]["records"] == COUNT - flagged
    assert report["replayed_with"] == {"model": "mnist-fnn", "version": 2, "calibrated": True,
                                       "not_a_digit_below": BELOW}
    assert report["skipped"] == {} and "labels" not in report


def test_replayed_with_version_1_agreement_and_accuracy_are_the_stored_versions(captured, tmp_path):
    truth, where = captured["truth"], captured["where"]
    labelled = np.random.default_rng(2).choice(COUNT, 600, replace=False)
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["file", "row", "label", "note"])  # an extra column is ignored
        out.writerows([*where[i], int(truth[i]), "checked"] for i in labelled)
        out.writerow(["capture-00000000000000000001-api0-1-000000.npz", 0, 3, "deleted by the cap"])
    report = report_of(str(captured["directory"]), "--store", str(MODEL_STORE), "--version", "1", "--labels",
                       str(path))
    served_labels, v1_labels = captured["v2"].argmax(1), captured["v1"].argmax(1)
    agree = served_labels == v1_labels
    assert 0.9 < agree.mean() < 1, "the versions differ on a few of these digits"
    assert report["agreeing"] == int(agree.sum())
    assert report["agreement"] == pytest.approx(agree.mean(), abs=1e-12)
    assert report["by_served_label"] == by_label(served_labels, agree)
    confidence_difference = np.abs(captured["v2"].max(1) - captured["v1"].max(1)).mean()
    assert report["mean_abs_confidence_difference"] == pytest.approx(confidence_difference, abs=1e-5)
    assert report["replayed_with"]["calibrated"] is False and report["not_a_digit"]["replayed"] == 0
    assert report["labels"] == {
        "labelled": 600, "naming_absent_files": 1, "file": str(path),
        "served_accuracy": pytest.approx(float((served_labels[labelled] == truth[labelled]).mean()), abs=1e-12),
        "replayed_accuracy": pytest.approx(float((v1_labels[labelled] == truth[labelled]).mean()), abs=1e-12)}


def test_the_text_report_names_what_it_measured(captured):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = replay.main([str(captured["directory"]), "--store", str(MODEL_STORE), "--version", "2",
                            "--no-progress"])
    assert code == 0 and err.getvalue() == ""
    text = out.getvalue()
    assert f"replayed {COUNT:,} records from 4 capture files" in text
    assert f"label agreement with what was served: 100.00% ({COUNT:,} of {COUNT:,})" in text
    for heading in ("by served label", "by served flag", "by served version"):
        assert heading in text


def in_process(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = replay.main([*args, "--no-progress"])
    return code, err.getvalue()


@pytest.mark.parametrize("labels, says", [
    ("row,label\n1,2\n", "must name the columns file,row,label"),
    ("file,row,label\n{name},0,ten\n", "line 2: expected file,row,label"),
    ("file,row,label\n{name},0,11\n", "line 2: label 11 is not a digit"),
    ("file,row,label\n{name},9999,1\n", "has rows 0..299, not 9999"),
    ("file,row,label\n{name},0,1\n{name},0,1\n", "labelled twice"),
    ("file,row,label\n", "holds no labels"),
    ("file,row,label\nelsewhere.npz,0,1\n", "names none of the capture files"),
])
def test_a_bad_labels_file_is_one_line_and_exit_2(captured, tmp_path, labels, says):
    path = tmp_path / "labels.csv"
    path.write_text(labels.format(name=captured["where"][0][0]))
    code, err = in_process(str(captured["directory"]), "--version", "2", "--store", str(MODEL_STORE),
                           "--labels", str(path))
    assert code == 2 and err.startswith("error: labels file") and says in err and err.count("\n") == 1


def test_a_bad_folder_or_version_is_one_line_and_exit_2(captured, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".capture-00000000000000000001-api0-1-000000.npz.tmp").write_bytes(b"half a file")
    for args, says in (([str(tmp_path / "missing")], "is not a folder"), ([str(empty)], "holds no capture file"),
                       ([str(captured["directory"]), "--labels", str(tmp_path / "none.csv")], "cannot be read")):
        code, err = in_process(*args, "--version", "2", "--store", str(MODEL_STORE))
        assert code == 2 and says in err and err.count("\n") == 1, err
    code, err = in_process(str(captured["directory"]), "--version", "99", "--store", str(MODEL_STORE))
    assert code == 2 and "version 99" in err and err.count("\n") == 1
    done = run(str(tmp_path / "missing"), "--version", "2", "--store", str(MODEL_STORE))  # as a real process
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_an_unreadable_capture_file_is_skipped_and_named(captured, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(captured["directory"], directory)
    broken = directory / captured["where"][0][0]
    broken.write_bytes(broken.read_bytes()[:1000])  # as if written in place by something else
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = replay.main([str(directory), "--version", "2", "--store", str(MODEL_STORE), "--no-progress", "--json"])
    report = json.loads(out.getvalue())
    assert code == 0 and (report["files"], report["records"], report["agreement"]) == (3, COUNT - 300, 1.0)
    assert list(report["skipped"]) == [broken.name]
