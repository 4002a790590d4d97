"""`POST /v1/subscriptions/{task_id}/backfill`: a retroactive subscription over HTTP.

Body: `{"since": "30d", "until": "2025-01-31T00:00:00Z", "dry_run": true}`
(`since` a duration back from now or an ISO 8601 time; `until` optional,
default now; `dry_run` default false). Answers 200 with the report of
`stepline.backfill` (scanned, matched, existing, to_start, started, run_ids).
Needs the server to know the task's subscriptions (`stepline serve --app`).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stepline.client.backfill import backfill
from stepline.errors import TaskDefinitionError
from stepline.server._http import _Api, _HttpError, _json_object, _read_body

_FIELDS = frozenset({"since", "until", "dry_run"})


def add_backfill_routes(app: web.Application, api: _Api) -> None:
    async def handle(request: web.Request) -> web.Response:
        api.authenticate(request)
        task_id = request.match_info["task_id"]
        if api.registry is None:
            raise _HttpError(409, "this server has no app: start it with --app to backfill subscriptions")
        task = api.registry.get(task_id)  # UnknownTask -> 404
        body: dict[str, Any] = _json_object(await _read_body(request, api.config.max_body_bytes), _FIELDS)
        since, until, dry_run = body.get("since"), body.get("until"), body.get("dry_run", False)
        if not isinstance(since, str) or not since:
            raise _HttpError(400, 'since is required: a duration such as "30d" or an ISO 8601 time')
        if until is not None and not isinstance(until, str):
            raise _HttpError(400, "until must be a duration or an ISO 8601 time, as a string")
        if not isinstance(dry_run, bool):
            raise _HttpError(400, "dry_run must be true or false")
        try:
            report = await backfill(task, since=since, until=until, dry_run=dry_run, client=api.client)
        except (ValueError, TaskDefinitionError) as exc:  # a bad time, a task with no subscription
            raise _HttpError(400, str(exc)) from None
        return web.json_response(report.as_dict())

    app.router.add_post("/v1/subscriptions/{task_id}/backfill", handle)
