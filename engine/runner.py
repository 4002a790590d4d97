"""One attempt of one run: replay the journal, execute, record the outcome.

The outcome of an attempt is exactly one of: RunCompleted, RunSuspended,
RetryScheduled, or RunFailed + RunDeadLettered. Each is awaited until
durable before the attempt counts as finished, so a crash at any point
leaves the run either in its previous state (and it is resumed) or in the
new one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from stepline.context import RunContext, Suspend, _current, error_info
from stepline.errors import NonDeterminismError, PayloadValidationError
from stepline.events import (
    ErrorInfo,
    Payload,
    RetryScheduled,
    RunCompleted,
    RunDeadLettered,
    RunFailed,
    RunStarted,
    RunSuspended,
    StepFailed,
    WaitCompleted,
)
from stepline.projections.runs import RunState
from stepline.task import Task


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # completed | suspended | retrying | failed
    offset: int  # where the outcome's last event landed
    detail: str = ""


async def execute_attempt(
    task: Task[Any, Any],
    state: RunState,
    ctx: RunContext,
    worker_id: str,
    rng: random.Random,
) -> Outcome:
    emit = ctx.emit
    attempt = state.attempt
    emit(RunStarted(attempt, worker_id))
    token = _current.set(ctx)
    try:
        payload = task.payload_codec.load(state.payload, f"payload of run {state.run_id}")
        result = await task.fn(payload)
        output = task.output_codec.dump(result, f"output of run {state.run_id}")
    except Suspend as s:
        for w in s.waits[:-1]:
            emit(RunSuspended(w.step, w.reason, w.wake_at, w.condition))
        last = s.waits[-1]
        off = await emit(RunSuspended(last.step, last.reason, last.wake_at, last.condition))
        return Outcome("suspended", off, str(s))
    except Exception as exc:
        return await _failed(task, state, ctx, exc, rng)
    finally:
        _current.reset(token)
    await _tell_parent(state, ctx, output=output)
    return Outcome("completed", await emit(RunCompleted(output, attempt)))


async def _tell_parent(
    state: RunState, ctx: RunContext, output: Payload | None = None, error: ErrorInfo | None = None
) -> None:
    """A child's result goes to its waiting parent before the child records
    its own end: a crash in between repeats the notice (the parent keeps
    the first), where the other order could lose it."""
    if ctx.request is None or state.parent_run_id is None or state.parent_step is None:
        return
    body = WaitCompleted(state.parent_step, "child", state.run_id, output, error)
    await ctx.request(state.parent_run_id, "", body)


async def _failed(
    task: Task[Any, Any], state: RunState, ctx: RunContext, exc: Exception, rng: random.Random
) -> Outcome:
    emit = ctx.emit
    attempt = state.attempt
    retriable = not isinstance(exc, (NonDeterminismError, PayloadValidationError))
    info = error_info(exc, retriable)
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
