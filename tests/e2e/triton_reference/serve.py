"""A real Triton Inference Server serving our checkpoint, as the reference the V2 tests compare against.

Runs under .venv-triton (`bash .ci/triton-venv.sh` makes it): PyTriton 0.7.0 starts Triton's own
``tritonserver`` binary (2.51) and binds a plain-numpy FNN computed from weights that export.py wrote from
the model store, so Triton itself parses, validates and answers every V2 request while the numbers are ours.

    .venv-triton/bin/python tests/e2e/triton_reference/serve.py --weights /tmp/mnist-fnn.npz \
        --http-port 8100 --grpc-port 8101 --metrics-port 8102

Tensors are the DESIGN table's, as far as Triton can say them: one datatype and one shape per input, so
``pixels`` is FP32 ``[-1,784]`` (in 0..1) and required; Triton alone then answers a missing, mistyped or
misshaped ``pixels``. ``image`` (BYTES) is left out: decoding pictures the way /predict does is digitserve's
own code, not something to re-implement in a reference. ``batching=False`` so that Triton reports exactly
the shapes the table gives (``[-1,784]``, ``[-1,10]``, ``[-1]``) instead of adding its own batch dimension.

Triton's Python stub must load the libpython of the interpreter running this file, not the system's, or it
fails with "'_thread.RLock' object has no attribute '_recursion_count'": main() re-executes itself with
LD_LIBRARY_PATH pointing at this interpreter's LIBDIR when it is not there already.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig


class Fnn:
    """784-500-10 Linear -> ReLU -> Linear on normalised input, then softmax(logits / T), T the version's
    temperature (1 without calibration); float32 like torch's CPU run."""

    def __init__(self, weights: Path) -> None:
        with np.load(weights) as npz:
            self.w1 = npz["fc1_weight"].T.copy()
            self.b1 = npz["fc1_bias"]
            self.w2 = npz["fc2_weight"].T.copy()
            self.b2 = npz["fc2_bias"]
            self.mean = np.float32(npz["mean"])
            self.std = np.float32(npz["std"])
            self.temperature = np.float32(npz["temperature"])
            self.name = str(npz["name"])
            self.version = int(npz["version"])

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.shape[0] == 0:  # Triton lets a [0,784] request through; max() of nothing would raise
            return np.zeros((0, 10), np.float32)
        x = (pixels.reshape(pixels.shape[0], 784).astype(np.float32) - self.mean) / self.std
        hidden = np.maximum(x @ self.w1 + self.b1, np.float32(0))
        logits = (hidden @ self.w2 + self.b2) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        probabilities: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
        return probabilities

    def __call__(self, requests: list[Any]) -> list[dict[str, np.ndarray]]:
        """PyTriton's unbatched callable: one answer per request, in order."""
        answers = []
        for request in requests:
            probs = self.probabilities(request["pixels"])
            answers.append(
                {
                    "probabilities": probs,
                    "label": probs.argmax(axis=1).astype(np.int64),
                    "confidence": probs.max(axis=1).astype(np.float32),
                    "typicality": np.full(len(probs), np.nan, np.float32),  # a version without calibration
                }
            )
        return answers


def ensure_libpython_path() -> None:
    """Re-exec with LD_LIBRARY_PATH led by this interpreter's LIBDIR (see the module docstring)."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if not libdir or current.split(":")[0] == libdir:
        return
    os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir
    os.execv(sys.executable, [sys.executable, *sys.argv])


def stop_on_sigterm() -> None:
    """SIGTERM does what Ctrl+C does: PyTriton's serve() then stops tritonserver and cleans its workspace."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def serve(weights: Path, http_port: int, grpc_port: int, metrics_port: int, workspace: Path | None) -> None:
    model = Fnn(weights)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=http_port,
        grpc_address="127.0.0.1",
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        allow_gpu_metrics=False,
        exit_on_error=True,
        exit_timeout_secs=5,
    )
    with Triton(config=config, workspace=workspace) as triton:
        triton.bind(
            model_name=model.name,
            model_version=model.version,
            infer_func=model,
            inputs=[Tensor(name="pixels", dtype=np.float32, shape=(-1, 784))],
            outputs=[
                Tensor(name="probabilities", dtype=np.float32, shape=(-1, 10)),
                Tensor(name="label", dtype=np.int64, shape=(-1,)),
                Tensor(name="confidence", dtype=np.float32, shape=(-1,)),
                Tensor(name="typicality", dtype=np.float32, shape=(-1,)),
            ],
            config=ModelConfig(batching=False),
            strict=True,
        )
        triton.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, required=True, help=".npz written by export.py")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--workspace", type=Path, default=None, help="PyTriton's workspace (default: a new one)")
    args = parser.parse_args()
    ensure_libpython_path()
    stop_on_sigterm()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    serve(args.weights, args.http_port, args.grpc_port, args.metrics_port, args.workspace)


if __name__ == "__main__":
    main()
