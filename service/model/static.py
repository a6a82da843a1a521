"""The static graph of a version: the FNN defined before it runs, stored beside its weights.

``torch.export`` traces the network once, with a dynamic batch dimension, into a program with no Python
in it; AOTInductor compiles that program to native code (a ``.pt2`` package) where a C++ compiler works.
Where none does, the exported program itself is stored and run uncompiled (``kind: exported``): still
the static graph, without the compiled kernels. Real MNIST test digits are stored with it, so a worker
can prove, before it serves a version, that the static graph answers as the eager module does.

A compiled artifact is native code: it is loaded only once the store verified its sha256 (and that of
the digits) against the version's metadata.json, built by this torch, for this kind of device. Every
refusal says why (``Refused.reason``); the worker then serves that version eager.
"""

from __future__ import annotations

import io
import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np
import torch
from torch import nn

from service.imaging import normalize
from service.model import store
from service.model.fnn import FNN

ARTIFACT_FILE = "model.pt2"
PARITY_FILE = "parity.npz"
PARITY_DIGITS = 256  # the first MNIST test digits (every class is among them)
PARITY_BATCHES = (1, 7, 64, PARITY_DIGITS)  # the dynamic dimension's kernels differ by size: check several
TOLERANCE = 1e-5  # largest |difference| of a probability allowed between the runtimes
MAX_BATCH = 4096  # the batch dimension's upper bound: --max-batch-size's own

Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
log = logging.getLogger("digitserve")


class FeatureNet(nn.Module):
    """What every runtime computes in one forward: ``FNN.features`` (the hidden layer after the ReLU, and
    the logits) as a module's forward, which torch.export traces."""

    def __init__(self, fnn: FNN):
        super().__init__()
        self.fnn = fnn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fnn.features(x)


class Refused(Exception):
    """Why a version's static graph is not served; ``reason`` is the fallback metric's label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def export(store_dir: Path, name: str, version: int, images: torch.Tensor, device: str = "cpu",
           compile: bool = True) -> store.Export:
    """Write version ``version``'s static graph and its parity digits (``images``: real MNIST, uint8
    (N, 28, 28)) into its folder, then record both in its metadata.json; each file is written whole or
    not at all. One exporter per version at a time."""
    loaded = store.load(store_dir, name, version, device)
    net = FeatureNet(loaded.model).eval()
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    example = torch.zeros(2, loaded.model.input_size, device=device)
    program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
    tmp = loaded.path / f".tmp-{secrets.token_hex(8)}-{ARTIFACT_FILE}"
    kind: Literal["aoti", "exported"] = "exported"
    try:
        if compile:
            try:
                _inductor().aoti_compile_and_package(program, package_path=str(tmp))
                kind = "aoti"
            except Exception as e:  # no (working) C++ compiler, or an inductor failure: say so, keep the graph
                log.warning("AOTInductor could not compile v%d (%s: %s); storing the exported program uncompiled, "
                            "which runs slower than eager (docs/runtimes.md)", version, type(e).__name__,
                            str(e).splitlines()[0] if str(e) else "")
        if kind == "exported":
            torch.export.save(program, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, loaded.path / ARTIFACT_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    digits = io.BytesIO()
    np.savez_compressed(digits, images=images[:PARITY_DIGITS].numpy().astype(np.uint8))
    store.replace_file(loaded.path / PARITY_FILE, digits.getvalue())
    record = store.Export(
        artifact=store.StoredFile(file=ARTIFACT_FILE, sha256=store.sha256_file(loaded.path / ARTIFACT_FILE)),
        kind=kind, device=torch.device(device).type, torch_version=torch.__version__,
        cpu_isa=(str(_inductor().cpu_vec_isa.pick_vec_isa()) if kind == "aoti" and torch.device(device).type == "cpu"
                 else None),
        parity=store.StoredFile(file=PARITY_FILE, sha256=store.sha256_file(loaded.path / PARITY_FILE)))
    store.record_export(loaded.path, record.model_dump())
    return record


def load(loaded: store.LoadedModel, device: torch.device) -> Features:
    """The version's static graph on ``device``, verified first; Refused says why not."""
    record = _record(loaded)
    if record.torch_version != torch.__version__:
        raise Refused("torch_version", f"v{loaded.version}'s static graph was built by torch {record.torch_version}, "
                                       f"this is {torch.__version__}: export it again")
    if record.device != device.type:
        raise Refused("device", f"v{loaded.version}'s static graph was built for {record.device}, this worker is on "
                                f"{device.type}: export it with --device {device.type}")
    usable = [str(isa) for isa in _inductor().cpu_vec_isa.valid_vec_isa_list()] if record.cpu_isa is not None else []
    if record.cpu_isa is not None and record.cpu_isa not in usable:
        raise Refused("cpu_isa", f"v{loaded.version}'s static graph uses {record.cpu_isa} instructions, this CPU has "
                                 f"{usable or 'none'}: export it on (a CPU like) this one")
    path = _verified(loaded, record.artifact)
    try:
        if record.kind == "aoti":
            return _inductor().aoti_load_package(str(path), run_single_threaded=True,
                                                     device_index=device.index if device.index is not None else -1)
        module: Features = torch.export.load(path).module()
        return module
    except Exception as e:  # a verified file torch cannot load: a torch or platform difference
        raise Refused("load", f"v{loaded.version}'s static graph {path} does not load: {type(e).__name__}: {e}") from e


def _inductor() -> ModuleType:
    """torch._inductor (with its CPU instruction sets), imported only where a compiled graph is made or
    loaded: the import takes about as long as torch's own, in every process that makes it, and an eager
    or exported version needs none of it."""
    import torch._inductor.cpu_vec_isa

    return torch._inductor


def check_parity(loaded: store.LoadedModel, eager: Features, static: Features, device: torch.device) -> None:
    """The static graph must give the eager module's labels and probabilities (within TOLERANCE), and its
    hidden layer (within TOLERANCE of its scale), on the version's real digits at several batch sizes."""
    path = _verified(loaded, _record(loaded).parity)
    with np.load(path, allow_pickle=False) as digits:
        images = digits["images"]
    norm = loaded.metadata.normalization
    x = torch.from_numpy(normalize(images.astype(np.float32) / 255, norm.mean, norm.std)).reshape(len(images), -1)
    x = x.to(device)
    with torch.inference_mode():
        hidden, logits = eager(x)
        expected = torch.softmax(logits, 1)
        for size in PARITY_BATCHES:
            # copied: a runtime with CUDA graphs reuses its outputs' memory on the next call
            parts = [[t.clone() for t in static(x[i:i + size])] for i in range(0, len(x), size)]
            got_hidden, got = torch.cat([h for h, _ in parts]), torch.softmax(torch.cat([lg for _, lg in parts]), 1)
            worst = (got - expected).abs().max().item()
            differ = int((got.argmax(1) != expected.argmax(1)).sum())
            hidden_off = (got_hidden - hidden).abs().max().item() / max(1.0, hidden.abs().max().item())
            if differ or worst > TOLERANCE or hidden_off > TOLERANCE:
                raise Refused("parity", f"v{loaded.version}'s static graph differs from the eager module on "
                                        f"{len(x)} real MNIST digits in batches of {size}: {differ} labels differ, "
                                        f"largest probability difference {worst:.3g}, hidden layer {hidden_off:.3g} "
                                        f"(allowed: none, {TOLERANCE:g}, {TOLERANCE:g})")


def _record(loaded: store.LoadedModel) -> store.Export:
    if loaded.metadata.export is None:
        raise Refused("absent", f"v{loaded.version} has no static graph: python -m service.export --store "
                                f"{loaded.path.parent.parent} --version {loaded.version}")
    return loaded.metadata.export


def _verified(loaded: store.LoadedModel, stored: store.StoredFile) -> Path:
    try:
        return store.verified_file(loaded.path, stored)
    except store.StoreError as e:
        raise Refused("checksum", str(e)) from None

