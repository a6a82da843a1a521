"""Export a model-store checkpoint to a .npz that the Triton reference (serve.py) computes with in plain numpy.

Runs in the project's venv (torch lives only there); serve.py runs in .venv-triton (numpy<2, no torch), so
the two meet through a file holding nothing but arrays: fc1/fc2 weights and biases as float32, the
normalisation, and the model's name and version (so the reference reports the same ones).

    .venv/bin/python -m tests.e2e.triton_reference.export --store model_store --out /tmp/mnist-fnn.npz
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[3]
LAYERS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def latest_version(store: Path, name: str) -> int:
    """The highest integer version folder of ``name``, as the server picks it when none is pinned."""
    versions = [int(p.name) for p in (store / name).iterdir() if p.name.isdigit() and (p / "model.pt").is_file()]
    if not versions:
        raise FileNotFoundError(f"no version with a model.pt under {store / name}")
    return max(versions)


def export(out: Path, store: Path = ROOT / "model_store", name: str = "mnist-fnn", version: int | None = None) -> Path:
    """Write ``out`` (.npz) from ``store/name/version``; the highest version when ``version`` is None."""
    version = latest_version(store, name) if version is None else version
    folder = store / name / str(version)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    missing = [key for key in LAYERS if key not in state]
    if missing:
        raise KeyError(f"{folder / 'model.pt'} lacks {missing}")
    metadata = json.loads((folder / "metadata.json").read_text())
    norm = metadata["normalization"]
    temperature = (metadata.get("calibration") or {}).get("temperature", 1.0)  # digitserve answers softmax(z / T)
    arrays = {key.replace(".", "_"): state[key].detach().to(torch.float32).numpy() for key in LAYERS}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        out,
        **arrays,
        mean=np.float32(norm["mean"]),
        std=np.float32(norm["std"]),
        temperature=np.float32(temperature),
        name=np.str_(name),
        version=np.int64(version),
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--store", type=Path, default=ROOT / "model_store", help="model store root")
    parser.add_argument("--name", default="mnist-fnn", help="model name in the store")
    parser.add_argument("--version", type=int, default=None, help="version to export (default: the highest)")
    args = parser.parse_args()
    print(export(args.out, args.store, args.name, args.version))


if __name__ == "__main__":
    main()
