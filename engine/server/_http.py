"""What the route modules of the HTTP API share: errors answered as JSON,
request bodies read within the limit, and the API object (client, config,
registry, token check) their handlers use.

app.py builds the application from the route modules (query_api, ops_api,
history_api, backfill_api); they and app.py import from here, so imports run
one way: app -> routes -> _http.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog
from aiohttp import web

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


def _json_object(raw: bytes, allowed: frozenset[str]) -> dict[str, Any]:
    body = _parse_json(raw)
    if not isinstance(body, dict):
        raise _HttpError(400, "request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        # A misspelt option silently ignored would trigger the wrong thing.
        raise _HttpError(400, f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")
    return body


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and (not isinstance(value, str) or not value):
        raise _HttpError(400, f"{name} must be a non-empty string")
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
