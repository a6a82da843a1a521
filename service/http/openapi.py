"""The OpenAPI document (/openapi.json, /docs): our inference routes are plain Starlette routes (the
fast path), which FastAPI does not describe, so their operations are written here from the schemas."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from service.http.schemas import ErrorResponse, ExplainRequest, ExplainResponse, PredictRequest, PredictResponse

ERRORS = {
    "400": "undecodable image, invalid base64, a body that is not JSON",
    "401": "missing or wrong API key (when DIGITSERVE_API_KEY is set)",
    "413": "body, image size or instance count over the limits",
    "415": "a content type other than JSON or multipart",
    "422": "wrong JSON shape or options, pixels out of range, a blank picture",
    "503": "overloaded, shutting down or a worker replaced (with Retry-After)",
    "504": "no answer within the request timeout",
}


def install(app: FastAPI) -> None:
    """Name the service and its version, and describe /predict and /explain."""
    app.title, app.version = "digitserve", version("digitserve")
    app.description = "Handwritten-digit classification with explanations, served by LitServe."

    def document() -> dict[str, Any]:
        if not app.openapi_schema:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            paths = schema.setdefault("paths", {})
            paths["/predict"] = _operation("Classify digit pictures", PredictRequest, PredictResponse, components)
            paths["/explain"] = _operation("Classify and explain (attributions, hooked activations)",
                                           ExplainRequest, ExplainResponse, components)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]


def _ref(model: type[BaseModel], components: dict[str, Any]) -> dict[str, str]:
    for name, definition in model.model_json_schema(ref_template="#/components/schemas/{model}").get(
            "$defs", {}).items():
        components[name] = definition
    definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
    definition.pop("$defs", None)
    components[model.__name__] = definition
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _operation(summary: str, request: type[BaseModel], response: type[BaseModel],
               components: dict[str, Any]) -> dict[str, Any]:
    multipart = {"type": "object", "required": ["file"],
                 "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
    error = {"application/json": {"schema": _ref(ErrorResponse, components)}}
    return {"post": {
        "summary": summary,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref(request, components)},
            "multipart/form-data": {"schema": multipart},
        }},
        "responses": {
            "200": {"description": "one answer per instance, in order",
                    "content": {"application/json": {"schema": _ref(response, components)}}},
            **{status: {"description": why, "content": error} for status, why in ERRORS.items()},
        },
    }}
