"""Reads of one run fence a replaced owner's late events, as the worker's fold does."""

from __future__ import annotations

import asyncio
import uuid

import pytest

import stepline as sl
from stepline.core import codec
from stepline.core.events import (
    JSON,
    Event,
    PartitionClaimed,
    Payload,
    RunCompleted,
    RunStarted,
    RunTriggered,
)
from stepline.core.ids import new_event_id

RUN = "run_01FENCED000000000000000000"


async def append(client: sl.Client, event: Event) -> None:
    """Into RUN's partition; claims carry the empty key, as workers write them."""
    await client.log.append(client.topics.runs, client.partition_of(RUN),
                            [(event.run_id.encode(), codec.encode(event))])


def ev(body, seq: int, epoch: int, run_id: str = RUN) -> Event:
    return Event(new_event_id(), body.TYPE, run_id, "t" if run_id else "", seq, 1000 + seq, epoch, body)


@pytest.fixture
async def client():
    async with sl.Client(f"memory://fence-{uuid.uuid4().hex}") as c:
        yield c


async def test_a_late_outcome_from_a_replaced_owner_is_not_the_runs_result(client):
    await append(client, ev(RunTriggered(Payload(JSON, b"1")), 1, 0))
    await append(client, ev(PartitionClaimed(client.partition_of(RUN), "old"), 0, 1, run_id=""))
    await append(client, ev(RunStarted(1, "old"), 2, 1))
    await append(client, ev(PartitionClaimed(client.partition_of(RUN), "new"), 0, 2, run_id=""))
    waiting = asyncio.create_task(client.wait(RUN, timeout=2, from_offset=0))
    # The old owner, paused past its session, comes back and records an outcome.
    await append(client, ev(RunCompleted(Payload(JSON, b'"zombie"'), 1), 3, 1))
    state = await client.get_run(RUN)
    assert state.status == "running" and state.output is None
    with pytest.raises(TimeoutError):
        await waiting  # the watcher does not take the stale outcome either
    await append(client, ev(RunCompleted(Payload(JSON, b'"owner"'), 1), 3, 2))
    state = await client.get_run(RUN)
    assert (state.status, state.output.data) == ("completed", b'"owner"')
