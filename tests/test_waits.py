"""Durable waits: for events, for tokens, for child runs, on every backend."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta

import pytest

import stepline as sl
from stepline.core.ids import wait_token
from stepline.events import LogRecorded, RunStarted

from .conftest import eventually

calls: Counter[str] = Counter()


def approval_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def reserve(order_id: str) -> str:
        calls["reserve"] += 1
        return f"reserved {order_id}"

    @sl.task(id="approve-order", registry=reg)
    async def approve_order(p: dict) -> dict:
        reserved = await reserve(p["order_id"])
        decision = await sl.wait_for_event(
            "order.approved", match={"order_id": p["order_id"], "amount": [{"numeric": [">", 0]}]},
            timeout=p.get("timeout", 60),
        )
        calls["after-wait"] += 1
        return {"reserved": reserved, "decision": decision}

    @sl.task(id="approval-by-human", registry=reg)
    async def by_human(p: dict) -> dict:
        token = sl.create_token()
        await notify(token.id)
        answer = await sl.wait_for_token(token, timeout=p.get("timeout", 60))
        return {"answer": answer}

    @sl.step
    async def notify(token: str) -> str:
        calls["notify"] += 1
        return token

    return reg


async def status(e, run_id: str) -> str:
    return (await e.client.get_run(run_id)).status


async def waiting(e, run_id: str, reason: str) -> bool:
    state = await e.client.get_run(run_id)
    return state.status == "suspended" and any(
        s.name == reason and s.status == "waiting" for s in state.steps.values()
    )


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STEPLINE_LOG=url)
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


async def test_a_run_waiting_for_an_event_is_resumed_by_stepline_publish(engine_factory, backend_url):
    e = await engine_factory(approval_app())
    h = await e.client.trigger("approve-order", {"order_id": "o-1"})
    await eventually(lambda: waiting(e, h.run_id, "event"), timeout=20, what="the run to wait")

    async def publish(data: dict) -> None:
        if backend_url.startswith("memory://"):  # another process cannot see this log
            await e.client.publish("order.approved", data)
            return
        proc = await asyncio.to_thread(cli, backend_url, "publish", "order.approved", "--data", json.dumps(data))
        assert proc.returncode == 0, proc.stderr

    # Neither another order's approval nor a zero amount resumes it.
    await publish({"order_id": "o-2", "amount": 5})
    await publish({"order_id": "o-1", "amount": 0})
    await asyncio.sleep(0.5)
    assert await status(e, h.run_id) == "suspended"
    await publish({"order_id": "o-1", "amount": 10, "by": "ada"})
    out = await h.result(timeout=30)
    assert out == {"reserved": "reserved o-1", "decision": {"order_id": "o-1", "amount": 10, "by": "ada"}}
    assert calls["reserve"] == 1  # the step before the wait never ran again


async def test_a_wait_survives_a_worker_restart_and_an_event_sent_meanwhile(engine_factory):
    e = await engine_factory(approval_app())
    h = await e.client.trigger("approve-order", {"order_id": "o-7"})
    await eventually(lambda: waiting(e, h.run_id, "event"), timeout=20, what="the run to wait")
    await e.stop_worker()
    await e.client.publish("order.approved", {"order_id": "o-7", "amount": 1})
    await e.start_worker()
    out = await h.result(timeout=30)
    assert out["decision"] == {"order_id": "o-7", "amount": 1}
    assert calls["reserve"] == 1 and calls["after-wait"] == 1


async def test_a_timed_out_wait_returns_none_and_a_late_event_changes_nothing(engine_factory):
    e = await engine_factory(approval_app())
    h = await e.client.trigger("approve-order", {"order_id": "o-3", "timeout": 0.3})
    assert (await h.result(timeout=30))["decision"] is None
    await e.client.publish("order.approved", {"order_id": "o-3", "amount": 9})
    await asyncio.sleep(0.5)
    state = await e.client.get_run(h.run_id)
    assert state.status == "completed" and json.loads(state.output.data)["decision"] is None
    assert calls["after-wait"] == 1


async def test_a_redelivered_event_resolves_a_wait_once(engine_factory):
    e = await engine_factory(approval_app())
    h = await e.client.trigger("approve-order", {"order_id": "o-5"})
    await eventually(lambda: waiting(e, h.run_id, "event"), timeout=20, what="the run to wait")
    await e.client.publish("order.approved", {"order_id": "o-5", "amount": 2})
    await h.result(timeout=30)
    await e.stop_worker()
    topic = e.client.topics.events
    group = f"{e.client.topics.namespace}.router"
    await e.client.log.commit(group, topic, {p: 0 for p in range(await e.client.log.partitions(topic))})
    await e.start_worker()
    await asyncio.sleep(1.0)
    history = [ev.type for _, ev in await e.client.history(h.run_id)]
    assert history.count("RunCompleted") == 1
    assert calls["after-wait"] == 1


async def test_stepline_complete_token_resumes_a_human_approval(engine_factory, backend_url):
    e = await engine_factory(approval_app())
    h = await e.client.trigger("approval-by-human", {})
    await eventually(lambda: waiting(e, h.run_id, "token"), timeout=20, what="the run to wait on its token")
    token = wait_token(h.run_id, 0)
    state = await e.client.get_run(h.run_id)
    assert json.loads(state.steps[1].output.data) == token  # the token the run sent out
    if backend_url.startswith("memory://"):
        await e.client.complete_token(token, {"approved": True})
    else:
        proc = await asyncio.to_thread(cli, backend_url, "complete-token", token, "--data", '{"approved": true}')
        assert proc.returncode == 0, proc.stderr
    assert await h.result(timeout=30) == {"answer": {"approved": True}}
    with pytest.raises(sl.InvalidRunState):
        await e.client.complete_token(token, {"approved": False})
    assert calls["notify"] == 1



async def test_a_log_line_is_recorded_once_however_often_the_run_resumes(engine_factory):
    reg = sl.Registry()

    @sl.step
    async def note(token: str) -> str:
        sl.logger.info("in the step")
        return token

    @sl.task(id="chatty", registry=reg)
    async def chatty(p: dict) -> str:
        sl.logger.info("before the token")
        token = sl.create_token()
        await note(token.id)
        await sl.wait_for_token(token, timeout=60)
        sl.logger.info("between the waits")
        await sl.wait_for_event("never.published", timeout=0.2)  # resumes by timing out
        sl.logger.info("after the waits")
        return "done"

    e = await engine_factory(reg)
    h = await e.client.trigger("chatty", {})
    await eventually(lambda: waiting(e, h.run_id, "token"), timeout=20, what="the run to wait on its token")
    await e.client.complete_token(wait_token(h.run_id, 0), "go")
    assert await h.result(timeout=30) == "done"
    history = await e.client.history(h.run_id)
    started = [ev.body.attempt for _, ev in history if isinstance(ev.body, RunStarted)]
    assert len(started) == 3, "the body ran three times: first, after the token, after the timeout"
    lines = [(ev.body.message, ev.body.step) for _, ev in history if isinstance(ev.body, LogRecorded)]
    assert lines == [("before the token", None), ("in the step", 1), ("between the waits", None),
                     ("after the waits", None)]

async def test_bad_tokens_are_refused_with_the_reason(engine_factory):
    e = await engine_factory(approval_app())
    with pytest.raises(sl.InvalidToken, match="not a Stepline wait token"):
        await e.client.complete_token("hello", 1)
    h = await e.client.trigger("approval-by-human", {"timeout": 0.2})
    assert await h.result(timeout=30) == {"answer": None}
    with pytest.raises(sl.InvalidRunState, match="already completed"):
        await e.client.complete_token(wait_token(h.run_id, 0), 1)


async def test_a_token_completed_before_the_run_records_its_wait_still_counts(engine_factory):
    """The human clicks before the run got to suspend: the answer waits in the journal."""
    reg = sl.Registry()
    gate = asyncio.Event()

    @sl.task(id="racy", registry=reg)
    async def racy(_: None) -> object:
        token = sl.create_token()
        await gate.wait()  # the token is completed while we are still here
        return await sl.wait_for_token(token)

    e = await engine_factory(reg)
    h = await e.client.trigger("racy", None)
    await eventually(lambda: _running(e, h.run_id), timeout=20, what="the run to start")
    await e.client.complete_token(wait_token(h.run_id, 0), "early")
    await eventually(lambda: _resolved(e, h.run_id), timeout=20, what="the early answer to be folded")
    gate.set()
    assert await h.result(timeout=30) == "early"


async def _running(e, run_id: str) -> bool:
    return await status(e, run_id) == "running"


async def _resolved(e, run_id: str) -> bool:
    return (await e.client.get_run(run_id)).steps.get(0) is not None


def family_app(concurrency_probe: Counter[str]) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="square", registry=reg)
    async def square(n: int) -> int:
        concurrency_probe["square"] += 1
        if n < 0:
            raise sl.FatalError(f"negative: {n}")
        return n * n

    @sl.task(id="sum-of-squares", registry=reg)
    async def sum_of_squares(ns: list[int]) -> dict:
        concurrency_probe["parent-attempts"] += 1
        first = await square.trigger_and_wait(ns[0])
        rest = await square.batch_trigger_and_wait(ns[1:])
        try:
            await square.trigger_and_wait(-1)
        except sl.ChildRunFailed as exc:
            failed = exc.error_type
        return {"first": first, "rest": rest, "total": first + sum(rest), "failed": failed}

    return reg


async def test_children_run_while_the_parent_waits_holding_no_slot(engine_factory):
    probe: Counter[str] = Counter()
    # One slot: children can only run if the waiting parent gave it up.
    e = await engine_factory(family_app(probe), concurrency=1)
    h = await e.client.trigger("sum-of-squares", [2, 3, 4, 5])
    out = await h.result(timeout=60)
    assert out == {"first": 4, "rest": [9, 16, 25], "total": 54, "failed": "FatalError"}
    runs = await e.client.list_runs()
    children = [r for r in runs if r.parent_run_id == h.run_id]
    assert len(children) == 5 and probe["square"] == 5  # each child ran once
    assert sorted(c.parent_step for c in children) == [0, 1, 2, 3, 4]


async def test_a_parent_waiting_on_children_survives_a_worker_restart(engine_factory):
    probe: Counter[str] = Counter()
    reg = family_app(probe)
    e = await engine_factory(reg)
    gate = asyncio.Event()

    @sl.task(id="slow-child", registry=reg)
    async def slow_child(n: int) -> int:
        await gate.wait()
        return n + 1

    @sl.task(id="waits-on-slow", registry=reg)
    async def waits_on_slow(n: int) -> int:
        return await slow_child.trigger_and_wait(n)

    h = await e.client.trigger("waits-on-slow", 41)
    await eventually(lambda: waiting(e, h.run_id, "child"), timeout=20, what="the parent to wait")
    await e.stop_worker()
    gate.set()
    await e.start_worker()
    assert await h.result(timeout=30) == 42
    assert len([r for r in await e.client.list_runs() if r.task_id == "slow-child"]) == 1


async def test_a_cancelled_child_fails_its_parents_wait(engine_factory):
    reg = sl.Registry()

    @sl.task(id="forever", registry=reg)
    async def forever(_: None) -> None:
        await sl.sleep(3600)

    @sl.task(id="parent", registry=reg)
    async def parent(_: None) -> str:
        try:
            await forever.trigger_and_wait(None)
        except sl.ChildRunFailed as exc:
            return exc.error_type
        return "finished"

    e = await engine_factory(reg)
    h = await e.client.trigger("parent", None)
    child = await eventually(lambda: _child_of(e, h.run_id, "suspended"), timeout=20, what="the child to sleep")
    await e.client.cancel(child.run_id)
    assert await h.result(timeout=30) == "Cancelled"


async def _child_of(e, parent: str, status_: str):
    for r in await e.client.list_runs():
        if r.parent_run_id == parent and r.status == status_:
            return r
    return None


async def test_a_wait_inside_a_step_is_refused_clearly(engine_factory):
    reg = sl.Registry()

    @sl.step
    async def bad() -> None:
        await sl.wait_for_event("x")

    @sl.task(id="bad-wait", registry=reg, retry=sl.Retry(max_attempts=1))
    async def bad_wait(_: None) -> None:
        await bad()

    e = await engine_factory(reg)
    h = await e.client.trigger("bad-wait", None)
    with pytest.raises(sl.RunFailedError, match="inside a step"):
        await h.result(timeout=30)


def test_a_malformed_match_fails_at_the_call() -> None:
    from stepline.consumers.patterns import PatternError
    from stepline.consumers.waits import check_wait_pattern

    with pytest.raises(PatternError, match="numeric"):
        check_wait_pattern("order.approved", {"amount": [{"numeric": ["~", 3]}]})


# --- lookback: the event that raced ahead of the wait ------------------------------------


def lookback_app(gate: asyncio.Event) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="paid", registry=reg)
    async def paid(p: dict) -> object:
        await gate.wait()  # the run is slow to reach its wait: the event comes first
        return await sl.wait_for_event("invoice.paid", match={"invoice": p["invoice"]},
                                       timeout=p["timeout"], lookback=p.get("lookback"))

    return reg


async def test_lookback_matches_an_event_published_just_before_the_wait(engine_factory):
    gate = asyncio.Event()
    e = await engine_factory(lookback_app(gate))
    with_lookback = await e.client.trigger("paid", {"invoice": "i-1", "timeout": 60, "lookback": 60})
    without = await e.client.trigger("paid", {"invoice": "i-1", "timeout": 1})
    await eventually(lambda: _running(e, with_lookback.run_id), timeout=20, what="the run to start")
    await eventually(lambda: _running(e, without.run_id), timeout=20, what="the run to start")
    await e.client.publish("invoice.paid", {"invoice": "i-0"})  # another invoice: never matches
    await e.client.publish("invoice.paid", {"invoice": "i-1", "amount": 5})
    router = e.worker._router
    await eventually(lambda: router.routed == 2, timeout=20, what="the router to see both events")
    await asyncio.sleep(0.05)  # the waits begin in a later millisecond than the event
    gate.set()
    assert await with_lookback.result(timeout=30) == {"invoice": "i-1", "amount": 5}
    assert await without.result(timeout=30) is None  # without lookback it came too early
    # The match is in the journal: a replay answers from it.
    state = await e.client.get_run(with_lookback.run_id)
    assert json.loads(state.steps[0].output.data) == {"invoice": "i-1", "amount": 5}


async def test_lookback_finds_the_event_on_the_log_after_a_restart(engine_factory):
    """A fresh router has no memory of recent events: the worker reads the events topic."""
    gate = asyncio.Event()
    gate.set()
    e = await engine_factory(lookback_app(gate))
    await e.client.publish("invoice.paid", {"invoice": "i-2"})
    await e.restart_worker()
    h = await e.client.trigger("paid", {"invoice": "i-2", "timeout": 60, "lookback": 300})
    assert await h.result(timeout=30) == {"invoice": "i-2"}


async def test_an_event_older_than_the_lookback_does_not_count(engine_factory):
    gate = asyncio.Event()
    e = await engine_factory(lookback_app(gate))
    h = await e.client.trigger("paid", {"invoice": "i-3", "timeout": 1, "lookback": 0.2})
    await eventually(lambda: _running(e, h.run_id), timeout=20, what="the run to start")
    await e.client.publish("invoice.paid", {"invoice": "i-3"})
    await asyncio.sleep(0.6)  # the event is now older than the lookback
    gate.set()
    assert await h.result(timeout=30) is None


def test_a_lookback_beyond_the_bound_is_refused() -> None:
    from stepline.sdk.waits import lookback_ms

    assert lookback_ms(timedelta(hours=24)) == 86_400_000
    with pytest.raises(ValueError, match="lookback must be from 0 to 1 day"):
        lookback_ms(timedelta(days=2))
