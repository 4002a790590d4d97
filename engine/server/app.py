"""`stepline serve`: trigger runs, publish events and receive webhooks over HTTP.

JSON in, JSON out; every error is `{"error": "..."}` with its status. The
`/v1/` API takes a bearer token. Webhook deliveries authenticate by their
signature instead, in their source's scheme (engine/server/webhook_schemes.py:
Stepline's own, Stripe's, Standard Webhooks, GitHub's). Stepline's:

    Stepline-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, f"{t}." + body)>

Several `v1=` entries may be sent while a secret is rotated. A delivery is
rejected, with nothing appended, when its signature does not match, its
timestamp is outside the tolerance window, or the same signature (or message
id) was already accepted within that window (a replay).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from stepline.client import Client
from stepline.core.ids import parse_token
from stepline.errors import InvalidToken
from stepline.observability import metrics
from stepline.projections.query import QueryProjector, QueryStore
from stepline.projections.views import state_dict
from stepline.sdk.task import Registry, Task
from stepline.security.sensitive import shown
from stepline.server._http import (
    _Api,
    _HttpError,
    _json_errors,
    _json_object,
    _optional_str,
    _parse_json,
    _read_body,
    log,
)
from stepline.server.backfill_api import add_backfill_routes
from stepline.server.backlog import Backlog
from stepline.server.config import ServeConfig, WebhookSource
from stepline.server.dashboard import add_dashboard_routes
from stepline.server.history_api import add_history_routes
from stepline.server.openapi import add_openapi_route
from stepline.server.ops_api import add_ops_routes
from stepline.server.query_api import add_query_routes
from stepline.server.webhook_schemes import SIGNATURE_HEADER, WebhookRejected, sign_webhook, verify_delivery
from stepline.version import __version__

# RunTriggered.priority is an Avro int.
_PRIORITY_RANGE = range(-(2**31), 2**31)
# Far beyond any sensible delay, and far inside the 64-bit millisecond
# timestamp RunTriggered.not_before stores.
_MAX_DELAY_S = 100 * 365 * 24 * 3600


@dataclass(frozen=True)
class _TriggerRequest:
    payload: Any
    idempotency_key: str | None
    delay: float | None
    priority: int
    tags: tuple[str, ...]
    concurrency_key: str | None = None
    ttl: float | None = None


_TRIGGER_FIELDS = frozenset({"payload", "idempotency_key", "delay", "priority", "tags", "concurrency_key", "ttl"})
_EVENT_FIELDS = frozenset({"name", "data", "key"})
_TOKEN_FIELDS = frozenset({"data"})


def _trigger_request(raw: bytes) -> _TriggerRequest:
    body = _json_object(raw, _TRIGGER_FIELDS)
    delay = _seconds(body, "delay")
    ttl = _seconds(body, "ttl")
    priority = body.get("priority", 0)
    if isinstance(priority, float) and priority.is_integer():
        # JSON has one number type: 5.0 is the integer 5, to JSON Schema and so to us.
        priority = int(priority)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority not in _PRIORITY_RANGE:
        raise _HttpError(400, "priority must be a 32-bit integer")
    tags = body.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _HttpError(400, "tags must be a list of strings")
    return _TriggerRequest(body.get("payload"), _optional_str(body, "idempotency_key"), delay, priority,
                           tuple(tags), _optional_str(body, "concurrency_key"), ttl)


def _seconds(body: dict[str, Any], name: str) -> float | None:
    value = body.get(name)
    # bool is an int to Python, never a number of seconds to a caller.
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float)
        or not math.isfinite(value) or not 0 <= value <= _MAX_DELAY_S
    ):
        raise _HttpError(400, f"{name} must be a number of seconds from 0 to {_MAX_DELAY_S}")
    return value


class _ReplayGuard:
    """Signatures accepted lately, so that a captured delivery cannot be sent again.

    Held in memory: the guarantee holds per server process. An entry lives
    2 x tolerance from its acceptance, which outlasts its timestamp's window
    (t + tolerance <= accepted + 2 x tolerance) and keeps expiries in
    insertion order, so pruning pops from the front only.
    """

    def __init__(self, tolerance_s: int) -> None:
        self._ttl = 2 * tolerance_s
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def claim(self, source: str, signature: str, now: float) -> bool:
        while self._seen and next(iter(self._seen.values())) < now:
            self._seen.popitem(last=False)
        key = (source, signature)
        if key in self._seen:
            return False
        self._seen[key] = now + self._ttl
        return True

    def release(self, source: str, signature: str) -> None:
        self._seen.pop((source, signature), None)


class _CoreApi(_Api):
    """The routes of app.py itself: trigger, publish, read, cancel, tokens, webhooks."""

    def __init__(self, client: Client, config: ServeConfig, registry: Registry | None) -> None:
        super().__init__(client, config, registry)
        self.replays = _ReplayGuard(config.signature_tolerance_s)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        """Ready while the log answers a read of the runs topic's end within the bound."""
        bound = self.config.ready_bound_s
        try:
            await asyncio.wait_for(self.client.log.end_offset(self.client.topics.runs, 0), bound)
        except TimeoutError:
            return web.json_response({"ready": False, "error": f"the log did not answer within {bound:g} s"},
                                     status=503)
        except Exception as exc:  # the log's own error says what is wrong
            return web.json_response({"ready": False, "error": f"the log is not reachable: {exc}"}, status=503)
        return web.json_response({"ready": True})

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: this process's counters, its workers' gauges (`stepline dev`), the backlog."""
        return web.Response(body=await metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})

    async def info(self, request: web.Request) -> web.Response:
        """Unauthenticated: tells the dashboard whether to ask for a token."""
        return web.json_response({"auth": self.config.auth_required, "version": __version__})

    async def trigger(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        task_id = request.match_info["task_id"]
        req = _trigger_request(await _read_body(request, self.config.max_body_bytes))
        task: Task[Any, Any] | str = self.registry.get(task_id) if self.registry is not None else task_id
        handle = await self.client.trigger(
            task, req.payload, idempotency_key=req.idempotency_key, delay=req.delay,
            priority=req.priority, tags=req.tags, concurrency_key=req.concurrency_key, ttl=req.ttl,
        )
        return web.json_response(
            {"run_id": handle.run_id, "task_id": handle.task_id}, status=202,
            headers={"Location": f"/v1/runs/{handle.run_id}"},
        )

    async def publish(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        body = _json_object(await _read_body(request, self.config.max_body_bytes), _EVENT_FIELDS)
        name = body.get("name")
        if not isinstance(name, str):
            raise _HttpError(400, "name must be a string, e.g. \"user.created\"")
        event_id = await self.client.publish(name, body.get("data"), key=_optional_str(body, "key"), source="api")
        return web.json_response({"event_id": event_id}, status=202)

    async def get_run(self, request: web.Request) -> web.Response:
        self.authenticate(request)
        state = await self.client.get_run(request.match_info["run_id"])
        # Sensitive fields show as "[redacted]" or "[erased]", never decrypted.
        return web.json_response(await shown(state_dict(state), self.client.keys))

    async def cancel(self, request: web.Request) -> web.Response:
        """Stop a run: a running step is cancelled at once, a waiting run never resumes."""
        self.authenticate(request)
        run_id = request.match_info["run_id"]
        was = await self.client.cancel(run_id, "cancelled over the API")
        return web.json_response({"run_id": run_id, "cancelled": True, "was": was.status}, status=202)

    async def complete_token(self, request: web.Request) -> web.Response:
        """Resume a run waiting in `wait_for_token` with `{"data": ...}`."""
        self.authenticate(request)
        token = request.match_info["token"]
        try:
            parse_token(token)
        except InvalidToken as exc:
            raise _HttpError(400, str(exc)) from None
        body = _json_object(await _read_body(request, self.config.max_body_bytes), _TOKEN_FIELDS)
        state = await self.client.complete_token(token, body.get("data"))
        return web.json_response({"token": token, "run_id": state.run_id, "completed": True})

    async def webhook(self, request: web.Request) -> web.Response:
        name = request.match_info["source"]
        source = self.config.webhooks.get(name)
        if source is None:
            raise _HttpError(404, f"no webhook source named {name!r}")
        raw = await _read_body(request, self.config.max_body_bytes)
        try:
            try:
                accepted = verify_delivery(source.scheme, name, source.secret, request.headers, raw,
                                           self.config.signature_tolerance_s)
            except WebhookRejected as exc:
                raise _HttpError(exc.status, exc.reason) from None
            data = _parse_json(raw)
            replay_key = accepted.replay_key
            if replay_key is not None and not self.replays.claim(name, replay_key, time.time()):
                raise _HttpError(401, f"this {accepted.what} was already accepted: a replayed delivery is refused")
        except _HttpError as exc:
            log.warning("webhook rejected", source=name, scheme=source.scheme, reason=exc.message,
                        remote=request.remote)
            raise
        try:
            event_id = await self.client.publish(source.event, data, source=f"webhook:{name}")
        except BaseException:
            # Not recorded, so the sender's retry of this very delivery must get through.
            if replay_key is not None:
                self.replays.release(name, replay_key)
            raise
        return web.json_response({"event_id": event_id}, status=202)


def create_app(
    client: Client, config: ServeConfig, registry: Registry | None = None, *, query: QueryStore | None = None,
) -> web.Application:
    """The HTTP API over a started client.

    With a registry, unknown task ids are refused (404) and payloads are
    validated (422); without one a trigger is recorded as given. With a
    query store (kept up to date by a QueryProjector) the run and event
    lists of engine/server/query_api.py answer; without one they answer 503.
    """
    # Above our own limit, so a too-large body gets our 413 and its message.
    app = web.Application(middlewares=[_json_errors], client_max_size=config.max_body_bytes + 1)
    api = _CoreApi(client, config, registry)
    # First: /v1/runs/bulk/cancel must not be read as /v1/runs/{run_id}/cancel.
    add_ops_routes(app, api, query)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    if query is not None:
        Backlog(query, registry).attach(app)  # pending work on /metrics, with or without workers
    app.router.add_post("/v1/tasks/{task_id}/trigger", api.trigger)
    app.router.add_post("/v1/events", api.publish)
    app.router.add_get("/v1/runs/{run_id}", api.get_run)
    app.router.add_post("/v1/tokens/{token}/complete", api.complete_token)
    app.router.add_post("/v1/runs/{run_id}/cancel", api.cancel)
    app.router.add_post("/v1/webhooks/{source}", api.webhook)
    add_query_routes(app, api, query)
    add_history_routes(app, api)
    add_backfill_routes(app, api)
    app.router.add_get("/v1/info", api.info)
    add_openapi_route(app, auth_required=config.auth_required)
    add_dashboard_routes(app)
    return app


async def serve(
    client: Client,
    config: ServeConfig,
    registry: Registry | None,
    host: str,
    port: int,
    *,
    on_listening: Callable[[list[str]], None] | None = None,
    query: QueryStore | None = None,
) -> None:
    """Serve until cancelled. `on_listening` gets the bound addresses (the real port for port 0)."""
    runner = web.AppRunner(create_app(client, config, registry, query=query), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        if on_listening is not None:
            on_listening([_address(a) for a in runner.addresses])
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve_api(
    client: Client,
    config: ServeConfig,
    registry: Registry | None,
    host: str,
    port: int,
    *,
    query_db: str | None,
    on_listening: Callable[[list[str]], None] | None = None,
) -> None:
    """Serve until cancelled, with the query projection of `query_db` kept up
    to date in this process on the client's log (None: no lists, 503)."""
    if query_db is None:
        await serve(client, config, registry, host, port, on_listening=on_listening)
        return
    async with QueryStore(query_db) as store:
        async with QueryProjector(client.log, store, topics=client.topics):
            await serve(client, config, registry, host, port, on_listening=on_listening, query=store)


def _address(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


__all__ = ["SIGNATURE_HEADER", "ServeConfig", "WebhookSource", "create_app", "serve", "serve_api", "sign_webhook"]
