"""Request bodies made from real MNIST test digits, PNG-encoded the way a client would send them."""

from __future__ import annotations

import json
import os
from pathlib import Path

from harness.server import ROOT, b64, encode
from service.model.data import load_mnist


def data_dir() -> Path:
    """``DIGITSERVE_DATA_DIR`` (the Makefile sets it), else ../shared/datasets next to the repository."""
    return Path(os.environ.get("DIGITSERVE_DATA_DIR") or ROOT.parent / "shared" / "datasets")


def mnist_pngs(n: int) -> tuple[list[bytes], list[int]]:
    """The first ``n`` MNIST test digits as PNG files, and their labels."""
    images, labels = load_mnist(data_dir(), train=False)
    return [encode(image.numpy()) for image in images[:n]], labels[:n].tolist()


def write_bodies(folder: Path, pngs: list[bytes], batch: int = 32, **explain: dict) -> dict[str, Path]:
    """One JSON body per line, per kind: ``single`` (one image), ``batch`` (``batch`` consecutive images,
    wrapping round) and one file per ``explain`` entry (name -> extra fields beside the single image)."""
    instances = [{"image_b64": b64(png)} for png in pngs]
    n_batches = len(pngs) // batch or 1
    kinds = {
        "single": [{"instances": [i]} for i in instances],
        "batch": [{"instances": [instances[(b * batch + k) % len(instances)] for k in range(batch)]}
                  for b in range(n_batches)],
        **{name: [{"instances": [i], **fields} for i in instances] for name, fields in explain.items()},
    }
    files = {}
    for kind, bodies in kinds.items():
        files[kind] = folder / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps(body, separators=(",", ":")) + "\n" for body in bodies))
    return files
