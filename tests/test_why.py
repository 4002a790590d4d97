"""Why is this run not running? `Client.why`, `stepline runs why` and `GET /v1/runs/{id}/why`, on every backend.

Runs held for each reason the log knows: a limited queue (place among the
waiters, the holders of its slots), a concurrency key at its limit, a rate
limit, a paused task (who, when, why), a sleep, an event wait, a token
wait, a child run, a delay, a TTL, a run with no worker, an ended run.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

import stepline as sl
from stepline.projections.why import Reason
from stepline.server import ServeConfig, create_app

from .conftest import eventually

REPO = Path(__file__).resolve().parent.parent

registry = sl.Registry()
release = asyncio.Event()

ONE_AT_A_TIME = sl.Queue("one-at-a-time", concurrency_limit=1)
PER_TENANT = sl.Queue("per-tenant", concurrency_limit=10, key_limit=1)
RATED = sl.Queue("rated", rate_limit=sl.RateLimit(1, 3600))


@sl.step
async def hold() -> str:
    await release.wait()
    return "released"


@sl.task(id="why-held", registry=registry, queue=ONE_AT_A_TIME)
async def held(p: dict[str, int]) -> str:
    return await hold()


@sl.task(id="why-tenant", registry=registry, queue=PER_TENANT)
async def tenant(p: dict[str, int]) -> str:
    return await hold()


@sl.task(id="why-rated", registry=registry, queue=RATED)
async def rated(p: dict[str, int]) -> int:
    return p["n"]


@sl.task(id="why-child", registry=registry)
async def child(p: dict[str, int]) -> str:
    return await hold()


@sl.task(id="why-waits", registry=registry)
async def waits(p: dict[str, str]) -> object:
    if p["kind"] == "sleep":
        await sl.sleep(3600)
    elif p["kind"] == "event":
        return await sl.wait_for_event("order.paid", match={"order": "o-7"}, timeout=7200)
    elif p["kind"] == "token":
        return await sl.wait_for_token(timeout=600)
    else:
        return await child.trigger_and_wait({"n": 1})
    return None


@sl.task(id="why-gpu", registry=registry, pool="gpu")
async def on_gpu(p: dict[str, int]) -> int:
    return p["n"]


@sl.task(id="why-paused", registry=registry)
async def paused(p: dict[str, int]) -> int:
    return p["n"]


def kinds(reasons: list[Reason]) -> list[str]:
    return [r.kind for r in reasons]


async def test_each_reason_a_run_is_held_is_named_with_its_facts(engine_factory):
    global release
    release = asyncio.Event()  # one per test: an Event binds to the loop it is first awaited on
    eng = await engine_factory(registry)
    client = eng.client
    try:
        first = await held.trigger({"n": 1}, client=client)
        await eventually(lambda: _status(client, first.run_id, "running"), timeout=30, what="the first to run")
        second = await held.trigger({"n": 2}, client=client)
        third = await held.trigger({"n": 3}, client=client)

        async def queued() -> bool:
            return "queue" in kinds(await client.why(third.run_id))

        await eventually(queued, timeout=30, what="the third run to be queued")
        [running] = await client.why(first.run_id)
        assert running.kind == "running" and running.details["steps"] == [0]
        reasons = {r.kind: r for r in await client.why(third.run_id)}
        assert reasons["queue"].details == {"queue": "one-at-a-time", "position": 2, "waiting": 2, "limit": 1,
                                            "holders": [first.run_id]}
        assert "place 2 of 2" in reasons["queue"].message
        assert (await client.why(second.run_id))[0].details["position"] == 1

        a = await tenant.trigger({"n": 1}, client=client, concurrency_key="acme")
        await eventually(lambda: _status(client, a.run_id, "running"), timeout=30, what="acme's first run")
        b = await tenant.trigger({"n": 2}, client=client, concurrency_key="acme")

        async def keyed() -> bool:
            return "concurrency_key" in kinds(await client.why(b.run_id))

        await eventually(keyed, timeout=30, what="acme's second run held by its key")
        key = next(r for r in await client.why(b.run_id) if r.kind == "concurrency_key")
        assert key.details == {"key": "acme", "key_limit": 1, "holders": [a.run_id]}

        r1 = await rated.trigger({"n": 1}, client=client)
        assert await r1.result(timeout=30) == 1
        r2 = await rated.trigger({"n": 2}, client=client)

        async def limited() -> bool:
            return "rate_limit" in kinds(await client.why(r2.run_id))

        await eventually(limited, timeout=30, what="the rate limit to hold the second run")
        rate = next(r for r in await client.why(r2.run_id) if r.kind == "rate_limit")
        assert rate.details["rate_limit"] == 1 and rate.details["next_free_at"] > client.clock() + 3_000_000

        await client.pause(task="why-paused", reason="migrating the ledger")
        p = await paused.trigger({"n": 1}, client=client)
        reasons = {r.kind: r for r in await client.why(p.run_id)}
        assert reasons["paused"].details["reason"] == "migrating the ledger"
        assert reasons["paused"].details["name"] == "why-paused"
        assert "ready" not in reasons and "no_worker" not in reasons  # a worker of the default pool runs

        sleeping = await waits.trigger({"kind": "sleep"}, client=client)
        event = await waits.trigger({"kind": "event"}, client=client)
        token = await waits.trigger({"kind": "token"}, client=client)
        parent = await waits.trigger({"kind": "child"}, client=client)
        for h in (sleeping, event, token):
            await eventually(lambda h=h: _status(client, h.run_id, "suspended"), timeout=30, what="a wait")
        [slept] = await client.why(sleeping.run_id)
        assert slept.kind == "wait" and slept.details["wait"] == "sleep"
        assert "wakes in 60.0 min" in slept.message or "wakes in 59.9 min" in slept.message
        [ev] = await client.why(event.run_id)
        assert ev.details["event"] == "order.paid" and ev.details["match"] == {"order": "o-7"}
        assert "for an event 'order.paid' matching" in ev.message and "times out in" in ev.message
        [tok] = await client.why(token.run_id)
        assert tok.details["token"].startswith("tok_") and tok.details["since"] is not None

        async def child_wait() -> bool:
            return any(r.details.get("child") for r in await client.why(parent.run_id))

        await eventually(child_wait, timeout=30, what="the parent to wait for its child")
        [kid] = await client.why(parent.run_id)
        assert kid.details["task"] == "why-child" and kid.details["child"].startswith("run_")

        later = await paused.trigger({"n": 2}, client=client, delay=3600, ttl=7200)
        reasons = {r.kind: r for r in await client.why(later.run_id)}
        assert {"delayed", "ttl", "paused"} <= set(reasons)
        assert reasons["ttl"].details["expires_at"] > reasons["delayed"].details["not_before"]
    finally:
        release.set()
    assert await first.result(timeout=30) == "released"
    [ended] = await client.why(first.run_id)
    assert ended.kind == "ended" and ended.details["status"] == "completed"
    with pytest.raises(sl.UnknownRun):
        await client.why("run_nope")


async def _status(client: sl.Client, run_id: str, status: str) -> bool:
    return (await client.get_run(run_id)).status == status


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_stepline_runs_why_with_no_worker_says_it_is_ready_and_waits_for_one(backend_url):
    async with sl.Client(backend_url, registry=registry) as client:
        h = await paused.trigger({"n": 1}, client=client)
    env = dict(os.environ, STEPLINE_LOG=backend_url, COLUMNS="200")
    text = subprocess.run([sys.executable, "-m", "stepline.cli", "runs", "why", h.run_id], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        f"{h.run_id} (why-paused) is pending:",
        "  - ready to start: it waits for a worker to pick it up",
        "  - no worker of pool 'default' is running: nothing will start or wake it until one does (`stepline worker`)"]
    as_json = subprocess.run([sys.executable, "-m", "stepline.cli", "runs", "why", h.run_id, "--json"], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=120)
    assert [r["kind"] for r in json.loads(as_json.stdout)["reasons"]] == ["ready", "no_worker"]
    async with sl.Client(backend_url, registry=registry) as client:
        g = await on_gpu.trigger({"n": 1}, client=client)
    gpu = subprocess.run([sys.executable, "-m", "stepline.cli", "runs", "why", g.run_id], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert gpu.stdout.splitlines()[1:3] == [
        "  - ready to start: it waits for a worker of pool 'gpu' (`stepline worker --pool gpu`) to pick it up",
        "  - no worker of pool 'gpu' is running: nothing will start or wake it until one does "
        "(`stepline worker --pool gpu`)"]
    missing = subprocess.run([sys.executable, "-m", "stepline.cli", "runs", "why", "run_nope"], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "run_nope" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("backend_url", ["sqlite", "kafka"], indirect=True)
async def test_the_http_api_says_why_a_run_waits(engine_factory, backend_url):
    eng = await engine_factory(registry)
    client = eng.client
    auth = {"Authorization": "Bearer t0ken"}
    async with TestClient(TestServer(create_app(client, ServeConfig("t0ken", {}), registry))) as http:
        async def why(run_id: str) -> tuple[int, dict[str, Any]]:
            resp = await http.get(f"/v1/runs/{run_id}/why", headers=auth)
            return resp.status, await resp.json()

        sleeping = await waits.trigger({"kind": "sleep"}, client=client)
        await eventually(lambda: _status(client, sleeping.run_id, "suspended"), timeout=30, what="the sleep")
        status, body = await why(sleeping.run_id)
        assert status == 200
        assert (body["run_id"], body["task_id"], body["status"]) == (sleeping.run_id, "why-waits", "suspended")
        [slept] = body["reasons"]
        assert slept["kind"] == "wait" and slept["wait"] == "sleep" and slept["step"] == 0
        assert slept["timeout_at"] > client.clock() + 3_000_000 and slept["message"].startswith("sleeping at step 0")

        paused_at = client.clock()
        resp = await http.post("/v1/tasks/why-paused/pause", json={"reason": "migrating the ledger"}, headers=auth)
        assert resp.status == 200, await resp.text()
        held = await paused.trigger({"n": 1}, client=client)
        status, body = await why(held.run_id)
        assert status == 200 and body["status"] == "pending"
        [pause] = body["reasons"]
        assert pause["kind"] == "paused" and pause["reason"] == "migrating the ledger"
        assert pause["name"] == "why-paused" and pause["at"] >= paused_at and pause["by"]
        assert "is paused (by" in pause["message"]

        assert (await http.get(f"/v1/runs/{held.run_id}/why")).status == 401
        assert await why("run_nope") == (404, {"error": "no run with id 'run_nope' on this log"})
