"""The OpenAPI 3.1 document of `stepline serve`, served at `GET /v1/openapi.json`.

Generated, not written: every route is declared beside its handler
(`Routes` in _http.py) with its body, query and path models (models.py) and
its answers (responses.py), and this module turns those declarations into
the document. Components are the models' own JSON Schemas
(`model_json_schema(ref_template="#/components/schemas/{model}")`); query and
path models become parameters, one per field. tests/test_openapi.py checks
the document against the app's routes and real answers against it, and
tests/test_api_fuzz.py sends what schemathesis generates from it to a real
server.

The document is unauthenticated, like `/v1/info`: it holds no data, and a
client needs it to learn how to authenticate. It names no webhook source
(those are configuration) and no task (the payload schema of
`/v1/tasks/{task_id}/trigger` is any JSON; a task's own model answers 422).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from pydantic_core.core_schema import CoreSchema, DataclassField, ModelField, TypedDictField

from stepline.server._http import Reply, Route, Routes
from stepline.server.responses import Document, Error
from stepline.version import __version__

SPEC_PATH = "/v1/openapi.json"
REF = "#/components/schemas/{model}"

Schema = dict[str, Any]

# Answers several routes give, in the words of their descriptions.
LOG_DOWN = "the log cannot be reached or written; retry later"
NO_RUN = "no run with this id on this log"
NO_QUERY = "this server keeps no query projection (`stepline serve --query-db`)"
BAD_BODY = "the body is not a JSON object of the listed fields, or a field is wrong or out of range (`error` names it)"
BAD_QUERY = "a query parameter is unknown, malformed or out of range (`error` names it)"
_TOO_LARGE = ("the body is larger than the server's limit (max_body_bytes), or the payload is larger than "
              "the client's (STEPLINE_MAX_PAYLOAD_BYTES)")

ROUTES = Routes()


class SpecRoute:
    """Serves one document, built once when the app is."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.body = json.dumps(spec).encode()

    @ROUTES("GET", SPEC_PATH, "openapi", "this description", {200: Reply("the OpenAPI document", Document)},
            auth="none", tags=("meta",))
    async def document(self, request: web.Request) -> web.Response:
        return web.Response(body=self.body, content_type="application/json")


class _Generator(GenerateJsonSchema):
    """Field titles left out: each is its name again, and names are what a reader sees."""

    def field_title_should_be_set(
            self, schema: CoreSchema | ModelField | DataclassField | TypedDictField) -> bool:
        return False


_SECURITY_SCHEMES: dict[str, Schema] = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer <API token>` (`stepline serve --api-token` or "
                              "STEPLINE_API_TOKEN)"},
    "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                   "description": "the API token as `?token=`, for /v1/stream only: a browser's EventSource "
                                  "cannot send headers"},
    "webhookSignature": {"type": "apiKey", "in": "header", "name": "Stepline-Signature",
                         "description": "Stepline's scheme (the default): `t=<unix seconds>,v1=<hex "
                                        "HMAC-SHA256(secret, t + '.' + body)>`; several v1= while a secret "
                                        "rotates. Refused when no v1 matches, t is outside the tolerance window "
                                        "(300 s), or the signature was already accepted (a replay). A source "
                                        "configured with another scheme (`--webhook-scheme SOURCE=SCHEME`) "
                                        "authenticates by that scheme's headers instead: `Stripe-Signature` "
                                        "(stripe), `webhook-id`/`webhook-timestamp`/`webhook-signature` "
                                        "(standard), `X-Hub-Signature-256` (github)."},
}

_SECURITY: dict[str, list[dict[str, list[str]]]] = {
    "none": [], "bearer-or-query": [{"bearer": []}, {"queryToken": []}], "signature": [{"webhookSignature": []}],
}


def _ref(model: type[BaseModel]) -> Schema:
    return {"$ref": REF.format(model=model.__name__)}


def _parameters(model: type[BaseModel], where: str, components: dict[str, Schema]) -> list[Schema]:
    """One parameter per field of a query or path model."""
    schema = model.model_json_schema(ref_template=REF, schema_generator=_Generator)
    components.update(schema.get("$defs", {}))
    required = set(schema.get("required", ()))
    out = []
    for name, prop in schema["properties"].items():
        prop = _not_null(prop)
        param: Schema = {"name": name, "in": where, "required": where == "path" or name in required}
        if "description" in prop:
            param["description"] = prop.pop("description")
        param["schema"] = prop
        if prop.get("type") == "array":
            param.update(style="form", explode=True)
        out.append(param)
    return out


def _not_null(prop: Schema) -> Schema:
    """A query parameter is text or absent, never null: `str | None` shows as its string."""
    prop = dict(prop)
    if prop.get("default", ...) is None:
        del prop["default"]
    options = [s for s in prop.get("anyOf", ()) if s != {"type": "null"}]
    if "anyOf" in prop and len(options) < len(prop["anyOf"]):
        del prop["anyOf"]
        prop = {**options[0], **prop} if len(options) == 1 else {**prop, "anyOf": options}
    return prop


def _answer(status: int, reply: Reply) -> Schema:
    out: Schema = {"description": reply.description}
    model = reply.model or (Error if status >= 400 else None)
    if reply.media:
        out["content"] = {media: {"schema": {"type": "string"}} for media in reply.media}
    elif model is not None:
        out["content"] = {"application/json": {"schema": _ref(model)}}
    if reply.headers:
        out["headers"] = {name: {"schema": {"type": "string"}, "description": text}
                          for name, text in reply.headers.items()}
    if reply.links_run:
        out["links"] = {"GetRun": {"operationId": "getRun", "parameters": {"run_id": "$response.body#/run_id"}}}
    return out


_UNAUTHORIZED: Schema = {
    **_answer(401, Reply("no token, or not the API token")),
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
}


def _operation(route: Route, components: dict[str, Schema], *, auth_required: bool) -> Schema:
    """One operation: a token route also answers 401; one with input validated by a model, 400; a body, 413."""
    op: Schema = {"operationId": route.operation_id, "summary": route.summary, "tags": list(route.tags)}
    params = [p for model, where in ((route.params, "path"), (route.query, "query")) if model is not None
              for p in _parameters(model, where, components)]
    if params:
        op["parameters"] = params
    answers = {str(status): _answer(status, reply) for status, reply in route.replies.items()}
    if route.body is not None:
        op["requestBody"] = {"required": route.body_required,
                             "content": {"application/json": {"schema": _ref(route.body)}}}
    elif route.raw_body:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": {"description": "any JSON value"}}}}
    if route.body is not None or route.raw_body:
        answers.setdefault("400", _answer(400, Reply(BAD_BODY)))
        answers["413"] = _answer(413, Reply(_TOO_LARGE))
    if route.query is not None:
        answers.setdefault("400", _answer(400, Reply(BAD_QUERY)))
    bearer = route.auth in ("bearer", "bearer-or-query")
    if bearer and auth_required:
        answers["401"] = _UNAUTHORIZED
    if route.auth in _SECURITY:
        op["security"] = _SECURITY[route.auth]
    if bearer and not auth_required:
        op["security"] = []
    op["responses"] = dict(sorted(answers.items()))
    return op


def _models(routes: Iterable[Route]) -> list[type[BaseModel]]:
    found: dict[type[BaseModel], None] = {Error: None}
    for route in routes:
        if route.body is not None:
            found[route.body] = None
        for reply in route.replies.values():
            if reply.model is not None:
                found[reply.model] = None
    return list(found)


def openapi_document(routes: Iterable[Route], *, auth_required: bool = True) -> dict[str, Any]:
    """The document of these routes; with `auth_required=False` (`stepline dev`) no operation needs a token."""
    routes = list(routes)
    _, defs = models_json_schema([(m, "validation") for m in _models(routes)], ref_template=REF,
                                 schema_generator=_Generator)
    components: dict[str, Schema] = dict(defs.get("$defs", {}))
    paths: dict[str, dict[str, Schema]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route, components,
                                                                            auth_required=auth_required)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Stepline API",
            "version": __version__,
            "description": "Trigger runs, publish events, read and list runs, receive signed webhooks. "
                           "JSON in, JSON out; every error is `{\"error\": \"...\"}` with its status. "
                           "Input that does not fit its model (an unknown field or query parameter, a wrong "
                           "type, a value out of range) is refused with 400 and a message naming the field. "
                           "A string query parameter given empty counts as not given. "
                           "This document is generated from the models the server validates with.",
        },
        "security": [{"bearer": []}] if auth_required else [],
        "paths": paths,
        "components": {"schemas": dict(sorted(components.items())), "securitySchemes": _SECURITY_SCHEMES},
    }


__all__ = ["LOG_DOWN", "NO_QUERY", "NO_RUN", "ROUTES", "SPEC_PATH", "SpecRoute", "openapi_document"]
