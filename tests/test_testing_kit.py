"""stepline.testing: the real worker on a virtual clock, and the pytest plugin.

No assertion here is about real time: each checks where the virtual clock
stood when something happened, and what the run recorded.
"""

from __future__ import annotations

import asyncio
import textwrap
from datetime import UTC, datetime, timedelta

import pytest

import stepline as sl
from stepline.testing import TestEngine, VirtualClock

pytest_plugins = ["pytester"]

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


@sl.step
async def add_one(x: int) -> int:
    return x + 1


def sleeper(registry: sl.Registry, pause: timedelta = timedelta(days=3)) -> sl.Task[int, int]:
    @sl.task(id="sleeper", registry=registry)
    async def run(x: int) -> int:
        y = await add_one(x)
        await sl.sleep(pause)
        return await add_one(y)

    return run


async def test_a_three_day_sleep_between_two_steps_completes_on_the_virtual_clock() -> None:
    reg = sl.Registry()
    task = sleeper(reg)
    async with TestEngine(reg) as engine:
        assert await engine.run(task, 1) == 3
        assert engine.clock.elapsed >= timedelta(days=3)
        [run] = await engine.runs()
        types = [ev.type for ev in await engine.history(run.run_id)]
    assert types.count("StepCompleted") == 2
    assert types.index("RunSuspended") < types.index("RunResumed") < types.index("RunCompleted")


async def test_a_retry_back_off_of_60_s_runs_attempt_two_with_the_clock_60_s_later() -> None:
    reg = sl.Registry()
    clock = VirtualClock()
    started: list[int] = []

    @sl.task(id="flaky", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=60, randomize=False))
    async def flaky(_: None) -> str:
        started.append(clock.now_ms())
        if len(started) == 1:
            raise ConnectionError("the first call fails")
        return "ok"

    async with TestEngine(reg, clock=clock) as engine:
        assert await engine.run(flaky) == "ok"
    assert len(started) == 2
    assert started[1] - started[0] == 60_000


async def test_advance_steps_through_every_retry_on_the_way() -> None:
    reg = sl.Registry()
    clock = VirtualClock()
    started: list[int] = []

    @sl.task(id="flaky", registry=reg, retry=sl.Retry.fixed_delay(60, max_attempts=5))
    async def flaky(_: None) -> int:
        started.append(clock.now_ms())
        if len(started) < 4:
            raise ConnectionError("not yet")
        return len(started)

    async with TestEngine(reg, clock=clock, auto_advance=False) as engine:
        handle = await engine.trigger(flaky)
        await engine.advance(timedelta(minutes=10))
        assert await handle.result() == 4
    assert [t - started[0] for t in started] == [0, 60_000, 120_000, 180_000]


async def test_a_delayed_trigger_starts_only_once_the_clock_passes_the_delay() -> None:
    reg = sl.Registry()

    @sl.task(id="later", registry=reg)
    async def later(x: int) -> int:
        return x * 2

    async with TestEngine(reg, auto_advance=False) as engine:
        handle = await later.trigger(21, delay=HOUR)  # finds the engine's client
        await engine.advance(timedelta(minutes=59))
        state = await engine.get_run(handle)
        assert state.status == "pending" and state.started_at is None
        await engine.advance(timedelta(minutes=1))
        assert await handle.result() == 42
        assert (await engine.get_run(handle)).started_at == engine.clock.now_ms()


async def test_a_delayed_trigger_completes_at_once_under_auto_advance() -> None:
    reg = sl.Registry()

    @sl.task(id="later", registry=reg)
    async def later(x: int) -> int:
        return x * 2

    async with TestEngine(reg) as engine:
        assert await engine.run(later, 21, delay=HOUR) == 42
        assert engine.clock.elapsed == HOUR


def order_waiter(registry: sl.Registry) -> sl.Task[str, dict | None]:
    @sl.task(id="await-payment", registry=registry)
    async def run(order_id: str) -> dict | None:
        paid: dict | None = await sl.wait_for_event(
            "payment.succeeded", match={"order_id": order_id}, timeout=DAY)
        return paid

    return run


async def test_wait_for_event_returns_none_once_the_clock_passes_its_timeout() -> None:
    reg = sl.Registry()
    task = order_waiter(reg)
    async with TestEngine(reg) as engine:
        assert await engine.run(task, "o-1") is None
        assert engine.clock.elapsed >= DAY


async def test_wait_for_event_returns_the_event_published_before_its_timeout() -> None:
    reg = sl.Registry()
    task = order_waiter(reg)
    async with TestEngine(reg) as engine:
        with engine.manual():  # no jump to the timeout while the run reaches its wait
            handle = await engine.trigger(task, "o-1")
            await engine.settle()
            assert (await engine.get_run(handle)).status == "suspended"
            await engine.publish("payment.succeeded", {"order_id": "o-2", "amount": 1})
            await engine.publish("payment.succeeded", {"order_id": "o-1", "amount": 5})
        assert await handle.result() == {"order_id": "o-1", "amount": 5}
        assert engine.clock.elapsed == timedelta(0)


async def test_settle_under_auto_advance_lets_a_subscribed_run_sleep_to_its_end() -> None:
    reg = sl.Registry()
    welcomed: list[dict] = []

    @sl.task(id="welcome", registry=reg, on=sl.Subscription("user.created", where={"plan": "pro"}))
    async def welcome(event: dict) -> None:
        await sl.sleep(DAY)
        welcomed.append(event)

    async with TestEngine(reg) as engine:
        await engine.publish("user.created", {"id": 1, "plan": "free"})
        await engine.publish("user.created", {"id": 2, "plan": "pro"})
        await engine.settle()
        assert welcomed == [{"id": 2, "plan": "pro"}]
        assert [r.status for r in await engine.runs(welcome)] == ["completed"]
        assert engine.clock.elapsed == DAY


async def test_a_token_completed_by_the_test_resumes_the_run() -> None:
    reg = sl.Registry()

    @sl.task(id="approve", registry=reg)
    async def approve(_: None) -> str:
        answer = await sl.wait_for_token(timeout=timedelta(days=3))
        return "timed out" if answer is None else answer["by"]

    async with TestEngine(reg) as engine:
        with engine.manual():
            handle = await engine.trigger(approve)
            await engine.settle()
            [token] = await engine.open_tokens(handle)
            await engine.complete_token(token, {"by": "ada"})
        assert await handle.result() == "ada"
        assert await engine.run(approve) == "timed out"
        assert engine.clock.elapsed >= timedelta(days=3)


async def test_without_auto_advance_a_sleeping_run_stays_suspended_until_advanced() -> None:
    reg = sl.Registry()
    task = sleeper(reg)
    async with TestEngine(reg, auto_advance=False) as engine:
        handle = await engine.trigger(task, 1)
        await engine.settle()
        assert (await engine.get_run(handle)).status == "suspended"
        await engine.advance(2 * DAY)
        assert (await engine.get_run(handle)).status == "suspended"
        assert engine.clock.elapsed == 2 * DAY
        await engine.advance(DAY)
        assert await handle.result() == 3


async def test_a_run_that_exhausts_its_retries_raises_run_failed_error() -> None:
    reg = sl.Registry()

    @sl.task(id="broken", registry=reg, retry=sl.Retry(max_attempts=3, min_timeout=600, max_timeout=3600))
    async def broken(_: None) -> None:
        raise ValueError("always")

    async with TestEngine(reg) as engine:
        with pytest.raises(sl.RunFailedError):
            await engine.run(broken)
        [run] = await engine.runs(broken)
        assert run.status == "failed" and run.attempt == 3
        assert engine.clock.elapsed >= timedelta(minutes=20)  # two back-offs of 600 s or more


async def test_schedule_ticks_fire_on_the_virtual_clock() -> None:
    reg = sl.Registry()

    @sl.task(id="hourly", registry=reg, schedule=sl.Every(HOUR))
    async def hourly(tick: sl.ScheduleTick) -> str:
        return tick.scheduled_at.isoformat()

    @sl.task(id="nightly", registry=reg, schedule=sl.Cron("0 3 * * *", tz="Europe/Berlin"))
    async def nightly(tick: sl.ScheduleTick) -> str:
        return tick.scheduled_at.isoformat()

    start = datetime(2026, 1, 1, 0, 30, tzinfo=UTC)
    async with TestEngine(reg, start=start, auto_advance=False) as engine:
        await engine.advance(timedelta(hours=3))
        hours = await engine.runs(hourly)
        assert [await engine.client.wait(r.run_id) for r in hours]  # all ended
        outputs = [await sl.RunHandle(r.run_id, r.task_id, engine.client, hourly.output_codec).result()
                   for r in hours]
        assert outputs == [f"2026-01-01T0{h}:00:00+00:00" for h in (1, 2, 3)]
        await engine.advance(2 * DAY)
        nights = await engine.runs(nightly)
    at = [datetime.fromtimestamp(r.created_at / 1000, UTC) for r in nights]
    assert [(t.day, t.hour, t.minute) for t in at] == [(1, 2, 0), (2, 2, 0), (3, 2, 0)]  # 03:00 in Berlin


async def test_schedule_ticks_do_not_drive_auto_advance() -> None:
    reg = sl.Registry()

    @sl.task(id="hourly", registry=reg, schedule=sl.Every(HOUR))
    async def hourly(_: sl.ScheduleTick) -> None:
        return None

    @sl.task(id="quick", registry=reg)
    async def quick(_: None) -> str:
        return "done"

    async with TestEngine(reg) as engine:
        assert await engine.run(quick) == "done"
        await engine.settle()
        assert engine.clock.elapsed == timedelta(0)
        assert await engine.runs(hourly) == []


async def test_the_engine_stops_without_leaving_tasks_behind() -> None:
    reg = sl.Registry()
    task = sleeper(reg)
    order_waiter(reg)

    @sl.task(id="hourly", registry=reg, schedule=sl.Every(HOUR))
    async def hourly(_: sl.ScheduleTick) -> None:
        return None

    before = asyncio.all_tasks()
    async with TestEngine(reg) as engine:
        assert await engine.run(task, 1) == 3
        await engine.trigger("await-payment", "o-9")  # left waiting at exit
        await engine.trigger(task, 5, delay=DAY)
    assert asyncio.all_tasks() == before


async def test_engines_do_not_share_records() -> None:
    reg = sl.Registry()
    task = sleeper(reg, timedelta(seconds=1))
    async with TestEngine(reg) as first, TestEngine(reg) as second:
        await first.run(task, 1)
        assert len(await first.runs()) == 1
        assert await second.runs() == []


def test_the_virtual_clock_only_moves_forward_when_told() -> None:
    clock = VirtualClock(datetime(2026, 5, 1, tzinfo=UTC))
    assert clock() == clock.now_ms() == int(datetime(2026, 5, 1, tzinfo=UTC).timestamp() * 1000)
    clock.advance(90)
    clock.advance(timedelta(minutes=1, seconds=30))
    assert clock.now() == datetime(2026, 5, 1, 0, 3, tzinfo=UTC)
    assert clock.elapsed == timedelta(minutes=3)
    with pytest.raises(ValueError):
        clock.advance(-1)


USER_TESTS = '''
    from datetime import timedelta

    import pytest

    import stepline as sl

    reg = sl.Registry()


    @sl.task(id="remind", registry=reg)
    async def remind(user: str) -> str:
        await sl.sleep(timedelta(days=7))
        return f"reminded {user}"


    @pytest.fixture
    def stepline_registry():
        return reg


    @pytest.mark.asyncio
    async def test_auto(stepline_engine):
        assert await stepline_engine.run(remind, "ada") == "reminded ada"
        assert stepline_engine.clock.elapsed >= timedelta(days=7)


    @pytest.mark.asyncio
    async def test_trigger_finds_the_fixture_client(stepline_engine):
        handle = await remind.trigger("bob")
        assert await handle.result() == "reminded bob"


    @pytest.mark.asyncio
    @pytest.mark.stepline(auto_advance=False)
    async def test_manual(stepline_engine):
        handle = await stepline_engine.trigger(remind, "eve")
        await stepline_engine.advance(timedelta(days=6))
        assert (await stepline_engine.get_run(handle)).status == "suspended"
        await stepline_engine.advance(timedelta(days=1))
        assert await handle.result() == "reminded eve"
'''


def test_the_pytest_plugin_gives_user_tests_a_stepline_engine(pytester: pytest.Pytester) -> None:
    # Strict mode, the stricter pytest-asyncio setting: async fixtures must
    # be declared as such, which the plugin's are.
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makeconftest('pytest_plugins = ["stepline.testing"]\n')
    pytester.makepyfile(test_user=textwrap.dedent(USER_TESTS))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error::pytest.PytestUnraisableExceptionWarning")
    result.assert_outcomes(passed=3)


def test_the_testing_kit_exports_its_classes() -> None:
    import stepline.testing

    assert sorted(stepline.testing.__all__) == ["KafkaContainerError", "KafkaTestContainer", "TestEngine",
                                                "VirtualClock"]
    assert stepline.testing.TestEngine.__test__ is False  # never collected as a test class
