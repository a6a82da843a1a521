"""The HTTP side in process: the real app object (``service.app.build``, no process started) over
ASGI, and the pure parts behind it (admission counting, error mapping, the /info payload, the
OpenAPI document, the CLI's messages). Everything a request can be refused for before it is
queued is checked here; what needs a worker is the e2e tier's."""

from __future__ import annotations

import asyncio
import time
from html.parser import HTMLParser
from importlib import resources

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service import cli
from service.__main__ import describe
from service.app import build
from service.config import Settings
from service.errors import HttpError, retry_after
from service.http.admission import PRIOR_ERROR, Admission, Refused
from service.http.dataplane import result
from service.http.routes import info_payload
from service.http.schemas import ExplainOptions, PredictResponse
from service.load import pool_loads
from service.model import store
from service.pipes import Pending, WorkerDied
from service.work import DEFAULT_METHOD, METHODS, Pool


def settings(*args: str) -> Settings:
    return cli.parse(list(args))


@pytest.fixture(scope="module")
def model(default_model: store.LoadedModel) -> store.LoadedModel:
    return default_model


def call(server, method: str, path: str, **kwargs) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


@pytest.fixture(scope="module")
def server(model):
    return build(settings("--api-key", "k3y"), model, "cpu")


def test_health_is_503_before_the_workers_exist(server):
    response = call(server, "GET", "/health")
    assert response.status_code == 503 and response.json() == {"status": "starting", "workers": {}}


def test_info_describes_model_serving_and_limits(server, model):
    body = call(server, "GET", "/info").json()
    routes = server.parts.routes
    assert body == info_payload(server.parts.settings, "cpu", routes.versions, routes.runtimes)
    assert body["versions"] == {"serving": model.version, "loaded": [model.version], "canary": None, "shadow": None,
                                "problems": {}}
    assert body["model"]["version"] == model.version and body["model"]["sha256"] == model.metadata.sha256
    assert body["serving"]["workers"] == {"/predict": 1, "/explain": 1}
    assert body["limits"]["max_instances"] == 64


@pytest.mark.parametrize(("headers", "body", "status", "detail"), [
    ({}, b"{}", 401, "missing or wrong API key"),
    ({"x-api-key": "wrong"}, b"{}", 401, "missing or wrong API key"),
    ({"x-api-key": "k3y", "content-type": "text/plain"}, b"x", 415, "unsupported content type 'text/plain'"),
    ({"authorization": "Bearer k3y", "content-type": "application/json"}, b"{", 400, "body is not valid JSON"),
    ({"x-api-key": "k3y", "content-type": "application/json"}, b'{"instances": []}', 422, "instances"),
    ({"x-api-key": "k3y", "content-type": "application/json"},
     b'{"instances": [{"image_b64": "%%%"}]}', 400, "instance 0: image_b64 is not valid base64"),
])
def test_requests_refused_before_anything_is_queued(server, headers, body, status, detail):
    for path in ("/predict", "/explain"):
        response = call(server, "POST", path, headers=headers, content=body)
        assert response.status_code == status, response.text
        assert detail in response.json()["detail"], response.json()
        assert "x-request-id" in response.headers  # the fast path runs inside the metrics middleware


def test_other_routes_take_the_full_stack_with_json_errors(server, tmp_path, monkeypatch):
    assert call(server, "GET", "/nope").json() == {"detail": "Not Found"}
    response = call(server, "GET", "/predict")
    assert response.status_code == 405 and response.json() == {"detail": "Method Not Allowed"}
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # the folder service.metrics_dir makes
    metrics = call(server, "GET", "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_openapi_names_the_service_and_describes_the_inference_routes(server):
    document = call(server, "GET", "/openapi.json").json()
    assert document["info"]["title"] == "digitserve" and document["info"]["version"] != "0.1.0"
    for path in ("/predict", "/explain"):
        post = document["paths"][path]["post"]
        assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
        assert {"200", "400", "413", "422", "503"} <= set(post["responses"])
    assert "PredictResponse" in document["components"]["schemas"]


def admitting(config: Settings) -> Admission:
    return Admission(config, pool_loads(config))


def test_admission_counts_across_api_servers_and_refuses_past_the_limit():
    admission = admitting(settings("--api-servers", "2", "--max-queued-requests", "2"))
    with admission.admit("/predict", 1, 0, 30, time.monotonic()):
        admission.slot = 1
        with admission.admit("/explain", 1, 0, 30, time.monotonic()):
            assert admission.in_flight() == 2
            with pytest.raises(Refused) as refused, admission.admit("/predict", 1, 0, 30, time.monotonic()):
                pass
            assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "1"}
            assert refused.value.reason == "queue_full"
            assert admission.in_flight() == 2  # the refused one is not left counted
        admission.slot = 0
    assert admission.in_flight() == 0


def test_admission_refuses_what_would_wait_past_its_pool_limit_or_deadline():
    admission = admitting(settings("--explain-max-queue-wait-ms", "2000"))
    # the worker fitted 1 ms per unit (after the prior's doubt), nothing per request or image
    admission.loads[Pool.EXPLAIN].costs.publish(0, np.array([0.0, 0.0, 0.001 / PRIOR_ERROR]))
    with admission.admit("/explain", 1, 2500, 30, time.monotonic()):  # an idle pool takes 2.5 s of work
        assert admission.wait_estimate("/explain") == pytest.approx(2.5)
        with pytest.raises(Refused) as waited, admission.admit("/explain", 1, 10, 30, time.monotonic()):
            pass  # it would wait for those 2.5 s before its own start: over the 2 s limit
        assert waited.value.reason == "queue_wait" and "2500 ms" in waited.value.detail
        assert waited.value.headers == {"Retry-After": "1"}  # the 0.5 s over the limit, rounded up
    with admission.admit("/explain", 1, 1500, 30, time.monotonic()):
        with pytest.raises(Refused) as late, admission.admit("/explain", 1, 10, 1.0, time.monotonic()):
            pass  # 1.5 s of wait: within the limit, past its own 1 s deadline
        assert late.value.reason == "deadline"
    assert admission.wait_estimate("/explain") == 0
    with admission.admit("/predict", 64, 10_000, 30, time.monotonic()):  # no costs fitted for /predict yet
        pass


def test_a_standing_queue_is_refused_before_the_body_is_read():
    admission = admitting(settings())
    now = time.monotonic()
    for i in range(10):  # a whole interval in which even the fastest answer took 300 ms
        admission._sojourn["/predict"].add(0.3 + i / 100, now)
    admission._sojourn["/predict"]._start = now - 0.15  # the interval is over
    with pytest.raises(Refused) as refused:
        admission.precheck("/predict")
    assert refused.value.reason == "queue_wait"
    admission.precheck("/explain")  # the other pool is not affected


def test_admission_in_lame_duck_then_draining():
    admission = admitting(settings())
    admission.lame_duck()
    assert admission.stopping
    with admission.admit("/predict", 1, 0, 30, time.monotonic()):  # still served
        pass
    admission.drain()
    with pytest.raises(HttpError, match="shutting down"), admission.admit("/predict", 1, 0, 30, time.monotonic()):
        pass


def test_retry_after_is_whole_seconds_rounded_up():
    """One rule for every refusal: sooner than the estimate would only be refused again; never 0."""
    assert [retry_after(s) for s in (0, 0.2, 1, 1.01, 2.5)] == ["1", "1", "1", "2", "3"]
    assert Refused("queue_wait", "overloaded", 1.4).headers == {"Retry-After": "2"}


def test_worker_failures_map_to_http_errors():
    def answered(response, ok: bool) -> Pending:
        pending = Pending()
        pending.deliver(response, ok)
        return pending

    assert result(answered((b"{}", 1), True)) == (b"{}", 1)
    with pytest.raises(HttpError) as died:
        result(answered(WorkerDied(), False))
    assert died.value.status == 503 and died.value.headers == {"Retry-After": "1"}
    with pytest.raises(HttpError) as expired:
        result(answered(HttpError(504, "waited"), False))
    assert expired.value.status == 504
    with pytest.raises(HttpError) as bug:
        result(answered(RuntimeError("boom"), False))
    assert bug.value.status == 500 and "boom" not in bug.value.detail


def test_explain_options_are_validated_against_the_limits():
    with pytest.raises(ValidationError, match="at most 8"):
        ExplainOptions.model_validate({"steps": 9}, context={"max_ig_steps": 8})
    with pytest.raises(ValidationError):
        ExplainOptions.model_validate({"method": "lime"})
    assert ExplainOptions.model_validate({}).method == "integrated_gradients"


def test_response_schema_accepts_what_a_worker_answers():
    PredictResponse.model_validate({"model": {"name": "mnist-fnn", "version": 1},
                                    "predictions": [{"label": 7, "confidence": 0.9, "probabilities": [0.01] * 10,
                                                     "box": [3, 4, 20, 20], "flags": []}]})


@pytest.mark.parametrize(("args", "says"), [
    (("--port", "80"), "--port (DIGITSERVE_PORT): Input should be greater than or equal to 1024"),
    (("--host", "no-such-host.invalid"),
     "--host (DIGITSERVE_HOST): 'no-such-host.invalid' is neither an IP address nor a host name"),
    (("--batch-timeout-ms", "900", "--request-timeout-s", "0.5"), "batch-timeout-ms must be shorter"),
])
def test_a_bad_setting_is_one_line_naming_the_flag(args, says):
    with pytest.raises(ValidationError) as bad:
        settings(*args)
    line = describe(bad.value)
    assert says in line and "\n" not in line and "pydantic.dev" not in line, line


def test_any_ip_address_can_be_bound():
    assert settings("--host", "192.168.1.10").host == "192.168.1.10"
    assert settings("--host", "::1").host == "::1"


def test_the_page_offers_every_explanation_method_and_no_other():
    """The page's buttons are its own markup (its order, its names): they must list service.work's methods,
    the default checked, as the script starts from the checked one."""
    buttons: list[tuple[str, bool]] = []

    class Buttons(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            fields = dict(attrs)
            if tag == "input" and fields.get("name") == "method":
                buttons.append((str(fields["value"]), "checked" in fields))

    Buttons().feed(resources.files("service.http").joinpath("page", "index.html").read_text())
    assert sorted(value for value, _ in buttons) == sorted(METHODS)
    assert [value for value, checked in buttons if checked] == [DEFAULT_METHOD]
