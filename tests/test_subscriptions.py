"""Domain events fanned out to subscribed tasks, on every backend."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel

import stepline as sl

from .conftest import eventually


def fanout_app() -> tuple[sl.Registry, Counter[str]]:
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.task(id="welcome-pro", registry=reg,
             on=sl.Subscription("user.created", where={"plan": ["pro", "team"]}))
    async def welcome_pro(event: dict) -> str:
        calls["welcome-pro"] += 1
        return event["name"]

    @sl.task(id="audit", registry=reg, on=sl.Subscription("user.*"))
    async def audit(event: dict) -> None:
        calls["audit"] += 1

    @sl.task(id="big-spender", registry=reg,
             on=sl.Subscription("user.created", where={"amount": [{"numeric": [">", 1000]}]}))
    async def big_spender(event: dict) -> None:
        calls["big-spender"] += 1

    @sl.task(id="orders", registry=reg, on=sl.Subscription("order.*"))
    async def orders(event: dict) -> None:
        calls["orders"] += 1

    @sl.task(id="broken-filter", registry=reg,
             on=sl.Subscription("user.created", where=lambda data: 1 / 0))
    async def broken(event: dict) -> None:
        calls["broken-filter"] += 1

    return reg, calls


async def runs_by_task(e) -> Counter[str]:
    return Counter(r.task_id for r in await e.client.list_runs())


async def all_done(e, n: int) -> bool:
    runs = await e.client.list_runs()
    return len(runs) == n and all(r.status == "completed" for r in runs)


async def test_one_event_fans_out_to_every_matching_subscription_once(engine_factory):
    reg, calls = fanout_app()
    e = await engine_factory(reg)
    await sl.publish("user.created", {"name": "ada", "plan": "pro", "amount": 50}, key="u1")
    await sl.publish("user.created", {"name": "bob", "plan": "free", "amount": 5000}, key="u2")
    await sl.publish("billing.invoiced", {"name": "x", "plan": "pro"})
    # ada: welcome-pro + audit; bob: audit + big-spender; billing: nothing.
    await eventually(lambda: all_done(e, 4), timeout=30, what="four runs to complete")
    assert await runs_by_task(e) == {"welcome-pro": 1, "audit": 2, "big-spender": 1}
    assert calls == {"welcome-pro": 1, "audit": 2, "big-spender": 1}
    # The raising predicate matched nothing and blocked nobody.
    assert calls["broken-filter"] == 0 and calls["orders"] == 0


async def test_redelivered_events_never_start_a_second_run(engine_factory):
    reg, calls = fanout_app()
    e = await engine_factory(reg)
    for i in range(5):
        await sl.publish("user.created", {"name": f"u{i}", "plan": "team", "amount": 2000})
    await eventually(lambda: all_done(e, 15), timeout=30, what="fifteen runs to complete")
    await e.stop_worker()
    # Forget what the router acknowledged: every event is delivered again.
    events_topic = e.client.topics.events
    group = f"{e.client.topics.namespace}.router"
    parts = await e.client.log.partitions(events_topic)
    await e.client.log.commit(group, events_topic, {p: 0 for p in range(parts)})
    await e.start_worker()
    await eventually(lambda: _committed_to_end(e, group), timeout=30, what="the router to catch up again")
    assert await runs_by_task(e) == {"welcome-pro": 5, "audit": 5, "big-spender": 5}
    assert calls == {"welcome-pro": 5, "audit": 5, "big-spender": 5}


async def _committed_to_end(e, group: str) -> bool:
    topic = e.client.topics.events
    committed = await e.client.log.committed(group, topic)
    for p in range(await e.client.log.partitions(topic)):
        if committed.get(p, 0) != await e.client.log.end_offset(topic, p):
            return False
    return True


class Signup(BaseModel):
    email: str


async def test_data_that_does_not_fit_the_payload_type_fails_only_that_run(engine_factory):
    reg = sl.Registry()

    @sl.task(id="typed", registry=reg, on=sl.Subscription("user.created"))
    async def typed(event: Signup) -> str:
        return event.email

    @sl.task(id="loose", registry=reg, on=sl.Subscription("user.created"))
    async def loose(event: dict) -> str:
        return event["name"]

    e = await engine_factory(reg)
    await sl.publish("user.created", {"name": "ada"})

    async def settled() -> bool:
        runs = await e.client.list_runs()
        return len(runs) == 2 and all(r.status in ("completed", "failed") for r in runs)
    await eventually(settled, timeout=30, what="both runs to end")
    by_task = {r.task_id: r for r in await e.client.list_runs()}
    assert by_task["loose"].status == "completed"
    assert by_task["typed"].status == "failed" and by_task["typed"].error is not None
    assert "email" in by_task["typed"].error.message
