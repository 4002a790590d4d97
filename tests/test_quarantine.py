"""Undecodable records are kept aside with the reason and never block a partition."""

from __future__ import annotations

from collections import Counter

import stepline as sl
from stepline.log.base import partition_for
from stepline.log.quarantine import read_quarantine

from .conftest import eventually


def app(calls: Counter[str]) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="greet", registry=reg, on=sl.Subscription("user.created"))
    async def greet(event: dict) -> str:
        calls["greet"] += 1
        return event["name"]

    return reg


async def test_garbage_on_the_runs_and_events_topics_is_quarantined_and_work_goes_on(engine_factory):
    calls: Counter[str] = Counter()
    e = await engine_factory(app(calls))
    log_, topics = e.client.log, e.client.topics
    run_key = b"run_01GARBAGE0000000000000000"
    runs_p = partition_for(run_key, await log_.partitions(topics.runs))
    [runs_off] = await log_.append(topics.runs, runs_p, [(run_key, b"\x00not avro at all")])
    unknown_schema = b"\xc3\x01" + b"\xde\xad\xbe\xef\x00\x00\x00\x00" + b"\x02"
    [events_off] = await log_.append(topics.events, 0, [(b"k", unknown_schema)])
    # Both partitions keep flowing past the bad records.
    await e.client.publish("user.created", {"name": "ada"}, key="k")
    handle = await e.client.trigger("greet", {"name": "bob"})
    assert await handle.result(timeout=30) == "bob"
    await eventually(lambda: calls["greet"] == 2, timeout=30, what="the event after the garbage to route")

    async def both_quarantined() -> list:
        found = await read_quarantine(log_, topics.quarantine)
        return found if len(found) == 2 else []

    found = await eventually(both_quarantined, timeout=30, what="two quarantined records")
    by_topic = {q.topic: q for q in found}
    assert (by_topic[topics.runs].partition, by_topic[topics.runs].offset) == (runs_p, runs_off)
    assert by_topic[topics.runs].value == b"\x00not avro at all"
    assert by_topic[topics.events].offset == events_off
    assert "fingerprint" in by_topic[topics.events].reason  # names the unknown schema
    assert by_topic[topics.events].reader == "router"
