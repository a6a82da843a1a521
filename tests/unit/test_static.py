"""The static graph's exporter and loader (``service.model.static``, ``python -m service.export``) on a copy of
the committed version and real MNIST digits. Uncompiled (``kind: exported``), so that this tier stays fast; the
AOTInductor-compiled artifact is exercised end to end in tests/e2e/test_runtimes.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from service import export as export_cli
from service.model import static, store
from service.model.fnn import FNN
from service.versions import Runtimes

MODEL = store.DEFAULT_NAME
CPU = torch.device("cpu")


@pytest.fixture
def exported(tmp_path, default_model, mnist_test) -> Path:
    root = tmp_path / "store"
    shutil.copytree(default_model.path, root / MODEL / "1")
    static.export(root, MODEL, 1, mnist_test[0], compile=False)
    return root


def served(root: Path, version: int = 1) -> tuple[store.LoadedModel, static.Features]:
    loaded = store.load(root, MODEL, version)
    features = static.load(loaded, CPU)
    static.check_parity(loaded, static.FeatureNet(loaded.model), features, CPU)
    return loaded, features


def refusal(root: Path) -> static.Refused:
    with pytest.raises(static.Refused) as refused:
        served(root)
    return refused.value


def test_export_records_both_files_and_the_graph_answers_as_the_module(exported, mnist_test):
    loaded, features = served(exported)
    record = loaded.metadata.export
    assert record is not None and record.kind == "exported" and record.device == "cpu"
    assert record.torch_version == torch.__version__
    for stored in (record.artifact, record.parity):
        assert store.sha256_file(loaded.path / stored.file) == stored.sha256
    x = torch.randn(5, 784)
    with torch.inference_mode():
        hidden, logits = features(x)
        assert hidden.shape == (5, 500) and (hidden >= 0).all()
        torch.testing.assert_close(logits, loaded.model(x), atol=1e-5, rtol=1e-5)
    assert not list(loaded.path.glob(".tmp-*"))  # nothing half-written left behind


def test_the_weights_checksum_still_holds_after_the_metadata_was_rewritten(exported):
    assert store.load(exported, MODEL, 1).metadata.sha256 == store.sha256_file(exported / MODEL / "1" / "model.pt")


@pytest.mark.parametrize("name", [static.ARTIFACT_FILE, static.PARITY_FILE])
def test_one_byte_changed_is_refused_by_the_checksum(exported, name):
    path = exported / MODEL / "1" / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused = refusal(exported)
    assert refused.reason == "checksum" and "checksum mismatch" in str(refused) and str(path) in str(refused)


def test_an_artifact_of_other_weights_fails_parity(exported, default_model):
    """The artifact and digits recorded with valid sha256, but the weights beside them are different ones."""
    other = FNN()
    torch.save(other.state_dict(), exported / MODEL / "1" / store.WEIGHTS_FILE)
    metadata = json.loads((exported / MODEL / "1" / store.METADATA_FILE).read_text())
    metadata["sha256"] = store.sha256_file(exported / MODEL / "1" / store.WEIGHTS_FILE)
    (exported / MODEL / "1" / store.METADATA_FILE).write_text(json.dumps(metadata))
    refused = refusal(exported)
    assert refused.reason == "parity" and "256 real MNIST digits" in str(refused)


@pytest.mark.parametrize(("field", "value", "reason"), [("torch_version", "1.0.0", "torch_version"),
                                                        ("device", "cuda", "device"), ("cpu_isa", "amx9", "cpu_isa")])
def test_an_artifact_built_elsewhere_is_not_loaded(exported, field, value, reason):
    path = exported / MODEL / "1" / store.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["export"][field] = value
    path.write_text(json.dumps(metadata))
    assert refusal(exported).reason == reason


def test_a_version_without_a_static_graph_says_how_to_make_one(tmp_path, default_model):
    shutil.copytree(default_model.path, tmp_path / MODEL / "1")
    refused = refusal(tmp_path)
    assert refused.reason == "absent" and "python -m service.export" in str(refused)


def test_the_command_line_exports_and_says_what_it_wrote(tmp_path, default_model, data_dir, capsys):
    shutil.copytree(default_model.path, tmp_path / MODEL / "1")
    assert export_cli.main(["--store", str(tmp_path), "--version", "1", "--data-dir", str(data_dir),
                            "--no-compile"]) == 0
    assert "v1: exported static graph for cpu" in capsys.readouterr().out
    served(tmp_path)


def test_the_command_line_exports_the_highest_version_unless_told(tmp_path, default_model, data_dir, capsys):
    for version in ("1", "2"):
        shutil.copytree(default_model.path, tmp_path / MODEL / version)
    assert export_cli.main(["--store", str(tmp_path), "--data-dir", str(data_dir), "--no-compile"]) == 0
    assert capsys.readouterr().out.startswith("v2: exported static graph")
    assert (tmp_path / MODEL / "2" / static.ARTIFACT_FILE).is_file()
    assert not (tmp_path / MODEL / "1" / static.ARTIFACT_FILE).exists()


def test_the_command_line_refuses_a_missing_version_in_one_line(tmp_path, default_model, data_dir, capsys):
    shutil.copytree(default_model.path, tmp_path / MODEL / "1")
    assert export_cli.main(["--store", str(tmp_path), "--version", "7", "--data-dir", str(data_dir)]) == 2
    assert "version 7 of model 'mnist-fnn' not found" in capsys.readouterr().err


def test_the_runtime_records_say_what_each_pool_serves_and_forget_a_dropped_version():
    runtimes = Runtimes()
    runtimes.record("/predict", 1, "export")
    runtimes.record("/predict", 3, "eager", "parity: " + "x" * 1000)
    runtimes.record("/explain", 1, "eager")
    records = runtimes.read()
    assert records["/predict"]["1"] == {"runtime": "export", "fallback": None}
    assert records["/predict"]["3"]["runtime"] == "eager" and len(records["/predict"]["3"]["fallback"]) == 300
    runtimes.record("/predict", 3, None)
    assert runtimes.read() == {"/predict": {"1": {"runtime": "export", "fallback": None}},
                               "/explain": {"1": {"runtime": "eager", "fallback": None}}}
