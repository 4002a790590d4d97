"""wait_for_any: the first of several waits wins, the losers are withdrawn, on every backend."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import pytest

import stepline as sl
from stepline.core.events import Event, Payload, RunResumed, RunSuspended, RunTriggered, WaitCompleted
from stepline.projections.runs import fold_events

from .conftest import eventually

calls: Counter[str] = Counter()


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def race_app() -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def prepare(order_id: str) -> str:
        calls["prepare"] += 1
        return order_id

    @sl.task(id="review", registry=reg)
    async def review(p: dict) -> str:
        calls["review"] += 1
        if p.get("fail"):
            raise sl.FatalError("the reviewer gave up")
        if p.get("hold"):
            await sl.wait_for_event("review.release", match={"order_id": p["order_id"]})
        return f"reviewed {p['order_id']}"

    @sl.task(id="decide", registry=reg)
    async def decide(p: dict) -> dict:
        order_id = await prepare(p["order_id"])
        won = await sl.wait_for_any([
            sl.EventWait("order.approved", match={"order_id": order_id}),
            sl.EventWait("order.rejected", match={"order_id": order_id}),
            sl.Timer(p.get("timer", 600)),
            sl.ChildRun(review, {"order_id": order_id, "hold": p.get("hold", True), "fail": p.get("fail", False)},
                        cancel_if_lost=p.get("cancel_child", True)),
        ])
        calls["after"] += 1
        return {"index": won.index, "kind": won.kind, "value": won.value}

    return reg


async def waiting_branches(e, run_id: str, n: int) -> bool:
    state = await e.client.get_run(run_id)
    return state.status == "suspended" and sum(s.status == "waiting" for s in state.steps.values()) == n


def child_id(run_id: str, pos: int) -> str:
    from stepline.core.ids import child_idempotency_key, idempotent_run_id

    return idempotent_run_id("review", child_idempotency_key(run_id, pos))


async def test_the_first_event_wins_and_every_loser_is_withdrawn(engine_factory):
    e = await engine_factory(race_app())
    h = await e.client.trigger("decide", {"order_id": "o-1"})
    await eventually(lambda: waiting_branches(e, h.run_id, 4), timeout=30, what="four open branches")
    child = child_id(h.run_id, 4)
    await eventually(lambda: _status(e, child, "suspended"), timeout=30, what="the child to hold")
    await e.client.publish("order.rejected", {"order_id": "o-1", "why": "stock"})
    out = await h.result(timeout=30)
    assert out == {"index": 1, "kind": "event", "value": {"order_id": "o-1", "why": "stock"}}
    # The losing child run was cancelled, and the other event wait left the table.
    await eventually(lambda: _status(e, child, "cancelled"), timeout=30, what="the losing child to be cancelled")
    table = e.worker._router.waits._waits
    await eventually(lambda: not any(k.startswith(h.run_id) for k in table), timeout=30,
                     what="the run's event waits to leave the waits table")
    state = await e.client.get_run(h.run_id)
    assert [state.steps[i].status for i in range(1, 5)] == ["lost", "completed", "lost", "lost"]
    assert state.steps[5].name == "wait_for_any" and json.loads(state.steps[5].output.data) == 1
    # A late event for a loser resolves nothing.
    await e.client.publish("order.approved", {"order_id": "o-1"})
    await asyncio.sleep(0.5)
    history = [ev for _, ev in await e.client.history(h.run_id)]
    assert [ev.type for ev in history].count("RunCompleted") == 1
    assert calls["prepare"] == 1 and calls["after"] == 1


async def _status(e, run_id: str, status: str) -> bool:
    try:
        return (await e.client.get_run(run_id)).status == status
    except sl.UnknownRun:
        return False


async def test_a_timer_wins_when_nothing_else_comes_and_a_late_event_changes_nothing(engine_factory):
    e = await engine_factory(race_app())
    h = await e.client.trigger("decide", {"order_id": "o-2", "timer": 0.5})
    out = await h.result(timeout=30)
    assert out == {"index": 2, "kind": "timer", "value": None}
    await e.client.publish("order.approved", {"order_id": "o-2"})
    await asyncio.sleep(0.5)
    state = await e.client.get_run(h.run_id)
    assert state.status == "completed" and json.loads(state.output.data)["kind"] == "timer"
    assert calls["after"] == 1


async def test_a_child_run_that_ends_first_wins_with_its_output(engine_factory):
    e = await engine_factory(race_app())
    h = await e.client.trigger("decide", {"order_id": "o-3", "hold": False})
    out = await h.result(timeout=30)
    assert out == {"index": 3, "kind": "child", "value": "reviewed o-3"}


async def test_a_failed_child_that_wins_raises_child_run_failed(engine_factory):
    reg = race_app()

    @sl.task(id="decide-or-fail", registry=reg)
    async def decide_or_fail(order_id: str) -> str:
        try:
            await sl.wait_for_any([sl.Timer(600), sl.ChildRun(reg.get("review"), {"order_id": order_id, "fail": True})])
        except sl.ChildRunFailed as exc:
            return f"child failed: {exc.error_type}"
        return "no"

    e = await engine_factory(reg)
    h = await e.client.trigger("decide-or-fail", "o-4")
    assert await h.result(timeout=30) == "child failed: FatalError"


async def test_a_losing_child_can_be_left_running(engine_factory):
    e = await engine_factory(race_app())
    h = await e.client.trigger("decide", {"order_id": "o-5", "cancel_child": False})
    await eventually(lambda: waiting_branches(e, h.run_id, 4), timeout=30, what="four open branches")
    child = child_id(h.run_id, 4)
    await eventually(lambda: _status(e, child, "suspended"), timeout=30, what="the child to hold")
    await e.client.publish("order.approved", {"order_id": "o-5"})
    assert (await h.result(timeout=30))["index"] == 0
    await e.client.publish("review.release", {"order_id": "o-5"})
    await eventually(lambda: _status(e, child, "completed"), timeout=30, what="the kept child to finish")
    # Its result went to a lost branch: the parent is unchanged.
    await asyncio.sleep(0.3)
    assert json.loads((await e.client.get_run(h.run_id)).output.data)["index"] == 0


async def test_waiting_for_any_survives_a_worker_restart(engine_factory):
    e = await engine_factory(race_app())
    h = await e.client.trigger("decide", {"order_id": "o-6"})
    await eventually(lambda: waiting_branches(e, h.run_id, 4), timeout=30, what="four open branches")
    await e.stop_worker()
    await e.client.publish("order.approved", {"order_id": "o-6", "by": "ada"})
    await e.start_worker()
    out = await h.result(timeout=30)
    assert out == {"index": 0, "kind": "event", "value": {"order_id": "o-6", "by": "ada"}}
    assert calls["prepare"] == 1


async def test_a_replay_returns_the_recorded_winner_although_another_branch_resolved_since(engine_factory):
    reg = sl.Registry()
    attempts: Counter[str] = Counter()
    gate = asyncio.Event()

    @sl.step
    async def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            await gate.wait()
            raise RuntimeError("first try fails")
        return "ok"

    @sl.task(id="two-events", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=0.05, max_timeout=0.05))
    async def two_events(_: None) -> dict:
        won = await sl.wait_for_any([sl.EventWait("a.happened"), sl.EventWait("b.happened")])
        await flaky()
        return {"index": won.index, "value": won.value}

    e = await engine_factory(reg)
    h = await e.client.trigger("two-events", None)
    await eventually(lambda: waiting_branches(e, h.run_id, 2), timeout=30, what="two open branches")
    await e.client.publish("a.happened", {"n": 1})
    await eventually(lambda: attempts["flaky"] == 1, timeout=30, what="the step after the wait")
    # While the step is failing, the other branch's event comes: it must not change the winner.
    await e.client.publish("b.happened", {"n": 2})
    await asyncio.sleep(0.3)
    gate.set()
    assert await h.result(timeout=30) == {"index": 0, "value": {"n": 1}}
    assert attempts["flaky"] == 2


def test_wait_for_any_refuses_what_it_cannot_wait_for() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        sl.Timer()
    with pytest.raises(ValueError, match="timezone"):
        from datetime import datetime

        sl.Timer(at=datetime(2030, 1, 1))


# --- the fold, without a backend ---------------------------------------------------------


def _ev(n: int, body, seq: int = 0, epoch: int = 0) -> Event:
    return Event(f"e{n}", body.TYPE, "run_1", "t", seq, 1000 + n, epoch, body)


def test_the_first_branch_resolved_in_log_order_wins_even_when_resolved_early() -> None:
    trig = RunTriggered(Payload("application/json", b"null"))
    data = Payload("application/json", b'"x"')
    events = [
        _ev(0, trig, seq=1),
        # Branches 1 and 2 are both resolved before the run records any wait.
        _ev(1, WaitCompleted(2, "event", "ev-b", data)),
        _ev(2, WaitCompleted(1, "event", "ev-a", data)),
        _ev(3, RunSuspended(0, "sleep", 5000, None, 0), seq=2),
        _ev(4, RunSuspended(1, "event", None, None, 0), seq=3),
        _ev(5, RunSuspended(2, "event", None, None, 0), seq=4),
        # A late timer and a late event for losers change nothing.
        _ev(6, RunResumed(0, "timer"), seq=5),
        _ev(7, WaitCompleted(2, "event", "ev-c", data)),
    ]
    state = fold_events(events)["run_1"]
    assert [state.steps[i].status for i in range(3)] == ["lost", "completed", "lost"]
    assert state.status == "pending" and state.wake_at is None


def test_ungrouped_waits_still_all_have_to_resolve() -> None:
    trig = RunTriggered(Payload("application/json", b"null"))
    events = [
        _ev(0, trig, seq=1),
        _ev(1, RunSuspended(0, "child", None, None), seq=2),
        _ev(2, RunSuspended(1, "child", None, None), seq=3),
        _ev(3, WaitCompleted(0, "child", "c0", Payload("application/json", b"1"))),
    ]
    state = fold_events(events)["run_1"]
    assert state.status == "suspended" and state.steps[1].status == "waiting"
