"""The read side of the HTTP API: lists for the dashboard, fed by the query projection.

Routes (all under the API's bearer token; `/v1/stream` also takes it as
`?token=`, since a browser's EventSource cannot send headers):

    GET  /v1/runs                  runs, newest first, filtered, keyset-paged
    GET  /v1/runs/{id}/history     every event of a run (read from the log); ?from=&to= those
                                   between two points (engine/history/replay.py)
    GET  /v1/runs/{id}/children    runs the run started
    POST /v1/runs/{id}/retry       re-trigger a failed or cancelled run
    GET  /v1/events                domain events, newest first, with the runs they started
    GET  /v1/queues                live runs per queue, with the queue's limits
    GET  /v1/schedules             scheduled tasks and their next tick
    GET  /v1/stream                Server-Sent Events: `run` per changed run
    DELETE /v1/subjects/{subject}  forget a subject: its sensitive fields become unreadable

The lists need a `QueryStore` (`create_app(..., query=store)`); without one
they answer 503. History, retry and schedules work without it.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from stepline.errors import UnknownRun
from stepline.history.replay import events_between, parse_point
from stepline.projections.query_store import InvalidCursor, Page, QueryStore, RunFilter, SubscriptionClosed
from stepline.projections.views import event_dict
from stepline.sdk.schedule import tick_key
from stepline.security.sensitive import shown
from stepline.server import models
from stepline.server._http import Reply, Routes, _Api, _HttpError
from stepline.server.models import (
    EventQuery,
    HistoryQuery,
    PageQuery,
    RetryRequest,
    RunPath,
    RunQuery,
    SubjectPath,
)
from stepline.server.openapi import BAD_QUERY, LOG_DOWN, NO_QUERY, NO_RUN
from stepline.server.responses import Erased, EventPage, QueueList, Retried, RunHistory, RunPage, ScheduleList

STATUSES = frozenset(models.STATUSES)
DEFAULT_LIMIT = models.DEFAULT_LIMIT
MAX_LIMIT = models.MAX_LIMIT
KEEPALIVE_S = 15.0
# A run changing many times in a burst is sent at most once per this window.
COALESCE_S = 0.1
# "stepline/tick/": the idempotency keys of schedule ticks, from their one definition.
_TICK_PREFIX = tick_key(datetime.fromtimestamp(0, UTC)).removesuffix("0")
_BAD_PAGE = "a query parameter is unknown or out of range, or the cursor is not one this API gave"

ROUTES = Routes()


def run_filter(query: RunQuery) -> RunFilter:
    """The filter of `GET /v1/runs` from its validated query string."""
    return RunFilter(
        task=query.task,
        statuses=tuple(query.status),
        tags=tuple(query.tag),
        created_from=query.from_,
        created_to=query.to,
        text=query.q,
        dead_letter=query.dead_letter,
        parent=query.parent,
        error_type=query.error_type,
    )


def _page_json(page: Page, key: str) -> dict[str, Any]:
    body: dict[str, Any] = {key: page.items, "next_cursor": page.next_cursor}
    if page.total_estimate is not None:
        body["total_estimate"] = page.total_estimate
    return body


class QueryRoutes:
    def __init__(self, api: _Api, store: QueryStore | None) -> None:
        self.api = api
        self.store = store
        self.streams: set[Any] = set()

    def _store(self) -> QueryStore:
        if self.store is None:
            raise _HttpError(503, "run lists need the query projection, and this server has none: "
                                  "`stepline serve` keeps one (--query-db); an app passes "
                                  "create_app(..., query=QueryStore(...)) with a QueryProjector")
        return self.store

    async def _page(self, coro: Any) -> Page:
        try:
            page: Page = await coro
        except InvalidCursor as exc:
            raise _HttpError(400, str(exc)) from None
        return page

    @ROUTES("GET", "/v1/runs", "listRuns", "runs, newest first, filtered, a page at a time", {
        200: Reply("runs, newest first", RunPage),
        400: "a filter is unknown, malformed or out of range, or the cursor is not one this API gave",
        503: NO_QUERY}, query=RunQuery)
    async def list_runs(self, request: web.Request, query: RunQuery) -> web.Response:
        store = self._store()
        page = await self._page(store.list_runs(run_filter(query), query.limit, query.cursor))
        return web.json_response(_page_json(page, "runs"))

    @ROUTES("GET", "/v1/runs/{run_id}/history", "getRunHistory",
            "every event of a run, in order; with ?from= and ?to= those between two points", {
                200: Reply("the run's events", RunHistory), 400: BAD_QUERY, 404: NO_RUN, 503: LOG_DOWN},
            params=RunPath, query=HistoryQuery)
    async def history(self, request: web.Request, query: HistoryQuery) -> web.Response:
        run_id = request.match_info["run_id"]
        events = await self.api.client.history(run_id)
        if not events:
            raise UnknownRun(run_id)
        now = self.api.client.clock()
        after = None if query.from_ is None else parse_point(query.from_, now, name="from")
        upto = None if query.to is None else parse_point(query.to, now, name="to")
        events = events_between(events, after, upto)
        rows = await shown([event_dict(off, ev) for off, ev in events], self.api.client.keys)
        return web.json_response({"run_id": run_id, "events": rows}, dumps=_dumps)

    @ROUTES("GET", "/v1/runs/{run_id}/children", "listChildRuns", "runs the run started", {
        200: Reply("runs, newest first", RunPage), 400: _BAD_PAGE, 503: NO_QUERY}, params=RunPath, query=PageQuery)
    async def children(self, request: web.Request, query: PageQuery) -> web.Response:
        store = self._store()
        where = RunFilter(parent=request.match_info["run_id"])
        page = await self._page(store.list_runs(where, query.limit, query.cursor))
        return web.json_response(_page_json(page, "runs"))

    @ROUTES("POST", "/v1/runs/{run_id}/retry", "retryRun",
            "re-trigger a failed or cancelled run from its last completed step", {
                202: Reply("the run is re-triggered", Retried), 404: NO_RUN,
                409: "the run is neither failed nor cancelled",
                422: "the new payload does not fit the task's model", 503: LOG_DOWN},
            body=RetryRequest, body_required=False, params=RunPath)
    async def retry(self, request: web.Request, body: RetryRequest) -> web.Response:
        """Re-trigger a failed (dead-lettered) or cancelled run; `{"payload": ...}` replaces its payload."""
        run_id = request.match_info["run_id"]
        new_payload = "payload" in body.model_fields_set
        was = await self.api.client.retry(run_id, body.payload, new_payload=new_payload)
        return web.json_response({"run_id": run_id, "retriggered": True, "was": was.status,
                                  "new_payload": new_payload}, status=202)

    @ROUTES("DELETE", "/v1/subjects/{subject}", "forgetSubject",
            "erase a subject: its sensitive fields become unreadable everywhere", {
                200: Reply("the subject's keys are deleted", Erased),
                503: "no key store is configured, or it cannot be reached"}, params=SubjectPath)
    async def forget(self, request: web.Request) -> web.Response:
        """Erase a subject (GDPR): delete its key, so its sensitive fields read as "[erased]"."""
        subject = request.match_info["subject"]
        kids = await self.api.client.forget(subject)
        return web.json_response({"subject": subject, "erased": bool(kids), "keys_deleted": len(kids)})

    @ROUTES("GET", "/v1/events", "listEvents", "domain events, newest first, with the runs each started", {
        200: Reply("a page of events", EventPage), 400: _BAD_PAGE, 503: NO_QUERY}, query=EventQuery,
        tags=("events",))
    async def events(self, request: web.Request, query: EventQuery) -> web.Response:
        store = self._store()
        page = await self._page(store.list_events(query.name, query.limit, query.cursor))
        return web.json_response(_page_json(page, "events"))

    @ROUTES("GET", "/v1/queues", "listQueues", "live runs per queue, with the queue's limits", {
        200: Reply("the queues", QueueList), 503: NO_QUERY}, tags=("queues",))
    async def queues(self, request: web.Request) -> web.Response:
        counts = await self._store().queue_counts()
        paused = {p["name"] for p in await self._store().pauses() if p["scope"] == "queue"}
        limits: dict[str, Any] = {}
        for t in self.api.registry or ():
            limits.setdefault(t.queue.name, t.queue)
        out = []
        for name in sorted(set(limits) | {q for q in counts if q is not None}):
            c = counts.get(name, {})
            q = limits.get(name)
            rate = q.rate_limit if q is not None else None
            out.append({
                "name": name,
                "pending": c.get("pending", 0), "running": c.get("running", 0),
                "retrying": c.get("retrying", 0), "suspended": c.get("suspended", 0),
                "limit": q.concurrency_limit if q is not None else None,
                "key_limit": q.key_limit if q is not None else None,
                "rate_limit": None if rate is None else {"limit": rate.limit, "period_ms": rate.period_ms},
                "paused": name in paused,
            })
        return web.json_response({"queues": out})

    @ROUTES("GET", "/v1/schedules", "listSchedules", "scheduled tasks and their next tick", {
        200: Reply("the schedules", ScheduleList)}, tags=("queues",))
    async def schedules(self, request: web.Request) -> web.Response:
        now = datetime.now(UTC)
        out = []
        for t in sorted(self.api.registry or (), key=lambda t: t.id):
            sched = t.schedule
            if sched is None:
                continue
            tick = next(iter(sched.ticks_after(now)))
            entry: dict[str, Any] = {
                "task_id": t.id, "schedule": sched.describe(),
                "next_tick": tick.isoformat(), "next_tick_ms": int(tick.timestamp() * 1000),
                "last_run": None,
            }
            if self.store is not None:
                entry["last_run"] = await self.store.last_run(t.id, _TICK_PREFIX)
            out.append(entry)
        return web.json_response({"schedules": out})

    @ROUTES("GET", "/v1/stream", "streamRuns", "Server-Sent Events: `event: run` with a RunSummary per "
            "changed run, `event: resync` when too much changed to send", {
                200: Reply("an endless event stream", media=("text/event-stream",)), 503: NO_QUERY},
            auth="bearer-or-query")
    async def stream(self, request: web.Request) -> web.StreamResponse:
        """`event: run` + a run summary per changed run; `event: resync` when
        too much changed at once to send (reload the list); a keepalive
        comment every 15 s."""
        store = self._store()
        resp = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
        })
        await resp.prepare(request)
        with store.feed.subscribe() as sub:
            self.streams.add(sub)
            try:
                await resp.write(b"retry: 2000\n: connected\n\n")
                while True:
                    try:
                        news = await sub.next(KEEPALIVE_S)
                    except SubscriptionClosed:
                        break
                    if news is None:
                        await resp.write(b": keepalive\n\n")
                        continue
                    runs, overflowed = news
                    chunks = [b"event: resync\ndata: {}\n\n"] if overflowed else []
                    chunks += [b"event: run\ndata: " + json.dumps(s).encode() + b"\n\n" for s in runs]
                    await resp.write(b"".join(chunks))
                    await asyncio.sleep(COALESCE_S)
            except ConnectionResetError:
                pass  # the browser went away
            finally:
                self.streams.discard(sub)
        return resp

    async def on_shutdown(self, app: web.Application) -> None:
        # Open streams would otherwise hold the server's shutdown for its whole timeout.
        for sub in list(self.streams):
            sub.close()


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str)


def add_query_routes(app: web.Application, api: _Api, store: QueryStore | None) -> QueryRoutes:
    routes = QueryRoutes(api, store)
    ROUTES.mount(app, api, routes)
    app.on_shutdown.append(routes.on_shutdown)
    return routes


__all__ = ["ROUTES", "QueryRoutes", "add_query_routes", "run_filter"]
