"""The OpenAPI document (/openapi.json): every route this server answers, written here from one table.

Most routes are plain Starlette endpoints (the fast path) or take the raw ``Request``, which FastAPI
cannot describe, so the document is not derived from the routes: ``_operations`` lists each route
with its parameters, body, answers and security, as this server's settings make them (the API key's
security only when one is set; the admin routes only when there is an admin key; ``steps`` up to
``--max-ig-steps``). ``tests/e2e/test_openapi.py`` runs schemathesis against it on a real server.
To describe a new field of an answer, add it to its model in ``service.http.schemas``.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from service.config import Settings
from service.http import v2
from service.http.schemas import (
    ErrorResponse,
    ExplainOptions,
    ExplainRequest,
    ExplainResponse,
    KServeError,
    PredictRequest,
    PredictResponse,
    ServeBody,
)

Json = dict[str, Any]
WHY = {
    "400": "undecodable image, invalid base64, a body that is not JSON, a malformed header",
    "401": "missing or wrong key",
    "403": "wrong admin key",
    "404": "no such model, version or route",
    "409": "the version is not loaded, or a version change is under way",
    "413": "body, picture size, pixels in all, instance or part count over the limits",
    "415": "a content type other than JSON or multipart",
    "422": "wrong JSON shape or options, pixels out of range, a blank picture, a malformed version",
    "431": "a header field over 16 KiB, or headers over 64 KiB in all",
    "500": "a fault of the service (logged)",
    "503": "overloaded, shutting down or a worker replaced (with Retry-After)",
    "504": "no answer within the request timeout (the client's X-Request-Timeout-Ms, or the service's)",
}
INFERENCE_ERRORS = ("400", "401", "413", "415", "422", "431", "500", "503", "504")


def install(app: FastAPI, settings: Settings) -> None:
    """/openapi.json: this document, built once, at its first request."""
    app.title, app.version = "digitserve", version("digitserve")
    app.description = "Handwritten-digit classification with explanations, served by LitServe."

    def document() -> Json:
        if not app.openapi_schema:
            app.openapi_schema = build(settings, app.title, app.version, app.description)
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def build(settings: Settings, title: str, release: str, description: str) -> Json:
    components: Json = {}
    paths: Json = {}
    for method, path, operation in _operations(settings, components):
        paths.setdefault(path, {})[method] = operation
    schemes = {"ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
               "Bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
               "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key"}}
    return {"openapi": "3.1.0", "info": {"title": title, "version": release, "description": description},
            "paths": paths, "components": {"schemas": components, "securitySchemes": schemes}}


# ---- the pieces of an operation


def _ref(model: type[BaseModel], components: Json) -> Json:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(schema: Json) -> Json:
    return {"application/json": {"schema": schema}}


def _errors(statuses: tuple[str, ...], error: Json) -> Json:
    return {status: {"description": WHY[status], "content": _json(error)} for status in statuses}


def _path(name: str, schema: Json, description: str) -> Json:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


VERSION = {"type": "integer", "minimum": 1, "maximum": 999_999_999}  # 1 to 9 ASCII digits
NAME = _path("name", {"type": "string", "pattern": "^[^/:]+$"}, "the model's name (404 for any other)")
PATH_VERSION = _path("version", VERSION, "a version of the model")
QUERY_VERSION = {"name": "version", "in": "query", "required": False, "schema": VERSION,
                 "description": "compute with this loaded version (404 not in the store, 409 not loaded)"}
TIMEOUT = {"name": "X-Request-Timeout-Ms", "in": "header", "required": False,
           "schema": {"type": "integer", "minimum": 1, "maximum": 999_999_999},
           "description": "answer 504 after this many milliseconds, if sooner than the service's timeout; work "
                          "still queued then is dropped"}


def _operation(summary: str, responses: Json, *, parameters: list[Json] | None = None,
               body: Json | None = None, security: list[Json] | None = None) -> Json:
    operation: Json = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": body}
    if security is not None:
        operation["security"] = security
    return operation


def _ok(description: str, schema: Json | None = None, media: str = "application/json") -> Json:
    return {"description": description, **({"content": {media: {"schema": schema}}} if schema else {})}


# ---- the routes


def _operations(settings: Settings, components: Json) -> list[tuple[str, str, Json]]:
    detail, error = _ref(ErrorResponse, components), _ref(KServeError, components)
    keyed: list[Json] = [{"ApiKey": []}, {"Bearer": []}] if settings.api_key is not None else []
    predict, explain = _ref(PredictRequest, components), _ref(ExplainRequest, components)
    predicted, explained = _ref(PredictResponse, components), _ref(ExplainResponse, components)
    _instance_schema(components)
    components["ExplainRequest"]["properties"]["steps"]["maximum"] = settings.max_ig_steps
    infer_request, infer_response = _v2_schemas(components)
    statuses = INFERENCE_ERRORS if keyed else tuple(s for s in INFERENCE_ERRORS if s != "401")

    def inference(summary: str, request: Json, answer: Json, fields: Json, errors: Json,
                  parameters: list[Json]) -> Json:
        multipart = {"type": "object", "required": ["file"], "additionalProperties": False, "properties": {
            "file": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}, **fields}}
        return _operation(summary, {"200": _ok("one answer per instance, in order", answer),
                                    **_errors(statuses, errors), **_errors(("404", "409"), errors)},
                          parameters=[*parameters, QUERY_VERSION, TIMEOUT], security=keyed,
                          body={**_json(request), "multipart/form-data": {"schema": multipart}})

    options = {name: schema for name, schema in components["ExplainRequest"]["properties"].items()
               if name in ExplainOptions.model_fields}
    operations = [
        ("post", "/predict", inference("Classify digit pictures", predict, predicted, {}, detail, [])),
        ("post", "/explain", inference("Classify and explain (attributions, hooked activations)", explain,
                                       explained, options, detail, [])),
        ("post", "/v1/models/{name}:predict", inference("KServe V1: /predict's", predict, predicted, {}, error,
                                                         [NAME])),
        ("post", "/v1/models/{name}:explain", inference("KServe V1: /explain's", explain, explained, options,
                                                         error, [NAME])),
    ]
    for path, parameters in (("/v2/models/{name}/infer", [NAME]),
                             ("/v2/models/{name}/versions/{version}/infer", [NAME, PATH_VERSION])):
        operations.append(("post", path, _operation(
            "Open Inference Protocol: infer", {
                "200": {"description": "the outputs asked for (binary ones after the JSON header)", "content": {
                    **_json(infer_response), "application/octet-stream": {"schema": {"type": "string",
                                                                                      "format": "binary"}}}},
                **_errors(statuses, error), **_errors(("404", "409"), error)},
            parameters=[*parameters, TIMEOUT, {
                "name": "Inference-Header-Content-Length", "in": "header", "required": False,
                "schema": {"type": "integer", "minimum": 1},
                "description": "the JSON header's length, when binary tensors follow it"}],
            body={**_json(infer_request), "application/octet-stream": {"schema": {"type": "string",
                                                                                  "format": "binary"}}},
            security=keyed)))
    operations += _gets(detail, error)
    if settings.admin_key is not None:
        operations += _admin(components, detail, error)
    return operations


def _gets(detail: Json, error: Json) -> list[tuple[str, str, Json]]:
    health = {"type": "object", "required": ["status"], "properties": {
        "status": {"enum": ["ok", "starting", "draining"]},
        "workers": {"type": "object", "additionalProperties": {"type": "string"}}}}
    ready = {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}}
    model_ready = {**ready, "required": ["name", "ready"],
                   "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}}}
    metadata = {"type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"], "properties": {
        "name": {"type": "string"}, "versions": {"type": "array", "items": {"type": "string"}},
        "platform": {"type": "string"}, "inputs": {"type": "array"}, "outputs": {"type": "array"}}}
    missing = _errors(("404", "409", "431"), error)
    return [
        ("get", "/health", _operation("200 once every worker is ready; 503 while starting or stopping", {
            "200": _ok("serving", health), "503": _ok("starting or draining", health), **_errors(("431",), detail)})),
        ("get", "/info", _operation("the served model, the serving configuration and the limits", {
            "200": _ok("what is served, and how", {"type": "object"}), **_errors(("431",), detail)})),
        ("get", "/metrics", _operation("Prometheus text format, every process of the service", {
            "200": _ok("the metrics", {"type": "string"}, "text/plain"), **_errors(("431",), detail)})),
        ("get", "/", _operation("the page: draw a digit, see the prediction and why", {
            "200": _ok("the page", {"type": "string"}, "text/html"), **_errors(("431",), detail)})),
        ("get", "/page/{name}", _operation("the page's script, style sheet and icon", {
            "200": {"description": "the file"}, **_errors(("404", "431"), detail)},
            parameters=[_path("name", {"type": "string"}, "the file")])),
        ("get", "/v2", _operation("Open Inference Protocol: server metadata", {
            "200": _ok("server metadata", {"type": "object", "required": ["name", "version", "extensions"]}),
            **_errors(("431",), detail)})),
        ("get", "/v2/health/live", _operation("Open Inference Protocol: liveness (200 while the process answers)", {
            "200": _ok("live", {"type": "object", "required": ["live"]}), **_errors(("431",), detail)})),
        ("get", "/v2/health/ready", _operation("Open Inference Protocol: readiness", {
            "200": _ok("ready", ready), "503": _ok("not ready", ready), **_errors(("431",), detail)})),
        ("get", "/v2/models/{name}", _operation("Open Inference Protocol: model metadata", {
            "200": _ok("the model's tensors and loaded versions", metadata), **missing}, parameters=[NAME])),
        ("get", "/v2/models/{name}/versions/{version}", _operation("Open Inference Protocol: model metadata", {
            "200": _ok("the model's tensors and loaded versions", metadata), **missing},
            parameters=[NAME, PATH_VERSION])),
        ("get", "/v2/models/{name}/ready", _operation("Open Inference Protocol: model readiness", {
            "200": _ok("ready", model_ready), "503": _ok("not ready", model_ready), **missing}, parameters=[NAME])),
        ("get", "/v2/models/{name}/versions/{version}/ready", _operation("Open Inference Protocol: model readiness", {
            "200": _ok("ready", model_ready), "503": _ok("not ready", model_ready), **missing},
            parameters=[NAME, PATH_VERSION])),
        ("get", "/v1/models", _operation("KServe V1: the models served", {
            "200": _ok("their names", {"type": "object", "required": ["models"],
                                       "properties": {"models": {"type": "array", "items": {"type": "string"}}}}),
            **_errors(("431",), detail)})),
        ("get", "/v1/models/{name}", _operation("KServe V1: model readiness", {
            "200": _ok("ready or not", model_ready), **_errors(("404", "431"), error)}, parameters=[NAME])),
    ]


def _admin(components: Json, detail: Json, error: Json) -> list[tuple[str, str, Json]]:
    admin: list[Json] = [{"AdminKey": []}, {"Bearer": []}]
    share = {"anyOf": [{"type": "null"}, {"type": "object", "required": ["version", "share"]}]}
    state = {"type": "object", "required": ["serving", "loaded", "canary", "shadow"], "properties": {
        "serving": {"type": "integer"}, "loaded": {"type": "array", "items": {"type": "integer"}},
        "canary": share, "shadow": share}}  # versioning.described
    changed = {"200": _ok("what is served and loaded now", state), **_errors(("401", "403", "431"), detail)}
    by_version = {**changed, **_errors(("404", "409"), detail)}
    repository = {"200": {"description": "done (an empty body, as Triton answers)"},
                  **_errors(("401", "403", "404", "409", "431"), error)}
    index = {"type": "array", "items": {"type": "object", "required": ["name", "version", "state"], "properties": {
        "name": {"type": "string"}, "version": {"type": "string"}, "state": {"enum": ["READY", "UNAVAILABLE"]},
        "reason": {"type": "string"}}}}

    def operation(summary: str, responses: Json, **kwargs: Any) -> Json:
        return _operation(summary, responses, security=admin, **kwargs)

    return [
        ("get", "/admin/versions", operation("admin: the store's versions and what is served", {
            "200": _ok("the versions", {"type": "object", "required": ["versions"]}),
            **_errors(("401", "403", "431"), detail)})),
        ("post", "/admin/versions/{version}/load", operation("admin: verify and load a version in every worker",
                                                             by_version, parameters=[PATH_VERSION])),
        ("post", "/admin/versions/{version}/unload", operation("admin: unload a version", by_version,
                                                               parameters=[PATH_VERSION])),
        ("post", "/admin/serve", operation("admin: serve a version, with an optional canary", {
            **by_version, **_errors(("400", "422"), detail)}, body=_json(_ref(ServeBody, components)))),
        ("post", "/admin/canary/promote", operation("admin: the canary is served", by_version)),
        ("post", "/admin/canary/rollback", operation("admin: drop the canary", by_version)),
        ("post", "/v2/repository/index", operation("repository: the versions, with their state", {
            "200": _ok("the versions", index), **_errors(("401", "403", "431"), error)})),
        ("post", "/v2/repository/models/{name}/load", operation(
            "repository: load and serve the newest version", repository, parameters=[NAME])),
        ("post", "/v2/repository/models/{name}/unload", operation(
            "repository: unload every version neither served nor the canary", repository, parameters=[NAME])),
    ]


def _instance_schema(components: Json) -> None:
    """An instance has exactly one of ``image_b64`` and ``pixels`` (pydantic's schema allows both or none)."""
    pixels = {"type": "array", "minItems": 28, "maxItems": 28, "description": "28 rows of 28 numbers in 0..255",
              "items": {"type": "array", "minItems": 28, "maxItems": 28,
                        "items": {"type": "number", "minimum": 0, "maximum": 255}}}
    image = {"type": "string", "minLength": 1,
             "description": "an encoded picture (PNG, JPEG, ...) in base64, or a data: URL of one"}
    components["Instance"] = {"description": "One picture: encoded bytes in base64, or MNIST's 28x28 frame", "oneOf": [
        {"type": "object", "required": ["image_b64"], "additionalProperties": False,
         "properties": {"image_b64": image}},
        {"type": "object", "required": ["pixels"], "additionalProperties": False, "properties": {"pixels": pixels}},
    ]}


def _v2_schemas(components: Json) -> tuple[Json, Json]:
    tensor = {"type": "object", "required": ["name", "shape", "datatype"], "additionalProperties": False,
              "properties": {"name": {"enum": ["pixels", "image"]},
                             "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                             "datatype": {"type": "string"}, "parameters": {"type": "object"},
                             "data": {"type": "array"}}}
    components["InferRequest"] = {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "description": "one input: `pixels` (FP32 or UINT8, [N,784], [N,28,28] or [N,1,28,28], 0..1 or 0..255) or "
                       "`image` (BYTES [N], each a picture in base64 in JSON, or length-prefixed in binary)",
        "properties": {
            "id": {"type": "string", "pattern": f"^[\\x20-\\x7e]{{1,{v2.MAX_ID}}}$"},
            "parameters": {"type": "object"}, "model_name": {"type": "string"}, "model_version": {"type": "string"},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": tensor},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"], "additionalProperties": False,
                "properties": {"name": {"enum": list(v2.OUTPUTS)}, "parameters": {"type": "object"}}}}}}
    components["InferResponse"] = {
        "type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "parameters": {"type": "object"},
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name", "datatype", "shape"], "properties": {
                    "name": {"enum": list(v2.OUTPUTS)}, "datatype": {"type": "string"},
                    "shape": {"type": "array", "items": {"type": "integer"}}, "data": {"type": "array"},
                    "parameters": {"type": "object"}}}}}}
    return {"$ref": "#/components/schemas/InferRequest"}, {"$ref": "#/components/schemas/InferResponse"}
