"""Request bodies made from real MNIST test digits, PNG-encoded the way a client would send them.

Three formats. JSON bodies (``<kind>.jsonl``, bench/wrk/post.lua): one body per line. Open Inference Protocol
(V2) bodies with binary tensors (``<kind>.bin``, bench/wrk/binary.lua): records of an ASCII line
``<body bytes> <JSON header bytes>\\n`` followed by the body, as tritonclient builds it (JSON header, then
the raw tensor; no ``outputs``, so ``"binary_data_output": true``, tritonclient's default). gRPC
``ModelInferRequest`` messages (``<kind>.grpc``, bench/grpcload.py): records of an ASCII line
``<message bytes>\\n`` followed by the serialized message: FP32 ``pixels`` as ``raw_input_contents``,
no ``outputs``, as tritonclient.grpc sends them.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from bench import grpcload
from harness.server import ROOT, b64, encode
from service.model.data import load_mnist

V2_KINDS = ("v2-fp32-single", "v2-fp32-batch", "v2-png-single", "v2-png-batch")
GRPC_KINDS = ("grpc-fp32-single", "grpc-fp32-batch")
V2_HEADERS = {"Content-Type": "application/octet-stream"}  # plus Inference-Header-Content-Length per body


def data_dir() -> Path:
    """``DIGITSERVE_DATA_DIR`` (the Makefile sets it), else ../shared/datasets next to the repository."""
    return Path(os.environ.get("DIGITSERVE_DATA_DIR") or ROOT.parent / "shared" / "datasets")


def mnist_pngs(n: int) -> tuple[list[bytes], list[int]]:
    """The first ``n`` MNIST test digits as PNG files, and their labels."""
    images, labels = load_mnist(data_dir(), train=False)
    return [encode(image.numpy()) for image in images[:n]], labels[:n].tolist()


def digits_of(kind: str, n_images: int, batch: int = 32) -> list[list[int]]:
    """Which digits (indices into the PNGs) each body of ``kind`` holds: one each for single-image kinds,
    ``batch`` consecutive ones, wrapping round, for ``*batch`` kinds."""
    if kind.endswith("batch"):
        return [[(b * batch + k) % n_images for k in range(batch)] for b in range(n_images // batch or 1)]
    return [[i] for i in range(n_images)]


def write_bodies(folder: Path, pngs: list[bytes], batch: int = 32, **explain: dict) -> dict[str, Path]:
    """The bodies files, per kind: ``single`` (one image), ``batch`` (``batch`` consecutive images, wrapping
    round) and one file per ``explain`` entry (name -> extra fields beside the single image), as JSON lines;
    the V2 kinds (``V2_KINDS``: FP32 ``pixels`` or BYTES ``image``, single or batch) as binary records, and the
    gRPC kinds (``GRPC_KINDS``: FP32 ``pixels``, single or batch) as serialized messages."""
    instances = [{"image_b64": b64(png)} for png in pngs]
    kinds = {
        "single": [{"instances": [instances[i] for i in d]} for d in digits_of("single", len(pngs))],
        "batch": [{"instances": [instances[i] for i in d]} for d in digits_of("batch", len(pngs), batch)],
        **{name: [{"instances": [i], **fields} for i in instances] for name, fields in explain.items()},
    }
    files = {}
    for kind, bodies in kinds.items():
        files[kind] = folder / f"{kind}.jsonl"
        files[kind].write_text("".join(json.dumps(body, separators=(",", ":")) + "\n" for body in bodies))
    for kind in V2_KINDS:
        files[kind] = folder / f"{kind}.bin"
        with files[kind].open("wb") as out:
            for digits in digits_of(kind, len(pngs), batch):
                body, header_length = v2_body(kind, [pngs[i] for i in digits])
                out.write(b"%d %d\n" % (len(body), header_length) + body)
    for kind in GRPC_KINDS:
        files[kind] = folder / f"{kind}.grpc"
        with files[kind].open("wb") as out:
            for digits in digits_of(kind, len(pngs), batch):
                out.write(grpcload.record(grpc_message([pngs[i] for i in digits])))
    return files


def fp32_pixels(pngs: list[bytes]) -> np.ndarray:
    """The pictures' own pixels (MNIST's: the PNGs are lossless) as FP32 [N,784] in 0..1."""
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("L")) for png in pngs])
    return pixels.reshape(len(pngs), 784).astype(np.float32) / 255


def v2_body(kind: str, pngs: list[bytes]) -> tuple[bytes, int]:
    """One V2 infer body for these pictures, built by tritonclient: FP32 ``pixels`` [N,784] in 0..1 (the PNG's
    own pixels, which are MNIST's: the PNG is lossless) or BYTES ``image`` [N] (the PNGs), both as binary data.
    Returns the body and the length of its JSON header."""
    import tritonclient.http as triton  # a test dependency, like httpx

    if kind.startswith("v2-fp32"):
        tensor = triton.InferInput("pixels", [len(pngs), 784], "FP32")
        tensor.set_data_from_numpy(fp32_pixels(pngs), binary_data=True)
    else:
        tensor = triton.InferInput("image", [len(pngs)], "BYTES")
        tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor])
    return body, header_length


def grpc_message(pngs: list[bytes]) -> bytes:
    """One serialized ``ModelInferRequest`` of these pictures' FP32 pixels, built with tritonclient.grpc's own
    protobuf classes (Triton's grpc_service.proto): what its ``infer`` sends for one ``pixels`` input."""
    from tritonclient.grpc import service_pb2  # a test dependency, like tritonclient.http

    pixels = fp32_pixels(pngs)
    request = service_pb2.ModelInferRequest(model_name="mnist-fnn")
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request.SerializeToString()


def read_bodies(path: Path) -> Iterator[tuple[bytes, dict[str, str]]]:
    """Each body of a bodies file with the headers it is sent with (what post.lua and binary.lua send)."""
    if path.suffix != ".bin":
        with path.open("rb") as f:
            yield from ((line.rstrip(b"\n"), {"Content-Type": "application/json"}) for line in f if line.strip())
        return
    data, offset = path.read_bytes(), 0
    while offset < len(data):
        end = data.index(b"\n", offset)
        size, header_length = (int(v) for v in data[offset:end].split())
        yield data[end + 1:end + 1 + size], {**V2_HEADERS, "Inference-Header-Content-Length": str(header_length)}
        offset = end + 1 + size
