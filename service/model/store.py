"""The versioned model store: ``<store>/<name>/<version>/{model.pt,metadata.json[,calibration.pt]}``.

Versions are integers, written to a hidden temporary folder and renamed into place, so a
reader never sees a half-written version. Loading verifies the sha256 recorded in the
metadata before unpickling anything, and only ever with ``weights_only=True``. A version's
calibration (temperature and typicality reference, ``calibration``) is a file of its own with its
sha256 in the metadata, checked the same way; a version without one serves uncalibrated.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.model.calibration import Calibration, calibrated
from service.model.fnn import FNN

DEFAULT_NAME = "mnist-fnn"
WEIGHTS_FILE = "model.pt"
METADATA_FILE = "metadata.json"
CALIBRATION_FILE = "calibration.pt"
_TMP_PREFIX = ".tmp-"


class StoreError(Exception):
    """A model store problem, with a message that names the path and what is wrong."""


class Architecture(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_classes: int = Field(gt=0)


class Normalization(BaseModel):
    mean: float
    std: float = Field(gt=0)


class StoredFile(BaseModel):
    """A file of the version's folder beside the weights, and the sha256 it must have to be read."""

    file: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Export(BaseModel):
    """The static graph of a version (``service.model.static``): the artifact, how it was built, and the
    real MNIST digits its parity with the eager module is checked on."""

    model_config = ConfigDict(extra="allow")
    artifact: StoredFile
    kind: Literal["aoti", "exported"]  # AOTInductor-compiled, or the exported program run uncompiled
    device: str
    torch_version: str
    cpu_isa: str | None = None  # the vector instructions compiled CPU code uses (AVX2, AVX-512...)
    parity: StoredFile


class CalibrationRecord(BaseModel):
    """metadata.json's ``calibration``: the file's checksum and the two numbers that are not tensors."""

    model_config = ConfigDict(extra="allow")
    file: str = CALIBRATION_FILE
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    temperature: float = Field(gt=0)
    score: str


class Metadata(BaseModel):
    """The fields a loader relies on; everything else training records is kept as is."""

    model_config = ConfigDict(extra="allow")
    name: str
    version: int
    architecture: Architecture
    normalization: Normalization
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    export: Export | None = None
    calibration: CalibrationRecord | None = None


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: int
    path: Path
    metadata: Metadata
    model: FNN
    calibration: Calibration | None = None

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """What the service answers for normalised images: softmax(logits / T), T = 1 without calibration."""
        return calibrated(self.calibration, *self.model.features(x))[0]

    @property
    def test_accuracy(self) -> float | None:
        return (self.metadata.model_extra or {}).get("metrics", {}).get("test_accuracy")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _model_dir(store: Path, name: str) -> Path:
    store = Path(store)
    if not store.is_dir():
        raise StoreError(f"model store {store} ({store.resolve()}) does not exist or is not a folder: "
                         "pass --store (or set DIGITSERVE_STORE) to the folder that holds <name>/<version>/")
    model_dir = store / name
    if not model_dir.is_dir():
        known = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise StoreError(f"model {name!r} not found in store {store} (models there: {known or 'none'})")
    return model_dir


def list_versions(store: Path, name: str) -> list[int]:
    """Complete versions only: integer folder names; temporary folders are invisible."""
    model_dir = _model_dir(store, name)
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isascii() and p.name.isdigit())


def resolve_version(store: Path, name: str, version: int | None = None) -> Path:
    """The folder of the pinned version, or of the highest one when ``version`` is None."""
    versions = list_versions(store, name)
    model_dir = Path(store) / name
    if not versions:
        raise StoreError(f"no versions of model {name!r} in {model_dir}")
    if version is None:
        return model_dir / str(versions[-1])
    if version not in versions:
        raise StoreError(f"version {version} of model {name!r} not found in {model_dir} (versions: {versions})")
    return model_dir / str(version)


def read_metadata(version_dir: Path) -> Metadata:
    path = version_dir / METADATA_FILE
    if not path.is_file():
        raise StoreError(f"metadata missing: {path}")
    try:
        return Metadata.model_validate_json(path.read_bytes())
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'file'}: {err['msg']}" for err in e.errors())
        raise StoreError(f"metadata invalid in {path}: {problems}") from None


def load(store: Path, name: str = DEFAULT_NAME, version: int | None = None,
         device: str | torch.device = "cpu") -> LoadedModel:
    """Resolve, verify and load a version onto ``device``, in eval mode."""
    version_dir = resolve_version(store, name, version)
    metadata = read_metadata(version_dir)
    weights = verified_file(version_dir, StoredFile(file=WEIGHTS_FILE, sha256=metadata.sha256), "weights")
    try:
        state_dict = torch.load(weights, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many kinds (zip, pickle, EOF) for a corrupt archive
        raise StoreError(f"weights corrupt or not a weights-only checkpoint: {weights}: {e}") from None
    arch = metadata.architecture
    model = FNN(arch.input_size, arch.hidden_size, arch.num_classes)
    try:
        if not isinstance(state_dict, dict):
            raise RuntimeError(f"expected a state_dict, found {type(state_dict).__name__}")
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise StoreError(
            f"architecture mismatch in {version_dir}: metadata says "
            f"{arch.input_size}-{arch.hidden_size}-{arch.num_classes} but {weights} does not fit it: {e}"
        ) from None
    model.to(device).eval()
    return LoadedModel(name=name, version=int(version_dir.name), path=version_dir, metadata=metadata, model=model,
                       calibration=_load_calibration(version_dir, metadata.calibration, device))


def _load_calibration(version_dir: Path, record: CalibrationRecord | None,
                      device: str | torch.device) -> Calibration | None:
    """The version's calibration, verified like the weights; None for a version that has none."""
    if record is None:
        return None
    path = version_dir / Path(record.file).name
    if not path.is_file():
        raise StoreError(f"calibration missing: {path} (metadata.json names it)")
    actual = sha256_file(path)
    if actual != record.sha256:
        raise StoreError(f"checksum mismatch for {path}: metadata says sha256 {record.sha256}, file has {actual}; "
                         "the file was changed or truncated after it was written")
    try:
        tensors = torch.load(path, map_location=device, weights_only=True)
        if not isinstance(tensors, dict):
            raise ValueError(f"expected a dict of tensors, found {type(tensors).__name__}")
        return Calibration.from_tensors(tensors, record.temperature, record.score)
    except Exception as e:  # corrupt archive, wrong content: the version cannot be served as it claims
        raise StoreError(f"calibration corrupt or invalid: {path}: {e}") from None


def load_best(store: Path, name: str, min_accuracy: float = 0.0) -> tuple[LoadedModel, dict[int, str]]:
    """The highest version that verifies, loads and records a test accuracy of at least ``min_accuracy``,
    and why each higher one was skipped. A corrupt newest version then does not stop a service whose
    previous version is one folder away."""
    skipped: dict[int, str] = {}
    for version in reversed(list_versions(store, name)):
        try:
            loaded = load(store, name, version)
        except StoreError as e:
            skipped[version] = str(e)
            continue
        accuracy = loaded.test_accuracy
        if accuracy is not None and accuracy < min_accuracy:
            skipped[version] = f"test accuracy {accuracy:.4f} is below --min-accuracy {min_accuracy}"
            continue
        return loaded, skipped
    reasons = "; ".join(f"v{v}: {why}" for v, why in skipped.items()) or "the store has none"
    raise StoreError(f"no version of model {name!r} in {store} can be served: {reasons}")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole or not at all: a fsynced hidden sibling renamed over it."""
    tmp = path.with_name(f"{_TMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
    try:
        _fsync_write(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def record_export(version_dir: Path, export: dict[str, Any]) -> None:
    """Add (or replace) the ``export`` entry of an existing version's metadata, atomically."""
    record = json.loads((version_dir / METADATA_FILE).read_bytes())
    record["export"] = export
    replace_file(version_dir / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True).encode())


def verified_file(version_dir: Path, stored: StoredFile, what: str = "file") -> Path:
    """The path of a file the metadata records, once its sha256 matches the record (else StoreError)."""
    path = version_dir / stored.file
    if not path.is_file():
        raise StoreError(f"{what} missing: {path}")
    actual = sha256_file(path)
    if actual != stored.sha256:
        raise StoreError(f"checksum mismatch for {path}: metadata says sha256 {stored.sha256}, file has {actual}; "
                         "the file was changed or truncated after it was written")
    return path


def write_version(store: Path, name: str, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any],
                  calibration: Calibration | None = None) -> Path:
    """Write a NEW version atomically (with its calibration, if given) and return its folder.

    Everything goes to a hidden temporary folder first; only a complete, fsynced version is
    renamed to its integer name. If anything fails, the temporary folder is removed.
    """
    model_dir = Path(store) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / f"{_TMP_PREFIX}{secrets.token_hex(8)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would survive the rename and hide the version from other users
    try:
        weights = tmp / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, weights)
        with open(weights, "rb") as f:
            os.fsync(f.fileno())
        record = {**metadata, "name": name, "sha256": sha256_file(weights)}
        record.pop("calibration", None)  # describes only the file this call writes (metadata copied from a version)
        if calibration is not None:
            calibration_path = tmp / CALIBRATION_FILE
            torch.save({k: v.detach().cpu().contiguous() for k, v in calibration.tensors().items()}, calibration_path)
            with open(calibration_path, "rb") as f:
                os.fsync(f.fileno())
            record["calibration"] = {"file": CALIBRATION_FILE, "sha256": sha256_file(calibration_path),
                                     "temperature": calibration.temperature, "score": calibration.score_name,
                                     "reference_size": len(calibration.reference)}
            if calibration.composition:
                record["calibration"]["reference"] = calibration.composition
        while True:
            versions = list_versions(store, name)
            version = (versions[-1] + 1) if versions else 1
            record["version"] = version
            _fsync_write(tmp / METADATA_FILE, json.dumps(record, indent=2, sort_keys=True).encode())
            target = model_dir / str(version)
            try:
                os.rename(tmp, target)  # atomic; fails if another writer took this number
            except OSError:
                if target.exists():
                    continue
                raise
            return target
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
