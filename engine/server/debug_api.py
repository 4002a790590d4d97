"""History as a debugger over HTTP: what the dashboard's time travel, diff
and "why" panels read.

    GET /v1/runs/{id}?as_of=POINT          the run as it stood at POINT (app.py's getRun, through
                                           `state_as_of` here)
    GET /v1/runs/{id}/history?from=&to=    the events between two points (query_api.py)
    GET /v1/runs/{a}/diff/{b}              two runs step by step, the first divergence marked
    GET /v1/runs/{id}/why                  what holds a run back: queue place, holders, rate
                                           limit, pause, wait, TTL, pool

A point is what `stepline runs show --as-of` takes (engine/history/replay.py):
a log offset (inclusive), an ISO-8601 time (UTC unless it names a zone) or a
time back from now (-5m). Every answer is the JSON of the CLI's `--json`.
"""

from __future__ import annotations

from aiohttp import web

from stepline.client import Client
from stepline.errors import UnknownRun
from stepline.history.replay import StateAt, parse_point, state_at
from stepline.projections.diff import diff_runs
from stepline.security.sensitive import shown
from stepline.server._http import Reply, Routes, _Api, _HttpError
from stepline.server.models import DiffPath, RunPath
from stepline.server.openapi import LOG_DOWN, NO_RUN
from stepline.server.responses import RunDiff, RunWhy

ROUTES = Routes()


async def state_as_of(client: Client, run_id: str, point_text: str) -> StateAt:
    """The run folded up to the point; 404 when it did not exist yet then."""
    events = await client.history(run_id)
    if not events:
        raise UnknownRun(run_id)
    try:
        point = parse_point(point_text, client.clock(), name="as_of")
    except ValueError as exc:  # the query model checked it already; kept for direct callers
        raise _HttpError(400, str(exc)) from None
    try:
        return state_at(run_id, events, point)
    except ValueError as exc:
        raise _HttpError(404, str(exc)) from None


class DebugRoutes:
    def __init__(self, api: _Api) -> None:
        self.api = api

    @ROUTES("GET", "/v1/runs/{run_id}/diff/{other_run_id}", "diffRuns",
            "two runs step by step (names, inputs, outputs, errors, durations, versions), the first "
            "divergence marked", {200: Reply("the diff; `same` says whether they differ", RunDiff),
                                  404: "no run with one of the ids on this log", 503: LOG_DOWN},
            params=DiffPath)
    async def diff(self, request: web.Request) -> web.Response:
        client = self.api.client
        a = await client.get_run(request.match_info["run_id"])
        b = await client.get_run(request.match_info["other_run_id"])
        return web.json_response(await shown(diff_runs(a, b).to_dict(), client.keys))

    @ROUTES("GET", "/v1/runs/{run_id}/why", "whyRun",
            "why the run is not running: queue place and the slots' holders, the concurrency key's "
            "holders, the rate limit, a pause, the sleep or wait, the TTL left, the pool",
            {200: Reply("the reasons, most telling first", RunWhy), 404: NO_RUN, 503: LOG_DOWN},
            params=RunPath)
    async def why(self, request: web.Request) -> web.Response:
        run_id = request.match_info["run_id"]
        state = await self.api.client.get_run(run_id)
        reasons = await self.api.client.why(run_id)
        return web.json_response({"run_id": run_id, "task_id": state.task_id, "status": state.status,
                                  "reasons": [r.to_dict() for r in reasons]})


def add_debug_routes(app: web.Application, api: _Api) -> DebugRoutes:
    routes = DebugRoutes(api)
    ROUTES.mount(app, api, routes)
    return routes


__all__ = ["ROUTES", "DebugRoutes", "add_debug_routes", "state_as_of"]
