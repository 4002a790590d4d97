"""Partition snapshots: a rebuild starts from the newest one and folds only the tail."""

from __future__ import annotations

import asyncio
import zlib

import pytest

import stepline as sl
from stepline.projections import snapshot
from stepline.projections.runs import PartitionRuns
from stepline.projections.snapshot import SnapshotError

from .conftest import eventually


def registry() -> tuple[sl.Registry, sl.Task]:
    reg = sl.Registry()

    @sl.step
    async def add(a: int, b: int) -> int:
        return a + b

    @sl.task(id="adder", registry=reg, retry=sl.Retry(max_attempts=2, min_timeout=0.01))
    async def adder(p: dict) -> int:
        total = await add(p["n"], 1)
        if p.get("nap"):
            await sl.sleep(p["nap"])
        if p.get("fail"):
            raise ValueError("asked to fail")
        return await add(total, 1)

    return reg, adder


async def test_a_restarted_worker_rebuilds_from_snapshots_to_the_same_state(engine_factory):
    reg, adder = registry()
    e = await engine_factory(reg, snapshot_every=20)
    # Asleep first, and long enough to still be asleep at the restart however
    # slowly the 30 others finish on a loaded machine.
    sleeper = await adder.trigger({"n": 100, "nap": 8.0})
    await eventually(lambda: _status(e, sleeper.run_id, "suspended"), timeout=30, what="the sleeper to suspend")
    handles = [await adder.trigger({"n": i, "fail": i % 7 == 0}) for i in range(30)]
    for h in handles:
        try:
            await h.result(timeout=30)
        except sl.RunFailedError:
            pass

    worker = await e.restart_worker()
    assert any(start > 0 for start in worker.rebuilt_from.values()), worker.rebuilt_from
    # The sleeping run is resumed from the snapshot's state after the restart.
    assert await sleeper.result(timeout=40) == 102
    # The client saw the outcome; let the worker fold its own last events too.
    await eventually(lambda: worker.runs()[sleeper.run_id].status == "completed",
                     what="the worker to fold the sleeper's completion")
    rebuilt = worker.runs()
    from_zero = {r.run_id: r for r in await e.client.list_runs()}
    assert set(rebuilt) == set(from_zero)
    for run_id, state in from_zero.items():
        assert rebuilt[run_id] == state, run_id


async def _status(e, run_id, status):
    s = await e.client.get_run(run_id)
    return s if s.status == status else None


async def test_a_snapshot_round_trips_every_run_state(engine_factory):
    reg, adder = registry()
    e = await engine_factory(reg)
    for i in range(12):
        h = await adder.trigger({"n": i, "fail": i % 4 == 0})
        with pytest.raises(sl.RunFailedError) if i % 4 == 0 else _nothing():
            await h.result(timeout=20)
    await asyncio.sleep(0.2)
    assert e.worker is not None
    for part in e.worker._parts.values():
        copy = snapshot.load(snapshot.dump(part))
        assert (copy.partition, copy.epoch, copy.next_offset) == (part.partition, part.epoch, part.next_offset)
        assert copy.runs == part.runs


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_a_damaged_or_unknown_snapshot_is_refused_not_guessed():
    good = snapshot.dump(PartitionRuns(3, epoch=2, next_offset=10))
    assert snapshot.load(good).next_offset == 10
    with pytest.raises(SnapshotError, match="damaged"):
        snapshot.load(good[:-4])
    with pytest.raises(SnapshotError, match="version 99"):
        snapshot.load(zlib.compress(b'{"v": 99}'))


async def test_a_worker_restarted_before_snapshot_every_still_leaves_one_after_a_long_rebuild(engine_factory):
    """Restarts more frequent than `snapshot_every` new events must not mean
    rebuilding from offset 0 forever: the rebuild itself counts."""
    reg, adder = registry()
    e = await engine_factory(reg, snapshot_every=10_000)
    for h in [await adder.trigger({"n": i}) for i in range(30)]:
        await h.result(timeout=20)
    await e.stop_worker()
    # Far fewer events than snapshot_every, but a rebuild of all of them:
    e.worker_options["snapshot_every"] = 20
    worker = await e.start_worker()
    assert all(start == 0 for start in worker.rebuilt_from.values())  # nothing to start from yet
    await eventually(lambda: _snapshots_written(e), timeout=20, what="a snapshot after the long rebuild")
    again = await e.restart_worker()
    assert any(start > 0 for start in again.rebuilt_from.values()), again.rebuilt_from


async def _snapshots_written(e) -> bool:
    topic = e.client.topics.snapshots
    return any([await e.client.log.end_offset(topic, p) > 0
                for p in range(await e.client.log.partitions(topic))])
