"""Schedules: cron expressions and fixed intervals that trigger a task.

Every tick maps to one deterministic run id (task id + tick time), so any
number of workers may fire the same tick and the log keeps one run: the
repeated triggers are no-ops in the fold. That also makes catching up
stateless: after downtime a worker re-fires the ticks of the catch-up
window, and those that already ran change nothing.

Missed ticks: by default (`catch_up=None`) ticks that fell while no worker
ran are skipped and the schedule resumes at the next one. With
`catch_up=timedelta(...)` every tick within that window before start is
fired once; older ones are skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import structlog
from pydantic import BaseModel

from stepline.core.causes import under_cause
from stepline.errors import SteplineError, TaskDefinitionError
from stepline.observability import sending
from stepline.sdk.port import ClientPort, TaskRef

log = structlog.get_logger("stepline.schedule")


class ScheduleTick(BaseModel):
    """The payload of a scheduled run."""

    schedule: str
    scheduled_at: datetime


@dataclass(frozen=True)
class Cron:
    """`Cron("0 3 * * *", tz="Europe/Berlin")`: standard five-field cron."""

    expression: str
    tz: str = "UTC"
    catch_up: timedelta | None = None

    def __post_init__(self) -> None:
        # Imported where used: an app without cron schedules (and a worker
        # restarting after a crash) does not pay for croniter at start.
        from croniter import CroniterError, croniter

        try:
            zone = ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise TaskDefinitionError(f"unknown time zone {self.tz!r} in Cron({self.expression!r})") from exc
        try:
            croniter(self.expression, datetime.now(zone))
        except (CroniterError, ValueError) as exc:
            raise TaskDefinitionError(f"invalid cron expression {self.expression!r}: {exc}") from exc

    def describe(self) -> str:
        return f"cron {self.expression} {self.tz}"

    def ticks_after(self, start: datetime) -> Iterator[datetime]:
        from croniter import croniter

        it = croniter(self.expression, start.astimezone(ZoneInfo(self.tz)))
        while True:
            yield it.get_next(datetime).astimezone(UTC)


@dataclass(frozen=True)
class Every:
    """`Every(timedelta(minutes=5))`: ticks at whole multiples of the interval (UTC)."""

    interval: timedelta
    catch_up: timedelta | None = None

    def __post_init__(self) -> None:
        if self.interval.total_seconds() <= 0:
            raise TaskDefinitionError(f"Every(interval) must be positive, got {self.interval}")

    def describe(self) -> str:
        return f"every {self.interval.total_seconds():g}s"

    def ticks_after(self, start: datetime) -> Iterator[datetime]:
        step_ms = int(self.interval.total_seconds() * 1000)
        ms = (int(start.timestamp() * 1000) // step_ms + 1) * step_ms
        while True:
            yield datetime.fromtimestamp(ms / 1000, UTC)
            ms += step_ms


Schedule = Cron | Every


def tick_key(tick: datetime) -> str:
    """The idempotency key of a tick's run; with the task id it fixes the run id.

    NEVER change this format: it is what makes a tick run once across workers.
    """
    return f"stepline/tick/{int(tick.timestamp() * 1000)}"


class Scheduled(TaskRef[Any], Protocol):
    """A task as the scheduler sees it (`stepline.Task` is one)."""

    @property
    def schedule(self) -> Schedule | None: ...


class Scheduler:
    """Fires the ticks of every scheduled task of a registry."""

    def __init__(self, registry: Iterable[Scheduled], client: ClientPort) -> None:
        self.registry = registry
        self.client = client
        self._tasks: list[asyncio.Task[None]] = []
        self.fired = 0

    def scheduled(self) -> list[Scheduled]:
        return [t for t in self.registry if t.schedule is not None]

    def start(self) -> None:
        for t in self.scheduled():
            self._tasks.append(asyncio.create_task(self._run(t), name=f"stepline-schedule-{t.id}"))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _fire(self, task: Scheduled, sched: Schedule, tick: datetime) -> None:
        # As JSON data, so a task may declare `ScheduleTick`, `dict` or nothing.
        payload = ScheduleTick(schedule=sched.describe(), scheduled_at=tick).model_dump(mode="json")
        # Nothing published a tick: its run links to a span of its own, the tick's.
        cause = sending.tick_cause(task.id, sched.describe(), int(tick.timestamp() * 1000))
        try:
            await under_cause(cause, partial(self.client.trigger, task, payload, idempotency_key=tick_key(tick),
                                             tags=("schedule",)))
            self.fired += 1
        except SteplineError as exc:  # the log is down: the next tick tries again
            log.error("could not fire a schedule tick", task=task.id, tick=tick.isoformat(), error=str(exc))

    async def _run(self, task: Scheduled) -> None:
        sched = task.schedule
        assert sched is not None
        await fire_ticks(sched, datetime.now(UTC), partial(self._fire, task, sched), _sleep_until)


async def _sleep_until(tick: datetime) -> None:
    delay = (tick - datetime.now(UTC)).total_seconds()
    if delay > 0:
        await asyncio.sleep(delay)


async def fire_ticks(
    sched: Schedule,
    now: datetime,
    fire: Callable[[datetime], Awaitable[None]],
    sleep_until: Callable[[datetime], Awaitable[None]],
) -> None:
    """Fire a schedule's ticks for ever, by one clock: the ticks of its
    catch-up window before `now` at once, then each later tick when
    `sleep_until` has reached it.

    The worker's Scheduler runs it on the wall clock, the TestEngine on its
    virtual clock: one catch-up rule for both.
    """
    if sched.catch_up is not None:
        for tick in sched.ticks_after(now - sched.catch_up):
            if tick > now:
                break
            await fire(tick)
    for tick in sched.ticks_after(now):
        await sleep_until(tick)
        await fire(tick)
