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
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from aiohttp import web

from stepline.client import Client
from stepline.observability import metrics
from stepline.projections.query import QueryProjector, QueryStore
from stepline.projections.views import state_dict
from stepline.sdk.task import Registry, Task
from stepline.security.sensitive import shown
from stepline.server import backfill_api, dashboard, debug_api, history_api, ops_api, query_api
from stepline.server._http import (
    Reply,
    Route,
    Routes,
    _Api,
    _HttpError,
    _json_errors,
    _parse_json,
    _read_body,
    log,
)
from stepline.server.backlog import Backlog
from stepline.server.config import ServeConfig, WebhookSource
from stepline.server.debug_api import state_as_of
from stepline.server.models import (
    AsOfQuery,
    CompleteTokenRequest,
    PublishRequest,
    RunPath,
    SourcePath,
    TaskPath,
    TokenPath,
    TriggerRequest,
)
from stepline.server.openapi import BAD_QUERY, LOG_DOWN, NO_RUN, SpecRoute, openapi_document
from stepline.server.openapi import ROUTES as OPENAPI_ROUTES
from stepline.server.responses import (
    Cancelled,
    Healthy,
    Info,
    Published,
    Ready,
    RunState,
    TokenCompleted,
    Triggered,
)
from stepline.server.webhook_schemes import SIGNATURE_HEADER, WebhookRejected, sign_webhook, verify_delivery
from stepline.version import __version__

CORE = Routes()
_META = ("meta",)
_LOCATION = {"Location": "/v1/runs/{run_id}"}


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

    @CORE("GET", "/healthz", "healthz", "the process is up", {200: Reply("always", Healthy)},
          auth="none", tags=_META)
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    @CORE("GET", "/readyz", "readyz", "the log answers: ready for traffic", {
        200: Reply("the log answered", Ready),
        503: "the log did not answer in time, or failed (`error` says which)"}, auth="none", tags=_META)
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

    @CORE("GET", "/metrics", "metrics", "Prometheus metrics (text format; docs/operations.md, \"Metrics\")", {
        200: Reply("the Prometheus text exposition format", media=("text/plain",))}, auth="none", tags=_META)
    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text: this process's counters, its workers' gauges (`stepline dev`), the backlog."""
        return web.Response(body=await metrics.exposition(), headers={"Content-Type": metrics.CONTENT_TYPE})

    @CORE("POST", "/v1/tasks/{task_id}/trigger", "triggerTask", "start a run of a task", {
        202: Reply("the run is recorded (or was already, for a repeated idempotency key)", Triggered, headers=_LOCATION,
                   links_run=True),
        404: "no task with this id (when the server knows the app's tasks)",
        409: "the idempotency key already started a run with another payload; nothing was recorded",
        422: "the payload does not fit the task's model", 503: LOG_DOWN},
        body=TriggerRequest, params=TaskPath)
    async def trigger(self, request: web.Request, body: TriggerRequest) -> web.Response:
        task_id = request.match_info["task_id"]
        task: Task[Any, Any] | str = self.registry.get(task_id) if self.registry is not None else task_id
        handle = await self.client.trigger(
            task, body.payload, idempotency_key=body.idempotency_key, delay=body.delay,
            priority=body.priority, tags=body.tags, concurrency_key=body.concurrency_key, ttl=body.ttl,
        )
        return web.json_response(
            {"run_id": handle.run_id, "task_id": handle.task_id}, status=202,
            headers={"Location": f"/v1/runs/{handle.run_id}"},
        )

    @CORE("POST", "/v1/events", "publishEvent", "publish a domain event to its subscribers", {
        202: Reply("the event is on the log", Published), 503: LOG_DOWN}, body=PublishRequest, tags=("events",))
    async def publish(self, request: web.Request, body: PublishRequest) -> web.Response:
        event_id = await self.client.publish(body.name, body.data, key=body.key, source="api")
        return web.json_response({"event_id": event_id}, status=202)

    @CORE("GET", "/v1/runs/{run_id}", "getRun", "a run's state: steps, outputs, errors, retries, logs; "
          "with ?as_of= as it stood at a past point (time travel)", {
              200: Reply("the run", RunState), 400: BAD_QUERY,
              404: NO_RUN + ", or the run did not exist yet at the point asked for", 503: LOG_DOWN},
          params=RunPath, query=AsOfQuery)
    async def get_run(self, request: web.Request, query: AsOfQuery) -> web.Response:
        run_id = request.match_info["run_id"]
        if query.as_of is None:
            state = await self.client.get_run(run_id)
            # Sensitive fields show as "[redacted]" or "[erased]", never decrypted.
            return web.json_response(await shown(state_dict(state), self.client.keys))
        at = await state_as_of(self.client, run_id, query.as_of)
        body = {**state_dict(at.state), "as_of": {**at.header(), "requested": query.as_of}}
        return web.json_response(await shown(body, self.client.keys))

    @CORE("POST", "/v1/tokens/{token}/complete", "completeToken", "resume a run waiting in wait_for_token", {
        200: Reply("the run resumes", TokenCompleted),
        400: "not a wait token, or the body is not a JSON object of the listed fields", 404: NO_RUN,
        409: "the token was already completed or timed out, or its run has ended", 503: LOG_DOWN},
        body=CompleteTokenRequest, params=TokenPath)
    async def complete_token(self, request: web.Request, body: CompleteTokenRequest) -> web.Response:
        """Resume a run waiting in `wait_for_token` with `{"data": ...}`."""
        token = request.match_info["token"]
        state = await self.client.complete_token(token, body.data)
        return web.json_response({"token": token, "run_id": state.run_id, "completed": True})

    @CORE("POST", "/v1/runs/{run_id}/cancel", "cancelRun", "stop a run; a running step is cancelled at once", {
        202: Reply("the run is cancelled", Cancelled), 404: NO_RUN, 409: "the run has already ended",
        503: LOG_DOWN}, params=RunPath)
    async def cancel(self, request: web.Request) -> web.Response:
        """Stop a run: a running step is cancelled at once, a waiting run never resumes."""
        run_id = request.match_info["run_id"]
        was = await self.client.cancel(run_id, "cancelled over the API")
        return web.json_response({"run_id": run_id, "cancelled": True, "was": was.status}, status=202)

    @CORE("POST", "/v1/webhooks/{source}", "receiveWebhook",
          "a signed delivery from a configured source, published as a domain event", {
              202: Reply("published", Published), 400: "the (authentic) body is not JSON",
              401: "missing, malformed, forged, stale or replayed signature",
              404: "no webhook source of this name", 503: LOG_DOWN},
          auth="signature", raw_body=True, params=SourcePath, tags=("webhooks",))
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

    @CORE("GET", "/v1/info", "info", "whether the API wants a token, and the version", {
        200: Reply("always", Info)}, auth="none", tags=_META)
    async def info(self, request: web.Request) -> web.Response:
        """Unauthenticated: tells the dashboard whether to ask for a token."""
        return web.json_response({"auth": self.config.auth_required, "version": __version__})



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
    ops_api.add_ops_routes(app, api, query)
    CORE.mount(app, api, api)
    if query is not None:
        Backlog(query, registry).attach(app)  # pending work on /metrics, with or without workers
    query_api.add_query_routes(app, api, query)
    history_api.add_history_routes(app, api)
    debug_api.add_debug_routes(app, api)
    backfill_api.add_backfill_routes(app, api)
    OPENAPI_ROUTES.mount(app, api, SpecRoute(openapi_spec(auth_required=config.auth_required)))
    dashboard.add_dashboard_routes(app)
    return app


def declared_routes() -> list[Route]:
    """Every route of `create_app`, in the order the OpenAPI document lists them."""
    return [*CORE.declared, *query_api.ROUTES.declared, *history_api.ROUTES.declared, *debug_api.ROUTES.declared,
            *ops_api.ROUTES.declared, *backfill_api.ROUTES.declared, *OPENAPI_ROUTES.declared,
            *dashboard.ROUTES.declared]


def openapi_spec(*, auth_required: bool = True) -> dict[str, Any]:
    """The OpenAPI document of `create_app`, generated from its declared routes and their models;
    with `auth_required=False` (`stepline dev`) no operation needs a token."""
    return openapi_document(declared_routes(), auth_required=auth_required)


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


__all__ = ["SIGNATURE_HEADER", "ServeConfig", "WebhookSource", "create_app", "declared_routes", "openapi_spec", "serve",
           "serve_api", "sign_webhook"]
