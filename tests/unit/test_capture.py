"""The capture writer in process: sampling, the files and what they hold, rotation, the size cap, and that
nothing it meets (a full disk, a folder gone, a slow writer, a caller's mistake) reaches the caller."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service import capture
from service.capture import FIELDS, Capture

BIG = 1 << 30  # a cap nothing here reaches


def instances(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n frames as the model sees them (float32 (n, 784) in 0..1, on the uint8 grid as MNIST's are) and
    their answer rows (ten probabilities, then a typicality)."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, 784)).astype(np.float32) / 255
    logits = rng.normal(size=(n, 10)).astype(np.float32) * 3
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rows = np.concatenate([probabilities, rng.random((n, 1), dtype=np.float32)], axis=1).astype(np.float32)
    return frames, rows


def record_each(c: Capture, frames: np.ndarray, rows: np.ndarray, version: int = 2, prefix: str = "r") -> None:
    """One request per instance, request ids r0, r1, ..."""
    for i in range(len(rows)):
        c.record(frames[i:i + 1], rows[i:i + 1], [["low_contrast"] if i % 2 else []], version, f"{prefix}{i}",
                 1_700_000_000.0 + i)


def read_all(directory: Path) -> dict[str, np.ndarray]:
    """Every capture file's arrays, concatenated in file order; numpy alone, no pickle."""
    loaded = []
    for path in capture.files(directory):
        with np.load(path, allow_pickle=False) as f:
            assert sorted(f.files) == sorted(FIELDS)
            loaded.append({name: f[name] for name in FIELDS})
    assert loaded, f"no capture file in {directory}"
    return {name: np.concatenate([part[name] for part in loaded]) for name in FIELDS}


def counts(directory: Path) -> list[int]:
    out = []
    for path in capture.files(directory):
        with np.load(path, allow_pickle=False) as f:
            out.append(len(f["label"]))
    return out


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------- what a file holds


def test_every_instance_with_share_1_in_files_numpy_reads_without_pickle(tmp_path):
    frames, rows = instances(7)
    c = Capture(tmp_path, 1.0, BIG, "api0")
    c.record(frames[:3], rows[:3], [[], ["low_contrast"], ["not_a_digit", "low_contrast"]], 2, "req-a", 1000.5)
    rows[:3] = 0  # the caller may reuse its arrays at once: capture copied what it keeps
    frames[:3] = 0
    c.record(frames[3:], rows[3:], [[]] * 4, 1, "req-b", 1001.25)
    c.close()
    assert (c.records, c.dropped, c.failures, c.stopped) == (7, 0, 0, False)
    got = read_all(tmp_path)
    expected_frames, expected_rows = instances(7)
    assert got["frames"].dtype == np.uint8 and got["frames"].shape == (7, 28, 28)
    assert np.array_equal(got["frames"].reshape(7, 784).astype(np.float32) / 255, expected_frames)
    assert got["probabilities"].dtype == np.float32
    assert np.array_equal(got["probabilities"], expected_rows[:, :10])
    assert np.array_equal(got["typicality"], expected_rows[:, 10])
    assert got["label"].dtype == np.int64
    assert np.array_equal(got["label"], expected_rows[:, :10].argmax(1))
    assert np.array_equal(got["confidence"], expected_rows[:, :10].max(1))
    assert got["flags"].tolist() == ["", "low_contrast", "not_a_digit,low_contrast", "", "", "", ""]
    assert got["version"].dtype == np.int64 and got["version"].tolist() == [2, 2, 2, 1, 1, 1, 1]
    assert got["request_id"].tolist() == ["req-a"] * 3 + ["req-b"] * 4
    assert got["time"].dtype == np.float64 and got["time"].tolist() == [1000.5] * 3 + [1001.25] * 4
    assert not [p.name for p in tmp_path.iterdir() if not p.name.startswith("capture-")], "no temporary file left"


def test_a_version_without_calibration_keeps_nan_typicality(tmp_path):
    frames, rows = instances(2)
    rows[:, 10] = np.nan
    c = Capture(tmp_path, 1.0, BIG, "api0")
    c.record(frames, rows, [[], []], 1, "x", 1.0)
    c.close()
    assert np.isnan(read_all(tmp_path)["typicality"]).all()


def test_file_names_sort_by_time_and_name_the_tag_and_pid(tmp_path):
    frames, rows = instances(6)
    c = Capture(tmp_path, 1.0, BIG, "api1", records_per_file=2)
    record_each(c, frames, rows)
    c.close()
    names = [p.name for p in capture.files(tmp_path)]
    assert len(names) == 3
    stamps = [int(name.split("-")[1]) for name in names]
    assert stamps == sorted(stamps) and abs(stamps[0] / 1e9 - time.time()) < 60
    assert all(f"-api1-{os.getpid()}-" in name for name in names)
    assert read_all(tmp_path)["request_id"].tolist() == [f"r{i}" for i in range(6)], "files in name order: arrival"


def test_files_ignores_temporary_names(tmp_path):
    (tmp_path / ".capture-00000000000000000001-api0-1-000000.npz.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("mine")
    assert capture.files(tmp_path) == []


# ---------------------------------------------------------------- sampling


def test_share_0_keeps_nothing(tmp_path):
    frames, rows = instances(200)
    c = Capture(tmp_path, 0.0, BIG, "api0")
    record_each(c, frames, rows)
    c.close()
    assert c.records == 0 and capture.files(tmp_path) == []


def test_share_half_keeps_about_half_each_instance_drawn_alone(tmp_path):
    frames, rows = instances(2000)
    c = Capture(tmp_path, 0.5, BIG, "api0")
    for start in range(0, 2000, 8):  # requests of 8 instances: each instance is drawn, not each request
        c.record(frames[start:start + 8], rows[start:start + 8], [[]] * 8, 2, f"q{start}", 1.0)
    c.close()
    got = read_all(tmp_path)
    assert 850 < c.records == len(got["label"]) < 1150  # binomial(2000, 0.5): sd 22
    per_request = np.unique(got["request_id"], return_counts=True)[1]
    assert set(per_request.tolist()) - {8}, "some requests partly kept"
    # the kept instances are the right ones: each kept frame's answer is its own
    index = {frames[i].tobytes(): i for i in range(2000)}
    kept = [index[(f.reshape(784).astype(np.float32) / 255).tobytes()] for f in got["frames"]]
    assert np.array_equal(got["probabilities"], rows[kept, :10])


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_outside_0_1_is_refused(tmp_path, share):
    with pytest.raises(ValueError, match="share"):
        Capture(tmp_path, share, BIG, "api0")


def test_a_tag_that_would_break_file_names_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tag"):
        Capture(tmp_path, 1.0, BIG, "../api0")


# ---------------------------------------------------------------- rotation


def test_a_file_closes_after_its_record_count(tmp_path):
    frames, rows = instances(25)
    c = Capture(tmp_path, 1.0, BIG, "api0", records_per_file=10, rotate_s=60)
    record_each(c, frames[:3], rows[:3])
    time.sleep(0.2)  # the writer has started and sleeps, until rotate_s or a full file's worth
    record_each(c, frames[3:], rows[3:], prefix="s")
    wait_for(lambda: len(capture.files(tmp_path)) == 2, timeout=5)  # the two full ones, well before rotate_s
    assert counts(tmp_path) == [10, 10]
    c.close()
    assert counts(tmp_path) == [10, 10, 5], "close writes what is held"
    c.close()  # idempotent
    assert counts(tmp_path) == [10, 10, 5]


def test_a_request_larger_than_a_file_is_split(tmp_path):
    frames, rows = instances(23)
    c = Capture(tmp_path, 1.0, BIG, "api0", records_per_file=10, rotate_s=60)
    c.record(frames, rows, [[]] * 23, 2, "big", 1.0)
    c.close()
    assert counts(tmp_path) == [10, 10, 3]
    assert np.array_equal(read_all(tmp_path)["probabilities"], rows[:, :10])


def test_a_file_closes_after_rotate_s_even_when_few_records(tmp_path):
    frames, rows = instances(3)
    c = Capture(tmp_path, 1.0, BIG, "api0", records_per_file=1000, rotate_s=0.2)
    started = time.monotonic()
    record_each(c, frames, rows)
    wait_for(lambda: capture.files(tmp_path), timeout=5)
    assert time.monotonic() - started >= 0.15
    assert counts(tmp_path) == [3]
    c.close()
    assert counts(tmp_path) == [3]


def test_the_records_counter_counts_what_was_written(tmp_path):
    before = REGISTRY.get_sample_value("digitserve_capture_records_total") or 0.0
    frames, rows = instances(5)
    c = Capture(tmp_path, 1.0, BIG, "api0")
    record_each(c, frames, rows)
    c.close()
    assert REGISTRY.get_sample_value("digitserve_capture_records_total") == before + 5


# ---------------------------------------------------------------- the cap


def test_the_cap_deletes_the_oldest_files_first_any_processes(tmp_path):
    old = [tmp_path / f"capture-{stamp:020d}-api9-1-000000.npz" for stamp in (1, 2, 3)]  # another process's
    for path in old:
        path.write_bytes(b"x" * 3000)
    (tmp_path / "notes.txt").write_bytes(b"y" * 50_000)  # not a capture file: neither counted nor deleted
    cap = 16_000
    frames, rows = instances(40)
    c = Capture(tmp_path, 1.0, cap, "api0", records_per_file=4, backlog_files=100)
    assert c.records_per_file == 1, "a file is at most an eighth of the cap"
    record_each(c, frames, rows)
    c.close()
    assert c.records == 40
    left = capture.files(tmp_path)
    assert sum(p.stat().st_size for p in left) <= cap
    assert not any(p.exists() for p in old), "the oldest go first"
    kept = read_all(tmp_path)["request_id"].tolist()
    assert 3 <= len(kept) < 40 and kept == [f"r{i}" for i in range(40 - len(kept), 40)], "the newest are kept"
    assert (tmp_path / "notes.txt").exists()


def test_a_cap_smaller_than_one_file_keeps_nothing_and_says_so_once(tmp_path, caplog):
    frames, rows = instances(5)
    c = Capture(tmp_path, 1.0, 100, "api0")
    with caplog.at_level(logging.WARNING, logger="digitserve"):
        record_each(c, frames, rows)
        c.close()
    assert c.records == 5 and not c.stopped
    assert capture.files(tmp_path) == []
    assert len([r for r in caplog.records if "larger than --capture-max-mb" in r.message]) == 1


# ---------------------------------------------------------------- failures never reach the caller


def test_a_folder_gone_stops_capture_with_one_warning_and_record_never_raises(tmp_path, caplog):
    folder = tmp_path / "captures"
    frames, rows = instances(30)
    c = Capture(folder, 1.0, BIG, "api0", records_per_file=5, rotate_s=60)
    folder.rmdir()
    folder.write_bytes(b"a file where the folder was")  # every write fails (ENOTDIR), like a full disk would
    before = REGISTRY.get_sample_value("digitserve_capture_dropped_total", {"reason": "failed"}) or 0.0
    with caplog.at_level(logging.WARNING, logger="digitserve"):
        record_each(c, frames[:10], rows[:10])
        wait_for(lambda: c.stopped)
        record_each(c, frames[10:], rows[10:])  # ignored, never raising
        c.close()
    assert (c.stopped, c.failures, c.records) == (True, 1, 0)
    assert 5 <= c.dropped <= 10
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "capture stopped" in r.message]
    assert len(warnings) == 1 and "NotADirectoryError" in warnings[0].message
    assert REGISTRY.get_sample_value("digitserve_capture_dropped_total", {"reason": "failed"}) == before + c.dropped


def test_a_write_error_as_a_full_disk_gives_it_stops_capture(tmp_path, monkeypatch, caplog):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(capture.np, "savez_compressed", full)
    frames, rows = instances(3)
    c = Capture(tmp_path, 1.0, BIG, "api0")
    with caplog.at_level(logging.WARNING, logger="digitserve"):
        record_each(c, frames, rows)
        c.close()
        record_each(c, frames, rows)
    assert (c.stopped, c.failures, c.records, c.dropped) == (True, 1, 0, 3)
    assert any("No space left on device" in r.message for r in caplog.records)
    assert list(tmp_path.iterdir()) == [], "the temporary file is removed"


def test_a_folder_that_cannot_be_made_is_capture_off_not_an_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    c = Capture(tmp_path / "file" / "captures", 1.0, BIG, "api0")
    frames, rows = instances(2)
    c.record(frames, rows, [[], []], 2, "x", 1.0)
    c.close()
    assert c.stopped and c.failures == 1


def test_a_slow_writer_drops_records_past_the_backlog_instead_of_growing(tmp_path, monkeypatch):
    release = threading.Event()
    real = Capture._write

    def slow(self, chunks):
        release.wait(10)
        return real(self, chunks)

    monkeypatch.setattr(Capture, "_write", slow)
    frames, rows = instances(30)
    c = Capture(tmp_path, 1.0, BIG, "api0", records_per_file=5, rotate_s=60, backlog_files=2)
    record_each(c, frames, rows)  # the writer takes the first 5 and blocks: 10 held in all, at most
    assert (c.max_held, c.dropped) == (10, 20)
    assert c._held == 10
    release.set()
    c.close()
    assert c.records == 10 and counts(tmp_path) == [5, 5]
    assert read_all(tmp_path)["request_id"].tolist() == [f"r{i}" for i in range(10)]
    assert not c.stopped, "dropping is not failing: capture goes on"


def test_a_callers_mistake_stops_capture_without_raising(tmp_path):
    frames, rows = instances(3)
    c = Capture(tmp_path, 1.0, BIG, "api0")
    c.record(frames, rows[:2], [[]] * 3, 2, "x", 1.0)  # rows for two instances, frames for three
    assert c.stopped and c.failures == 1
    c.record(frames, rows, [[]] * 3, 2, "x", 1.0)
    c.close()
    assert capture.files(tmp_path) == []


def test_record_is_cheap(tmp_path):
    """The event loop's cost: microseconds per call (generous for a shared 2-core machine)."""
    frames, rows = instances(1)
    c = Capture(tmp_path, 0.01, BIG, "api0")
    started = time.perf_counter()
    for i in range(5000):
        c.record(frames, rows, [[]], 2, "x", float(i))
    per_call = (time.perf_counter() - started) / 5000
    c.close()
    assert per_call < 50e-6, f"{per_call * 1e6:.1f} us per call"


def test_a_forked_process_writes_its_own_files_with_its_own_writer(tmp_path):
    """Built before the API servers fork (as service.app builds everything), it still captures in each."""
    frames, rows = instances(4)
    c = Capture(tmp_path, 1.0, BIG, "api0", rotate_s=60)
    c.record(frames[:1], rows[:1], [[]], 2, "parent", 1.0)  # the parent's writer thread runs, holding a record
    pid = os.fork()
    if pid == 0:  # the child: no writer thread of its own yet, nothing of the parent's held
        code = 1
        try:
            c.record(frames[1:], rows[1:], [[]] * 3, 2, "child", 2.0)
            c.close()
            mine = [p for p in capture.files(tmp_path) if f"-api0-{os.getpid()}-" in p.name]
            code = 0 if c.records == 3 and len(mine) == 1 else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked process hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(done[1]) == 0
    c.close()
    assert c.records == 1
    got = read_all(tmp_path)
    assert sorted(got["request_id"].tolist()) == ["child"] * 3 + ["parent"]
