"""Operations at fleet scale over HTTP: pauses and bulk actions.

Routes (under the API's bearer token):

    POST /v1/tasks/{task_id}/pause     hold a task's runs (body: {"reason": ...}, optional)
    POST /v1/tasks/{task_id}/resume
    POST /v1/queues/{name}/pause       hold every run of a queue
    POST /v1/queues/{name}/resume
    GET  /v1/pauses                    what is paused
    POST /v1/runs/bulk/cancel          cancel / retry / replay the runs a filter selects
    POST /v1/runs/bulk/retry           (body: {"filter": {...}, "dry_run": true,
    POST /v1/runs/bulk/replay           "request_id": "..."}; see engine/client/bulk.py)

The bulk filter takes the names of `GET /v1/runs`' query parameters (task,
status, tag, from, to, q, dead_letter, parent, error_type), plus `since` and
`until` as durations or ISO 8601 times; it needs the query projection (503
without). The bulk routes are registered before `/v1/runs/{run_id}/...`, so
"bulk" is never read as a run id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from stepline.client.backfill import parse_time
from stepline.client.bulk import ACTIONS, InvalidBulkRequest, bulk_action
from stepline.client.pause import InvalidPause, pauses, set_paused
from stepline.core.events import PAUSE_QUEUE, PAUSE_TASK
from stepline.projections.query_store import QueryStore, RunFilter
from stepline.server._http import H, Reply, Routes, _Api, _HttpError
from stepline.server.models import BulkRequest, PauseRequest, QueuePath, TaskPath
from stepline.server.openapi import LOG_DOWN
from stepline.server.query_api import STATUSES
from stepline.server.responses import BulkReport, PauseList, PauseState

ROUTES = Routes()
# Kept for the command line, whose filter is a dict; over HTTP BulkFilter refuses unknown fields first.
_FILTER_FIELDS = frozenset({"task", "status", "tag", "from", "to", "since", "until", "q", "dead_letter",
                            "parent", "error_type"})
_MAX_MS = 2**63 - 1


def _strings(value: Any, name: str) -> tuple[str, ...]:
    """A string, a comma-separated string or a list of strings; empty items dropped."""
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in items):
        raise InvalidBulkRequest(f"filter.{name} must be a string or a list of strings")
    return tuple(dict.fromkeys(s for v in items for s in (v.split(",") if name == "status" else [v]) if s))


def _opt_str(value: Any, name: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidBulkRequest(f"filter.{name} must be a string")
    return value


def _ms(value: Any, name: str) -> int | None:
    """from / to: milliseconds since the Unix epoch."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # JSON has one number type: 5.0 is 5
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_MS:
        raise InvalidBulkRequest(f"filter.{name} must be milliseconds since the Unix epoch, got {value!r}")
    return value


def _when(value: Any, name: str, now: int) -> int | None:
    """since / until: a duration back from now (24h, 7d) or an ISO 8601 time."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidBulkRequest(f"filter.{name} must be a duration (24h) or an ISO 8601 time, got {value!r}")
    try:
        ms = parse_time(value, now, f"filter.{name}")
    except ValueError as exc:
        raise InvalidBulkRequest(str(exc)) from None
    return max(0, ms)


def parse_filter(doc: Any, now: int) -> RunFilter:
    """A bulk request's `filter` object as the run list's RunFilter; InvalidBulkRequest when malformed."""
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InvalidBulkRequest("filter must be a JSON object")
    unknown = sorted(set(doc) - _FILTER_FIELDS)
    if unknown:
        raise InvalidBulkRequest(f"unknown filter field(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(_FILTER_FIELDS))}")
    statuses = _strings(doc.get("status"), "status")
    bad = sorted(set(statuses) - STATUSES)
    if bad:
        raise InvalidBulkRequest(f"unknown status {', '.join(map(repr, bad))}; one of {', '.join(sorted(STATUSES))}")
    dead = doc.get("dead_letter")
    if dead is not None and not isinstance(dead, bool):
        raise InvalidBulkRequest("filter.dead_letter must be true, false or null")
    # Both forms of a bound may be given: each narrows the window.
    starts = [v for v in (_ms(doc.get("from"), "from"), _when(doc.get("since"), "since", now)) if v is not None]
    ends = [v for v in (_ms(doc.get("to"), "to"), _when(doc.get("until"), "until", now)) if v is not None]
    return RunFilter(
        task=_opt_str(doc.get("task"), "task"),
        statuses=statuses,
        tags=_strings(doc.get("tag"), "tag"),
        created_from=max(starts) if starts else None,
        created_to=min(ends) if ends else None,
        text=_opt_str(doc.get("q"), "q"),
        dead_letter=dead,
        parent=_opt_str(doc.get("parent"), "parent"),
        error_type=_opt_str(doc.get("error_type"), "error_type"),
    )


def _pause_replies(kind: str) -> dict[int, str | Reply]:
    return {200: Reply("recorded on every partition", PauseState),
            404: f"no {kind} of this name (when the server knows the app's tasks)", 503: LOG_DOWN}


def _bulk(action: str) -> Callable[[H], H]:
    assert action in ACTIONS
    return ROUTES("POST", f"/v1/runs/bulk/{action}", f"bulk{action.capitalize()}",
                  f"{action} every run a filter selects, or count them (dry_run)", {
                      200: Reply("what was (or would be) done", BulkReport),
                      503: "this server keeps no query projection, or the log cannot be written"},
                  body=BulkRequest, body_required=False)


class OpsRoutes:
    def __init__(self, api: _Api, store: QueryStore | None) -> None:
        self.api = api
        self.store = store

    async def _pause(self, scope: str, name: str, paused: bool, reason: str = "") -> web.Response:
        try:
            await set_paused(self.api.client, scope, name, paused, reason=reason, requested_by="api")
        except InvalidPause as exc:
            raise _HttpError(404, str(exc)) from None  # a blank or unknown name names nothing
        return web.json_response({"scope": scope, "name": name, "paused": paused, "reason": reason})

    # A resume takes no body: there is nothing to say about it.
    @ROUTES("POST", "/v1/tasks/{task_id}/pause", "pauseTask",
            "pause a task: its runs stay queued, attempts under way finish", _pause_replies("task"),
            body=PauseRequest, body_required=False, params=TaskPath, tags=("queues",))
    async def pause_task(self, request: web.Request, body: PauseRequest) -> web.Response:
        return await self._pause(PAUSE_TASK, request.match_info["task_id"], True, body.reason)

    @ROUTES("POST", "/v1/tasks/{task_id}/resume", "resumeTask",
            "resume a task: its held runs start in their usual order", _pause_replies("task"),
            params=TaskPath, tags=("queues",))
    async def resume_task(self, request: web.Request) -> web.Response:
        return await self._pause(PAUSE_TASK, request.match_info["task_id"], False)

    @ROUTES("POST", "/v1/queues/{name}/pause", "pauseQueue",
            "pause a queue: its runs stay queued, attempts under way finish", _pause_replies("queue"),
            body=PauseRequest, body_required=False, params=QueuePath, tags=("queues",))
    async def pause_queue(self, request: web.Request, body: PauseRequest) -> web.Response:
        return await self._pause(PAUSE_QUEUE, request.match_info["name"], True, body.reason)

    @ROUTES("POST", "/v1/queues/{name}/resume", "resumeQueue",
            "resume a queue: its held runs start in their usual order", _pause_replies("queue"),
            params=QueuePath, tags=("queues",))
    async def resume_queue(self, request: web.Request) -> web.Response:
        return await self._pause(PAUSE_QUEUE, request.match_info["name"], False)

    @ROUTES("GET", "/v1/pauses", "listPauses", "paused tasks and queues", {200: Reply("what is paused", PauseList)},
            tags=("queues",))
    async def list_pauses(self, request: web.Request) -> web.Response:
        """From the query projection when the server keeps one, else read from the log."""
        if self.store is not None:
            found = await self.store.pauses()
            out = [{k: p[k] for k in ("scope", "name", "since", "reason", "requested_by")} for p in found]
        else:
            out = [{"scope": b.scope, "name": b.name, "since": None, "reason": b.reason,
                    "requested_by": b.requested_by} for b in (await pauses(self.api.client)).values()]
        return web.json_response({"pauses": out})

    @_bulk("replay")
    @_bulk("retry")
    @_bulk("cancel")
    async def bulk(self, request: web.Request, body: BulkRequest) -> web.Response:
        action = request.path.rsplit("/", 1)[-1]
        if self.store is None:
            raise _HttpError(503, "bulk actions select runs from the query projection, and this server has "
                                  "none: `stepline serve` keeps one (--query-db)")
        try:
            doc = None if body.filter is None else body.filter.model_dump(by_alias=True, exclude_unset=True)
            where = parse_filter(doc, self.api.client.clock())
            report = await bulk_action(self.api.client, self.store, action, where, dry_run=body.dry_run,
                                       request_id=body.request_id, requested_by="api")
        except InvalidBulkRequest as exc:
            raise _HttpError(400, str(exc)) from None
        return web.json_response(report.as_dict())


def add_ops_routes(app: web.Application, api: _Api, store: QueryStore | None) -> OpsRoutes:
    routes = OpsRoutes(api, store)
    ROUTES.mount(app, api, routes)
    return routes


__all__ = ["ROUTES", "OpsRoutes", "add_ops_routes", "parse_filter"]
