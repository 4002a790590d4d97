"""The OpenAPI 3.1 description of `stepline serve`, served at `GET /v1/openapi.json`.

Built here as a dict, next to the code it describes, rather than kept as a
YAML file that drifts: tests/test_openapi.py fails when a route of
`create_app` is missing from it or it names a route that does not exist,
and tests/test_api_fuzz.py sends what schemathesis generates from it to a
real server and checks every answer against it.

The description is unauthenticated, like `/v1/info`: it holds no data, and a
client needs it to learn how to authenticate. It names no webhook source
(those are configuration) and no task (the payload schema of
`/v1/tasks/{task_id}/trigger` is any JSON; a task's own model answers 422).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from stepline.version import __version__

SPEC_PATH = "/v1/openapi.json"

# Mirrors of the server's limits; tests/test_openapi.py pins each to its source.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
MAX_DELAY_S = 100 * 365 * 24 * 3600
MAX_LIMIT = 500
MAX_MS = 2**63 - 1
STATUSES = ("pending", "running", "suspended", "retrying", "completed", "failed", "cancelled", "expired")

# Python's str.isspace(), spelled out: `\s` means less in JSON Schema's regex dialect.
SPACE = r"\t\n\v\f\r\x1c-\x20\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"

Schema = dict[str, Any]

_ANY: Schema = {"description": "any JSON value"}
_MS: Schema = {"type": "integer", "description": "milliseconds since the Unix epoch"}


def _nullable(schema: Schema) -> Schema:
    kind = schema["type"]
    return {**schema, "type": [kind, "null"]}


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _obj(required: list[str], **properties: Schema) -> Schema:
    return {"type": "object", "required": required, "properties": properties}


def _request(name: str) -> Schema:
    """A closed object: the server refuses unknown fields, so a misspelt option never passes silently."""
    return {"type": "object", "additionalProperties": False, **_SCHEMAS_REQUEST[name]}


# --- schemas -------------------------------------------------------------------------


# A point in time as engine/client/backfill.py parses it.
_WHEN: Schema = {"anyOf": [{"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[smhdw]\s*$"},
                           {"type": "string", "format": "date-time"}]}

# A status, or several separated by commas; empty is no filter.
_STATUS_LIST: Schema = {"type": "string", "pattern": f"^$|^({'|'.join(STATUSES)})(,({'|'.join(STATUSES)}))*$"}

_SCHEMAS_REQUEST: dict[str, Schema] = {
    "TriggerRequest": {"properties": {
        "payload": {**_ANY, "description": "the task's input; checked against its model (422)"},
        "idempotency_key": {**_nullable({"type": "string", "minLength": 1}),
                            "description": "a repeated trigger with the same key and payload is the same run; "
                                           "the key with another payload is refused (409)"},
        "delay": {**_nullable({"type": "number", "minimum": 0, "maximum": MAX_DELAY_S}),
                  "description": "seconds before the run may start"},
        "ttl": {**_nullable({"type": "number", "minimum": 0, "maximum": MAX_DELAY_S}),
                "description": "seconds the run may wait to start before it expires"},
        "priority": {"type": "integer", "minimum": PRIORITY_MIN, "maximum": PRIORITY_MAX, "default": 0},
        "tags": {"type": "array", "items": {"type": "string"}, "default": []},
        "concurrency_key": _nullable({"type": "string", "minLength": 1}),
    }},
    "PublishRequest": {"required": ["name"], "properties": {
        # What client.check_event_name accepts: no whitespace, no leading or trailing dot.
        "name": {"type": "string", "pattern": f"^[^{SPACE}.](?:[^{SPACE}]*[^{SPACE}.])?$",
                 "examples": ["user.created"]},
        "data": _ANY,
        "key": {**_nullable({"type": "string", "minLength": 1}),
                "description": "partitioning key: events with one key stay in order"},
    }},
    "CompleteTokenRequest": {"properties": {"data": {**_ANY, "description": "what wait_for_token returns"}}},
    "RetryRequest": {"properties": {"payload": {**_ANY, "description": "replaces the run's payload"}}},
    "ForkRequest": {"required": ["at_step"], "properties": {
        "at_step": {"type": "integer", "description": "the first journal position to run live"},
        "payload": {**_ANY, "description": "replaces the payload"},
        "step_outputs": {"type": ["object", "null"], "propertyNames": {"pattern": "^[0-9]+$"},
                         "description": "recorded outputs to replace, by step position"},
        "idempotency_key": _nullable({"type": "string", "minLength": 1}),
    }},
    "PauseRequest": {"properties": {"reason": {"type": "string", "description": "shown with the pause"}}},
    "BulkRequest": {"properties": {
        "filter": {"type": ["object", "null"], "additionalProperties": False,
                   "description": "the runs list's filter (`GET /v1/runs` parameter names); since/until "
                                  "take a duration (24h) or an ISO 8601 time, from/to milliseconds",
                   "properties": {
                       "task": _nullable({"type": "string"}),
                       "status": {"anyOf": [_STATUS_LIST, {"type": "array", "items": _STATUS_LIST},
                                            {"type": "null"}]},
                       "tag": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                                         {"type": "null"}]},
                       "from": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_MS}),
                       "to": _nullable({"type": "integer", "minimum": 0, "maximum": MAX_MS}),
                       "since": {"anyOf": [_WHEN, {"type": "null"}]},
                       "until": {"anyOf": [_WHEN, {"type": "null"}]},
                       "q": _nullable({"type": "string"}), "dead_letter": _nullable({"type": "boolean"}),
                       "parent": _nullable({"type": "string"}), "error_type": _nullable({"type": "string"}),
                   }},
        "dry_run": {"type": "boolean", "default": False, "description": "count, act on nothing"},
        "request_id": {**_nullable({"type": "string", "pattern": r"\S", "maxLength": 200}),
                       "description": "repeat it to repeat the request: no run is acted on twice"},
    }},
    "ShadowRequest": {"properties": {"module": {**_nullable({"type": "string", "minLength": 1}),
                                                "description": "as ?module="}}},
    "BackfillRequest": {"required": ["since"], "properties": {
        "since": {**_WHEN, "examples": ["30d", "2025-01-01T00:00:00Z"],
                  "description": "a duration back from now (30d, 12h, 15m, 90s, 2w), or an ISO 8601 time"},
        "until": {"anyOf": [_WHEN, {"type": "null"}], "description": "as since; default now"},
        "dry_run": {"type": "boolean", "default": False, "description": "count, start nothing"},
    }},
}

_ERROR_INFO = _obj(["type", "message", "stack"], type={"type": "string"}, message={"type": "string"},
                   stack={"type": "string"})

_RUN_SUMMARY = _obj(
    ["run_id", "task_id", "status", "dead_lettered", "priority", "tags", "created_at", "updated_at"],
    run_id={"type": "string"}, task_id={"type": "string"}, status=_ref("RunStatus"),
    dead_lettered={"type": "boolean"}, priority={"type": "integer"},
    tags={"type": "array", "items": {"type": "string"}},
    created_at=_MS, updated_at=_MS, started_at=_nullable(_MS), ended_at=_nullable(_MS),
    attempt={"type": "integer"}, queue=_nullable({"type": "string"}),
    concurrency_key=_nullable({"type": "string"}), parent_run_id=_nullable({"type": "string"}),
    idempotency_key=_nullable({"type": "string"}), error_type=_nullable({"type": "string"}),
    error_message=_nullable({"type": "string"}),
    paused={"type": "boolean", "description": "queued behind a paused task or queue (in lists only)"},
)

_STEP = _obj(
    ["step", "name", "status", "attempt"],
    step={"type": "integer"}, name={"type": "string"},
    status={"type": "string", "examples": ["running", "completed", "failed", "waiting", "resolved"]},
    attempt={"type": "integer"}, started_at=_nullable(_MS), ended_at=_nullable(_MS),
    input=_ANY, output=_ANY, error=_nullable({"type": "string"}), wake_at=_nullable(_MS),
    condition={**_ANY, "description": "a wait's wake condition, as recorded"},
)

_RUN_STATE = _obj(
    ["run_id", "task_id", "status", "dead_lettered", "attempt", "created_at", "updated_at", "priority",
     "tags", "payload", "steps", "errors", "retries", "logs"],
    run_id={"type": "string"}, task_id={"type": "string"}, status=_ref("RunStatus"),
    dead_lettered={"type": "boolean"},
    attempt={"type": "integer", "description": "the latest attempt, counted over the run's whole life as on its events and steps: a retriggered dead letter goes on from its last attempt"},
    created_at=_MS, updated_at=_MS, ended_at=_nullable(_MS), priority={"type": "integer"},
    tags={"type": "array", "items": {"type": "string"}}, idempotency_key=_nullable({"type": "string"}),
    payload=_ANY, output=_ANY, error={"oneOf": [_ERROR_INFO, {"type": "null"}]},
    wake_at=_nullable(_MS), retry_at=_nullable(_MS), started_at=_nullable(_MS), expires_at=_nullable(_MS),
    queue=_nullable({"type": "string"}), concurrency_key=_nullable({"type": "string"}),
    parent_run_id=_nullable({"type": "string"}), parent_step=_nullable({"type": "integer"}),
    errors={"type": "array", "items": _obj(
        ["attempt", "time", "type", "message"], attempt={"type": "integer"}, step=_nullable({"type": "integer"}),
        step_name=_nullable({"type": "string"}), time=_MS, type={"type": "string"},
        message={"type": "string"}, stack={"type": "string"})},
    steps={"type": "array", "items": _ref("Step")},
    retries={"type": "array", "items": _obj(
        ["attempt", "retry_at", "delay_ms", "reason"], attempt={"type": "integer"}, retry_at=_MS,
        delay_ms={"type": "integer"}, reason={"type": "string"})},
    logs={"type": "array", "items": _obj(
        ["time", "level", "message", "attempt"], time=_MS, level={"type": "string"},
        message={"type": "string"}, attempt={"type": "integer"}, step=_nullable({"type": "integer"}),
        fields={"type": "object"})},
    logs_dropped={"type": "integer"},
)

_SCHEMAS: dict[str, Schema] = {
    "Error": {**_obj(["error"], error={"type": "string", "description": "what was wrong and what to do"}),
              "description": "every error answer, whatever its status"},
    "RunStatus": {"type": "string", "enum": list(STATUSES)},
    "RunSummary": _RUN_SUMMARY,
    "RunState": _RUN_STATE,
    "Step": _STEP,
    "RunPage": _obj(
        ["runs", "next_cursor"], runs={"type": "array", "items": _ref("RunSummary")},
        next_cursor={**_nullable({"type": "string"}), "description": "pass as ?cursor= for the next page"},
        total_estimate={"type": "integer", "description": "only on an unfiltered first page"}),
    "DomainEvent": _obj(
        ["event_id", "name", "time", "partition", "offset", "runs"],
        event_id={"type": "string"}, name={"type": "string"}, key=_nullable({"type": "string"}),
        source=_nullable({"type": "string"}), time=_MS, data=_ANY, partition={"type": "integer"},
        offset={"type": "integer"}, runs={"type": "array", "items": _ref("RunSummary")}),
    "EventPage": _obj(["events", "next_cursor"], events={"type": "array", "items": _ref("DomainEvent")},
                      next_cursor=_nullable({"type": "string"})),
    "HistoryEvent": _obj(
        ["offset", "time", "type", "seq", "epoch", "run_id", "task_id", "body"],
        offset={"type": "integer"}, time=_MS, type={"type": "string", "examples": ["RunTriggered"]},
        seq={"type": "integer"}, epoch={"type": "integer"}, run_id={"type": "string"},
        task_id={"type": "string"}, body={"type": "object", "description": "the event's fields"}),
    "Queue": _obj(
        ["name", "pending", "running", "retrying", "suspended"], name={"type": "string"},
        pending={"type": "integer"}, running={"type": "integer"}, retrying={"type": "integer"},
        suspended={"type": "integer"}, limit=_nullable({"type": "integer"}),
        key_limit=_nullable({"type": "integer"}),
        rate_limit={"oneOf": [_obj(["limit", "period_ms"], limit={"type": "integer"},
                                   period_ms={"type": "integer"}), {"type": "null"}]},
        paused={"type": "boolean"}),
    "Pause": _obj(["scope", "name", "reason"], scope={"type": "string", "enum": ["task", "queue"]},
                  name={"type": "string"}, since=_nullable(_MS), reason={"type": "string"},
                  requested_by={"type": "string"}),
    "BulkReport": _obj(
        ["action", "request_id", "dry_run", "filter", "matched", "acted", "skipped", "skipped_total", "sample"],
        action={"type": "string", "enum": ["cancel", "retry", "replay"]}, request_id={"type": "string"},
        dry_run={"type": "boolean"},
        filter={"type": "object", "description": "the filter applied; `to` pinned to the request's time"},
        matched={"type": "integer"}, acted={"type": "integer", "description": "on a dry run: would act"},
        skipped={"type": "object", "additionalProperties": {"type": "integer"},
                 "description": "runs skipped, by reason (e.g. `already completed`)"},
        skipped_total={"type": "integer"},
        sample={"type": "array", "items": {"type": "string"},
                "description": "the first run ids acted on (for replays, the new runs)"}),
    "Schedule": _obj(
        ["task_id", "schedule", "next_tick", "next_tick_ms"], task_id={"type": "string"},
        schedule={"type": "string", "examples": ["cron 0 3 * * * Europe/Berlin"]},
        next_tick={"type": "string", "format": "date-time"}, next_tick_ms=_MS,
        last_run={"oneOf": [_ref("RunSummary"), {"type": "null"}]}),
    **{name: _request(name) for name in _SCHEMAS_REQUEST},
}


# --- operations ----------------------------------------------------------------------


def _error(description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref("Error")}}}


def _json(description: str, schema: Schema, **extra: Any) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}, **extra}


_UNAUTHORIZED = {**_error("no token, or not the API token"),
                 "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}}
_TOO_LARGE = _error("the body is larger than the server's limit (max_body_bytes), or the payload is "
                    "larger than the client's (STEPLINE_MAX_PAYLOAD_BYTES)")
_LOG_DOWN = _error("the log cannot be reached or written; retry later")
_NO_RUN = _error("no run with this id on this log")
_NO_QUERY = _error("this server keeps no query projection (`stepline serve --query-db`)")
_BAD_JSON = "the body is not a JSON object of the listed fields, or a field is out of range"


def _path(name: str, description: str, **schema: Any) -> Schema:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": {"type": "string", **schema}}


def _query(name: str, description: str, schema: Schema, **extra: Any) -> Schema:
    return {"name": name, "in": "query", "required": False, "description": description, "schema": schema,
            **extra}


_RUN_ID = _path("run_id", "a run id, e.g. from a trigger's answer", examples=["run_0123456789abcdef"])
_LIMIT = _query("limit", "items per page", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT,
                                            "default": 50})
_CURSOR = _query("cursor", "`next_cursor` of the previous page (opaque); an empty value is the first page",
                 {"type": "string", "pattern": "^[A-Za-z0-9_-]*$"})


def _op(op_id: str, summary: str, responses: dict[str, Schema], *, auth: bool = True,
        body: tuple[str, bool] | None = None, params: list[Schema] | None = None,
        tags: tuple[str, ...] = ("runs",), **extra: Any) -> Schema:
    """One operation; an authenticated one also answers 401, one that reads a body 400 and 413."""
    out: Schema = {"operationId": op_id, "summary": summary, "tags": list(tags)}
    if params:
        out["parameters"] = params
    all_responses = dict(responses)
    if body is not None:
        name, required = body
        out["requestBody"] = {"required": required,
                              "content": {"application/json": {"schema": _ref(name)}}}
        all_responses.setdefault("400", _error(_BAD_JSON))
        all_responses["413"] = _TOO_LARGE
    if auth:
        all_responses["401"] = _UNAUTHORIZED
    else:
        out["security"] = []
    out["responses"] = dict(sorted(all_responses.items()))
    out.update(extra)
    return out


def _get_run_link() -> Schema:
    """The link from an answer's run_id to getRun."""
    return {"GetRun": {"operationId": "getRun", "parameters": {"run_id": "$response.body#/run_id"}}}


def _meta_paths() -> dict[str, dict[str, Schema]]:
    """The process, the API and this description: no token needed."""
    return {
        "/healthz": {"get": _op("healthz", "the process is up", {
            "200": _json("always", _obj(["ok"], ok={"type": "boolean", "const": True}))},
            auth=False, tags=("meta",))},
        "/readyz": {"get": _op("readyz", "the log answers: ready for traffic", {
            "200": _json("the log answered", _obj(["ready"], ready={"type": "boolean", "const": True})),
            "503": _error("the log did not answer in time, or failed (`error` says which)")},
            auth=False, tags=("meta",))},
        "/metrics": {"get": _op("metrics", "Prometheus metrics (text format; docs/operations.md, \"Metrics\")", {
            "200": {"description": "the Prometheus text exposition format", "content": {
                "text/plain": {"schema": {"type": "string"}}}}}, auth=False, tags=("meta",))},
        "/v1/info": {"get": _op("info", "whether the API wants a token, and the version", {
            "200": _json("always", _obj(["auth", "version"], auth={"type": "boolean"},
                                        version={"type": "string"}))}, auth=False, tags=("meta",))},
        SPEC_PATH: {"get": _op("openapi", "this description", {
            "200": _json("the OpenAPI document", {"type": "object"})}, auth=False, tags=("meta",))},
    }


def _run_paths() -> dict[str, dict[str, Schema]]:
    """Trigger and publish, then read, list, cancel and retry runs."""
    run_page = _json("runs, newest first", _ref("RunPage"))
    return {
        "/v1/tasks/{task_id}/trigger": {"post": _op(
            "triggerTask", "start a run of a task", {
                "202": _json("the run is recorded (or was already, for a repeated idempotency key)",
                             _obj(["run_id", "task_id"], run_id={"type": "string"}, task_id={"type": "string"}),
                             headers={"Location": {"schema": {"type": "string"},
                                                   "description": "/v1/runs/{run_id}"}},
                             links=_get_run_link()),
                "404": _error("no task with this id (when the server knows the app's tasks)"),
                "409": _error("the idempotency key already started a run with another payload; "
                              "nothing was recorded"),
                "422": _error("the payload does not fit the task's model"),
                "503": _LOG_DOWN},
            body=("TriggerRequest", True), params=[_path("task_id", "the task's id", examples=["charge"])])},
        "/v1/events": {
            "post": _op("publishEvent", "publish a domain event to its subscribers", {
                "202": _json("the event is on the log", _obj(["event_id"], event_id={"type": "string"})),
                "503": _LOG_DOWN}, body=("PublishRequest", True), tags=("events",)),
            "get": _op("listEvents", "domain events, newest first, with the runs each started", {
                "200": _json("a page of events", _ref("EventPage")),
                "400": _error("a query parameter is out of range, or the cursor is not one this API gave"),
                "503": _NO_QUERY},
                params=[_query("name", "only events of this name", {"type": "string"}), _LIMIT, _CURSOR],
                tags=("events",)),
        },
        "/v1/runs": {"get": _op("listRuns", "runs, newest first, filtered, a page at a time", {
            "200": run_page,
            "400": _error("a filter is malformed or out of range, or the cursor is not one this API gave"),
            "503": _NO_QUERY}, params=[
                _query("task", "only runs of this task", {"type": "string"}),
                _query("status", "only runs in these states (repeat it, or separate them by commas)",
                       {"type": "array", "items": {"type": "string", "pattern":
                        f"^$|^({'|'.join(STATUSES)})(,({'|'.join(STATUSES)}))*$"}}, style="form", explode=True),
                _query("tag", "only runs with every one of these tags", {"type": "array",
                       "items": {"type": "string"}}, style="form", explode=True),
                _query("from", "created at or after (ms)", {"type": "integer", "minimum": 0, "maximum": MAX_MS}),
                _query("to", "created before (ms)", {"type": "integer", "minimum": 0, "maximum": MAX_MS}),
                _query("q", "text in the payload or output", {"type": "string"}),
                _query("dead_letter", "only dead-lettered runs (true) or only others (false)",
                       {"type": "boolean"}),
                _query("parent", "only runs started by this run", {"type": "string"}),
                _query("error_type", "only runs whose last error has this type, e.g. TimeoutError",
                       {"type": "string"}),
                _LIMIT, _CURSOR])},
        "/v1/runs/{run_id}": {"get": _op("getRun", "a run's state: steps, outputs, errors, retries, logs", {
            "200": _json("the run", _ref("RunState")), "404": _NO_RUN, "503": _LOG_DOWN}, params=[_RUN_ID])},
        "/v1/runs/{run_id}/history": {"get": _op("getRunHistory", "every event of a run, in order", {
            "200": _json("the run's events", _obj(["run_id", "events"], run_id={"type": "string"},
                                                  events={"type": "array", "items": _ref("HistoryEvent")})),
            "404": _NO_RUN, "503": _LOG_DOWN}, params=[_RUN_ID])},
        "/v1/runs/{run_id}/children": {"get": _op("listChildRuns", "runs the run started", {
            "200": run_page, "400": _error("the cursor is not one this API gave, or limit is out of range"),
            "503": _NO_QUERY}, params=[_RUN_ID, _LIMIT, _CURSOR])},
        "/v1/runs/{run_id}/cancel": {"post": _op("cancelRun", "stop a run; a running step is cancelled at once", {
            "202": _json("the run is cancelled", _obj(["run_id", "cancelled", "was"], run_id={"type": "string"},
                                                      cancelled={"type": "boolean", "const": True},
                                                      was=_ref("RunStatus"))),
            "404": _NO_RUN, "409": _error("the run has already ended"), "503": _LOG_DOWN}, params=[_RUN_ID])},
        "/v1/runs/{run_id}/retry": {"post": _op(
            "retryRun", "re-trigger a failed or cancelled run from its last completed step", {
                "202": _json("the run is re-triggered", _obj(
                    ["run_id", "retriggered", "was", "new_payload"], run_id={"type": "string"},
                    retriggered={"type": "boolean", "const": True}, was=_ref("RunStatus"),
                    new_payload={"type": "boolean"})),
                "404": _NO_RUN, "409": _error("the run is neither failed nor cancelled"),
                "422": _error("the new payload does not fit the task's model"), "503": _LOG_DOWN},
            body=("RetryRequest", False), params=[_RUN_ID])},
    }


def _branch_paths() -> dict[str, dict[str, Schema]]:
    """Forks, shadows and wait tokens: a run taken from its history or resumed."""
    return {
        "/v1/runs/{run_id}/fork": {"post": _op(
            "forkRun", "a new run replaying this one's journal up to a step, then running live", {
                "202": _json("the fork is triggered", _obj(
                    ["run_id", "task_id", "forked_from", "at_step"], run_id={"type": "string"},
                    task_id={"type": "string"}, forked_from={"type": "string"}, at_step={"type": "integer"}),
                    headers={"Location": {"schema": {"type": "string"}}}, links=_get_run_link()),
                "400": _error("at_step or step_outputs do not fit the run's journal, or " + _BAD_JSON),
                "404": _NO_RUN, "409": _error("the run cannot be forked in its state"),
                "422": _error("the new payload does not fit the task's model"), "503": _LOG_DOWN},
            body=("ForkRequest", True), params=[_RUN_ID])},
        "/v1/runs/{run_id}/shadow": {
            method: _op(f"shadowRun{method.capitalize()}", "replay a run against code (the server's app, or "
                        "?module= under --shadow-path) and show where it diverges", {
                "200": _json("the shadow diff", {"type": "object"}),
                "400": _error("the module cannot be loaded, or " + _BAD_JSON),
                "403": _error("modules are refused: the server runs without a token or without "
                              "--shadow-path"),
                "404": _NO_RUN, "409": _error("the server has no app code"), "503": _LOG_DOWN},
                body=("ShadowRequest", False) if method == "post" else None,
                params=[_RUN_ID, _query("module", "a dotted module name under --shadow-path",
                                        {"type": "string"})])
            for method in ("get", "post")},
        "/v1/tokens/{token}/complete": {"post": _op(
            "completeToken", "resume a run waiting in wait_for_token", {
                "200": _json("the run resumes", _obj(["token", "run_id", "completed"], token={"type": "string"},
                                                     run_id={"type": "string"},
                                                     completed={"type": "boolean", "const": True})),
                "400": _error("not a wait token, or " + _BAD_JSON), "404": _NO_RUN,
                "409": _error("the token was already completed or timed out, or its run has ended"),
                "503": _LOG_DOWN},
            body=("CompleteTokenRequest", True),
            params=[_path("token", "tok_<run id>_<step>, as wait_for_token gave it",
                          pattern=r"^tok_run_[\s\S]*_[0-9]+$", examples=["tok_run_0123456789abcdef_2"])])},
    }


def _ops_paths() -> dict[str, dict[str, Schema]]:
    """Bulk actions, pauses, and the live views of queues, schedules and runs."""
    return {
        **{f"/v1/runs/bulk/{action}": {"post": _op(
            f"bulk{action.capitalize()}", f"{action} every run a filter selects, or count them (dry_run)", {
                "200": _json("what was (or would be) done", _ref("BulkReport")),
                "400": _error("a filter field is unknown or malformed, or " + _BAD_JSON),
                "503": _error("this server keeps no query projection, or the log cannot be written")},
            body=("BulkRequest", False))} for action in ("cancel", "retry", "replay")},
        **{f"/v1/{kind}s/{{{param}}}/{verb}": {"post": _op(
            f"{verb}{kind.capitalize()}", f"{verb} a {kind}: " + (
                "its runs stay queued, attempts under way finish" if verb == "pause"
                else "its held runs start in their usual order"), {
                "200": _json("recorded on every partition", _obj(
                    ["scope", "name", "paused", "reason"], scope={"type": "string"}, name={"type": "string"},
                    paused={"type": "boolean"}, reason={"type": "string"})),
                "404": _error(f"no {kind} of this name (when the server knows the app's tasks)"),
                "503": _LOG_DOWN},
            body=("PauseRequest", False) if verb == "pause" else None,
            params=[_path(param, f"the {kind}'s " + ("id" if kind == "task" else "name"))], tags=("queues",))}
           for kind, param in (("task", "task_id"), ("queue", "name")) for verb in ("pause", "resume")},
        "/v1/pauses": {"get": _op("listPauses", "paused tasks and queues", {
            "200": _json("what is paused", _obj(["pauses"], pauses={"type": "array", "items": _ref("Pause")}))},
            tags=("queues",))},
        "/v1/queues": {"get": _op("listQueues", "live runs per queue, with the queue's limits", {
            "200": _json("the queues", _obj(["queues"], queues={"type": "array", "items": _ref("Queue")})),
            "503": _NO_QUERY}, tags=("queues",))},
        "/v1/schedules": {"get": _op("listSchedules", "scheduled tasks and their next tick", {
            "200": _json("the schedules", _obj(["schedules"], schedules={"type": "array",
                                                                        "items": _ref("Schedule")}))},
            tags=("queues",))},
        "/v1/stream": {"get": _op("streamRuns", "Server-Sent Events: `event: run` with a RunSummary per "
                                  "changed run, `event: resync` when too much changed to send", {
            "200": {"description": "an endless event stream",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}}},
            "503": _NO_QUERY}, security=[{"bearer": []}, {"queryToken": []}])},
    }


def _edge_paths() -> dict[str, dict[str, Schema]]:
    """Webhooks, backfills, erasure, and the dashboard's files."""
    return {
        "/v1/webhooks/{source}": {"post": _op(
            "receiveWebhook", "a signed delivery from a configured source, published as a domain event", {
                "202": _json("published", _obj(["event_id"], event_id={"type": "string"})),
                "400": _error("the (authentic) body is not JSON"),
                "401": _error("missing, malformed, forged, stale or replayed signature"),
                "404": _error("no webhook source of this name"), "413": _TOO_LARGE, "503": _LOG_DOWN},
            auth=False, params=[_path("source", "the source's name, as configured", examples=["payments"])],
            tags=("webhooks",), security=[{"webhookSignature": []}],
            requestBody={"required": True, "content": {"application/json": {"schema": _ANY}}})},
        "/v1/subscriptions/{task_id}/backfill": {"post": _op(
            "backfillSubscription", "start the runs a task's subscriptions would have started in a past window", {
                "200": _json("what was found and started", _obj(
                    ["task_id", "since", "until", "dry_run", "scanned", "matched", "existing", "to_start",
                     "started", "run_ids"], task_id={"type": "string"}, since=_MS, until=_MS,
                    dry_run={"type": "boolean"}, scanned={"type": "integer"}, matched={"type": "integer"},
                    existing={"type": "integer"}, to_start={"type": "integer"}, started={"type": "integer"},
                    run_ids={"type": "array", "items": {"type": "string"}})),
                "400": _error("a bad time or window, a task without subscriptions, or " + _BAD_JSON),
                "404": _error("no task with this id"),
                "409": _error("this server has no app (`stepline serve --app`)"), "503": _LOG_DOWN},
            body=("BackfillRequest", True), params=[_path("task_id", "the subscribed task's id")],
            tags=("events",))},
        "/v1/subjects/{subject}": {"delete": _op(
            "forgetSubject", "erase a subject: its sensitive fields become unreadable everywhere", {
                "200": _json("the subject's keys are deleted", _obj(
                    ["subject", "erased", "keys_deleted"], subject={"type": "string"},
                    erased={"type": "boolean"}, keys_deleted={"type": "integer"})),
                "503": _error("no key store is configured, or it cannot be reached")},
            params=[_path("subject", "the subject id the fields were marked with")], tags=("runs",))},
        "/": {"get": _op("dashboard", "the dashboard page", {
            "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}},
            auth=False, tags=("dashboard",))},
        "/static/{name}": {"get": _op("dashboardFile", "a file of the dashboard", {
            "200": {"description": "the file", "content": {
                "text/css": {"schema": {"type": "string"}}, "text/javascript": {"schema": {"type": "string"}},
                "image/svg+xml": {"schema": {"type": "string"}}}},
            "404": _error("no such file")}, auth=False, tags=("dashboard",),
            params=[_path("name", "file name", examples=["app.js"])])},
    }


def _paths() -> dict[str, dict[str, Schema]]:
    # In this order: the served description lists its paths as written here.
    return {**_meta_paths(), **_run_paths(), **_branch_paths(), **_ops_paths(), **_edge_paths()}


_SECURITY_SCHEMES: dict[str, Schema] = {
    "bearer": {"type": "http", "scheme": "bearer",
               "description": "`Authorization: Bearer <API token>` (`stepline serve --api-token` or "
                              "STEPLINE_API_TOKEN)"},
    "queryToken": {"type": "apiKey", "in": "query", "name": "token",
                   "description": "the API token as `?token=`, for /v1/stream only: a browser's EventSource "
                                  "cannot send headers"},
    "webhookSignature": {"type": "apiKey", "in": "header", "name": "Stepline-Signature",
                         "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, t + '.' + body)>`; "
                                        "several v1= while a secret rotates. Refused when no v1 matches, t "
                                        "is outside the tolerance window (300 s), or the signature was "
                                        "already accepted (a replay)."},
}


def openapi_spec(*, auth_required: bool = True) -> dict[str, Any]:
    """The description as a dict; with `auth_required=False` (`stepline dev`) no operation needs a token."""
    paths = _paths()
    if not auth_required:
        for ops in paths.values():
            for op in ops.values():
                if op.get("security") != [{"webhookSignature": []}]:
                    op["security"] = []
                    op["responses"].pop("401", None)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Stepline API",
            "version": __version__,
            "description": "Trigger runs, publish events, read and list runs, receive signed webhooks. "
                           "JSON in, JSON out; every error is `{\"error\": \"...\"}` with its status. "
                           "A string query parameter given empty counts as not given; an unknown "
                           "query parameter of a list is refused (400), never ignored.",
        },
        "security": [{"bearer": []}] if auth_required else [],
        "paths": paths,
        "components": {"schemas": _SCHEMAS, "securitySchemes": _SECURITY_SCHEMES},
    }


def add_openapi_route(app: web.Application, *, auth_required: bool) -> None:
    """Serve the description at SPEC_PATH, without a token."""
    body = json.dumps(openapi_spec(auth_required=auth_required)).encode()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get(SPEC_PATH, handler)


__all__ = ["SPEC_PATH", "add_openapi_route", "openapi_spec"]
