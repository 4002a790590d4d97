"""The read side of the HTTP API: lists for the dashboard, fed by the query projection.

Routes (all under the API's bearer token; `/v1/stream` also takes it as
`?token=`, since a browser's EventSource cannot send headers):

    GET  /v1/runs                  runs, newest first, filtered, keyset-paged
    GET  /v1/runs/{id}/history     every event of a run (read from the log)
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
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from stepline.errors import UnknownRun
from stepline.projections.query_store import InvalidCursor, Page, QueryStore, RunFilter, SubscriptionClosed
from stepline.projections.runs import LIVE, TERMINAL
from stepline.projections.views import event_dict
from stepline.sdk.schedule import tick_key
from stepline.security.sensitive import shown
from stepline.server._http import _Api, _HttpError, _json_object, _read_body

STATUSES = frozenset(LIVE | TERMINAL)
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
KEEPALIVE_S = 15.0
# A run changing many times in a burst is sent at most once per this window.
COALESCE_S = 0.1
_RETRY_FIELDS = frozenset({"payload"})
# Far more digits than any bound here, and far fewer than int()'s 4300-digit limit.
_INTEGER = re.compile(r"-?[0-9]{1,40}")
_PAGE_PARAMS = frozenset({"limit", "cursor"})
_RUN_PARAMS = _PAGE_PARAMS | {"task", "status", "tag", "from", "to", "q", "dead_letter", "parent", "error_type"}
# "stepline/tick/": the idempotency keys of schedule ticks, from their one definition.
_TICK_PREFIX = tick_key(datetime.fromtimestamp(0, UTC)).removesuffix("0")


def _int(request: web.Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    # ASCII digits only: int() also takes " 7", "1_000" and "٣", which no client means.
    value = int(raw) if _INTEGER.fullmatch(raw) else lo - 1
    if not lo <= value <= hi:
        raise _HttpError(400, f"{name} must be an integer from {lo} to {hi}, got {raw!r}")
    return value


def _bool(request: web.Request, name: str) -> bool | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if raw.lower() in ("true", "1", "yes"):
        return True
    if raw.lower() in ("false", "0", "no"):
        return False
    raise _HttpError(400, f"{name} must be true or false, got {raw!r}")


def _known_params(request: web.Request, known: frozenset[str]) -> None:
    # A misspelt filter (?stauts=failed) silently ignored would list everything.
    unknown = sorted(set(request.query) - known)
    if unknown:
        raise _HttpError(400, f"unknown query parameter(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")


def _statuses(request: web.Request) -> tuple[str, ...]:
    # An empty value is no filter; inside a list, every item must be a status.
    given = [s for raw in request.query.getall("status", []) if raw for s in raw.split(",")]
    unknown = sorted(set(given) - STATUSES)
    if unknown:
        raise _HttpError(400, f"unknown status {', '.join(map(repr, unknown))}; "
                              f"one of {', '.join(sorted(STATUSES))}")
    return tuple(dict.fromkeys(given))


def run_filter(request: web.Request) -> RunFilter:
    """The filter of `GET /v1/runs` from its query string."""
    _known_params(request, _RUN_PARAMS)
    q = request.query
    ms = 2**63 - 1
    return RunFilter(
        task=q.get("task") or None,
        statuses=_statuses(request),
        tags=tuple(dict.fromkeys(t for t in q.getall("tag", []) if t)),
        created_from=_int(request, "from", None, 0, ms),
        created_to=_int(request, "to", None, 0, ms),
        text=q.get("q") or None,
        dead_letter=_bool(request, "dead_letter"),
        parent=q.get("parent") or None,
        error_type=q.get("error_type") or None,
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

    def _limit(self, request: web.Request) -> int:
        value = _int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        assert value is not None
        return value

    async def _page(self, coro: Any) -> Page:
        try:
            page: Page = await coro
        except InvalidCursor as exc:
            raise _HttpError(400, str(exc)) from None
        return page

    async def list_runs(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        store = self._store()
        where = run_filter(request)
        page = await self._page(store.list_runs(where, self._limit(request), request.query.get("cursor")))
        return web.json_response(_page_json(page, "runs"))

    async def children(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        store = self._store()
        _known_params(request, _PAGE_PARAMS)
        where = RunFilter(parent=request.match_info["run_id"])
        page = await self._page(store.list_runs(where, self._limit(request), request.query.get("cursor")))
        return web.json_response(_page_json(page, "runs"))

    async def history(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        run_id = request.match_info["run_id"]
        events = await self.api.client.history(run_id)
        if not events:
            raise UnknownRun(run_id)
        rows = await shown([event_dict(off, ev) for off, ev in events], self.api.client.keys)
        return web.json_response({"run_id": run_id, "events": rows}, dumps=_dumps)

    async def retry(self, request: web.Request) -> web.Response:
        """Re-trigger a failed (dead-lettered) or cancelled run; `{"payload": ...}` replaces its payload."""
        self.api.authenticate(request)
        run_id = request.match_info["run_id"]
        raw = await _read_body(request, self.api.config.max_body_bytes)
        body = _json_object(raw, _RETRY_FIELDS) if raw.strip() else {}
        was = await self.api.client.retry(run_id, body.get("payload"), new_payload="payload" in body)
        return web.json_response({"run_id": run_id, "retriggered": True, "was": was.status,
                                  "new_payload": "payload" in body}, status=202)

    async def forget(self, request: web.Request) -> web.Response:
        """Erase a subject (GDPR): delete its key, so its sensitive fields read as "[erased]"."""
        self.api.authenticate(request)
        subject = request.match_info["subject"]
        kids = await self.api.client.forget(subject)
        return web.json_response({"subject": subject, "erased": bool(kids), "keys_deleted": len(kids)})

    async def events(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
        store = self._store()
        _known_params(request, _PAGE_PARAMS | {"name"})
        name = request.query.get("name") or None
        page = await self._page(store.list_events(name, self._limit(request), request.query.get("cursor")))
        return web.json_response(_page_json(page, "events"))

    async def queues(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
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

    async def schedules(self, request: web.Request) -> web.Response:
        self.api.authenticate(request)
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

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """`event: run` + a run summary per changed run; `event: resync` when
        too much changed at once to send (reload the list); a keepalive
        comment every 15 s."""
        self.api.authenticate(request, query_token=True)
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
    app.router.add_get("/v1/runs", routes.list_runs)
    app.router.add_get("/v1/runs/{run_id}/history", routes.history)
    app.router.add_get("/v1/runs/{run_id}/children", routes.children)
    app.router.add_post("/v1/runs/{run_id}/retry", routes.retry)
    app.router.add_get("/v1/events", routes.events)
    app.router.add_get("/v1/queues", routes.queues)
    app.router.add_get("/v1/schedules", routes.schedules)
    app.router.add_get("/v1/stream", routes.stream)
    app.router.add_delete("/v1/subjects/{subject}", routes.forget)
    app.on_shutdown.append(routes.on_shutdown)
    return routes


__all__ = ["QueryRoutes", "add_query_routes", "run_filter"]
