"""Retroactive subscriptions: starting a task for events already on the log, on every backend."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest

import stepline as sl
from stepline.consumers.router import fanout_key
from stepline.core.ids import idempotent_run_id
from stepline.sdk.context import now_ms

from .conftest import eventually
from .test_server import api, call, config

APPS = Path(__file__).parent / "apps"
DAY_MS = 86_400_000


def app(with_subscription: bool, since: timedelta | None = None) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="audit", registry=reg, on=sl.Subscription("audit.*"))
    async def audit(event: dict) -> None: ...

    if with_subscription:
        @sl.task(id="welcome-pro", registry=reg,
                 on=sl.Subscription("user.created", where={"plan": ["pro"]}, since=since))
        async def welcome_pro(event: dict) -> str:
            return f"welcome {event['name']}"

    return reg


async def publish_history(e, url: str) -> dict[str, str]:
    """Events of the last 40 days, published while nobody subscribed to them."""
    ids: dict[str, str] = {}
    async with sl.Client(url, topics=e.topics) as old:
        old.clock = lambda: now_ms() - 40 * DAY_MS  # before the 30-day window
        ids["ancient"] = await old.publish("user.created", {"name": "ancient", "plan": "pro"})
    ids["ada"] = await e.client.publish("user.created", {"name": "ada", "plan": "pro"})
    ids["bob"] = await e.client.publish("user.created", {"name": "bob", "plan": "free"})
    ids["cy"] = await e.client.publish("user.created", {"name": "cy", "plan": "pro"})
    ids["other"] = await e.client.publish("user.deleted", {"name": "ada", "plan": "pro"})
    router = e.worker._router
    await eventually(lambda: router.routed == 5, timeout=30, what="the events to be routed")
    return ids


def fanout_run(event_id: str) -> str:
    return idempotent_run_id("welcome-pro", fanout_key(event_id))


async def welcome_runs(e) -> Counter[str]:
    return Counter(r.run_id for r in await e.client.list_runs() if r.task_id == "welcome-pro")


async def triggers_of(e, run_id: str) -> int:
    return sum(ev.type == "RunTriggered" for _, ev in await e.client.history(run_id))


async def test_offset_for_time_finds_where_a_time_begins(backend_url):
    async with sl.open_log(backend_url) as lg:
        topic = f"t{os.getpid()}"
        await lg.ensure_topics([sl_topic(topic)])
        await lg.append(topic, 0, [(b"k", b"a"), (b"k", b"b"), (b"k", b"c")])
        await asyncio.sleep(0.05)
        between = now_ms()
        await asyncio.sleep(0.05)
        await lg.append(topic, 0, [(b"k", b"d"), (b"k", b"e")])
        assert await lg.offset_for_time(topic, 0, 0) == 0
        assert await lg.offset_for_time(topic, 0, between) == 3
        assert await lg.offset_for_time(topic, 0, now_ms() + 60_000) == 5  # none yet: the end


def sl_topic(name: str):
    from stepline.log.base import TopicSpec

    return TopicSpec(name, 1)


async def test_a_dry_run_counts_then_a_backfill_starts_each_matching_event_once(engine_factory, backend_url):
    e = await engine_factory(app(with_subscription=False))
    ids = await publish_history(e, backend_url)
    # The subscription is deployed after its events went by: live routing does not reach them.
    e.registry = e.client.registry = e.worker.registry = app(with_subscription=True)
    await e.restart_worker()
    assert await welcome_runs(e) == Counter()

    dry = await sl.backfill("welcome-pro", since=timedelta(days=30), dry_run=True, client=e.client)
    assert (dry.matched, dry.existing, dry.to_start, dry.started) == (2, 0, 2, 0)
    assert dry.scanned == 4  # the 40-day-old event is outside the window
    assert await welcome_runs(e) == Counter()

    done = await sl.backfill("welcome-pro", since="30d", client=e.client)
    assert done.started == 2
    # The same run ids live fan-out gives those events.
    assert sorted(done.run_ids) == sorted([fanout_run(ids["ada"]), fanout_run(ids["cy"])])
    for rid in done.run_ids:
        state = await (e.client.wait(rid, timeout=30))
        assert state.status == "completed"

    again = await sl.backfill("welcome-pro", since="30d", client=e.client)
    assert (again.matched, again.existing, again.started) == (2, 2, 0)
    assert sorted(await welcome_runs(e)) == sorted(done.run_ids)
    assert all([await triggers_of(e, rid) == 1 for rid in done.run_ids])


async def test_a_backfill_overlapping_live_routing_starts_nothing_twice(engine_factory):
    e = await engine_factory(app(with_subscription=True))
    live = await e.client.publish("user.created", {"name": "dee", "plan": "pro"})
    await eventually(lambda: _exists(e, fanout_run(live)), timeout=30, what="the live fan-out")
    report = await sl.backfill("welcome-pro", since=timedelta(hours=1), client=e.client)
    assert (report.matched, report.existing, report.started) == (1, 1, 0)
    assert await triggers_of(e, fanout_run(live)) == 1


async def _exists(e, run_id: str) -> bool:
    try:
        await e.client.get_run(run_id)
        return True
    except sl.UnknownRun:
        return False


async def test_a_subscription_with_since_backfills_once_when_first_deployed(engine_factory, backend_url):
    e = await engine_factory(app(with_subscription=False))
    ids = await publish_history(e, backend_url)
    e.registry = e.client.registry = e.worker.registry = app(True, since=timedelta(days=30))
    await e.restart_worker()
    wanted = {fanout_run(ids["ada"]), fanout_run(ids["cy"])}
    await eventually(lambda: _all_exist(e, wanted), timeout=30, what="the retroactive runs")
    await e.restart_worker()  # a second start finds the backfill marked done
    await asyncio.sleep(0.5)
    assert set(await welcome_runs(e)) == wanted
    assert all([await triggers_of(e, rid) == 1 for rid in wanted])


async def _all_exist(e, run_ids: set[str]) -> bool:
    return all([await _exists(e, r) for r in run_ids])


async def test_backfill_over_http_with_a_dry_run(engine_factory, backend_url):
    e = await engine_factory(app(with_subscription=False))
    await publish_history(e, backend_url)
    e.registry = e.client.registry = e.worker.registry = app(with_subscription=True)
    async with api(e) as (session, base):
        headers = {"Authorization": f"Bearer {config().api_token}"}
        url = f"{base}/v1/subscriptions/welcome-pro/backfill"
        status, body = await call(session, "POST", url, {"since": "30d", "dry_run": True}, headers=headers)
        assert status == 200 and (body["matched"], body["to_start"], body["started"]) == (2, 2, 0)
        status, body = await call(session, "POST", url, {"since": "30d"}, headers=headers)
        assert status == 200 and body["started"] == 2 and len(body["run_ids"]) == 2
        status, body = await call(session, "POST", url, {"since": "a while"}, headers=headers)
        assert status == 400 and "30d" in body["error"]
        status, body = await call(session, "POST", f"{base}/v1/subscriptions/audit-x/backfill",
                                  {"since": "1d"}, headers=headers)
        assert status == 404


def test_times_and_subscriptions_are_checked_with_clear_errors() -> None:
    from stepline.client.backfill import parse_time

    assert parse_time("2d", 10 * DAY_MS) == 8 * DAY_MS
    assert parse_time("1970-01-02T00:00:00Z", 0) == DAY_MS
    with pytest.raises(ValueError, match="duration like 30d"):
        parse_time("yesterday", 0)
    with pytest.raises(sl.TaskDefinitionError, match="positive timedelta"):
        sl.Subscription("user.created", since=timedelta(0))


def test_stepline_backfill_cli_dry_run_then_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"

    async def seed() -> None:
        async with sl.Client(url) as client:
            await client.publish("user.created", {"name": "ada", "plan": "pro"})
            await client.publish("user.created", {"name": "bob", "plan": "free"})

    asyncio.run(seed())
    env = dict(os.environ, STEPLINE_LOG=url, STEPLINE_APP=str(APPS / "retro_app.py"))

    def cli(*args: str) -> dict:
        proc = subprocess.run([sys.executable, "-m", "stepline.cli", "backfill", "welcome-pro", *args, "--json"],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    dry = cli("--since", "30d", "--dry-run")
    assert (dry["matched"], dry["to_start"], dry["started"]) == (1, 1, 0)
    assert cli("--since", "30d")["started"] == 1
    assert cli("--since", "30d")["started"] == 0  # idempotent
    proc = subprocess.run([sys.executable, "-m", "stepline.cli", "backfill", "welcome-pro", "--since", "soon"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "duration like 30d" in proc.stderr
