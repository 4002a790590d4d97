"""One attempt of one run: replay the journal, execute, record the outcome.

The outcome of an attempt is exactly one of: RunCompleted, RunSuspended,
RetryScheduled, or RunFailed + RunDeadLettered. Each is awaited until
durable before the attempt counts as finished, so a crash at any point
leaves the run either in its previous state (and it is resumed) or in the
new one. An attempt its worker stops at a step boundary while draining
(`Handover`, engine/sdk/context.py) records nothing more: its completed
steps are durable, and the run's next owner resumes it like after a crash.

An attempt of a task with `max_duration` that runs longer fails with
MaxDurationExceeded, like any error under the retry policy. A task with
isolation="process" runs its attempt in a child process (engine/runtime/isolation.py),
which records through this same code. Which of the two runs an attempt is
decided in engine/runtime/executor.py (`execute_attempt`).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from stepline.core.events import (
    ErrorInfo,
    Payload,
    RetryScheduled,
    RunCompleted,
    RunDeadLettered,
    RunFailed,
    RunSuspended,
    StepFailed,
    WaitCompleted,
)
from stepline.errors import (
    MaxDurationExceeded,
    NonDeterminismError,
    PayloadValidationError,
)
from stepline.log.topics import DEFAULT_POOL
from stepline.projections.runs import RunState
from stepline.sdk.context import Handover, RunContext, Suspend, enter_run, error_info, exit_run
from stepline.sdk.interceptors import Interceptors
from stepline.sdk.logs import note_dropped
from stepline.sdk.task import Task

HANDED_OVER = "handed_over"


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # completed | suspended | retrying | failed | handed_over
    offset: int | None  # where the outcome's last event landed; None: handed over, nothing recorded
    detail: str = ""


async def run_body(
    task: Task[Any, Any],
    state: RunState,
    ctx: RunContext,
    rng: random.Random,
    max_duration: float | None,
    hooks: Interceptors,
) -> Outcome:
    """The attempt after RunStarted: run the function, record how it ended.

    A child process runs this with `max_duration=None`: its parent enforces
    the limit by killing it, which also stops code that never yields.
    """
    emit = ctx.emit
    attempt = state.attempt
    token = enter_run(ctx)
    try:
        try:
            hooks.enter_body(task, state, ctx)  # e.g. an isolated child's log lines, scrubbed too
            payload = task.payload_codec.load(state.payload, f"payload of run {state.run_id}")
            if max_duration is None:
                result = await task.fn(payload)
            else:
                result = await _bounded(task, payload, max_duration, attempt)
            output = task.output_codec.dump(result, f"output of run {state.run_id}")
        finally:
            note_dropped(ctx)  # how many log lines the cap dropped, before the outcome
    except Suspend as s:
        for w in s.waits[:-1]:
            emit(RunSuspended(w.step, w.reason, w.wake_at, w.condition, w.group))
        last = s.waits[-1]
        off = await emit(RunSuspended(last.step, last.reason, last.wake_at, last.condition, last.group))
        return Outcome("suspended", off, str(s))
    except Handover as h:
        await ctx.quiesce()  # a step some branch started anyway records its checkpoint first
        return Outcome(HANDED_OVER, None, str(h))
    except Exception as exc:
        return await record_failure(task, state, ctx, exc, rng, hooks)
    finally:
        exit_run(token)
    await _tell_parent(state, ctx, output=output)
    return Outcome("completed", await emit(RunCompleted(output, attempt)))


async def _bounded(task: Task[Any, Any], payload: Any, limit: float, attempt: int) -> Any:
    """The task function under its max_duration.

    asyncio.timeout rather than wait_for, which on 3.11 can swallow a
    cancel arriving as it times out (a run cancelled at its deadline would
    then record a failure instead of ending). Suspend passes through.
    """
    deadline = asyncio.timeout(limit)
    try:
        async with deadline:
            return await task.fn(payload)
    except TimeoutError as exc:
        if deadline.expired():
            raise MaxDurationExceeded(task.id, limit, attempt) from exc
        raise  # the task's own timeout, not ours


async def _tell_parent(
    state: RunState, ctx: RunContext, output: Payload | None = None, error: ErrorInfo | None = None
) -> None:
    """A child's result goes to its waiting parent before the child records
    its own end: a crash in between repeats the notice (the parent keeps
    the first), where the other order could lose it."""
    if ctx.request is None or state.parent_run_id is None or state.parent_step is None:
        return
    body = WaitCompleted(state.parent_step, "child", state.run_id, output, error)
    await ctx.request(state.parent_run_id, "", body, state.parent_pool or DEFAULT_POOL)


async def record_failure(
    task: Task[Any, Any], state: RunState, ctx: RunContext, exc: Exception, rng: random.Random,
    hooks: Interceptors,
) -> Outcome:
    """Record a failed attempt under the retry policy: RetryScheduled, or
    RunFailed + RunDeadLettered (after telling a waiting parent)."""
    emit = ctx.emit
    attempt = state.attempt
    retriable = not isinstance(exc, (NonDeterminismError, PayloadValidationError))
    info = error_info(exc, retriable)
    hooks.failed(exc)
    if exc is not ctx.recorded_failure:
        emit(StepFailed(attempt, info))
    delay = task.retry.next_delay(state.attempt_in_trigger, exc, rng) if retriable else None
    if delay is None:
        await _tell_parent(state, ctx, error=info)
        emit(RunFailed(info, attempt))
        tries = state.attempt_in_trigger
        off = await emit(RunDeadLettered(f"{info.type} after {tries} attempt{'s' * (tries != 1)}"))
        return Outcome("failed", off, info.type)
    delay_ms = int(delay * 1000)
    retry_at = ctx.clock() + delay_ms
    off = await emit(RetryScheduled(attempt + 1, retry_at, delay_ms, f"{info.type}: {info.message}"))
    return Outcome("retrying", off, info.type)
