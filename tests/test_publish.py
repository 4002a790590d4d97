"""Domain events: `sl.publish` and `stepline publish` append a DomainEvent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import stepline as sl
from stepline.core import codec
from stepline.core.events import DomainEvent
from stepline.errors import InvalidEventName
from stepline.log.base import kafka_partition_for


async def events_on_topic(client: sl.Client) -> list:
    topic = client.topics.events
    out = []
    for p in range(await client.log.partitions(topic)):
        for rec in await client.log.read(topic, p, 0, 1000):
            out.append((p, rec.offset, codec.decode(rec.value)))
    return out


async def test_publish_appends_a_domain_event_keyed_for_order(engine_factory):
    e = await engine_factory(sl.Registry())
    first = await sl.publish("user.created", {"id": 1, "plan": "pro"}, key="user-1")
    second = await e.client.publish("user.updated", {"id": 1}, key="user-1", source="billing")
    other = await e.client.publish("order.paid", [1, 2])
    found = await events_on_topic(e.client)
    by_id = {ev.event_id: (p, off, ev) for p, off, ev in found}
    assert set(by_id) == {first, second, other}
    p1, o1, ev1 = by_id[first]
    p2, o2, ev2 = by_id[second]
    assert p1 == p2 == kafka_partition_for(b"user-1", await e.client.log.partitions(e.client.topics.events))
    assert o1 < o2  # one key, one partition, in order
    assert ev1.body == DomainEvent("user.created", ev1.body.data, "user-1", "api")
    assert json.loads(ev1.body.data.data) == {"id": 1, "plan": "pro"}
    assert ev2.body.source == "billing"
    assert json.loads(by_id[other][2].body.data.data) == [1, 2]


async def test_a_bad_event_name_is_refused_and_nothing_appended(engine_factory):
    e = await engine_factory(sl.Registry())
    for bad in ("", "user created", " user.created", "user.created.", "user.\ncreated"):
        with pytest.raises(InvalidEventName):
            await e.client.publish(bad, {})
    assert await events_on_topic(e.client) == []


def test_stepline_publish_prints_the_event_id_and_refuses_bad_json(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/stepline.db"
    env = dict(os.environ, STEPLINE_LOG=url)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "stepline.cli", *args], env=env,
                              capture_output=True, text=True, timeout=60)

    ok = cli("publish", "user.created", "--data", '{"plan": "pro"}', "--key", "u-7", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["event_id"]
    bad = cli("publish", "user.created", "--data", "{plan")
    assert bad.returncode == 1 and "--data is not valid JSON" in bad.stderr
    spaced = cli("publish", "user created", "--data", "{}")
    assert spaced.returncode == 1 and "event name" in spaced.stderr


async def test_oversized_payloads_and_event_data_are_refused_and_nothing_appended(engine_factory):
    reg = sl.Registry()

    @sl.task(id="echo", registry=reg)
    async def echo(p: dict) -> dict:
        return p

    e = await engine_factory(reg)
    big = {"blob": "x" * (600 * 1024)}  # over the 512 KiB default
    runs_before = len(await e.client.list_runs())
    with pytest.raises(sl.PayloadTooLarge, match="over the 524,288-byte limit"):
        await e.client.trigger("echo", big)
    with pytest.raises(sl.PayloadTooLarge, match="data of event 'user.created'"):
        await e.client.publish("user.created", big)
    assert len(await e.client.list_runs()) == runs_before
    assert await events_on_topic(e.client) == []
    # The limit is the client's to set.
    async with sl.Client(e.url, topics=e.topics, max_payload_bytes=1024 * 1024) as roomy:
        handle = await roomy.trigger("echo", big)
        assert handle.run_id
