"""What the route modules of the HTTP API share: errors answered as JSON,
request bodies read within the limit, the API object (client, config,
registry, token check) their handlers use, and `Routes`, with which each
module declares its routes beside their handlers.

A declared route names its body, query and path models (pydantic, in
models.py), its answers and their models (responses.py), and how it
authenticates. Mounting it on the app wraps the handler so that the token is
checked first and the input validated next, before the handler runs; the
OpenAPI document (openapi.py) is generated from the same declarations, so
the two cannot drift apart.

app.py builds the application from the route modules (query_api, ops_api,
history_api, backfill_api); they and app.py import from here, so imports run
one way: app -> routes -> _http.
"""

from __future__ import annotations

import hmac
import json
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args, get_origin

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from stepline.client import Client
from stepline.errors import (
    InvalidEventName,
    InvalidRunState,
    InvalidToken,
    KeyStoreError,
    LogError,
    PayloadTooLarge,
    PayloadValidationError,
    UnknownRun,
    UnknownTask,
)
from stepline.sdk.task import Registry
from stepline.server.config import ServeConfig

log = structlog.get_logger("stepline.server")


class _HttpError(Exception):
    """Answered as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def _unauthorized(message: str) -> _HttpError:
    return _HttpError(401, message, {"WWW-Authenticate": "Bearer"})


# Errors callers cause, by the status that tells them so; checked in order.
_STATUS_OF: tuple[tuple[type[Exception], int], ...] = (
    (UnknownTask, 404),
    (UnknownRun, 404),
    (PayloadValidationError, 422),
    (PayloadTooLarge, 413),
    (InvalidEventName, 400),
    (InvalidToken, 409),
    (InvalidRunState, 409),
    (LogError, 503),
    (KeyStoreError, 503),
)


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except _HttpError as exc:
        return _error(exc.status, exc.message, exc.headers)
    except web.HTTPException as exc:  # aiohttp's own: no such route, wrong method
        if exc.status < 400:
            raise
        message = f"{exc.reason}: {request.method} {request.path}"
        return _error(exc.status, message, {k: v for k, v in exc.headers.items() if k == "Allow"})
    except Exception as exc:
        for cls, status in _STATUS_OF:
            if isinstance(exc, cls):
                return _error(status, str(exc))
        log.exception("request failed", method=request.method, path=request.path)
        return _error(500, "internal error; the server log has the details")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes without reading further.

    A declared length is checked up front; a chunked body is read to at most
    limit + 1 bytes, enough to know it is too long.
    """
    too_large = _HttpError(413, f"request body is larger than the {limit}-byte limit")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    """The body as JSON; 400 for what Python's parser takes but JSON (RFC 8259) and Avro do not."""
    try:
        value = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise _HttpError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _HttpError(400, "request body is nested too deeply") from None
    try:
        # NaN, Infinity and 1e400 (which parses as infinity) fail allow_nan=False;
        # a lone surrogate escape ("\ud800") fails the UTF-8 encoding that
        # every string meets on its way into an Avro record.
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except ValueError as exc:  # UnicodeEncodeError is a ValueError
        why = ("a lone UTF-16 surrogate escape" if isinstance(exc, UnicodeEncodeError)
               else "NaN, Infinity and numbers beyond a double's range (such as 1e400) are not JSON")
        raise _HttpError(400, f"request body is not valid JSON: {why}") from None
    except RecursionError:
        raise _HttpError(400, "request body is nested too deeply") from None
    return value


class _Api:
    """The server's client, configuration and (optional) registry, and the token check."""

    def __init__(self, client: Client, config: ServeConfig, registry: Registry | None) -> None:
        self.client = client
        self.config = config
        self.registry = registry

    def authenticate(self, request: web.Request, *, query_token: bool = False) -> None:
        """`query_token=True` also accepts `?token=` (EventSource cannot send headers)."""
        if not self.config.auth_required:
            return
        header = request.headers.get("Authorization")
        if header is None and query_token and request.query.get("token"):
            header = f"Bearer {request.query['token']}"
        if header is None:
            raise _unauthorized("missing Authorization header: send 'Authorization: Bearer <API token>'")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _unauthorized("Authorization header must be 'Bearer <API token>'")
        token = self.config.api_token or ""
        # Compared as bytes: compare_digest refuses non-ASCII str, and a header may hold any.
        if not hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode()):
            raise _unauthorized("the API token is not valid")


# --- routes declared with their models --------------------------------------------------

# bearer: the API token; bearer-or-query: also as ?token= (EventSource sends no
# headers); none: public; signature: the handler checks a webhook signature.
Auth = Literal["bearer", "bearer-or-query", "none", "signature"]
Handler = Callable[..., Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)


@dataclass(frozen=True)
class Reply:
    """One documented answer. `model` describes a JSON body (an error's is
    the Error model); `media` names other content types, whose body is text."""

    description: str
    model: type[BaseModel] | None = None
    media: tuple[str, ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)  # name -> description
    links_run: bool = False  # the body's run_id is a run to GET


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    operation_id: str
    summary: str
    replies: Mapping[int, Reply]
    handler: Handler
    body: type[BaseModel] | None = None
    body_required: bool = True
    query: type[BaseModel] | None = None
    params: type[BaseModel] | None = None
    auth: Auth = "bearer"
    tags: tuple[str, ...] = ("runs",)
    # A body of any JSON that the handler reads itself (a webhook's signature covers its bytes).
    raw_body: bool = False


class Routes:
    """The routes of one module, declared on their handlers:

        ROUTES = Routes()

        class RunRoutes:
            @ROUTES("POST", "/v1/runs/{run_id}/retry", "retryRun", "re-trigger a run",
                    {202: Reply("re-triggered", Retried), 404: "no such run"},
                    body=RetryRequest, body_required=False, params=RunPath)
            async def retry(self, request: web.Request, body: RetryRequest) -> web.Response: ...

    A handler gets `body=` and `query=` (validated models) for the models it
    declares. An answer given as a string is an error answer with that description.
    """

    def __init__(self) -> None:
        self.declared: list[Route] = []

    def __call__(self, method: str, path: str, operation_id: str, summary: str,
                 replies: Mapping[int, str | Reply], **options: Any) -> Callable[[H], H]:
        def declare(handler: H) -> H:
            answers = {status: Reply(r) if isinstance(r, str) else r for status, r in replies.items()}
            self.declared.append(Route(method, path, operation_id, summary, answers, handler, **options))
            return handler
        return declare

    def mount(self, app: web.Application, api: _Api | None, owner: object | None = None) -> None:
        """Add the routes to `app`, their handlers bound to `owner` (None: plain functions)."""
        for route in self.declared:
            handler = route.handler if owner is None else types.MethodType(route.handler, owner)
            wrapped = _validating(route, api, handler)
            if route.method == "GET":
                app.router.add_get(route.path, wrapped)  # and HEAD beside it
            else:
                app.router.add_route(route.method, route.path, wrapped)


RequestHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _validating(route: Route, api: _Api | None, handler: Handler) -> RequestHandler:
    async def handle(request: web.Request) -> web.StreamResponse:
        # The token first: a caller without one learns nothing, not even what input is valid.
        if route.auth in ("bearer", "bearer-or-query"):
            assert api is not None, f"{route.path} needs the API to authenticate"
            api.authenticate(request, query_token=route.auth == "bearer-or-query")
        if route.params is not None:
            _validate(route.params, dict(request.match_info), "path parameter")
        inputs: dict[str, BaseModel] = {}
        if route.query is not None:
            inputs["query"] = _validate(route.query, _query_dict(request, route.query), "query parameter")
        if route.body is not None:
            assert api is not None, f"{route.path} needs the API's body limit"
            raw = await _read_body(request, api.config.max_body_bytes)
            doc = _json_object(raw) if raw.strip() or route.body_required else {}
            inputs["body"] = _validate(route.body, doc, "field")
        return await handler(request, **inputs)
    return handle


def _json_object(raw: bytes) -> dict[str, Any]:
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise _HttpError(400, "request body must be a JSON object")
    return body


M = TypeVar("M", bound=BaseModel)


def _validate(model: type[M], doc: dict[str, Any], what: str) -> M:
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise _HttpError(400, invalid_input_message(model, exc, what)) from None


def _query_dict(request: web.Request, model: type[BaseModel]) -> dict[str, Any]:
    """The query string as the model's input: every value of a list field, the first of any other.

    Unknown names are passed on too, for the model to refuse (extra="forbid")."""
    lists = {f.alias or name for name, f in model.model_fields.items() if _is_list(f.annotation)}
    return {key: request.query.getall(key) if key in lists else request.query[key] for key in request.query}


def _is_list(annotation: Any) -> bool:
    return get_origin(annotation) is list or any(get_origin(a) is list for a in get_args(annotation))


def invalid_input_message(model: type[BaseModel], exc: ValidationError, what: str) -> str:
    """One line naming every problem: unknown names with the known ones, then each bad value by its field.

    Our own checks (error type "stepline") say what they mean in full and
    name their field themselves; pydantic's messages get the field put in front."""
    unknown: dict[tuple[str | int, ...], list[str]] = {}
    problems: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            unknown.setdefault(loc[:-1], []).append(str(loc[-1]))
        elif err["type"] == "stepline" or not loc:
            problems.append(err["msg"])
        else:
            problems.append(f"{_dotted(loc)}: {err['msg']}")
    for parent, names in unknown.items():
        scope = f"{_dotted(parent)} " if parent else ""
        known = ", ".join(_field_names(model, parent))
        problems.insert(0, f"unknown {scope}{what}(s) {', '.join(sorted(names))}; known: {known}")
    return "; ".join(problems)


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _field_names(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The field names (as sent) of the model found at `loc` inside `model`; [] when there is none."""
    current = model
    for part in loc:
        found = {f.alias or n: f for n, f in current.model_fields.items()}.get(str(part))
        if found is None:
            return []
        nested = [a for a in (found.annotation, *get_args(found.annotation))
                  if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return []
        current = nested[0]
    return sorted(f.alias or n for n, f in current.model_fields.items())
