"""/openapi.json describes the server as it is: schemathesis (a fuzzer we did not write) derives requests
from it, sends them to a real server with both keys set, and checks every answer against the document:
never a 5xx, only documented statuses, content types and headers, answers that match their schemas, bad
requests refused, routes that need a key refusing requests without one.

One check is left out: ``positive_data_acceptance`` (every schema-valid request answered 2xx). JSON Schema
cannot say that a picture holds a digit, or that base64 decodes to an image: a schema-valid blank frame
or a random base64 string is rightly refused 422 or 400 (documented statuses, which the other checks
verify).

The client deadline and the key's second header are sent, not fuzzed: a deadline shorter than the wait
is rightly refused 503 (with `Retry-After`, documented), which the server-error check would count; and
the keys are alternatives, so a malformed `Authorization` beside a right `X-API-Key` is rightly served,
which the negative checks would count. Both are tested in test_hardening (and test_overload).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.server import running

KEY, ADMIN = "k1-openapi", "a1-openapi"
BUDGET_S = 75  # schemathesis's own time limit for the whole run


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with running(tmp_path_factory.mktemp("openapi"), "--api-servers", "1", "--api-key", KEY,
                 "--admin-key", ADMIN) as served:
        yield served


def test_the_document_names_every_route_parameter_and_scheme(server):
    with server.client() as client:
        document = client.get("/openapi.json").json()
    paths = document["paths"]
    for path, method in [("/v1/models/{name}:predict", "post"), ("/v2/models/{name}/versions/{version}/infer", "post"),
                         ("/admin/versions/{version}/load", "post"), ("/v2/repository/models/{name}/load", "post"),
                         ("/metrics", "get"), ("/admin/serve", "post")]:
        operation = paths[path][method]
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == {part[1:-1].split("}")[0] for part in path.replace(":", "/").split("/")
                            if part.startswith("{")}, path
    assert set(document["components"]["securitySchemes"]) == {"ApiKey", "Bearer", "AdminKey"}
    predict = paths["/predict"]["post"]
    assert {p["name"] for p in predict["parameters"]} == {"version", "X-Request-Timeout-Ms"}
    assert {"401", "404", "409", "413", "422", "431", "503", "504"} <= set(predict["responses"])
    assert "requestBody" in paths["/admin/serve"]["post"]
    assert "content" not in paths["/v2/repository/models/{name}/load"]["post"]["responses"]["200"]
    schemas = document["components"]["schemas"]
    assert len(schemas["Instance"]["oneOf"]) == 2 and schemas["ExplainRequest"]["properties"]["steps"]["maximum"]
    assert {"box", "flags"} <= set(schemas["Prediction"]["properties"])
    assert schemas["PredictRequest"]["additionalProperties"] is False


def test_schemathesis_finds_nothing(server, tmp_path):
    executable = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert executable, "schemathesis is not installed: it is in the test extra (pip install -e .[test])"
    result = subprocess.run(
        [executable, "run", f"{server.url}/openapi.json", "-H", f"X-API-Key: {KEY}", "-H", f"X-Admin-Key: {ADMIN}",
         "-H", f"Authorization: Bearer {KEY}", "-H", "X-Request-Timeout-Ms: 60000",
         "--max-examples", "10", "--max-time", str(BUDGET_S), "--no-shrink", "--seed", "28",
         "--exclude-checks", "positive_data_acceptance", "--request-timeout", "20", "--warnings", "off"],
        capture_output=True, text=True, timeout=BUDGET_S + 120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Traceback" not in server.output()
