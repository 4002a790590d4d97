"""Schedules: one run per tick, whoever fires it; missed ticks by policy."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

import stepline as sl
from stepline.core.ids import idempotent_run_id
from stepline.sdk.schedule import Scheduler, tick_key

from .conftest import eventually


def ticking(interval: float, catch_up: timedelta | None = None) -> sl.Registry:
    reg = sl.Registry()

    @sl.task(id="tick", registry=reg, schedule=sl.Every(timedelta(seconds=interval), catch_up=catch_up))
    async def tick(t: sl.ScheduleTick) -> str:
        return t.scheduled_at.isoformat()

    return reg


def scheduled_at(state: sl.RunState) -> datetime:
    return datetime.fromisoformat(json.loads(state.payload.data)["scheduled_at"])


async def test_every_tick_runs_once_under_its_derived_run_id(engine_factory):
    e = await engine_factory(ticking(0.3))
    await eventually(lambda: _completed(e, 3), timeout=20, what="three ticks to run")
    runs = [r for r in await e.client.list_runs() if r.status == "completed"]
    for r in runs:
        at = scheduled_at(r)
        assert int(at.timestamp() * 1000) % 300 == 0  # on the interval's grid
        assert r.run_id == idempotent_run_id("tick", tick_key(at))
    assert len({scheduled_at(r) for r in runs}) == len(runs)


async def _completed(e, n: int) -> bool:
    return sum(r.status == "completed" for r in await e.client.list_runs()) >= n


async def test_a_tick_fired_by_three_schedulers_runs_once(engine_factory):
    reg = ticking(0.25)
    e = await engine_factory(reg)  # its worker fires the ticks too
    others = [Scheduler(reg, e.client) for _ in range(2)]
    for s in others:
        s.start()
    async def overlapped() -> bool:
        # Both others fired ticks of their own, not only the engine's ticks
        # from before they started (under load the worker may run those
        # first four before the others' first tick comes).
        return all(s.fired >= 2 for s in others) and await _completed(e, 4)

    try:
        await eventually(overlapped, timeout=30, what="four ticks to run, two fired by each other scheduler")
    finally:
        for s in others:
            await s.close()
    await asyncio.sleep(0.3)
    runs = await e.client.list_runs()
    ticks = [scheduled_at(r) for r in runs]
    assert len(ticks) == len(set(ticks)), "a tick started two runs"
    triggers = [[ev.type for _, ev in await e.client.history(r.run_id)].count("RunTriggered") for r in runs]
    assert max(triggers) >= 2  # a tick fired more than once, kept once


async def test_a_cron_tick_fires_once_across_three_workers(engine_factory):
    """Three workers, each with its own connection and scheduler, share the
    partitions; every tick still starts exactly one run."""
    reg = sl.Registry()
    executions: list[str] = []

    @sl.task(id="cron", registry=reg, schedule=sl.Cron("* * * * * *"))  # every second
    async def cron(t: sl.ScheduleTick) -> None:
        executions.append(t.scheduled_at.isoformat())

    e = await engine_factory(reg)
    extra = []
    for _ in range(2):
        log_ = sl.open_log(e.url)
        await log_.start()
        w = sl.Worker(reg, log_, topics=e.topics, client=e.client)
        # On the single-seat logs (memory, sqlite) a second worker is a
        # standby: start() waits for the seat, but its scheduler already fires.
        extra.append((w, log_, asyncio.create_task(w.start())))
    try:
        await eventually(lambda: len(executions) >= 3, timeout=30, what="three cron ticks to run")
    finally:
        for w, log_, starting in extra:
            await w.close()
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            await log_.close()
    runs = await e.client.list_runs()
    ticks = [scheduled_at(r) for r in runs]
    assert len(ticks) == len(set(ticks)), "a tick started two runs"
    assert len(executions) == len(set(executions)), "a tick executed twice"
    fired = [[ev.type for _, ev in await e.client.history(r.run_id)].count("RunTriggered") for r in runs]
    assert max(fired) >= 2  # several workers fired a tick; one run was kept


async def test_missed_ticks_are_skipped_unless_a_catch_up_window_is_set(engine_factory):
    started = datetime.now(UTC)
    e = await engine_factory(ticking(0.1, catch_up=timedelta(seconds=1)))
    await eventually(lambda: _completed(e, 9), timeout=20, what="the caught-up ticks to run")
    earliest = min(scheduled_at(r) for r in await e.client.list_runs())
    assert started - timedelta(seconds=1.2) <= earliest < started - timedelta(seconds=0.5)


async def test_without_catch_up_no_tick_before_the_start_runs(engine_factory):
    started = datetime.now(UTC)
    e = await engine_factory(ticking(0.1))
    await eventually(lambda: _completed(e, 2), timeout=20, what="two ticks to run")
    assert min(scheduled_at(r) for r in await e.client.list_runs()) > started


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: sl.Cron("61 * * * *"), "invalid cron expression '61 * * * *'"),
        (lambda: sl.Cron("every day"), "invalid cron expression"),
        (lambda: sl.Cron("0 3 * * *", tz="Mars/Base"), "unknown time zone 'Mars/Base'"),
        (lambda: sl.Every(timedelta(0)), "must be positive"),
    ],
)
def test_a_bad_schedule_fails_at_definition_with_a_clear_message(make, message):
    with pytest.raises(sl.TaskDefinitionError, match=message.replace("*", r"\*")):
        make()


def test_cron_ticks_follow_the_time_zone():
    cron = sl.Cron("0 3 * * *", tz="Europe/Berlin")
    first = next(cron.ticks_after(datetime(2026, 7, 1, 12, 0, tzinfo=UTC)))
    assert first == datetime(2026, 7, 2, 1, 0, tzinfo=UTC)  # 03:00 CEST
