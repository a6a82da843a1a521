"""The HTTP wire as clients see it: whole responses in order, 100-continue, one write per response."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np

from harness.server import b64, encode
from service.http.keepalive import OneWrite


class RecordingTransport:
    """Stands in for asyncio's socket transport: records each write (each would be one send())."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return f"extra {name}"


def test_a_response_leaves_in_one_write():
    async def scenario() -> dict[str, object]:
        seen: dict[str, object] = {}
        wire = RecordingTransport()
        one = OneWrite(wire)  # type: ignore[arg-type]
        one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        seen["head alone"] = list(wire.writes)
        one.write(b"{}")
        one.flush()  # what the protocol does when the response is whole
        seen["whole"] = list(wire.writes)
        one.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # no response completes after this one
        seen["interim, same iteration"] = len(wire.writes)
        await asyncio.sleep(0)
        seen["interim, next iteration"] = wire.writes[-1]
        one.write(b"last")
        one.close()  # uvicorn closes right after writing a "connection: close" response
        seen["at close"] = (wire.writes[-1], wire.closed)
        seen["passed through"] = one.get_extra_info("peername")

        gone = RecordingTransport()
        late = OneWrite(gone)  # type: ignore[arg-type]
        late.write(b"answer")
        gone.closed = True  # the client went away before the iteration ended
        await asyncio.sleep(0)
        seen["to a closed connection"] = gone.writes
        return seen

    seen = asyncio.run(scenario())
    assert seen["head alone"] == []
    assert seen["whole"] == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    assert seen["interim, same iteration"] == 1
    assert seen["interim, next iteration"] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert seen["at close"] == (b"last", True)
    assert seen["passed through"] == "extra peername"
    assert seen["to a closed connection"] == []


def read_response(stream) -> tuple[int, dict[str, str], bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, stream.read(int(headers["content-length"]))


def post(body: bytes, request_id: str, *extra: str) -> bytes:
    head = ["POST /predict HTTP/1.1", "Host: test", "Content-Type: application/json",
            f"Content-Length: {len(body)}", f"X-Request-ID: {request_id}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def test_pipelined_requests_are_answered_whole_and_in_order(served, mnist_test):
    """Three requests in one packet, the middle one bad, the last asking to close: three complete
    answers in request order, then the server closes."""
    images, _ = mnist_test
    picks = [3, 7]
    bodies = [json.dumps({"instances": [{"image_b64": b64(encode(images[i].numpy()))}]}).encode() for i in picks]
    burst = post(bodies[0], "first") + post(b"{not json", "second") + post(bodies[1], "third", "Connection: close")
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock, sock.makefile("rb") as stream:
        sock.sendall(burst)
        answers = [read_response(stream) for _ in range(3)]
        assert stream.read() == b"", "the connection stays open after Connection: close"
    assert [(status, headers["x-request-id"]) for status, headers, _ in answers] == [
        (200, "first"), (400, "second"), (200, "third")]
    assert "not valid JSON" in json.loads(answers[1][2])["detail"]
    with served.client() as client:
        alone = [client.post("/predict", content=body, headers={"content-type": "application/json"}).json()
                 for body in bodies]
    assert [json.loads(answers[0][2]), json.loads(answers[2][2])] == alone
    assert answers[2][1]["connection"] == "close"


def test_expect_100_continue_is_answered_before_the_body_is_sent(served, mnist_test):
    """curl sends ``Expect: 100-continue`` for bodies over 1 kB and waits for the interim answer."""
    image = mnist_test[0][0].numpy()
    body = json.dumps({"instances": [{"pixels": image.tolist()}]}).encode()
    request = post(body, "waits", "Expect: 100-continue")
    head = request[: len(request) - len(body)]
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as sock, sock.makefile("rb") as stream:
        sock.sendall(head)
        assert stream.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert stream.readline() == b"\r\n"
        sock.sendall(body)
        status, headers, answer = read_response(stream)
    assert (status, headers["x-request-id"]) == (200, "waits")
    label = json.loads(answer)["predictions"][0]["label"]
    assert label == int(mnist_test[1][0])
    assert np.isclose(sum(json.loads(answer)["predictions"][0]["probabilities"]), 1, atol=1e-4)
