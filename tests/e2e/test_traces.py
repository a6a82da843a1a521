"""Traces in a real server: the spans of a call reach an OTLP/HTTP receiver (``harness.otlp``), from the API
server and from the model worker, under the client's W3C ``traceparent``, and the access log names the trace.

The server exports with a batch delay of a minute, and is stopped before anything is read: every span here
was sent on the way out, by the API servers and by the workers (SIGTERMed), so none is lost at a stop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tg

from harness.otlp import Receiver, Span
from harness.server import b64, encode, free_port, running
from tests.conftest import SERVED

MODEL = "mnist-fnn"
ADMIN = {"X-Admin-Key": "adm-" + os.urandom(8).hex()}
SERVER_KIND = 2  # OTLP's SPAN_KIND_SERVER
API_SERVER_SPANS = ("parse", "admission", "imaging", "worker")
WORKER_SPANS = ("queue wait", "batch", "forward")


def traceparent(sampled: bool = True) -> tuple[str, str, str]:
    """A client's new ``traceparent`` header: (header, trace id, parent span id)."""
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{parent}-{'01' if sampled else '00'}", trace_id, parent


@dataclass
class Sent:
    """What the fixture sent (each call's trace id and parent span id, and request ids), and what came of it."""

    receiver: Receiver
    access: dict[str, dict]  # request id -> its access-log entry
    calls: dict[str, tuple[str, str]]  # name -> (trace id, the client's parent span id)
    ids: dict[str, str]  # name -> request id
    images: int  # the /predict call's


def pixels_body(frames: np.ndarray) -> dict:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": list(frames.shape),
                        "data": frames.ravel().tolist()}]}


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory, mnist_test) -> Iterator[Sent]:
    """A traced server (gRPC on, version 1 loaded for the shadow) sent, one after another: /predict with a
    traceparent; the same unsampled; V2 REST without one; gRPC ModelInfer with one; then, shadowing on,
    /predict with one. Then stopped: only then does the receiver hold the spans (the batch delay is 60 s)."""
    images = mnist_test[0].numpy()
    calls, ids = {}, {}
    with Receiver() as receiver:
        grpc_port = free_port()
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "60000",
               "DIGITSERVE_ADMIN_KEY": ADMIN["X-Admin-Key"]}
        with running(tmp_path_factory.mktemp("traces"), "--grpc-port", str(grpc_port), env=env) as server, \
                server.client() as client:

            def post(name: str, path: str, body: dict, sampled: bool | None = True) -> httpx.Response:
                headers = {"X-Request-ID": f"traces-{name}"}
                if sampled is not None:
                    header, trace_id, parent = traceparent(sampled)
                    headers["traceparent"], calls[name] = header, (trace_id, parent)
                response = client.post(path, json=body, headers=headers)
                assert response.status_code == 200, response.text
                ids[name] = response.headers["x-request-id"]
                return response

            pictures = {"instances": [{"image_b64": b64(encode(image))} for image in images[:3]]}
            post("predict", "/predict", pictures)
            post("unsampled", "/predict", pictures, sampled=False)
            post("v2", f"/v2/models/{MODEL}/infer", pixels_body(images[:2].reshape(2, 784) / 255), sampled=None)

            header, trace_id, parent = traceparent()
            calls["grpc"] = (trace_id, parent)
            tensor = tg.InferInput("pixels", [1, 784], "FP32")
            tensor.set_data_from_numpy((images[3:4].reshape(1, 784) / 255).astype(np.float32))
            with tg.InferenceServerClient(f"127.0.0.1:{grpc_port}") as grpc_client:
                grpc_client.infer(MODEL, [tensor], headers={"traceparent": header, "x-request-id": "traces-grpc"})
            ids["grpc"] = "traces-grpc"

            assert client.post("/admin/versions/1/load", headers=ADMIN).status_code == 200
            assert client.post("/admin/shadow", json={"version": 1, "share": 1.0}, headers=ADMIN).status_code == 200
            post("shadowed", "/predict", pictures)
            shadowed(client, len(pictures["instances"]))
        access = {entry["request_id"]: entry for entry in server.access_log()}
        yield Sent(receiver, access, calls, ids, len(pictures["instances"]))


def shadowed(client: httpx.Client, instances: int) -> None:
    """Once version 1's shadow has computed (or dropped) ``instances``: the server may stop then. Shadow
    work is never admitted, so a drain would not wait for it."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        listed = client.get("/admin/versions", headers=ADMIN).json()["versions"]
        tally = next(v for v in listed if v["version"] == 1)["shadowed"] or {"instances": 0, "dropped": 0}
        if tally["instances"] + tally["dropped"] >= instances:
            return
        time.sleep(0.05)


def by_name(spans: list[Span]) -> dict[str, Span]:
    named = {span.name: span for span in spans}
    assert len(named) == len(spans), f"a span name twice in one call's trace: {sorted(s.name for s in spans)}"
    return named


def assert_call_tree(spans: list[Span], root_name: str, parent: str) -> dict[str, Span]:
    """One call's spans: its root (SERVER, under ``parent``: the client's span, or none), the API server's
    stages under it, the worker's wait under ``worker`` and the forward under ``batch``; all of digitserve."""
    named = by_name(spans)
    assert set(named) == {root_name, *API_SERVER_SPANS, *WORKER_SPANS}
    root = named[root_name]
    assert (root.parent_id, root.kind) == (parent, SERVER_KIND)
    for name in API_SERVER_SPANS:
        assert named[name].parent_id == root.span_id, name
    assert named["queue wait"].parent_id == named["batch"].parent_id == named["worker"].span_id
    assert named["forward"].parent_id == named["batch"].span_id
    assert {span.service for span in spans} == {"digitserve"}
    return named


def test_a_request_is_traced_under_the_clients_traceparent_with_its_batch(sent):
    trace_id, parent = sent.calls["predict"]
    named = assert_call_tree(sent.receiver.trace(trace_id), "POST /predict", parent)
    batch, root = named["batch"].attributes, named["POST /predict"].attributes
    entry = sent.access[sent.ids["predict"]]
    assert batch["digitserve.batch.size"] == entry["batch_size"] >= sent.images  # its 3 images, maybe more
    assert batch["digitserve.batch.requests"] >= 1
    assert (batch["digitserve.model.version"], batch["digitserve.pool"]) == (int(SERVED), "predict")
    assert (root["digitserve.status"], root["digitserve.request_id"]) == (200, sent.ids["predict"])
    assert root["http.route"] == "/predict"
    assert entry["trace_id"] == trace_id


def test_a_call_without_traceparent_starts_a_trace_the_access_log_names(sent):
    trace_id = sent.access[sent.ids["v2"]]["trace_id"]
    named = assert_call_tree(sent.receiver.trace(trace_id), "POST /v2/models/{name}/infer", "")
    assert named["batch"].attributes["digitserve.batch.size"] >= 2


def test_a_grpc_call_continues_the_traceparent_in_its_metadata(sent):
    trace_id, parent = sent.calls["grpc"]
    named = assert_call_tree(sent.receiver.trace(trace_id), "inference.GRPCInferenceService/ModelInfer", parent)
    assert named["inference.GRPCInferenceService/ModelInfer"].attributes["rpc.method"] == "ModelInfer"
    assert sent.access[sent.ids["grpc"]]["trace_id"] == trace_id


def test_a_client_that_does_not_sample_is_not_traced(sent):
    """The default sampler follows the parent: a traceparent whose sampled flag is off records nothing."""
    trace_id, _ = sent.calls["unsampled"]
    assert sent.receiver.trace(trace_id) == []
    assert "trace_id" not in sent.access[sent.ids["unsampled"]]


def test_shadow_work_is_a_trace_of_its_own_linked_to_the_served_request(sent):
    trace_id, parent = sent.calls["shadowed"]
    served = assert_call_tree(sent.receiver.trace(trace_id), "POST /predict", parent)["POST /predict"]
    shadows = [span for span in sent.receiver.spans if span.name == "shadow"]
    assert len(shadows) == 1
    shadow = shadows[0]
    assert shadow.links == [(trace_id, served.span_id)] and shadow.trace_id != trace_id
    assert shadow.attributes["digitserve.model.version"] == 1
    worker = by_name([span for span in sent.receiver.trace(shadow.trace_id) if span.name != "shadow"])
    assert set(worker) == set(WORKER_SPANS)
    assert worker["queue wait"].parent_id == worker["batch"].parent_id == shadow.span_id
    assert worker["batch"].attributes["digitserve.model.version"] == 1


def test_off_when_the_sdk_is_disabled_nothing_is_sent(tmp_path, mnist_test):
    """``OTEL_SDK_DISABLED=true`` wins over an endpoint: no exporter, so the receiver hears nothing, even
    after the server stopped (when an exporter would send what it held), and no access line names a trace."""
    header, _, _ = traceparent()
    with Receiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_SDK_DISABLED": "true"}
        with running(tmp_path, env=env) as server, server.client() as client:
            body = {"instances": [{"image_b64": b64(encode(mnist_test[0].numpy()[0]))}]}
            response = client.post("/predict", json=body, headers={"traceparent": header})
            assert response.status_code == 200, response.text
        entries = server.access_log()
        assert [entry["status"] for entry in entries if entry["endpoint"] == "predict"] == [200]
        assert not any("trace_id" in entry for entry in entries)
        assert receiver.posts == 0
