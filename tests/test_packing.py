"""A worker keeps its suspended runs packed: each unpacks to exactly the
state it was, wakes on its timer or its event, survives a snapshot, and
costs a few hundred bytes instead of a couple of kilobytes."""

from __future__ import annotations

import dataclasses
import time
import tracemalloc
import uuid
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

import stepline as sl
from stepline.core.events import ErrorInfo, PatchRecorded, Payload
from stepline.core.ids import new_run_id
from stepline.log.memory import forget_store
from stepline.projections import snapshot
from stepline.projections.packing import JsonPacker
from stepline.projections.runs import (
    SUSPENDED,
    AttemptError,
    LogLine,
    PartitionRuns,
    RetryInfo,
    RunState,
    RunTable,
    StepState,
)
from tests.test_compaction import copy, story, template

from .conftest import eventually


def sleeper_state(i: int, **changes: Any) -> RunState:
    t = 1_765_000_000_000 + i
    wait = StepState(1, "sleep", "waiting", 1, t, wake_at=t + 60_000)
    done = StepState(0, "charge", "completed", 1, t, t + 3, input=Payload("application/json", b"[1]"),
                     output=Payload("application/json", b'"ok \xc3\xa9"'))
    state = RunState(run_id=new_run_id(), task_id="sleeper", status=SUSPENDED,
                     payload=Payload("application/json", b'{"i": %d}' % i), created_at=t, updated_at=t + 5,
                     seq=4, started_at=t + 1, wake_at=t + 60_000, steps=MappingProxyType({0: done, 1: wait}))
    return dataclasses.replace(state, **changes)


def test_a_packed_run_unpacks_to_exactly_the_state_it_was() -> None:
    packer = JsonPacker()
    t = 1_765_000_000_000
    err = ErrorInfo("ValueError", "boom é", "stack", True)
    states = [
        sleeper_state(0),
        sleeper_state(1),
        sleeper_state(2, tags=("a", "b"), priority=3, idempotency_key="k", parent_run_id="run_p", parent_step=2,
                      queue="q", concurrency_key="c", expires_at=t + 9, attempt=3, first_attempt=2,
                      errors=(AttemptError(2, 0, "charge", err, t),), retries=(RetryInfo(2, t + 5, 5, "r", t),),
                      logs=(LogLine(t, "info", "hi", 1, 0, "{}"),), logs_dropped=2, forked_from="run_f",
                      forked_at_step=1, task_version="v2", patches=(PatchRecorded("p1", True, 0),),
                      requests=("e1", "e2"), parent_pool="gpu", error=err, dead_lettered=False),
        sleeper_state(3, steps=MappingProxyType({
            4: StepState(4, "event", "waiting", 1, t, wake_at=None, condition='{"name":"x"}', group=4),
            5: StepState(5, "sleep", "waiting", 1, t, wake_at=t + 1, group=4),
        }), wake_at=t + 1),
    ]
    for state in states:
        data = packer.pack(state)
        assert packer.unpack(state.run_id, data) == state
    assert len(packer.pack(sleeper_state(7))) < 200  # the dictionary is the first run packed


async def sleeper_history() -> list[Any]:
    """The events of one real run that sleeps twice, as a worker wrote them."""
    reg, _ = sleepy_app()
    url = f"memory://packing-{uuid.uuid4().hex}"
    try:
        async with sl.Client(url, registry=reg) as client, sl.Worker(reg, client.log, client=client):
            h = await client.trigger("nap", {"i": 5, "ms": 20})
            assert await h.result(timeout=20) == 5
            return [ev for _, ev in await client.history(h.run_id)]
    finally:
        forget_store(url.removeprefix("memory://"))


async def test_every_state_of_real_runs_is_the_same_in_a_packing_table() -> None:
    naps = await sleeper_history()
    assert any(ev.type == "RunSuspended" for ev in naps)
    evs = story(await template())
    # Sleepers interleaved with the rest, one of them still asleep at the end.
    for i in range(4):
        evs[10 * i:10 * i] = copy(naps, f"run_nap{i}", 1)[:-3] if i == 3 else copy(naps, f"run_nap{i}", 1)
    plain, packed = PartitionRuns(0, keep_ended=40), PartitionRuns(0, keep_ended=40)
    packed.runs.use(JsonPacker())
    # Every event twice: duplicates of packed runs change nothing either.
    for offset, ev in enumerate(evs + evs):
        assert packed.apply(ev, offset) == plain.apply(ev, offset)
    assert packed.runs == plain.runs and packed.ended == plain.ended
    assert "run_nap3" in packed.runs.packed
    assert packed.run_counts() == plain.run_counts()


def test_only_suspended_runs_are_packed_and_a_resumed_one_is_whole_again() -> None:
    table = RunTable(JsonPacker())
    asleep, running = sleeper_state(1), sleeper_state(2, status="running", wake_at=None)
    table[asleep.run_id] = asleep
    table[running.run_id] = running
    assert set(table.packed) == {asleep.run_id} and set(table.whole) == {running.run_id}
    assert table[asleep.run_id] == asleep and table.get(asleep.run_id) == asleep
    assert sorted(table.statuses()) == ["running", "suspended"] and len(table) == 2
    woken = dataclasses.replace(asleep, status="pending", wake_at=None)
    table[asleep.run_id] = woken
    assert not table.packed and table[asleep.run_id] is woken
    del table[asleep.run_id]
    assert asleep.run_id not in table and table.get(asleep.run_id) is None
    with pytest.raises(KeyError):
        table[asleep.run_id]


def test_a_snapshot_of_packed_runs_loads_as_the_same_runs() -> None:
    part = PartitionRuns(3, epoch=2, next_offset=77)
    part.runs.use(JsonPacker())
    states = [sleeper_state(i) for i in range(20)] + [sleeper_state(99, status="running", wake_at=None)]
    for st in states:
        part.runs[st.run_id] = st
    assert len(part.runs.packed) == 20
    loaded = snapshot.load(snapshot.dump(part))
    assert not loaded.runs.packed  # loaded whole; the worker packs them again
    assert dict(loaded.runs.items()) == {st.run_id: st for st in states}


def test_a_packed_sleeper_takes_at_most_a_quarter_of_a_whole_one() -> None:
    states = [sleeper_state(i) for i in range(5000)]
    sizes = {}
    for name, packer in (("whole", None), ("packed", JsonPacker())):
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            table = RunTable(packer)
            for st in states:  # each state made anew, as the fold makes them
                table[st.run_id] = dataclasses.replace(st, steps=MappingProxyType(dict(st.steps)),
                                                       payload=Payload("application/json", bytes(st.payload.data)))
            sizes[name] = (tracemalloc.get_traced_memory()[0] - before) / len(states)
        finally:
            tracemalloc.stop()
        del table
    assert sizes["packed"] <= sizes["whole"] / 4, sizes


# --- in a worker, on a real sqlite file ----------------------------------------


def sleepy_app() -> tuple[sl.Registry, list[str]]:
    reg = sl.Registry()
    seen: list[str] = []

    @sl.step
    async def mark(i: int) -> int:
        seen.append(f"mark {i}")
        return i

    @sl.task(id="nap", registry=reg)
    async def nap(p: dict[str, Any]) -> int:
        await mark(p["i"])
        await sl.sleep(timedelta(milliseconds=p["ms"]))
        return p["i"]

    @sl.task(id="await-order", registry=reg)
    async def await_order(p: dict[str, Any]) -> Any:
        return await sl.wait_for_event("order.paid", match={"order": p["order"]}, timeout=120)

    return reg, seen


async def test_a_worker_keeps_sleepers_packed_and_wakes_each_once(tmp_path: Path) -> None:
    reg, seen = sleepy_app()
    url = f"sqlite:///{tmp_path / 'log.db'}"
    async with sl.Client(url, registry=reg) as client, sl.Worker(reg, client.log, client=client) as worker:
        long = [await client.trigger("nap", {"i": i, "ms": 120_000}) for i in range(30)]
        short = [await client.trigger("nap", {"i": 100 + i, "ms": 1_500}) for i in range(10)]
        waiter = await client.trigger("await-order", {"order": "o-7"})

        def packed() -> int:
            return sum(len(p.runs.packed) for p in worker._parts.values())

        await eventually(lambda: packed() == 41, timeout=30, what="every run to sleep or wait, packed")
        assert not any(st.status == SUSPENDED for p in worker._parts.values() for st in p.runs.whole.values())
        assert worker.run_counts().get("suspended") == 41
        assert worker.runs()[long[0].run_id].steps[1].status == "waiting"
        # The short sleepers wake on their timers; the waiter on its event.
        assert [await h.result(timeout=30) for h in short] == list(range(100, 110))
        await client.publish("order.paid", {"order": "o-7", "total": 3})
        assert await waiter.result(timeout=30) == {"order": "o-7", "total": 3}
        await eventually(lambda: packed() == 30, timeout=10, what="the woken runs to leave the packed ones")
        assert sorted(seen) == sorted({f"mark {i}" for i in range(30)} | {f"mark {100 + i}" for i in range(10)})
        for h in long:
            assert (await client.get_run(h.run_id)).status == SUSPENDED


async def test_a_restarted_worker_wakes_the_packed_sleepers_from_its_snapshot(tmp_path: Path) -> None:
    reg, seen = sleepy_app()
    url = f"sqlite:///{tmp_path / 'log.db'}"
    async with sl.Client(url, registry=reg) as client:
        wake = int(time.time() * 1000) + 6_000
        async with sl.Worker(reg, client.log, client=client, snapshot_every=20) as worker:
            handles = [await client.trigger("nap", {"i": i, "ms": max(0, wake - int(time.time() * 1000))})
                       for i in range(20)]
            await eventually(lambda: sum(len(p.runs.packed) for p in worker._parts.values()) == 20,
                             timeout=30, what="every run asleep, packed")
        # The stop left a snapshot of each partition, the sleepers in it.
        async with sl.Worker(reg, client.log, client=client) as again:
            assert any(start > 0 for start in again.rebuilt_from.values()), again.rebuilt_from
            assert sum(len(p.runs.packed) for p in again._parts.values()) == 20
            assert sorted([await h.result(timeout=40) for h in handles]) == list(range(20))
        assert sorted(seen) == sorted(f"mark {i}" for i in range(20))  # the step before the sleep ran once


async def test_a_frozen_copy_snapshots_the_partition_as_it_was_whatever_is_folded_after() -> None:
    naps = await sleeper_history()
    evs = story(await template())
    evs[0:0] = copy(naps, "run_nap0", 1)[:-3]
    part = PartitionRuns(0, keep_ended=40)
    part.runs.use(JsonPacker())
    half = len(evs) // 2
    for offset, ev in enumerate(evs[:half]):
        part.apply(ev, offset)
    want = snapshot.dump(part)
    frozen = part.frozen()
    # The rest folds on (runs end, are compacted, the sleeper wakes and ends).
    for offset, ev in enumerate(evs[half:] + copy(naps, "run_nap0", 2)[-3:], start=half):
        part.apply(ev, offset)
    assert "run_nap0" not in part.runs.packed and len(part.ended) > len(frozen.ended)
    assert snapshot.dump(frozen) == want
    assert "run_nap0" in snapshot.load(want).runs
