"""`stepline serve`: the HTTP API and the webhook receiver, over real sockets, on every backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from pydantic import BaseModel

import stepline as sl
from stepline.server import ServeConfig, WebhookSource, create_app, sign_webhook

from .conftest import eventually

TOKEN = "test-token-0123456789"
PAYMENTS_SECRET = "whsec_payments"
CARRIER_SECRET = "whsec_carrier"


class Order(BaseModel):
    order_id: str
    amount: int


def server_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="record-payment", registry=reg,
             on=sl.Subscription("webhook.payments", where={"type": ["payment.succeeded"]}))
    async def record_payment(event: dict) -> dict:
        return {"paid": event["data"]["id"]}

    @sl.task(id="mark-delivered", registry=reg, on=sl.Subscription("shipping.delivered"))
    async def mark_delivered(event: dict) -> str:
        return event["parcel"]

    @sl.task(id="charge", registry=reg)
    async def charge(order: Order) -> int:
        return order.amount * 2

    @sl.task(id="welcome", registry=reg, on=sl.Subscription("user.created"))
    async def welcome(event: dict) -> str:
        return f"hello {event['name']}"

    return reg


def config(**overrides: Any) -> ServeConfig:
    options: dict[str, Any] = {
        "api_token": TOKEN,
        "webhooks": {
            "payments": WebhookSource("payments", PAYMENTS_SECRET),
            "carrier": WebhookSource("carrier", CARRIER_SECRET, event_name="shipping.delivered"),
        },
    }
    options.update(overrides)
    return ServeConfig(**options)


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def api(e: Any, **overrides: Any) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with serving(create_app(e.client, config(**overrides), e.registry)) as base:
        async with aiohttp.ClientSession() as session:
            yield session, base


async def call(
    session: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any]:
    if body is not None:
        kwargs["data"] = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json()


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def appended(e: Any, topic: str) -> int:
    log = e.client.log
    return sum([await log.end_offset(topic, p) for p in range(await log.partitions(topic))])


async def completed_run(e: Any, task_id: str) -> sl.RunState | None:
    runs = [r for r in await e.client.list_runs() if r.task_id == task_id]
    return runs[0] if len(runs) == 1 and runs[0].status == "completed" else None


async def output_of(e: Any, task_id: str) -> Any:
    state = await eventually(lambda: completed_run(e, task_id), timeout=30, what=f"a run of {task_id}")
    return json.loads(state.output.data)


# --- webhooks ---------------------------------------------------------------------


async def test_only_authentic_timely_first_deliveries_are_published(engine_factory):
    e = await engine_factory(server_app())
    events = e.client.topics.events
    body = json.dumps({"type": "payment.succeeded", "data": {"id": "pi_1"}}).encode()
    hook = "/v1/webhooks/payments"
    async with api(e) as (http, base):
        before = await appended(e, events)
        rejected = {
            "forged": sign_webhook("not-the-secret", body),
            "missing": None,
            "malformed": "v1=abc",
            "stale": sign_webhook(PAYMENTS_SECRET, body, timestamp=int(time.time()) - 301),
        }
        messages = {}
        for case, signature in rejected.items():
            headers = {} if signature is None else {"Stepline-Signature": signature}
            status, answer = await call(http, "POST", base + hook, body, headers=headers)
            assert status == 401, case
            messages[case] = answer["error"]
        assert "does not match" in messages["forged"]
        assert "missing Stepline-Signature" in messages["missing"]
        assert "malformed" in messages["malformed"]
        assert "outside the 300 s tolerance window" in messages["stale"]
        assert await appended(e, events) == before

        valid = {"Stepline-Signature": sign_webhook(PAYMENTS_SECRET, body)}
        status, answer = await call(http, "POST", base + hook, body, headers=valid)
        assert status == 202 and answer["event_id"]
        status, replay = await call(http, "POST", base + hook, body, headers=valid)
        assert status == 401 and "already accepted" in replay["error"]
        assert await appended(e, events) == before + 1

        status, unknown = await call(http, "POST", base + "/v1/webhooks/nobody", body, headers=valid)
        assert status == 404 and "nobody" in unknown["error"]

        # Mid-rotation the sender signs with the old and the new secret; one match is enough.
        parcel = json.dumps({"parcel": "P-7"}).encode()
        t = int(time.time())
        old, new = sign_webhook("old-secret", parcel, t), sign_webhook(CARRIER_SECRET, parcel, t)
        rotated = {"Stepline-Signature": f"{old},{new.split(',')[1]}"}
        status, _ = await call(http, "POST", base + "/v1/webhooks/carrier", parcel, headers=rotated)
        assert status == 202

    assert await output_of(e, "record-payment") == {"paid": "pi_1"}
    # The carrier's deliveries are published under the name it was mapped to.
    assert await output_of(e, "mark-delivered") == "P-7"


async def test_an_oversize_body_is_refused_with_413_and_nothing_appended(engine_factory):
    e = await engine_factory(server_app())
    events = e.client.topics.events
    limit = 256
    url_path = "/v1/webhooks/payments"

    def delivery(size: int) -> tuple[bytes, dict[str, str]]:
        prefix = b'{"type": "payment.failed", "pad": "'
        body = prefix + b"x" * (size - len(prefix) - 2) + b'"}'
        assert len(body) == size
        return body, {"Stepline-Signature": sign_webhook(PAYMENTS_SECRET, body)}

    async def chunked(body: bytes) -> AsyncIterator[bytes]:
        # No Content-Length: the server must stop reading on its own.
        for i in range(0, len(body), 64):
            yield body[i:i + 64]

    async with api(e, max_body_bytes=limit) as (http, base):
        before = await appended(e, events)
        body, headers = delivery(limit + 1)
        status, declared = await call(http, "POST", base + url_path, body, headers=headers)
        assert status == 413 and "256-byte limit" in declared["error"]
        async with http.post(base + url_path, data=chunked(body), headers=headers) as resp:
            assert resp.status == 413 and "256-byte limit" in (await resp.json())["error"]
        assert await appended(e, events) == before

        body, headers = delivery(limit)
        status, _ = await call(http, "POST", base + url_path, body, headers=headers)
        assert status == 202
        assert await appended(e, events) == before + 1


# --- the API ------------------------------------------------------------------------


async def test_a_run_triggered_over_http_is_readable_there_when_done(engine_factory):
    e = await engine_factory(server_app())
    async with api(e) as (http, base):
        status, health = await call(http, "GET", base + "/healthz")
        assert status == 200 and health == {"ok": True}

        trigger = base + "/v1/tasks/charge/trigger"
        status, answer = await call(http, "POST", trigger, {"payload": {"order_id": "o1", "amount": 21},
                                                           "tags": ["http"], "priority": 3}, headers=bearer())
        assert status == 202 and answer["task_id"] == "charge"
        run_url = f"{base}/v1/runs/{answer['run_id']}"

        async def finished() -> Any:
            status, state = await call(http, "GET", run_url, headers=bearer())
            assert status == 200
            return state if state["status"] == "completed" else None

        state = await eventually(finished, timeout=30, what="the run to complete")
        assert state["output"] == 42 and state["payload"] == {"order_id": "o1", "amount": 21}
        assert state["tags"] == ["http"] and state["priority"] == 3


async def test_api_requests_are_refused_with_the_status_that_names_the_problem(engine_factory):
    e = await engine_factory(server_app())
    runs = e.client.topics.runs
    trigger = "/v1/tasks/charge/trigger"
    good = {"payload": {"order_id": "o1", "amount": 1}}
    async with api(e) as (http, base):
        before = await appended(e, runs)
        status, missing = await call(http, "POST", base + trigger, good)
        assert status == 401 and "missing Authorization" in missing["error"]
        status, wrong = await call(http, "POST", base + trigger, good, headers=bearer("guess-123"))
        assert status == 401 and "not valid" in wrong["error"] and "guess-123" not in wrong["error"]
        status, _ = await call(http, "GET", base + "/v1/runs/run_x", headers=bearer("guess-123"))
        assert status == 401

        cases = [
            ("/v1/tasks/no-such-task/trigger", good, 404, "unknown task id 'no-such-task'"),
            (trigger, {"payload": {"order_id": "o1"}}, 422, "amount: Field required"),
            (trigger, {"payload": {"order_id": "o1", "amount": "lots"}}, 422, "amount"),
            (trigger, b"{not json", 400, "not valid JSON"),
            (trigger, [1, 2], 400, "JSON object"),
            (trigger, {**good, "priority": "high"}, 400, "priority"),
            (trigger, {**good, "delay": -1}, 400, "delay"),
            (trigger, {**good, "tags": "urgent"}, 400, "tags"),
            (trigger, {**good, "idempotencyKey": "k"}, 400, "unknown field(s) idempotencyKey"),
            ("/v1/events", {"name": "has space"}, 400, "event name"),
            ("/v1/events", {"data": 1}, 400, "name: Field required"),
            ("/v1/events", {"name": 5}, 400, "name: Input should be a valid string"),
        ]
        for path, body, expected, message in cases:
            status, answer = await call(http, "POST", base + path, body, headers=bearer())
            assert (status, message in answer["error"]) == (expected, True), (path, body, answer)
        status, unknown = await call(http, "GET", base + "/v1/runs/run_nope", headers=bearer())
        assert status == 404 and "run_nope" in unknown["error"]
        assert await appended(e, runs) == before

    async with api(e, api_token=None, auth_required=False) as (http, base):
        status, _ = await call(http, "POST", base + trigger, good)
        assert status == 202


async def test_an_event_published_over_http_starts_its_subscribers(engine_factory):
    e = await engine_factory(server_app())
    async with api(e) as (http, base):
        status, answer = await call(http, "POST", base + "/v1/events",
                                    {"name": "user.created", "data": {"name": "ada"}, "key": "u1"},
                                    headers=bearer())
        assert status == 202 and answer["event_id"]
    assert await output_of(e, "welcome") == "hello ada"


async def test_a_token_completed_over_http_resumes_the_waiting_run(engine_factory):
    reg = server_app()

    @sl.task(id="needs-approval", registry=reg)
    async def needs_approval(_: None) -> Any:
        return await sl.wait_for_token()

    e = await engine_factory(reg)
    handle = await e.client.trigger("needs-approval", None)

    async def waiting() -> bool:
        state = await e.client.get_run(handle.run_id)
        return state.status == "suspended"

    await eventually(waiting, timeout=30, what="the run to wait for its token")
    token = f"tok_{handle.run_id}_0"
    url = f"/v1/tokens/{token}/complete"
    async with api(e) as (http, base):
        status, _ = await call(http, "POST", base + url, {"data": 1})
        assert status == 401  # the API token is required here too
        status, answer = await call(http, "POST", base + url, {"data": {"approved": True}}, headers=bearer())
        assert (status, answer["run_id"]) == (200, handle.run_id)
        assert await handle.result(timeout=30) == {"approved": True}
        status, answer = await call(http, "POST", base + url, {"data": 2}, headers=bearer())
        assert status == 409 and "already" in answer["error"]
        status, answer = await call(http, "POST", base + "/v1/tokens/nonsense/complete", {}, headers=bearer())
        assert status == 400 and "not a Stepline wait token" in answer["error"]


async def test_a_run_cancelled_over_http_stops_and_a_second_cancel_is_refused(engine_factory):
    reg = server_app()

    @sl.task(id="sleepy", registry=reg)
    async def sleepy(_: None) -> None:
        await sl.sleep(3600)

    e = await engine_factory(reg)
    handle = await e.client.trigger("sleepy", None)

    async def suspended() -> bool:
        return (await e.client.get_run(handle.run_id)).status == "suspended"

    await eventually(suspended, timeout=30, what="the run to sleep")
    async with api(e) as (http, base):
        url = f"{base}/v1/runs/{handle.run_id}/cancel"
        status, answer = await call(http, "POST", url, headers=bearer())
        assert (status, answer["was"]) == (202, "suspended")
        with_state = await eventually(lambda: _cancelled(e, handle.run_id), timeout=30, what="cancelled")
        assert with_state
        status, answer = await call(http, "POST", url, headers=bearer())
        assert status == 409 and "already cancelled" in answer["error"]
        status, _ = await call(http, "POST", f"{base}/v1/runs/run_nope/cancel", headers=bearer())
        assert status == 404


async def _cancelled(e: Any, run_id: str) -> bool:
    return (await e.client.get_run(run_id)).status == "cancelled"


# --- the command line -------------------------------------------------------------


def serve_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG="memory://cli-serve", COLUMNS="200")
    for name in ("STEPLINE_API_TOKEN", "STEPLINE_WEBHOOKS", "STEPLINE_APP"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "stepline.cli", "serve", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_serve_refuses_to_start_without_a_token_unless_told_no_auth():
    proc = serve_cli("--port", "0")
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "API token" in proc.stderr
    assert "--no-auth" in proc.stderr


def test_a_malformed_webhook_flag_is_refused_without_echoing_the_secret():
    proc = serve_cli("--api-token", TOKEN, "--webhook", "s3cret-without-source")
    assert proc.returncode != 0
    assert "SOURCE=SECRET" in proc.stderr and "s3cret" not in proc.stderr
