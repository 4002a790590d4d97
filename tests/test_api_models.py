"""The HTTP API on pydantic models: the OpenAPI document generated from the
declared routes, bad input refused with one 400 that names the field, and real
answers that fit the declared response models. On a real SQLite log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import BaseModel

import stepline as sl
from stepline.projections.query import QueryProjector, QueryStore
from stepline.projections.query_store import RunFilter
from stepline.projections.views import state_dict
from stepline.server import ServeConfig, create_app, models, responses
from stepline.server._http import Route
from stepline.server.app import declared_routes, openapi_spec
from stepline.server.openapi import REF, _Generator
from tests.conftest import Engine, eventually

TOKEN = "models-token-0123456789"

# Every (method, path) of the hand-written document this generated one replaced
# (engine/server/openapi.py before the API moved onto pydantic models), with its
# operationId and answers: the generated one must keep them all.
HAND_WRITTEN: dict[tuple[str, str], tuple[str, set[str]]] = {
    ("GET", "/healthz"): ("healthz", {"200"}),
    ("GET", "/readyz"): ("readyz", {"200", "503"}),
    ("GET", "/metrics"): ("metrics", {"200"}),
    ("GET", "/v1/info"): ("info", {"200"}),
    ("GET", "/v1/openapi.json"): ("openapi", {"200"}),
    ("POST", "/v1/tasks/{task_id}/trigger"): ("triggerTask", {"202", "400", "401", "404", "413", "422", "503"}),
    ("POST", "/v1/events"): ("publishEvent", {"202", "400", "401", "413", "503"}),
    ("GET", "/v1/events"): ("listEvents", {"200", "400", "401", "503"}),
    ("GET", "/v1/runs"): ("listRuns", {"200", "400", "401", "503"}),
    ("GET", "/v1/runs/{run_id}"): ("getRun", {"200", "401", "404", "503"}),
    ("GET", "/v1/runs/{run_id}/history"): ("getRunHistory", {"200", "401", "404", "503"}),
    ("GET", "/v1/runs/{run_id}/children"): ("listChildRuns", {"200", "400", "401", "503"}),
    ("POST", "/v1/runs/{run_id}/cancel"): ("cancelRun", {"202", "401", "404", "409", "503"}),
    ("POST", "/v1/runs/{run_id}/retry"): ("retryRun", {"202", "400", "401", "404", "409", "413", "422", "503"}),
    ("POST", "/v1/runs/{run_id}/fork"): ("forkRun", {"202", "400", "401", "404", "409", "413", "422", "503"}),
    ("GET", "/v1/runs/{run_id}/shadow"): ("shadowRunGet", {"200", "400", "401", "403", "404", "409", "503"}),
    ("POST", "/v1/runs/{run_id}/shadow"): ("shadowRunPost", {"200", "400", "401", "403", "404", "409", "413",
                                                             "503"}),
    ("POST", "/v1/tokens/{token}/complete"): ("completeToken", {"200", "400", "401", "404", "409", "413", "503"}),
    ("POST", "/v1/runs/bulk/cancel"): ("bulkCancel", {"200", "400", "401", "413", "503"}),
    ("POST", "/v1/runs/bulk/retry"): ("bulkRetry", {"200", "400", "401", "413", "503"}),
    ("POST", "/v1/runs/bulk/replay"): ("bulkReplay", {"200", "400", "401", "413", "503"}),
    ("POST", "/v1/tasks/{task_id}/pause"): ("pauseTask", {"200", "400", "401", "404", "413", "503"}),
    ("POST", "/v1/tasks/{task_id}/resume"): ("resumeTask", {"200", "401", "404", "503"}),
    ("POST", "/v1/queues/{name}/pause"): ("pauseQueue", {"200", "400", "401", "404", "413", "503"}),
    ("POST", "/v1/queues/{name}/resume"): ("resumeQueue", {"200", "401", "404", "503"}),
    ("GET", "/v1/pauses"): ("listPauses", {"200", "401"}),
    ("GET", "/v1/queues"): ("listQueues", {"200", "401", "503"}),
    ("GET", "/v1/schedules"): ("listSchedules", {"200", "401"}),
    ("GET", "/v1/stream"): ("streamRuns", {"200", "401", "503"}),
    ("POST", "/v1/webhooks/{source}"): ("receiveWebhook", {"202", "400", "401", "404", "413", "503"}),
    ("POST", "/v1/subscriptions/{task_id}/backfill"): ("backfillSubscription", {"200", "400", "401", "404", "409",
                                                                               "413", "503"}),
    ("DELETE", "/v1/subjects/{subject}"): ("forgetSubject", {"200", "401", "503"}),
    ("GET", "/"): ("dashboard", {"200"}),
    ("GET", "/static/{name}"): ("dashboardFile", {"200", "404"}),
}


# --- the document, generated ---------------------------------------------------------


def test_the_generated_document_keeps_every_path_method_and_answer_of_the_hand_written_one() -> None:
    spec = openapi_spec()
    generated = {(m.upper(), p): (op["operationId"], set(op["responses"]))
                 for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert set(HAND_WRITTEN) - set(generated) == set()
    for key, (operation_id, answers) in HAND_WRITTEN.items():
        assert generated[key][0] == operation_id, key
        assert answers <= generated[key][1], key


def test_components_are_the_models_own_json_schemas() -> None:
    schemas = openapi_spec()["components"]["schemas"]
    for model in (models.TriggerRequest, models.BulkRequest, models.ForkRequest, responses.RunState,
                  responses.RunPage, responses.DomainEvent, responses.Error):
        own = model.model_json_schema(ref_template=REF, schema_generator=_Generator)
        nested = own.pop("$defs", {})
        assert schemas[model.__name__] == own, model.__name__
        assert all(schemas[name] == schema for name, schema in nested.items()), model.__name__


def test_every_body_and_query_model_refuses_unknown_names() -> None:
    spec = openapi_spec()
    routes: list[Route] = declared_routes()
    inputs = {m for r in routes for m in (r.body, r.query, r.params) if m is not None}
    assert len(inputs) >= 15
    for model in inputs:
        assert model.model_config.get("extra") == "forbid", model.__name__
    for route in routes:
        if route.body is not None:
            body = spec["components"]["schemas"][route.body.__name__]
            assert body["additionalProperties"] is False, route.path
    assert spec["components"]["schemas"]["BulkFilter"]["additionalProperties"] is False


# --- bad input: one 400 naming the field, nothing appended ----------------------------


@pytest.fixture
def backend_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/stepline.db"


def _app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def double(n: int) -> int:
        return 2 * n

    @sl.task(id="echo", registry=reg)
    async def echo(payload: dict[str, Any]) -> Any:
        sl.logger.info("echoing", size=len(payload))
        return {"doubled": await double(int(payload.get("n", 1))), "payload": payload}

    return reg


@asynccontextmanager
async def serving(e: Engine, tmp_path: Path) -> AsyncIterator[tuple[aiohttp.ClientSession, QueryStore]]:
    async with QueryStore(tmp_path / "query.db") as store, QueryProjector(e.client.log, store,
                                                                          topics=e.client.topics):
        runner = web.AppRunner(create_app(e.client, ServeConfig(api_token=TOKEN, webhooks={}), e.registry,
                                          query=store))
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            async with aiohttp.ClientSession(f"http://{host}:{port}",
                                             headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                yield http, store
        finally:
            await runner.cleanup()


async def appended(e: Engine) -> int:
    log, total = e.client.log, 0
    for topic in (e.client.topics.runs, e.client.topics.events):
        total += sum([await log.end_offset(topic, p) for p in range(await log.partitions(topic))])
    return total


_TRIGGER_FIELDS = "concurrency_key, delay, idempotency_key, payload, priority, tags, ttl"
_FILTER_FIELDS = "dead_letter, error_type, from, parent, q, since, status, tag, task, to, until"
_RUN_PARAMS = "cursor, dead_letter, error_type, from, limit, parent, q, status, tag, task, to"

BAD_INPUT = [
    ("POST", "/v1/tasks/echo/trigger", {"priorty": 1},
     f"unknown field(s) priorty; known: {_TRIGGER_FIELDS}"),
    ("POST", "/v1/tasks/echo/trigger", {"payload": {}, "tags": ["a", 5]}, "tags[1]: Input should be a valid string"),
    ("POST", "/v1/tasks/echo/trigger", {"priority": "7"}, "priority: Input should be a valid integer"),
    ("POST", "/v1/tasks/echo/trigger", {"priority": 7.5}, "priority: Input should be a valid integer"),
    ("POST", "/v1/tasks/echo/trigger", {"delay": True}, "delay: Input should be a valid number"),
    ("POST", "/v1/tasks/echo/trigger", {"idempotency_key": ""},
     "idempotency_key: String should have at least 1 character"),
    ("POST", "/v1/events", {"name": "a", "extra": 1, "key": ""},
     "unknown field(s) extra; known: data, key, name; key: String should have at least 1 character"),
    ("POST", "/v1/runs/bulk/cancel", {"filter": {"stauts": "failed", "tagz": []}},
     f"unknown filter field(s) stauts, tagz; known: {_FILTER_FIELDS}"),
    ("POST", "/v1/runs/bulk/retry", {"filter": {"status": 3}}, "filter.status must be a string or a list of strings"),
    ("POST", "/v1/runs/bulk/replay", {"dry_run": "yes"}, "dry_run: Input should be a valid boolean"),
    ("POST", "/v1/runs/run_x/fork", {"at_step": "2"}, "at_step: Input should be a valid integer"),
    ("POST", "/v1/runs/run_x/fork", {"at_step": 1, "step_outputs": {"one": 1}},
     'step_outputs must be an object from step positions to outputs, e.g. {"2": 10}'),
    ("POST", "/v1/tasks/echo/pause", {"reason": ["busy"]}, "reason: Input should be a valid string"),
    ("POST", "/v1/subscriptions/echo/backfill", {"until": "1d"}, "since: Field required"),
    ("GET", "/v1/runs?stauts=failed&limt=2", None, f"unknown query parameter(s) limt, stauts; known: {_RUN_PARAMS}"),
    ("GET", "/v1/runs?limit=0", None, "limit must be an integer from 1 to 500, got '0'"),
    ("GET", "/v1/runs?dead_letter=perhaps", None, "dead_letter must be true or false, got 'perhaps'"),
    ("GET", "/v1/events?task=x", None, "unknown query parameter(s) task; known: cursor, limit, name"),
    ("GET", "/v1/runs/run_x/shadow?modul=m", None, "unknown query parameter(s) modul; known: module"),
    ("GET", "/v1/runs/run_x?asof=3", None, "unknown query parameter(s) asof; known: as_of"),
    ("GET", "/v1/runs/run_x?as_of=soon", None,
     "as_of 'soon' is neither a log offset (e.g. 1234), an ISO-8601 time (e.g. 2025-01-31T12:00:00.250Z) "
     "nor a relative time (e.g. -5m, -90s, -2h)"),
    ("GET", "/v1/runs/run_x?as_of=2025-13-01T00:00", None,
     "as_of '2025-13-01T00:00' is neither a log offset (e.g. 1234), an ISO-8601 time "
     "(e.g. 2025-01-31T12:00:00.250Z) nor a relative time (e.g. -5m, -90s, -2h)"),
    ("GET", "/v1/runs/run_x/history?from=%2012&till=4", None, "unknown query parameter(s) till; known: from, to; "
     "from ' 12' is neither a log offset (e.g. 1234), an ISO-8601 time (e.g. 2025-01-31T12:00:00.250Z) "
     "nor a relative time (e.g. -5m, -90s, -2h)"),
]


@pytest.mark.parametrize(("method", "path", "body", "message"), BAD_INPUT)
async def test_bad_input_gets_one_400_naming_the_field_and_appends_nothing(
    engine_factory: Callable[..., Awaitable[Engine]], tmp_path: Path, method: str, path: str,
    body: Any, message: str,
) -> None:
    e = await engine_factory(_app())
    before = await appended(e)
    async with serving(e, tmp_path) as (http, _):
        async with http.request(method, path, json=body) as resp:
            answer = await resp.json()
            assert (resp.status, answer) == (400, {"error": message})
    assert "\n" not in message
    assert await appended(e) == before


async def test_without_the_token_bad_input_is_refused_for_the_token_first(
    engine_factory: Callable[..., Awaitable[Engine]], tmp_path: Path,
) -> None:
    e = await engine_factory(_app())
    async with serving(e, tmp_path) as (http, _):
        async with http.post("/v1/tasks/echo/trigger", json={"priorty": 1}, headers={"Authorization": ""}) as resp:
            assert resp.status == 401 and "Authorization" in (await resp.json())["error"]


# --- real answers fit the declared response models ------------------------------------


def declared_model(method: str, path: str, status: int) -> type[BaseModel]:
    for route in declared_routes():
        if (route.method, route.path) == (method, path) and status in route.replies:
            return route.replies[status].model or responses.Error
    if status >= 400:
        return responses.Error  # 400, 401 and 413, added to every route that can answer them
    raise AssertionError(f"{method} {path} declares no {status}")


async def test_real_answers_fit_the_declared_response_models(
    engine_factory: Callable[..., Awaitable[Engine]], tmp_path: Path,
) -> None:
    e = await engine_factory(_app())
    async with serving(e, tmp_path) as (http, store):

        async def fits(method: str, url: str, template: str, body: Any = None) -> dict[str, Any]:
            async with http.request(method, url, json=body) as resp:
                answer = await resp.json()
                declared_model(method, template, resp.status).model_validate(answer)
                return dict(answer)

        triggered = await fits("POST", "/v1/tasks/echo/trigger", "/v1/tasks/{task_id}/trigger",
                               {"payload": {"n": 4}, "tags": ["t"]})
        run_id = triggered["run_id"]
        assert (await e.client.wait(run_id, timeout=20)).status == "completed"
        await fits("POST", "/v1/events", "/v1/events", {"name": "order.placed", "data": {"id": 1}})

        async def listed() -> bool:
            events = await store.list_events(None, 5, None)
            runs = await store.list_runs(RunFilter(statuses=("completed",)), 5, None)
            return bool(events.items and runs.items)
        await eventually(listed, 20, "the run and the event in the query projection")

        run = await fits("GET", f"/v1/runs/{run_id}", "/v1/runs/{run_id}")
        assert run["steps"] and run["logs"] and run["output"]["doubled"] == 8
        page = await fits("GET", "/v1/runs?limit=5", "/v1/runs")
        assert [r["run_id"] for r in page["runs"]] == [run_id]
        events = await fits("GET", "/v1/events", "/v1/events")
        assert [ev["name"] for ev in events["events"]] == ["order.placed"]
        history = await fits("GET", f"/v1/runs/{run_id}/history", "/v1/runs/{run_id}/history")
        assert history["events"][0]["type"] == "RunTriggered"
        first_step = next(ev["offset"] for ev in history["events"] if ev["type"] == "StepCompleted")
        then = await fits("GET", f"/v1/runs/{run_id}?as_of={first_step}", "/v1/runs/{run_id}")
        assert then["as_of"]["offset"] == first_step and then["status"] == "running" and then["output"] is None
        between = await fits("GET", f"/v1/runs/{run_id}/history?from={first_step}", "/v1/runs/{run_id}/history")
        assert [ev["offset"] for ev in between["events"]] == [
            ev["offset"] for ev in history["events"] if ev["offset"] > first_step]
        diff = await fits("GET", f"/v1/runs/{run_id}/diff/{run_id}", "/v1/runs/{run_id}/diff/{other_run_id}")
        assert diff["same"] is True and diff["first_divergence"] is None
        why = await fits("GET", f"/v1/runs/{run_id}/why", "/v1/runs/{run_id}/why")
        assert [r["kind"] for r in why["reasons"]] == ["ended"]
        await fits("GET", "/v1/queues", "/v1/queues")
        await fits("GET", "/v1/info", "/v1/info")
        await fits("POST", "/v1/runs/bulk/cancel", "/v1/runs/bulk/cancel", {"dry_run": True})
        for method, url, template in (("GET", "/v1/runs/run_nope", "/v1/runs/{run_id}"),
                                      ("GET", f"/v1/runs/{run_id}?as_of=-3650d", "/v1/runs/{run_id}"),
                                      ("GET", f"/v1/runs/{run_id}/diff/run_nope",
                                       "/v1/runs/{run_id}/diff/{other_run_id}"),
                                      ("GET", "/v1/runs/run_nope/why", "/v1/runs/{run_id}/why"),
                                      ("POST", f"/v1/runs/{run_id}/cancel", "/v1/runs/{run_id}/cancel"),
                                      ("GET", "/v1/runs?limit=x", "/v1/runs")):
            error = await fits(method, url, template)
            assert set(error) == {"error"}

        # Every field the views return is described, so the document is complete.
        assert set(run) | {"as_of"} == set(responses.RunState.model_fields) == set(then)
        assert set(state_dict(await e.client.get_run(run_id))) | {"as_of"} == set(responses.RunState.model_fields)
        assert set(diff) == set(responses.RunDiff.model_fields)
        assert set(diff["a"]) == set(responses.DiffRun.model_fields)
        assert set(diff["steps"][0]["a"]) == set(responses.DiffStep.model_fields)
        assert set(why) == set(responses.RunWhy.model_fields)
        assert set(page["runs"][0]) <= set(responses.RunSummary.model_fields)
        assert set(events["events"][0]) == set(responses.DomainEvent.model_fields)
        assert set(json.loads(json.dumps(history["events"][0]))) == set(responses.HistoryEvent.model_fields)
