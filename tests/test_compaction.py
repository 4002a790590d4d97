"""Ended runs leave a worker's memory after a bounded window, and a rebuild
that skips decoding them reaches the state the full fold reaches."""

from __future__ import annotations

import dataclasses
import uuid
import zlib

import pytest

import stepline as sl
from stepline.core import codec
from stepline.core.events import ErrorInfo, Event, PartitionClaimed, RunFailed
from stepline.core.ids import new_event_id
from stepline.log.memory import MemoryLog, MemoryStore, forget_store
from stepline.log.topics import Topics
from stepline.projections import catchup, snapshot
from stepline.projections.runs import COMPLETED, FAILED, RUNNING, PartitionRuns

WINDOW = 40


async def template() -> list[Event]:
    """The 9 events of one real three-step run, as a worker wrote them."""
    reg = sl.Registry()

    @sl.step
    async def one(x: int) -> int:
        return x + 1

    @sl.task(id="three", registry=reg)
    async def three(x: int) -> int:
        return await one(await one(await one(x)))

    url = f"memory://compaction-{uuid.uuid4().hex}"
    try:
        async with sl.Client(url, registry=reg) as client, sl.Worker(reg, client.log, client=client):
            h = await three.trigger(1, client=client)
            assert await h.result(timeout=20) == 4
            return [ev for _, ev in await client.history(h.run_id)]
    finally:
        forget_store(url.removeprefix("memory://"))


def copy(tpl: list[Event], run_id: str, epoch: int) -> list[Event]:
    return [dataclasses.replace(ev, event_id=new_event_id(), run_id=run_id,
                                epoch=ev.epoch and epoch) for ev in tpl]


def claim(epoch: int) -> Event:
    return Event(new_event_id(), PartitionClaimed.TYPE, "", "", 0, 1, epoch, PartitionClaimed(0, "w"))


def story(tpl: list[Event]) -> list[Event]:
    """One partition's log with what a rebuild must not get wrong."""
    evs: list[Event] = [claim(1)]
    for i in range(12):  # plain completed runs
        evs += copy(tpl, f"run_done{i}", 1)
    # A run that failed: it stays whole (it can be retriggered, journal and all).
    failed = copy(tpl, "run_failed", 1)[:4]
    evs += failed + [dataclasses.replace(failed[-1], event_id=new_event_id(), type=RunFailed.TYPE, seq=5,
                                         body=RunFailed(ErrorInfo("E", "boom"), 1))]
    # A zombie: the old owner's completion arrives after a newer claim (fenced),
    # so the run is still running when the new owner takes it.
    zombie = copy(tpl, "run_zombie", 1)
    evs += zombie[:-1] + [claim(2), zombie[-1]]
    # Runs interleaved with each other, one of them with a duplicate completion
    # and a repeated trigger after it ended.
    a, b = copy(tpl, "run_a", 2), copy(tpl, "run_b", 2)
    for x, y in zip(a, b):
        evs += [x, y]
    evs += [dataclasses.replace(a[-1], event_id=new_event_id()), dataclasses.replace(a[0], event_id=new_event_id())]
    for i in range(5):  # the last ones end within the window of the end: whole
        evs += copy(tpl, f"run_late{i}", 2)
    evs += copy(tpl, "run_live", 2)[:5]
    return evs


def full_fold(evs: list[Event]) -> PartitionRuns:
    part = PartitionRuns(0, keep_ended=WINDOW)
    for off, ev in enumerate(evs):
        part.apply(ev, off)
    return part


async def rebuild(evs: list[Event], batch: int) -> PartitionRuns:
    """The worker's own catch-up over the same events on a real (memory://) log."""
    topics = Topics(partitions=1)
    async with MemoryLog(f"compaction-{uuid.uuid4().hex}", store=MemoryStore()) as log:
        await log.ensure_topics(topics.specs())
        await log.append(topics.runs, 0, [(ev.run_id.encode(), codec.encode(ev)) for ev in evs])
        worker = sl.Worker(sl.Registry(), log, topics=topics, read_batch=batch, keep_ended=WINDOW)
        part = PartitionRuns(0, keep_ended=WINDOW)
        await worker._catch_up(part, await log.end_offset(topics.runs, 0))
        return part


@pytest.mark.parametrize("batch", [7, 50, 2000])
async def test_a_rebuild_that_skips_ended_runs_reaches_the_full_folds_state(batch: int) -> None:
    evs = story(await template())
    want = full_fold(evs)
    got = await rebuild(evs, batch)
    assert (got.epoch, got.next_offset, got.fenced) == (want.epoch, want.next_offset, want.fenced) == (2, len(evs), 1)
    assert got.runs == want.runs
    assert got.ended == want.ended
    assert list(got.ending) == list(want.ending)
    # What that state is: early completions compacted to their ids, the rest whole.
    assert {f"run_done{i}" for i in range(12)} | {"run_a", "run_b"} <= got.ended
    assert got.runs["run_failed"].status == FAILED
    assert got.runs["run_zombie"].status == RUNNING  # the fenced completion did not count
    assert all(got.runs[f"run_late{i}"].status == COMPLETED for i in (2, 3, 4))
    assert got.runs["run_live"].live


async def test_the_rebuild_decodes_none_of_the_events_of_runs_it_compacts() -> None:
    evs = story(await template())
    values = [codec.encode(ev) for ev in evs]
    plan = catchup.plan(PartitionRuns(0, keep_ended=WINDOW), values, range(len(evs)), len(evs),
                        codec.peek_envelope, lambda v: codec.decode(v).epoch)
    assert set(plan.ended) == {f"run_done{i}" for i in range(12)} | {"run_a", "run_b", "run_late0"}
    assert plan.skip == {i for i, ev in enumerate(evs) if ev.run_id in set(plan.ended)}
    # Without compaction everything is decoded and folded.
    assert not catchup.plan(PartitionRuns(0), values, range(len(evs)), len(evs),
                            codec.peek_envelope, lambda v: codec.decode(v).epoch).skip


async def test_an_ended_run_is_compacted_after_the_window_and_stays_ended() -> None:
    tpl = await template()
    part = PartitionRuns(0, keep_ended=WINDOW)
    off = 0
    for ev in copy(tpl, "run_old", 1):
        part.apply(ev, off)
        off += 1
    assert part.runs["run_old"].status == COMPLETED  # whole, inside the window
    for i in range(6):
        for ev in copy(tpl, f"run_new{i}", 1):
            part.apply(ev, off)
            off += 1
    assert "run_old" not in part.runs and "run_old" in part.ended
    # Its trigger delivered again (a client retry, an idempotency key reused)
    # does not start it again, and nothing else about it changes anything.
    for ev in copy(tpl, "run_old", 1):
        assert part.apply(ev, off) is None
        off += 1
    assert "run_old" not in part.runs
    # Compaction is the worker's choice: a plain fold keeps every run whole.
    plain = PartitionRuns(0)
    for o, ev in enumerate(copy(tpl, "run_x", 1) * 20):
        plain.apply(ev, o)
    assert plain.runs["run_x"].status == COMPLETED and not plain.ended


async def test_a_snapshot_keeps_the_compacted_runs_and_reads_version_5() -> None:
    evs = story(await template())
    part = full_fold(evs)
    assert part.ended and part.ending
    copy_ = snapshot.load(snapshot.dump(part))
    assert copy_.runs == part.runs and copy_.ended == part.ended and list(copy_.ending) == list(part.ending)
    doc = (b'{"v":5,"partition":0,"epoch":3,"next_offset":9,"fenced":0,"runs":[]}')
    old = snapshot.load(zlib.compress(doc))
    assert (old.epoch, old.next_offset, old.ended) == (3, 9, set())
