"""The run engine, end to end, on every log backend (see conftest.backend_url)."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest
from pydantic import BaseModel

import stepline as sl
from stepline.errors import PayloadValidationError

from .conftest import eventually

pytestmark = pytest.mark.asyncio


class Order(BaseModel):
    order_id: str
    total: float = 10.0


class Flaky(Exception):
    pass


async def event_types(engine, run_id: str) -> list[str]:
    return [ev.type for _, ev in await engine.client.history(run_id)]


async def test_a_three_step_run_completes_with_its_output(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def fetch(order_id: str) -> dict:
        calls["fetch"] += 1
        return {"id": order_id, "total": 12.5}

    @sl.step
    async def charge(total: float) -> str:
        calls["charge"] += 1
        return f"ch_{total}"

    @sl.step
    async def email(to: str) -> None:
        calls["email"] += 1

    @sl.task(id="order", registry=reg)
    async def order(p: Order) -> dict:
        o = await fetch(p.order_id)
        charge_id = await charge(o["total"])
        await email("a@example.com")
        return {"status": "completed", "order_id": o["id"], "charge": charge_id}

    e = await engine_factory(reg)
    handle = await order.trigger(Order(order_id="o-1"))
    assert await handle.result(timeout=10) == {"status": "completed", "order_id": "o-1", "charge": "ch_12.5"}
    assert calls == {"fetch": 1, "charge": 1, "email": 1}
    assert await event_types(e, handle.run_id) == [
        "RunTriggered", "RunStarted",
        "StepStarted", "StepCompleted", "StepStarted", "StepCompleted", "StepStarted", "StepCompleted",
        "RunCompleted",
    ]
    state = await handle.state()
    assert [s.name for s in state.steps.values()] == [fetch.__qualname__, charge.__qualname__, email.__qualname__]
    assert state.steps[0].input is not None and b"o-1" in state.steps[0].input.data


async def test_a_completed_step_never_runs_again_when_a_later_step_is_retried(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def first() -> int:
        calls["first"] += 1
        return 41

    @sl.step
    async def second(x: int) -> int:
        calls["second"] += 1
        if calls["second"] == 1:
            raise Flaky("payment provider timed out")
        return x + 1

    @sl.task(id="retrying", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=0.01, randomize=False))
    async def retrying(_: None) -> int:
        return await second(await first())

    e = await engine_factory(reg)
    handle = await retrying.trigger(None)
    assert await handle.result(timeout=10) == 42
    assert calls == {"first": 1, "second": 2}
    state = await handle.state()
    assert state.attempt_in_trigger == 2
    assert len(state.retries) == 1
    assert state.retries[0].reason.startswith("Flaky: payment provider timed out")
    assert [err.error.type for err in state.errors] == ["Flaky"]
    types = await event_types(e, handle.run_id)
    assert types.count("StepFailed") == 1 and types.count("RetryScheduled") == 1


async def test_steps_started_with_gather_are_replayed_not_rerun(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def browse(url: str) -> str:
        calls[url] += 1
        await asyncio.sleep(0.01 * (3 - int(url[-1])))  # finish out of order
        return f"text of {url}"

    @sl.step
    async def analyze(texts: list[str]) -> str:
        calls["analyze"] += 1
        if calls["analyze"] == 1:
            raise Flaky("model overloaded")
        return " | ".join(texts)

    @sl.task(id="research", registry=reg, retry=sl.Retry(min_timeout=0.01, randomize=False))
    async def research(topic: str) -> str:
        texts = await asyncio.gather(*(browse(f"u{i}") for i in range(3)))
        return await analyze(list(texts))

    await engine_factory(reg)
    handle = await research.trigger("durable tasks")
    assert await handle.result(timeout=10) == "text of u0 | text of u1 | text of u2"
    assert calls == {"u0": 1, "u1": 1, "u2": 1, "analyze": 2}


async def test_exhausted_retries_dead_letter_and_a_retry_with_a_new_payload_resumes(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def load(n: int) -> int:
        calls["load"] += 1
        return n

    @sl.step
    async def divide(n: int, by: int) -> float:
        calls["divide"] += 1
        return n / by

    @sl.task(id="divide", registry=reg, retry=sl.Retry(max_attempts=2, min_timeout=0.01, randomize=False))
    async def task(p: dict) -> float:
        n = await load(10)
        return await divide(n, p["by"])

    e = await engine_factory(reg)
    handle = await task.trigger({"by": 0})
    with pytest.raises(sl.RunFailedError, match="ZeroDivisionError"):
        await handle.result(timeout=10)
    state = await eventually(lambda: _dead(e, handle.run_id), what="dead letter")
    assert state.status == "failed" and state.attempt_in_trigger == 2
    assert state.error is not None and "division by zero" in state.error.message
    assert "ZeroDivisionError" in state.error.stack

    await e.client.retry(handle.run_id, {"by": 4}, new_payload=True)
    state = await eventually(lambda: _done(e, handle.run_id), what="retried run to complete")
    assert state.output is not None and state.output.data == b"2.5"
    assert calls == {"load": 1, "divide": 3}
    assert not state.dead_lettered


async def _dead(e, run_id):
    s = await e.client.get_run(run_id)
    return s if s.dead_lettered else None


async def _done(e, run_id):
    s = await e.client.get_run(run_id)
    return s if s.status == "completed" else None


async def test_a_sleeping_run_holds_no_worker_slot_and_wakes(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def before() -> str:
        calls["before"] += 1
        return "b"

    @sl.task(id="sleeper", registry=reg)
    async def sleeper(_: None) -> str:
        await before()
        await sl.sleep(timedelta(milliseconds=300))
        return "awake"

    e = await engine_factory(reg)
    handle = await sleeper.trigger(None)
    state = await eventually(lambda: _status(e, handle.run_id, "suspended"), what="suspension")
    assert state.wake_at is not None
    # Suspended, and no coroutine held for it.
    await eventually(lambda: e.worker is not None and e.worker.active == 0, what="attempt to end")
    assert await handle.result(timeout=10) == "awake"
    assert calls["before"] == 1
    types = await event_types(e, handle.run_id)
    assert "RunSuspended" in types and "RunResumed" in types


async def test_runs_woken_together_each_resume_once_in_order(engine_factory):
    # More runs wake at once than the worker runs at a time: some start
    # before their RunResumed is read back, some after, from the ready queue.
    reg = sl.Registry()
    calls: Counter[int] = Counter()

    @sl.step
    async def after(i: int) -> int:
        calls[i] += 1
        return i

    @sl.task(id="nap", registry=reg)
    async def nap(i: int) -> int:
        await sl.sleep(timedelta(milliseconds=200))
        return await after(i)

    e = await engine_factory(reg, concurrency=3)
    handles = [await nap.trigger(i) for i in range(24)]
    assert [await h.result(timeout=30) for h in handles] == list(range(24))
    assert calls == Counter({i: 1 for i in range(24)})
    for h in handles:
        history = [ev for _, ev in await e.client.history(h.run_id)]
        types = [ev.type for ev in history]
        assert types.count("RunResumed") == 1 and types.count("RunStarted") == 2, types
        resumed = types.index("RunResumed")
        assert types[resumed - 1] == "RunSuspended" and types[resumed + 1] == "RunStarted", types
        seqs = [ev.seq for ev in history if ev.seq]
        assert seqs == sorted(set(seqs)), seqs  # one writer, no sequence number twice


async def _status(e, run_id, status):
    s = await e.client.get_run(run_id)
    return s if s.status == status else None


async def test_a_sleep_survives_a_worker_restart(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def once() -> int:
        calls["once"] += 1
        return 7

    @sl.task(id="long-sleep", registry=reg)
    async def long_sleep(_: None) -> int:
        v = await once()
        await sl.sleep(0.5)
        return v * 6

    e = await engine_factory(reg)
    handle = await long_sleep.trigger(None)
    await eventually(lambda: _status(e, handle.run_id, "suspended"), what="suspension")
    await e.stop_worker()
    await asyncio.sleep(0.6)  # the wake time passes while no worker runs
    await e.start_worker()
    assert await handle.result(timeout=10) == 42
    assert calls["once"] == 1


async def test_an_idempotency_key_maps_repeated_triggers_to_one_run(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.task(id="once", registry=reg)
    async def once(p: dict) -> int:
        calls["run"] += 1
        return p["n"]

    await engine_factory(reg)
    h1 = await once.trigger({"n": 1}, idempotency_key="order-42")
    h2 = await once.trigger({"n": 1}, idempotency_key="order-42")
    assert h1.run_id == h2.run_id
    assert await h1.result(timeout=10) == 1
    assert await h2.result(timeout=10) == 1
    h3 = await once.trigger({"n": 1}, idempotency_key="order-42")
    assert await h3.result(timeout=10) == 1
    assert calls["run"] == 1
    # The key with another payload is refused (tests/test_idempotency.py), not answered with the old run.
    with pytest.raises(sl.IdempotencyKeyReused):
        await once.trigger({"n": 2}, idempotency_key="order-42")


async def test_a_delayed_run_does_not_start_before_its_time(engine_factory):
    reg = sl.Registry()
    started: list[float] = []

    @sl.task(id="later", registry=reg)
    async def later(_: None) -> None:
        started.append(asyncio.get_running_loop().time())

    e = await engine_factory(reg)
    t0 = asyncio.get_running_loop().time()
    handle = await later.trigger(None, delay=0.4)
    await asyncio.sleep(0.2)
    assert started == []
    state = await e.client.get_run(handle.run_id)
    assert state.status == "pending" and state.not_before is not None
    await handle.result(timeout=10)
    assert started[0] - t0 >= 0.35


async def test_an_invalid_payload_is_refused_with_the_field_named_and_nothing_appended(engine_factory):
    reg = sl.Registry()

    @sl.task(id="typed", registry=reg)
    async def typed(p: Order) -> None:
        return None

    e = await engine_factory(reg)
    runs = e.topics.runs
    before = [await e.client.log.end_offset(runs, p) for p in range(3)]
    with pytest.raises(PayloadValidationError, match="order_id"):
        await typed.trigger({"total": 3})
    with pytest.raises(sl.UnknownTask, match="nope"):
        await e.client.trigger("nope", {})
    after = [await e.client.log.end_offset(runs, p) for p in range(3)]
    assert before == after


async def test_changed_code_under_a_recorded_run_fails_it_as_non_deterministic(engine_factory):
    reg = sl.Registry()
    version = {"v": 1}

    @sl.step
    async def a() -> int:
        return 1

    @sl.step
    async def b() -> int:
        if version["v"] == 1:
            raise Flaky("first attempt fails")
        return 2

    @sl.task(id="drift", registry=reg, retry=sl.Retry(max_attempts=5, min_timeout=0.2, randomize=False))
    async def drift(_: None) -> int:
        if version["v"] == 1:
            return await a() + await b()
        return await b() + await a()  # a deploy reordered the steps

    e = await engine_factory(reg)
    handle = await drift.trigger(None)
    await eventually(lambda: _status(e, handle.run_id, "retrying"), what="retry")
    version["v"] = 2
    with pytest.raises(sl.RunFailedError, match="NonDeterminismError"):
        await handle.result(timeout=10)
    state = await e.client.get_run(handle.run_id)
    assert state.attempt_in_trigger == 2  # no retry after non-determinism
    assert state.error is not None and "journal" in state.error.message


async def test_cancel_stops_a_sleeping_run_for_good(engine_factory):
    reg = sl.Registry()
    resumed: list[int] = []

    # Long enough that the cancel lands while it sleeps even on a loaded
    # machine; the test then waits past the wake time to see it never wakes.
    nap = 2.0

    @sl.task(id="cancellable", registry=reg)
    async def cancellable(_: None) -> None:
        await sl.sleep(nap)
        resumed.append(1)

    e = await engine_factory(reg)
    handle = await cancellable.trigger(None)
    await eventually(lambda: _status(e, handle.run_id, "suspended"), what="suspension")
    await e.client.cancel(handle.run_id)
    with pytest.raises(sl.RunFailedError, match="cancelled"):
        await handle.result(timeout=5)
    await asyncio.sleep(nap + 0.5)
    assert resumed == []
    assert (await e.client.get_run(handle.run_id)).status == "cancelled"
    with pytest.raises(sl.InvalidRunState):
        await e.client.cancel(handle.run_id)


async def test_cancel_interrupts_a_running_step(engine_factory):
    reg = sl.Registry()
    entered = asyncio.Event()

    @sl.step
    async def forever() -> None:
        entered.set()
        await asyncio.sleep(3600)

    @sl.task(id="stuck", registry=reg)
    async def stuck(_: None) -> None:
        await forever()

    e = await engine_factory(reg)
    handle = await stuck.trigger(None)
    await asyncio.wait_for(entered.wait(), 10)
    await e.client.cancel(handle.run_id)
    await eventually(lambda: e.worker is not None and e.worker.active == 0, what="attempt to stop")
    assert (await e.client.get_run(handle.run_id)).status == "cancelled"


async def test_step_idempotency_keys_are_stable_across_attempts(engine_factory):
    reg = sl.Registry()
    keys: list[str] = []

    @sl.step
    async def pay() -> None:
        keys.append(sl.idempotency_key())
        if len(keys) < 3:
            raise Flaky("try again")

    @sl.task(id="pay", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=0.01, randomize=False))
    async def pay_task(_: None) -> None:
        await pay()

    await engine_factory(reg)
    handle = await pay_task.trigger(None)
    await handle.result(timeout=10)
    assert keys == [f"{handle.run_id}:0"] * 3


async def test_a_queue_limit_caps_concurrent_runs_and_priority_goes_first(engine_factory):
    reg = sl.Registry()
    running = 0
    peak = 0
    order: list[str] = []

    @sl.task(id="limited", registry=reg, queue=sl.Queue("emails", concurrency_limit=2))
    async def limited(p: dict) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(p["name"])
        await asyncio.sleep(0.02)
        running -= 1

    e = await engine_factory(reg)
    await e.stop_worker()  # queue everything first, so admission order is observable
    handles = [await limited.trigger({"name": f"low{i}"}) for i in range(8)]
    handles.append(await limited.trigger({"name": "urgent"}, priority=10))
    await e.start_worker()
    for h in handles:
        await h.result(timeout=10)
    assert peak == 2
    assert order.index("urgent") < 2


async def test_a_task_triggered_from_inside_a_task_runs_as_its_own_run(engine_factory):
    reg = sl.Registry()

    @sl.task(id="child", registry=reg)
    async def child(p: dict) -> int:
        return p["x"] * 2

    @sl.task(id="parent", registry=reg)
    async def parent(_: None) -> str:
        h = await child.trigger({"x": 21})
        return h.run_id

    await engine_factory(reg)
    child_id = await (await parent.trigger(None)).result(timeout=10)
    assert child_id.startswith("run_")


async def test_an_unknown_task_on_the_worker_dead_letters_the_run(engine_factory):
    reg = sl.Registry()
    e = await engine_factory(reg)
    # A client that does not know the task (another service) cannot check it.
    other = sl.Client(log=e.client.log, topics=e.topics)
    await other.start()
    try:
        handle = await other.trigger("not-deployed", {"a": 1})
        with pytest.raises(sl.RunFailedError, match="UnknownTask"):
            await handle.result(timeout=10)
    finally:
        await other.close()
    state = await eventually(lambda: _dead(e, handle.run_id), what="dead letter")
    assert state.error is not None and state.error.type == "UnknownTask"
    assert "not registered" in (await event_types_bodies(e, handle.run_id))


async def event_types_bodies(e, run_id) -> str:
    return " ".join(repr(ev.body) for _, ev in await e.client.history(run_id))
