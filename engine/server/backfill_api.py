"""`POST /v1/subscriptions/{task_id}/backfill`: a retroactive subscription over HTTP.

Body: `{"since": "30d", "until": "2025-01-31T00:00:00Z", "dry_run": true}`
(`since` a duration back from now or an ISO 8601 time; `until` optional,
default now; `dry_run` default false). Answers 200 with the report of
`stepline.backfill` (scanned, matched, existing, to_start, started, run_ids).
Needs the server to know the task's subscriptions (`stepline serve --app`).
"""

from __future__ import annotations

from aiohttp import web

from stepline.client.backfill import backfill
from stepline.errors import TaskDefinitionError
from stepline.server._http import Reply, Routes, _Api, _HttpError
from stepline.server.models import BackfillRequest, TaskPath
from stepline.server.openapi import LOG_DOWN
from stepline.server.responses import BackfillReport

ROUTES = Routes()


class BackfillRoutes:
    def __init__(self, api: _Api) -> None:
        self.api = api

    @ROUTES("POST", "/v1/subscriptions/{task_id}/backfill", "backfillSubscription",
            "start the runs a task's subscriptions would have started in a past window", {
                200: Reply("what was found and started", BackfillReport),
                400: "a bad time or window, a task without subscriptions, or a body that does not fit",
                404: "no task with this id", 409: "this server has no app (`stepline serve --app`)",
                503: LOG_DOWN}, body=BackfillRequest, params=TaskPath, tags=("events",))
    async def backfill(self, request: web.Request, body: BackfillRequest) -> web.Response:
        task_id = request.match_info["task_id"]
        if self.api.registry is None:
            raise _HttpError(409, "this server has no app: start it with --app to backfill subscriptions")
        task = self.api.registry.get(task_id)  # UnknownTask -> 404
        try:
            report = await backfill(task, since=body.since, until=body.until, dry_run=body.dry_run,
                                    client=self.api.client)
        except (ValueError, TaskDefinitionError) as exc:  # a bad time, a task with no subscription
            raise _HttpError(400, str(exc)) from None
        return web.json_response(report.as_dict())


def add_backfill_routes(app: web.Application, api: _Api) -> None:
    ROUTES.mount(app, api, BackfillRoutes(api))


__all__ = ["ROUTES", "BackfillRoutes", "add_backfill_routes"]
