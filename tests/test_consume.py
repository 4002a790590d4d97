"""`stepline.events.consume`: other teams' projections from the engine's events."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import stepline as sl
from stepline.core import codec
from stepline.core.ids import new_event_id
from stepline.errors import UnknownTopic
from stepline.events import (
    JSON,
    DomainEvent,
    Event,
    PartitionClaimed,
    Payload,
    RunCompleted,
    RunStarted,
    RunTriggered,
    StepCompleted,
    consume,
)
from tests.test_examples_ecosystem import lines_after, run_example


def app() -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="bill", registry=reg)
    async def bill(payload: dict) -> int:
        @sl.step
        async def price(n: int) -> int:
            return n * 3

        return await price(payload["n"])

    return reg


async def run_some(e, first: int, count: int) -> list[str]:
    handles = [await e.client.trigger("bill", {"n": n}) for n in range(first, first + count)]
    await asyncio.gather(*(h.result(timeout=30) for h in handles))
    return [h.run_id for h in handles]


async def test_a_projection_from_offset_0_sees_every_run_the_engine_recorded(engine_factory):
    e = await engine_factory(app())
    run_ids = await run_some(e, 0, 12)
    outputs: dict[str, int] = {}
    types: Counter[str] = Counter()
    async with consume(e.client.log, ["runs"]) as stream:
        async for d in stream:
            types[d.event.type] += 1
            assert d.topic == "runs"
            if isinstance(d.body, RunCompleted):
                outputs[d.event.run_id] = json.loads(d.body.output.data)
    # Not following: the stream ended at the end offsets it saw when it opened.
    assert outputs == {rid: n * 3 for n, rid in enumerate(run_ids)}
    assert types["RunTriggered"] == types["StepCompleted"] == 12

    only: list[str] = []
    async with consume(e.client.log, ["runs"], types=[StepCompleted]) as stream:
        only = [d.event.type async for d in stream]
    assert only == ["StepCompleted"] * 12



async def test_iterating_a_stream_without_async_with_opens_and_reads_the_log(engine_factory, backend_url):
    e = await engine_factory(app())
    run_ids = await run_some(e, 0, 3)
    # A URL: the stream opens the log itself for the loop, and closes it after.
    by_url = [d.event.run_id async for d in consume(backend_url, ["runs"], types=[RunCompleted])]
    assert sorted(by_url) == sorted(run_ids)
    # An open Log: read as it is.
    by_log = [d.event.run_id async for d in consume(e.client.log, ["runs"], types=[RunCompleted])]
    assert sorted(by_log) == sorted(run_ids)

async def test_a_committed_position_resumes_after_the_last_delivery(engine_factory):
    e = await engine_factory(app())
    await run_some(e, 0, 5)
    async with consume(e.client.log, ["runs"], group="billing", types=[RunCompleted]) as stream:
        assert len([d async for d in stream]) == 5
        await stream.commit()
    later = await run_some(e, 100, 4)
    async with consume(e.client.log, ["runs"], group="billing", start="committed",
                       types=[RunCompleted]) as stream:
        resumed = sorted([d.event.run_id async for d in stream])
    assert resumed == sorted(later)
    # Another group has its own position: from offset 0.
    async with consume(e.client.log, ["runs"], group="audit", start="committed",
                       types=[RunCompleted]) as stream:
        assert len([d async for d in stream]) == 9


async def test_following_delivers_what_is_recorded_after_the_stream_opened(engine_factory):
    e = await engine_factory(app())
    await run_some(e, 0, 2)
    async with consume(e.client.log, ["runs", "events"], start="latest", follow=True, poll_timeout=0.05,
                       types=[RunCompleted, DomainEvent]) as stream:
        async def first_two() -> list[Event]:
            got: list[Event] = []
            async for d in stream:
                got.append(d.event)
                if len(got) == 2:
                    return got
            raise AssertionError("a following stream ended")

        reader = asyncio.create_task(first_two())
        await asyncio.sleep(0.1)
        (rid,) = await run_some(e, 7, 1)
        await e.client.publish("invoice.paid", {"amount": 5})
        got = await asyncio.wait_for(reader, 30)
    assert {ev.type for ev in got} == {"RunCompleted", "DomainEvent"}
    assert next(ev for ev in got if ev.type == "RunCompleted").run_id == rid


RUN = "run_01CONSUMEFENCE000000000000"


async def test_a_replaced_owners_late_outcome_is_dropped_unless_asked_for(backend_url):
    async with sl.Client(backend_url) as client:
        p = client.partition_of(RUN)

        async def append(body, seq: int, epoch: int, run_id: str = RUN) -> None:
            ev = Event(new_event_id(), body.TYPE, run_id, "t" if run_id else "", seq, 1000 + seq, epoch, body)
            await client.log.append(client.topics.runs, p, [(run_id.encode(), codec.encode(ev))])

        await append(RunTriggered(Payload(JSON, b"1")), 1, 0)
        await append(PartitionClaimed(p, "old"), 0, 1, run_id="")
        await append(RunStarted(1, "old"), 2, 1)
        await append(PartitionClaimed(p, "new"), 0, 2, run_id="")
        await append(RunCompleted(Payload(JSON, b'"zombie"'), 1), 3, 1)
        await append(RunCompleted(Payload(JSON, b'"owner"'), 1), 3, 2)
        # Not an event at all: passed over and counted, never blocking what follows.
        await client.log.append(client.topics.runs, p, [(b"x", b"\x00garbage")])
        await append(RunCompleted(Payload(JSON, b'"after"'), 1), 4, 2)

        async with consume(client.log, types=[RunCompleted]) as stream:
            accepted = [d.body.output.data async for d in stream]
            assert stream.skipped == 1
        async with consume(client.log, types=[RunCompleted], accepted_only=False) as stream:
            raw = [d.body.output.data async for d in stream]
    assert accepted == [b'"owner"', b'"after"']
    assert raw == [b'"zombie"', b'"owner"', b'"after"']


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="topics must be some of runs, events, queues"):
        consume("memory://x", ["waits"])
    with pytest.raises(ValueError, match="start='committed' needs a group"):
        consume("memory://x", start="committed")
    with pytest.raises(ValueError, match="start must be"):
        consume("memory://x", start="yesterday")  # type: ignore[arg-type]


async def test_commit_without_a_group_is_refused(tmp_path: Path):
    async with sl.Client(f"sqlite:///{tmp_path}/s.db") as client, consume(client.log) as stream:
        with pytest.raises(ValueError, match="opened without a group"):
            await stream.commit()


async def test_a_log_the_engine_never_wrote_names_the_missing_topic(tmp_path: Path):
    with pytest.raises(UnknownTopic, match=r"stepline\.runs"):
        async with consume(f"sqlite:///{tmp_path}/empty.db"):
            pass


def test_the_tenant_cost_example_resumes_from_its_commit_and_equals_a_rebuild(tmp_path: Path):
    lines = run_example("tenant_costs.py", tmp_path)
    assert lines_after("incremental == rebuild from offset 0: ", lines) == ["True"]
    billing = json.loads(lines_after("billing: ", lines)[0])
    # 39 renders over three tenants; page counts divisible by 7 fail (7, 14, 21, 28, 105).
    assert sum(t["runs"] for t in billing.values()) == 39
    assert sum(t["failed"] for t in billing.values()) == 5
    pages = [n + 1 for n in range(30)] + [100 + n for n in range(9)]
    assert sum(t["pages_billed"] for t in billing.values()) == sum(p for p in pages if p % 7)
    # The second pass read only what followed the commit.
    (first,) = lines_after("from offset 0: ", lines)
    (more,) = lines_after("from the commit of 'billing': ", lines)
    assert int(more.split()[0]) < int(first.split()[0])


def stepline_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stepline.cli", *args], capture_output=True, text=True,
                          timeout=60, env={k: v for k, v in os.environ.items() if not k.startswith("STEPLINE_")})


async def test_stepline_events_prints_json_lines_and_resumes_from_its_group(tmp_path: Path):
    url = f"sqlite:///{tmp_path}/cli.db"
    from tests.conftest import Engine

    e = await Engine(url, app()).start()
    try:
        run_ids = await run_some(e, 0, 3)
    finally:
        await e.close()
    proc = await asyncio.to_thread(stepline_cli, "events", "--log", url, "--type", "RunCompleted",
                                   "--group", "audit")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["run_id"] for r in rows) == sorted(run_ids)
    assert {(r["topic"], r["type"]) for r in rows} == {("runs", "RunCompleted")}
    assert sorted(r["body"]["output"] for r in rows) == [0, 3, 6]
    again = await asyncio.to_thread(stepline_cli, "events", "--log", url, "--from", "committed",
                                    "--group", "audit")
    assert again.returncode == 0 and again.stdout == "", again.stderr
    bad = await asyncio.to_thread(stepline_cli, "events", "--log", url, "--type", "StepDone")
    assert bad.returncode != 0 and "unknown event type(s) StepDone" in bad.stderr
