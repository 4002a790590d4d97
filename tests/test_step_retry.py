"""A step's own retry policy (`@sl.step(retry=...)`): its tries happen in place within
the attempt, each recorded, and a worker that stops between them is followed by one
that makes only the tries left. On the memory and sqlite logs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import stepline as sl
from stepline.core.events import RetryScheduled, StepFailed

from .conftest import eventually


@pytest.fixture(params=["memory", "sqlite"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://step-retry-{id(request)}"
    return f"sqlite:///{tmp_path}/stepline.db"


class Flaky(Exception):
    pass


def flaky_app(calls: list[str], fail_first: int, step_retry: sl.Retry, task_retry: sl.Retry) -> sl.Registry:
    reg = sl.Registry()

    @sl.step
    async def before() -> str:
        calls.append("before")
        return "ok"

    @sl.step(retry=step_retry)
    async def charge(order: str) -> str:
        calls.append("charge")
        if calls.count("charge") <= fail_first:
            raise Flaky(f"gateway busy ({calls.count('charge')})")
        return f"charged {order}"

    @sl.task(id="order", registry=reg, retry=task_retry)
    async def order(payload: dict) -> str:
        await before()
        return await charge(payload["id"])

    return reg


async def step_failures(e: Any, run_id: str) -> list[StepFailed]:
    return [ev.body for _, ev in await e.client.history(run_id) if isinstance(ev.body, StepFailed)]


async def test_a_step_retries_in_place_within_one_attempt_and_records_each_failed_try(engine_factory):
    calls: list[str] = []
    e = await engine_factory(flaky_app(calls, 2, sl.Retry.fixed_delay(0.05, max_attempts=3), sl.Retry.never()))
    handle = await e.client.trigger("order", {"id": "o1"})

    assert await handle.result(timeout=30) == "charged o1"
    assert calls == ["before", "charge", "charge", "charge"]  # the step before it ran once
    failures = await step_failures(e, handle.run_id)
    assert [(f.attempt, f.step, f.name, f.error.message, f.error.retriable) for f in failures] == [
        (1, 1, "flaky_app.<locals>.charge", "gateway busy (1)", True),
        (1, 1, "flaky_app.<locals>.charge", "gateway busy (2)", True),
    ]
    state = await handle.state()
    assert state.attempt == 1 and state.retries == ()  # the task's policy was never asked


async def test_when_the_steps_policy_gives_up_the_tasks_policy_decides_and_each_attempt_retries_the_step_anew(
    engine_factory,
):
    calls: list[str] = []
    e = await engine_factory(flaky_app(calls, 100, sl.Retry.fixed_delay(0, max_attempts=2),
                                       sl.Retry.fixed_delay(0.05, max_attempts=2)))
    handle = await e.client.trigger("order", {"id": "o2"})

    with pytest.raises(sl.RunFailedError, match="gateway busy \\(4\\)"):
        await handle.result(timeout=30)
    assert calls.count("charge") == 4  # 2 tries in each of 2 attempts
    failures = await step_failures(e, handle.run_id)
    assert [(f.attempt, f.error.retriable) for f in failures] == [(1, True), (1, False), (2, True), (2, False)]
    history = [ev.body for _, ev in await e.client.history(handle.run_id)]
    assert sum(isinstance(b, RetryScheduled) for b in history) == 1


async def test_a_fatal_error_is_never_retried_by_the_steps_policy(engine_factory):
    reg = sl.Registry()
    tries: list[int] = []

    @sl.step(retry=sl.Retry.fixed_delay(0, max_attempts=5))
    async def refuse() -> None:
        tries.append(1)
        raise sl.FatalError("card declined")

    @sl.task(id="fatal", registry=reg)
    async def fatal(payload: dict) -> None:
        await refuse()

    e = await engine_factory(reg)
    with pytest.raises(sl.RunFailedError, match="card declined"):
        await (await e.client.trigger("fatal", {})).result(timeout=30)
    assert tries == [1]


async def test_a_worker_stopped_between_a_steps_tries_is_followed_by_one_that_makes_only_the_tries_left(
    engine_factory,
):
    calls: list[str] = []
    # Always failing, 3 tries, 1 s apart: stopped after the second failure,
    # the next worker makes exactly one more try (not three) and gives up.
    e = await engine_factory(flaky_app(calls, 100, sl.Retry.fixed_delay(1, max_attempts=3), sl.Retry.never()))
    handle = await e.client.trigger("order", {"id": "o3"})
    await eventually(lambda: _failed_tries(e, handle.run_id, 2), timeout=30, what="two failed tries")
    await e.stop_worker()
    assert calls.count("charge") == 2

    await e.start_worker()
    with pytest.raises(sl.RunFailedError, match="gateway busy \\(3\\)"):
        await handle.result(timeout=30)
    assert calls.count("charge") == 3
    assert calls.count("before") == 1  # the completed step before it was replayed, not run
    failures = await step_failures(e, handle.run_id)
    assert [(f.attempt, f.error.retriable) for f in failures] == [(1, True), (1, True), (1, False)]


async def test_a_resumed_step_that_had_already_given_up_is_not_run_again(engine_factory):
    calls: list[str] = []
    gate = asyncio.Event()
    reg = sl.Registry()

    @sl.step(retry=sl.Retry.fixed_delay(0, max_attempts=2))
    async def charge() -> str:
        calls.append("charge")
        raise Flaky("gateway down")

    @sl.task(id="hold", registry=reg, retry=sl.Retry.never())
    async def hold(payload: dict) -> str:
        try:
            return await charge()
        except Flaky:
            await gate.wait()  # the step gave up; the attempt's end is not recorded yet
            raise

    e = await engine_factory(reg)
    handle = await e.client.trigger("hold", {})
    await eventually(lambda: _failed_tries(e, handle.run_id, 2), timeout=30, what="the step to give up")
    await e.stop_worker()
    gate.set()
    await e.start_worker()
    with pytest.raises(sl.RunFailedError, match="StepRetriesExhausted.*gave up after 2 tries: Flaky: gateway down"):
        await handle.result(timeout=30)
    assert calls == ["charge", "charge"]


async def _failed_tries(e: Any, run_id: str, n: int) -> bool:
    return len(await step_failures(e, run_id)) >= n


@pytest.mark.slow
async def test_kill_9_between_a_steps_tries_then_restart_makes_only_the_tries_left(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/stepline.db"
    app = Path(__file__).parent / "apps" / "step_retry_app.py"

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "stepline.cli", "worker", str(app), "--log", url],
                                env=dict(os.environ, STEP_RETRY_DIR=str(tmp_path)),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def tries() -> int:
        path = tmp_path / "tries.log"
        return len(path.read_text().splitlines()) if path.exists() else 0

    worker = start()
    try:
        async with sl.Client(url) as client:
            handle = await client.trigger("always-busy", {})

            async def two_recorded() -> bool:
                history = await client.history(handle.run_id)
                return sum(isinstance(ev.body, StepFailed) for _, ev in history) == 2

            await eventually(two_recorded, timeout=60, what="two failed tries on the log")
            worker.send_signal(signal.SIGKILL)  # in the 2 s backoff before the third try
            worker.wait(10)
            assert tries() == 2

            worker = start()
            with pytest.raises(sl.RunFailedError, match="gateway busy \\(3\\)"):
                await handle.result(timeout=60)
            assert tries() == 3
    finally:
        worker.kill()
        worker.wait(10)
