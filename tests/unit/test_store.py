"""Model store tests: versioning, atomic writes, and a clear StoreError for every way a store can be broken."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from service.model import store
from service.model.fnn import FNN, MNIST_MEAN, MNIST_STD
from service.model.store import StoreError

NAME = "digits"


def write_model(root: Path, seed: int = 0, **extra) -> Path:
    """Write a freshly initialised FNN as a new version through the real writer; return its folder."""
    torch.manual_seed(seed)
    model = FNN()
    metadata = {"architecture": model.architecture(), "normalization": {"mean": MNIST_MEAN, "std": MNIST_STD}, **extra}
    return store.write_version(root, NAME, model.state_dict(), metadata)


def edit_metadata(version_dir: Path, edit) -> None:
    """Apply ``edit`` to the parsed metadata.json of a version and write it back."""
    path = version_dir / store.METADATA_FILE
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


def reseal(version_dir: Path) -> None:
    """Record model.pt's current sha256, as if the file had been written that way (checksum passes)."""
    digest = hashlib.sha256((version_dir / store.WEIGHTS_FILE).read_bytes()).hexdigest()
    edit_metadata(version_dir, lambda m: m.update(sha256=digest))


def load_error(root: Path, version: int | None = None) -> str:
    """The message of the StoreError that loading raises."""
    with pytest.raises(StoreError) as caught:
        store.load(root, NAME, version)
    return str(caught.value)


def entries(model_dir: Path) -> list[str]:
    """Everything in a model folder, hidden entries included."""
    return sorted(p.name for p in model_dir.iterdir())


class Opaque:
    """An arbitrary class: pickling it into model.pt is what a hostile checkpoint would do."""


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def version_dir(root) -> Path:
    """One valid version, version 1."""
    return write_model(root)


# ---------------------------------------------------------------- versions: write, list, load

def test_versions_count_up_and_latest_wins(root):
    """Each write is the next integer; load() takes the highest, a pinned version gets exactly that one."""
    paths = [write_model(root, seed=s) for s in range(3)]
    assert [p.name for p in paths] == ["1", "2", "3"]
    assert store.list_versions(root, NAME) == [1, 2, 3]
    assert store.load(root, NAME).version == 3
    pinned = store.load(root, NAME, version=2)
    assert pinned.version == 2 and pinned.path == root / NAME / "2"


def test_round_trip_keeps_weights_and_metadata(root):
    """What load() returns is bit-for-bit what was written, with name, version and sha256 recorded."""
    torch.manual_seed(0)
    original = FNN()
    version_dir = write_model(root, seed=0, seed_used=0)
    loaded = store.load(root, NAME)
    for key, tensor in original.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], tensor), key
    meta = json.loads((version_dir / store.METADATA_FILE).read_text())
    assert (meta["name"], meta["version"], meta["seed_used"]) == (NAME, 1, 0)
    assert meta["sha256"] == hashlib.sha256((version_dir / store.WEIGHTS_FILE).read_bytes()).hexdigest()
    assert not loaded.model.training


def test_weights_file_is_a_plain_state_dict(version_dir):
    """model.pt holds tensors only, so weights_only loading accepts it."""
    state = torch.load(version_dir / store.WEIGHTS_FILE, weights_only=True)
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_version_folder_has_ordinary_permissions(version_dir):
    """A version is as readable as any folder made there (umask), so a server running as another user can load it."""
    sibling = version_dir.parent / "plain"
    sibling.mkdir()
    assert version_dir.stat().st_mode == sibling.stat().st_mode


# ---------------------------------------------------------------- interrupted writes

@pytest.mark.parametrize("state_dict, metadata, error", [
    pytest.param(FNN().state_dict(), {"architecture": FNN().architecture(), "not_json": object()}, TypeError,
                 id="metadata-not-json"),
    pytest.param({"fc1.weight": "not a tensor"}, {}, AttributeError, id="state-dict-not-tensors"),
])
def test_failed_write_leaves_nothing_behind(version_dir, state_dict, metadata, error):
    """A writer that fails midway adds no version and removes its temporary folder."""
    model_dir = version_dir.parent
    before = entries(model_dir)
    with pytest.raises(error):
        store.write_version(model_dir.parent, NAME, state_dict, metadata)
    assert entries(model_dir) == before == ["1"]
    assert store.load(model_dir.parent, NAME).version == 1


def test_leftover_temp_folder_is_invisible(version_dir):
    """A hidden .tmp- folder left by a killed writer, even a complete one, is never listed or loaded."""
    model_dir = version_dir.parent
    shutil.copytree(version_dir, model_dir / ".tmp-k1ll3d")
    edit_metadata(model_dir / ".tmp-k1ll3d", lambda m: m.update(version=2))
    assert store.list_versions(model_dir.parent, NAME) == [1]
    assert store.load(model_dir.parent, NAME).version == 1
    assert write_model(model_dir.parent).name == "2"  # the next writer is not confused by it either


def test_store_with_only_a_temp_folder_has_no_versions(version_dir):
    """If the only thing there is a partial write, there is nothing to load."""
    model_dir = version_dir.parent
    version_dir.rename(model_dir / ".tmp-partial")
    assert store.list_versions(model_dir.parent, NAME) == []
    message = load_error(model_dir.parent)
    assert "no versions" in message and str(model_dir) in message


# ---------------------------------------------------------------- finding the version: clear errors

def test_missing_store_folder(tmp_path):
    missing = tmp_path / "nowhere"
    message = load_error(missing)
    assert str(missing) in message and "does not exist" in message


def test_missing_model_name(version_dir):
    root = version_dir.parent.parent
    with pytest.raises(StoreError) as caught:
        store.load(root, "no-such-model")
    message = str(caught.value)
    assert "'no-such-model' not found" in message and str(root) in message
    assert NAME in message  # says which models are there


def test_model_folder_without_versions(root):
    (root / NAME).mkdir(parents=True)
    message = load_error(root)
    assert "no versions" in message and str(root / NAME) in message


def test_pinned_version_missing(version_dir):
    message = load_error(version_dir.parent.parent, version=7)
    assert "version 7" in message and "not found" in message and str(version_dir.parent) in message
    assert "[1]" in message  # lists the versions that do exist


# ---------------------------------------------------------------- broken files: clear errors

def test_weights_missing(version_dir):
    (version_dir / store.WEIGHTS_FILE).unlink()
    message = load_error(version_dir.parent.parent)
    assert "weights missing" in message and str(version_dir / store.WEIGHTS_FILE) in message


def test_tampered_weights_fail_the_checksum(version_dir):
    """Changed bytes no longer match the recorded sha256."""
    weights = version_dir / store.WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    message = load_error(version_dir.parent.parent)
    assert "checksum mismatch" in message and str(weights) in message


def test_truncated_weights_fail_the_checksum(version_dir):
    weights = version_dir / store.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:1000])
    message = load_error(version_dir.parent.parent)
    assert "checksum mismatch" in message and "truncated" in message and str(weights) in message


@pytest.mark.parametrize("damage", [
    pytest.param(lambda b: b"\x00" * 16 + b[16:], id="header-overwritten"),
    pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
    pytest.param(lambda b: b"this is not a torch checkpoint", id="garbage"),
])
def test_corrupt_weights_with_matching_checksum(version_dir, damage):
    """Damage the checksum cannot see (metadata resealed to match) still fails, as 'corrupt'."""
    weights = version_dir / store.WEIGHTS_FILE
    weights.write_bytes(damage(weights.read_bytes()))
    reseal(version_dir)
    message = load_error(version_dir.parent.parent)
    assert "corrupt" in message and str(weights) in message


def test_checkpoint_with_arbitrary_objects_is_refused(version_dir):
    """A checkpoint that needs full unpickling is never loaded: weights_only=True refuses it."""
    weights = version_dir / store.WEIGHTS_FILE
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": Opaque()}, weights)
    reseal(version_dir)
    message = load_error(version_dir.parent.parent)
    assert "not a weights-only checkpoint" in message and str(weights) in message


def test_metadata_missing(version_dir):
    (version_dir / store.METADATA_FILE).unlink()
    message = load_error(version_dir.parent.parent)
    assert "metadata missing" in message and str(version_dir / store.METADATA_FILE) in message


def test_metadata_not_json(version_dir):
    (version_dir / store.METADATA_FILE).write_text("{ this is not json")
    message = load_error(version_dir.parent.parent)
    assert "metadata invalid" in message and str(version_dir / store.METADATA_FILE) in message


@pytest.mark.parametrize("field", ["architecture", "normalization", "sha256"])
def test_metadata_missing_a_field(version_dir, field):
    """The message names the missing field."""
    edit_metadata(version_dir, lambda m: m.pop(field))
    message = load_error(version_dir.parent.parent)
    assert "metadata invalid" in message and field in message and str(version_dir / store.METADATA_FILE) in message


def test_metadata_with_a_bad_value(version_dir):
    edit_metadata(version_dir, lambda m: m["architecture"].update(hidden_size=-5))
    message = load_error(version_dir.parent.parent)
    assert "metadata invalid" in message and "architecture.hidden_size" in message


def test_architecture_mismatch(version_dir):
    """Metadata says 784-400-10, the weights are 784-500-10."""
    edit_metadata(version_dir, lambda m: m["architecture"].update(hidden_size=400))
    message = load_error(version_dir.parent.parent)
    assert "architecture mismatch" in message and "784-400-10" in message and str(version_dir) in message


def test_weights_that_are_not_a_state_dict(version_dir):
    """A valid tensor file that is not a state_dict is reported, not crashed on."""
    torch.save(torch.zeros(3), version_dir / store.WEIGHTS_FILE)
    reseal(version_dir)
    message = load_error(version_dir.parent.parent)
    assert "expected a state_dict" in message and str(version_dir) in message
