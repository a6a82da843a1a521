"""What the gRPC tests share: our server with its gRPC port, tensors for tritonclient.grpc, a call's status code.

A module that imports this one must not import ``service.grpc``: tritonclient's protobuf messages and ours
have the protocol's own names (package ``inference``), and one process cannot hold both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import tritonclient.grpc as tg
from tritonclient.utils import InferenceServerException

from harness.server import Server, free_port, running


@contextmanager
def grpc_server(log_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[Server, str]]:
    """Our server, ready, with gRPC on a free port; yields it and that port's ``host:port``."""
    port = free_port()
    with running(log_dir, "--grpc-port", str(port), *args, env=env) as server:
        yield server, f"127.0.0.1:{port}"


def pixels(data: np.ndarray, datatype: str = "FP32", name: str = "pixels") -> tg.InferInput:
    """``data`` as one input tensor, sent as ``raw_input_contents`` (tritonclient's way)."""
    tensor = tg.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def code_of(call: Callable[..., object], *args: object) -> str:
    """The gRPC status code ``call(*args)`` ends with (``"OK"`` when it answers), through tritonclient or a stub."""
    try:
        call(*args)
    except InferenceServerException as e:
        return str(e.status()).removeprefix("StatusCode.")
    except grpc.RpcError as e:
        return str(e.code().name)  # a call's RpcError is a grpc.Call too
    return "OK"
