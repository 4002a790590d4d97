"""Flow control per attempt: max_duration, and isolation="process" (engine/runtime/isolation.py).

Isolated tasks live in tests/apps/isolated_app.py, since a child process
finds its task by importing its module. Every test runs on each backend.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import pytest

import stepline as sl
from stepline.errors import MaxDurationExceeded

from .conftest import eventually

APP = Path(__file__).parent / "apps" / "isolated_app.py"


@pytest.fixture
def app() -> sl.Registry:
    return sl.load_app(str(APP))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def dead_letter(engine, run_id: str) -> sl.RunState:
    """The run once dead-lettered: RunDeadLettered lands just after the
    RunFailed that ends `result()`."""

    async def check() -> sl.RunState | None:
        state = await engine.client.get_run(run_id)
        return state if state.dead_lettered else None

    return await eventually(check, what=f"run {run_id} to be dead-lettered")


async def event_types(engine, run_id: str) -> list[str]:
    return [ev.type for _, ev in await engine.client.history(run_id)]


# --- definitions -------------------------------------------------------------


async def _noop(payload: dict) -> None:
    return None


@pytest.mark.parametrize("options", [
    {"max_duration": 0},
    {"max_duration": -1.0},
    {"max_duration": float("inf")},
    {"max_duration": float("nan")},
    {"max_duration": "30s"},
    {"isolation": "thread"},
    {"memory_limit_mb": 200},  # inline: a limit needs a process of its own
    {"isolation": "process", "memory_limit_mb": 0},
])
def test_bad_flow_control_options_fail_at_definition(options):
    with pytest.raises(sl.TaskDefinitionError):
        sl.task(id="bad", registry=sl.Registry(), **options)(_noop)


def test_an_isolated_task_must_be_importable_by_its_child():
    async def local(payload: dict) -> None: ...

    with pytest.raises(sl.TaskDefinitionError, match="module level"):
        sl.task(id="local", registry=sl.Registry(), isolation="process")(local)


def test_max_duration_takes_seconds_or_a_timedelta():
    from datetime import timedelta

    t = sl.task(id="t", registry=sl.Registry(), max_duration=timedelta(milliseconds=1500))(_noop)
    assert t.max_duration == 1.5 and t.isolation == "inline" and t.memory_limit_mb is None


# --- max_duration inline -----------------------------------------------------


async def test_an_inline_attempt_past_max_duration_fails_and_is_retried_then_dead_lettered(engine_factory):
    reg = sl.Registry()
    calls: Counter[str] = Counter()

    @sl.step
    async def prepare() -> str:
        calls["prepare"] += 1
        return "ready"

    @sl.task(id="slow", registry=reg, max_duration=0.3,
             retry=sl.Retry(max_attempts=2, min_timeout=0.05, max_timeout=0.05))
    async def slow(_: None) -> str:
        await prepare()
        await asyncio.sleep(10)
        return "never"

    e = await engine_factory(reg)
    started = time.monotonic()
    handle = await slow.trigger(None)
    with pytest.raises(sl.RunFailedError) as failed:
        await handle.result(timeout=10)
    assert time.monotonic() - started < 5
    assert failed.value.error_type == "MaxDurationExceeded"
    assert "'slow'" in failed.value.message and "0.3 s" in failed.value.message
    assert "attempt 2" in failed.value.message
    assert calls == {"prepare": 1}  # journaled: attempt 2 replays it
    state = await dead_letter(e, handle.run_id)
    assert state.attempt_in_trigger == 2
    assert [err.error.type for err in state.errors] == ["MaxDurationExceeded"] * 2


async def test_a_durable_sleep_is_not_cut_by_max_duration(engine_factory):
    reg = sl.Registry()

    @sl.task(id="sleeper", registry=reg, max_duration=5)
    async def sleeper(_: None) -> str:
        await sl.sleep(0.05)  # Suspend passes through the deadline untouched
        return "woke"

    await engine_factory(reg)
    assert await (await sleeper.trigger(None)).result(timeout=10) == "woke"


def test_max_duration_exceeded_names_task_limit_and_attempt():
    err = MaxDurationExceeded("sync-crm", 30.0, 3)
    assert str(err) == "task 'sync-crm' exceeded its max_duration of 30 s on attempt 3"


# --- isolation="process" -----------------------------------------------------


async def test_an_isolated_run_records_its_steps_and_a_completed_step_never_reruns(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-steps", {"dir": str(tmp_path), "n": 4})
    result = await handle.result(timeout=30)
    assert result["value"] == 41
    assert result["pid"] != os.getpid()
    calls = (tmp_path / "calls.log").read_text().split("\n")[:-1]
    assert [c.split()[0] for c in calls] == ["load", "add", "add"]  # load ran once, in attempt 1
    assert {int(c.split()[1]) for c in calls}.isdisjoint({os.getpid()})
    state = await e.client.get_run(handle.run_id)
    assert state.attempt_in_trigger == 2
    assert [err.error.type for err in state.errors] == ["RuntimeError"]
    assert [s.status for s in state.steps.values()] == ["completed", "completed"]
    types = await event_types(e, handle.run_id)
    assert types.count("StepCompleted") == 2 and types.count("RetryScheduled") == 1
    assert types[-1] == "RunCompleted"


async def test_a_spinning_isolated_task_is_killed_at_max_duration_while_the_worker_serves_others(
    engine_factory, app, tmp_path
):
    e = await engine_factory(app)
    spin = await e.client.trigger("iso-spin", {"dir": str(tmp_path)})
    echoes = [await e.client.trigger("inline-echo", {"n": i}) for i in range(5)]
    outputs = await asyncio.gather(*(h.result(timeout=10) for h in echoes))
    assert [o["echo"] for o in outputs] == list(range(5))
    with pytest.raises(sl.RunFailedError) as failed:
        await spin.result(timeout=30)
    assert failed.value.error_type == "MaxDurationExceeded"
    # Served while it spun: every echo ended before the spinning run was killed.
    spun = await e.client.get_run(spin.run_id)
    for h in echoes:
        assert (await e.client.get_run(h.run_id)).updated_at < spun.updated_at
    state = await dead_letter(e, spin.run_id)
    assert state.attempt_in_trigger == 1
    after = await e.client.trigger("iso-steps", {"dir": str(tmp_path), "n": 1})
    assert (await after.result(timeout=30))["value"] == 11


async def test_a_child_that_dies_is_a_failed_attempt_and_the_retry_succeeds(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-crash-once", {"dir": str(tmp_path)})
    assert await handle.result(timeout=30) == "survived"
    state = await e.client.get_run(handle.run_id)
    assert state.status == "completed" and state.attempt_in_trigger == 2
    [died] = state.errors
    assert died.attempt == state.attempt - 1
    assert died.error.type == "ChildProcessDied"
    assert "SIGKILL" in died.error.message and "'iso-crash-once'" in died.error.message


async def test_a_task_past_its_memory_limit_fails_not_the_worker(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-hog", {"dir": str(tmp_path)})
    with pytest.raises(sl.RunFailedError) as failed:
        await handle.result(timeout=30)
    assert failed.value.error_type in ("MemoryError", "ChildProcessDied")
    state = await dead_letter(e, handle.run_id)
    assert state.attempt_in_trigger == 2  # retried by policy
    echo = await e.client.trigger("inline-echo", {"n": 7})
    assert (await echo.result(timeout=10))["echo"] == 7


async def test_cancelling_an_isolated_run_kills_its_child_promptly(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-spin-forever", {"dir": str(tmp_path)})
    pid_file = tmp_path / "pid"
    await eventually(pid_file.exists, timeout=30, what="the child to start")
    pid = int(await eventually(pid_file.read_text, what="the child's pid"))
    assert alive(pid)
    await e.client.cancel(handle.run_id)
    with pytest.raises(sl.RunFailedError) as failed:
        await handle.result(timeout=10)
    assert failed.value.status == "cancelled"
    await eventually(lambda: not alive(pid), timeout=5, what=f"child {pid} to be gone")
    worker = e.worker
    assert worker is not None
    await eventually(lambda: worker.active == 0, what="the attempt to wind down")


async def test_an_isolated_task_triggers_waits_and_publishes_through_its_worker(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-fan-out", {"dir": str(tmp_path), "n": 21})
    assert await handle.result(timeout=60) == {"doubled": 42, "published": True}
    child = [s for s in (await e.client.get_run(handle.run_id)).steps.values() if s.name == "child"]
    assert len(child) == 1 and child[0].status == "completed"


async def test_an_isolated_task_waits_for_an_event_registered_through_its_worker(engine_factory, app, tmp_path):
    e = await engine_factory(app)
    handle = await e.client.trigger("iso-await-event", {"dir": str(tmp_path), "key": "k-1"})

    async def suspended() -> bool:
        return (await e.client.get_run(handle.run_id)).status == "suspended"

    await eventually(suspended, timeout=30, what="the run to suspend on its wait")
    await e.client.publish("isolated.ping", {"key": "k-1", "n": 5})
    assert await handle.result(timeout=30) == {"got": {"key": "k-1", "n": 5}}
