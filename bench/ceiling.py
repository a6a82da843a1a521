"""The ceiling: what the HTTP stack alone answers under the benchmark's wrk, with no model and no parsing.

A raw ASGI app on uvicorn (2 worker processes, httptools, uvloop where installed, no access log) that reads
each request's whole body and answers every request, whatever its path (``/health`` too), with the same fixed
JSON: the bytes of a real ``/predict`` answer for one image (MNIST test digit 0, a 7). ``make bench`` measures
it with ``predict-1img@64``'s wrk script and bodies, so digitserve's rates can be read against it.

With ``--grpc-port``, as many processes more serve gRPC there (grpc.aio, SO_REUSEPORT, as digitserve's API
servers do): every ``ModelInfer`` is answered, its message unread, with the same answer as a serialized
``ModelInferResponse``. ``make bench`` drives it with bench/grpcload.py as ``grpc-fp32-1img@64``: what the
gRPC stack and the load generator reach together on these cores.

    python -m bench.ceiling --port 8002 [--workers 2] [--grpc-port 8003]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import uvicorn

# digitserve's answer to {"instances": [{"image_b64": <PNG of MNIST test digit 0>}]} (2026-12-01, 333 bytes)
ANSWER = (b'{"model":{"name":"mnist-fnn","version":1},"predictions":[{"label":7,"confidence":0.9999984502792358,'
          b'"probabilities":[3.900696432523887e-11,3.035039242149651e-7,7.455989248228434e-7,4.416339436374983e-7,'
          b'4.71817300940619e-13,2.065361987338421e-12,4.498636981492912e-16,0.9999984502792358,'
          b'2.4318131952583144e-9,1.1000399702254526e-8]}]}')
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]
START = {"type": "http.response.start", "status": 200, "headers": HEADERS}
BODY = {"type": "http.response.body", "body": ANSWER}

Message = dict[str, Any]


async def app(scope: Message, receive: Callable[[], Awaitable[Message]],
              send: Callable[[Message], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    b"".join(chunks)  # the whole body in one piece, as a server that parses it would hold it
    await send(START)
    await send(BODY)


def grpc_answer() -> bytes:
    """``ANSWER``'s numbers as a serialized ``ModelInferResponse``, the outputs as raw contents, as digitserve
    answers them."""
    from service.grpc import oip_pb2 as pb

    prediction = json.loads(ANSWER)["predictions"][0]
    outputs = {"probabilities": ("FP32", np.array([prediction["probabilities"]], np.float32)),
               "label": ("INT64", np.array([prediction["label"]], np.int64)),
               "confidence": ("FP32", np.array([prediction["confidence"]], np.float32))}
    response = pb.ModelInferResponse(model_name="mnist-fnn", model_version="1")
    for name, (datatype, array) in outputs.items():
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response.SerializeToString()


def serve_grpc(port: int) -> None:
    """One process's gRPC server: ``ModelInfer`` answered with ``grpc_answer()``, bytes in and out."""
    answer = grpc_answer()

    async def infer(request: bytes, context: Any) -> bytes:
        return answer

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1), ("grpc.max_receive_message_length", -1)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--grpc-port", type=int, default=0, help="0: no gRPC")
    args = parser.parse_args()
    for _ in range(args.workers if args.grpc_port else 0):  # daemons: they end with this process
        mp.get_context("spawn").Process(target=serve_grpc, args=(args.grpc_port,), daemon=True).start()
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    # uvicorn logs "Started server process [pid]" per worker (bench.procs.roles names them by it too)
    uvicorn.run("bench.ceiling:app", host="127.0.0.1", port=args.port, workers=args.workers, http="httptools",
                loop=loop, lifespan="off", access_log=False, server_header=False, log_level="info")


if __name__ == "__main__":
    main()
