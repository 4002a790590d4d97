"""The OpenAPI description (engine/server/openapi.py) against the real app, and the
odd inputs the fuzzer (tests/test_api_fuzz.py) found, each refused with a
clear 400 and nothing appended, on a real SQLite log."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from aiohttp import web

import stepline as sl
from stepline.projections.runs import LIVE, TERMINAL
from stepline.server import ServeConfig, WebhookSource, create_app, models, query_api, sign_webhook
from stepline.server.app import openapi_spec

TOKEN = "spec-token-0123456789"
SECRET = "whsec_spec"


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route; aiohttp adds HEAD beside each GET itself."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path is not None:
            out.add((route.method, path))
    return out


def spec_routes(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[sl.Client]:
    reg = sl.Registry()

    @sl.task(id="echo", registry=reg)
    async def echo(payload: Any) -> Any:
        return payload

    async with sl.Client(f"sqlite:///{tmp_path}/stepline.db", registry=reg) as c:
        yield c


@pytest.fixture
async def base(client: sl.Client) -> AsyncIterator[str]:
    config = ServeConfig(api_token=TOKEN, webhooks={"payments": WebhookSource("payments", SECRET)})
    runner = web.AppRunner(create_app(client, config, client.registry))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def appended(client: sl.Client) -> int:
    log, total = client.log, 0
    for topic in (client.topics.runs, client.topics.events):
        total += sum([await log.end_offset(topic, p) for p in range(await log.partitions(topic))])
    return total


# --- the description ------------------------------------------------------------------


async def test_every_route_is_described_and_every_description_is_a_route(client: sl.Client) -> None:
    app = create_app(client, ServeConfig(api_token=TOKEN, webhooks={}))
    spec = openapi_spec()
    assert app_routes(app) - spec_routes(spec) == set(), "routes missing from engine/server/openapi.py"
    assert spec_routes(spec) - app_routes(app) == set(), "engine/server/openapi.py describes routes that do not exist"


def test_the_description_is_valid_openapi_3_1() -> None:
    for auth_required in (True, False):
        schemathesis.openapi.from_dict(openapi_spec(auth_required=auth_required)).validate()


def test_every_authenticated_operation_documents_401_and_every_body_400_and_413() -> None:
    for path, ops in openapi_spec()["paths"].items():
        for method, op in ops.items():
            label = f"{method.upper()} {path}"
            assert "default" not in op["responses"], label
            if op.get("security") != []:
                assert "401" in op["responses"], label
            if "requestBody" in op:
                assert {"400", "413"} <= set(op["responses"]), label
            for status, answer in op["responses"].items():
                if status >= "400" and status != "401" or status == "401" and "security" not in op:
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"}, f"{label} {status}"


def test_without_auth_no_operation_asks_for_a_token_but_webhooks_still_need_a_signature() -> None:
    spec = openapi_spec(auth_required=False)
    assert spec["security"] == []
    hook = spec["paths"]["/v1/webhooks/{source}"]["post"]
    assert hook["security"] == [{"webhookSignature": []}] and "401" in hook["responses"]
    others = [op for p, ops in spec["paths"].items() for op in ops.values() if p != "/v1/webhooks/{source}"]
    assert all(op["security"] == [] and "401" not in op["responses"] for op in others)


def test_the_statuses_and_limits_of_the_models_are_the_servers() -> None:
    assert set(models.STATUSES) == LIVE | TERMINAL == query_api.STATUSES
    assert models.MAX_LIMIT == query_api.MAX_LIMIT


async def test_the_limits_in_the_description_are_the_limits_enforced(client: sl.Client, base: str) -> None:
    trigger = openapi_spec()["components"]["schemas"]["TriggerRequest"]["properties"]
    lo, hi = trigger["priority"]["minimum"], trigger["priority"]["maximum"]
    longest = trigger["delay"]["anyOf"][0]["maximum"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for body, status in (({"priority": hi}, 202), ({"priority": lo}, 202), ({"priority": hi + 1}, 400),
                             ({"priority": lo - 1}, 400), ({"delay": longest}, 202),
                             ({"delay": longest + 1}, 400), ({"ttl": -0.5}, 400)):
            async with http.post(base + "/v1/tasks/echo/trigger", json=body) as resp:
                assert resp.status == status, (body, await resp.text())


def test_the_event_name_pattern_is_check_event_name() -> None:
    from stepline.client import check_event_name

    space = re.compile(f"[{models.SPACE}]")
    assert [c for c in range(sys.maxunicode + 1) if chr(c).isspace() != bool(space.fullmatch(chr(c)))] == []
    pattern = re.compile(openapi_spec()["components"]["schemas"]["PublishRequest"]["properties"]["name"]["pattern"])
    for name in ("user.created", "a", "a..b", "", ".a", "a.", "a b", "a\x1db", "a\u3000", "ü.ö", "x\x00y"):
        try:
            check_event_name(name)
            accepted = True
        except sl.SteplineError:
            accepted = False
        assert accepted == bool(pattern.search(name)), repr(name)


# --- odd input the fuzzer found: a 400 naming the problem, nothing appended -----------


BAD_BODIES = [
    # What Python's json module takes but JSON and Avro do not.
    ("/v1/events", b'{"name": "user.created", "key": "\\ud800"}', "surrogate"),
    ("/v1/events", b'{"name": "user\\udfff.created"}', "surrogate"),
    ("/v1/tasks/echo/trigger", b'{"idempotency_key": "k\\ud800"}', "surrogate"),
    ("/v1/tasks/echo/trigger", b'{"payload": NaN}', "not JSON"),
    ("/v1/tasks/echo/trigger", b'{"payload": [1e400]}', "not JSON"),
    ("/v1/events", b'{"name": "a", "data": -Infinity}', "not JSON"),
    ("/v1/tasks/echo/trigger", b'{"payload": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
]


@pytest.mark.parametrize(("path", "body", "mentions"), BAD_BODIES)
async def test_json_python_takes_but_json_does_not_is_refused(
    client: sl.Client, base: str, path: str, body: bytes, mentions: str
) -> None:
    before = await appended(client)
    async with aiohttp.ClientSession() as http:
        async with http.post(base + path, data=body, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 400, await resp.text()
            assert mentions in (await resp.json())["error"]
        # A signed webhook delivery goes through the same parser.
        signed = {"Stepline-Signature": sign_webhook(SECRET, body)}
        async with http.post(base + "/v1/webhooks/payments", data=body, headers=signed) as resp:
            assert resp.status == 400 and mentions in (await resp.json())["error"]
    assert await appended(client) == before


async def test_an_integral_float_priority_is_that_integer(client: sl.Client, base: str) -> None:
    # JSON has one number type: to JSON Schema (and so to the description) 7.0 is an integer.
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/v1/tasks/echo/trigger", json={"priority": 7.0},
                             headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 202
            run_id = (await resp.json())["run_id"]
    assert (await client.get_run(run_id)).priority == 7


@pytest.mark.parametrize("token", ["tok_run_x_²", "tok_run_x_", "tok_x_1", "run_x_1"])
async def test_a_token_that_is_not_one_is_refused_with_400(base: str, token: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/tokens/{token}/complete", json={},
                             headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
            assert resp.status == 400
            assert "not a Stepline wait token" in (await resp.json())["error"]


@pytest.mark.parametrize(("query", "mentions"), [
    ("stauts=failed", "unknown query parameter(s) stauts"),
    ("limit=1_000", "limit must be an integer"),
    ("limit=%20%207", "limit must be an integer"),
    ("limit=%D9%A3", "limit must be an integer"),  # Arabic-Indic 3: int() takes it
    ("limit=", "limit must be an integer"),
    ("from=" + "9" * 5000, "from must be an integer"),  # past int()'s digit limit
    ("dead_letter=", "dead_letter must be true or false"),
    ("status=failed,,completed", "unknown status ''"),
])
async def test_a_malformed_list_query_is_refused_with_400(client: sl.Client, tmp_path: Path, query: str,
                                                          mentions: str) -> None:
    from stepline.projections.query import QueryStore

    async with QueryStore(tmp_path / "query.db") as store:
        app = create_app(client, ServeConfig(api_token=TOKEN, webhooks={}), query=store)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{host}:{port}/v1/runs?{query}",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    assert resp.status == 400
                    assert mentions in (await resp.json())["error"]
                # An empty string filter is no filter, as before.
                async with http.get(f"http://{host}:{port}/v1/runs?task=&q=&status=",
                                    headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                    assert resp.status == 200
        finally:
            await runner.cleanup()
