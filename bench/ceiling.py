"""The ceiling: what the HTTP stack alone answers under the benchmark's wrk, with no model and no parsing.

A raw ASGI app on uvicorn (2 worker processes, httptools, uvloop where installed, no access log) that reads
each request's whole body and answers every request, whatever its path (``/health`` too), with the same fixed
JSON: the bytes of a real ``/predict`` answer for one image (MNIST test digit 0, a 7). ``make bench`` measures
it with ``predict-1img@64``'s wrk script and bodies, so digitserve's rates can be read against it.

    python -m bench.ceiling --port 8002 [--workers 2]
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Awaitable, Callable
from typing import Any

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    # uvicorn logs "Started server process [pid]" per worker (bench.procs.roles names them by it too)
    uvicorn.run("bench.ceiling:app", host="127.0.0.1", port=args.port, workers=args.workers, http="httptools",
                loop=loop, lifespan="off", access_log=False, server_header=False, log_level="info")


if __name__ == "__main__":
    main()
