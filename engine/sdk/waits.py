"""Durable waits beyond `sleep`: for a domain event, for a token, for child runs.

Each wait holds one journal position, like a step. Reaching it the first
time records RunSuspended and frees the worker; whatever resolves it (the
router matching an event, `stepline complete-token`, a child run ending)
appends WaitCompleted to the run, the run becomes ready, and on the next
attempt the journal answers the wait with the recorded value. A timeout is
the owner's timer appending RunResumed: the wait then answers None.

Waits are called from the task body (also under `asyncio.gather`), never
from inside a step: a step's body does not run again on replay, so a wait
in it would have no stable journal position.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from stepline.consumers.lookback import MAX_LOOKBACK
from stepline.consumers.waits import WaitEntry, check_wait_pattern
from stepline.core.ids import TOKEN, child_idempotency_key, idempotent_run_id, wait_token
from stepline.core.payloads import ANY
from stepline.errors import ChildRunFailed, NotInRunContext
from stepline.projections.runs import DONE_STEPS, StepState
from stepline.sdk.context import RunContext, Suspend, Wait, _step_position, require_run
from stepline.sdk.port import TaskRef, current_client

R = TypeVar("R")

EVENT = "event"
CHILD = "child"


def _in_body(what: str) -> RunContext:
    ctx = require_run(what)
    if _step_position.get() is not None:
        raise NotInRunContext(
            f"{what} cannot be used inside a step: a step's body is skipped on replay, "
            f"so the wait would have no stable place in the journal. Call it from the task."
        )
    return ctx


def _deadline(ctx: RunContext, rec: StepState | None, timeout: timedelta | float | None) -> int | None:
    if rec is not None and rec.wake_at is not None:
        return rec.wake_at  # fixed when first reached: a replay does not restart the clock
    if timeout is None:
        return None
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)
    return ctx.clock() + int(seconds * 1000)


def _answer(rec: StepState, what: str) -> Any:
    return None if rec.output is None else ANY.load(rec.output, what)


async def wait_for_event(
    name: str,
    match: Mapping[str, Any] | None = None,
    *,
    timeout: timedelta | float | None = None,
    lookback: timedelta | float | None = None,
) -> Any:
    """Suspend until a domain event `name` whose data matches `match` is published.

    `match` is a pattern as in `Subscription(where=...)` (exact values,
    alternatives, prefix, numeric ranges, exists...). Events published
    after the wait is reached count, and with `lookback` (at most 24 hours)
    also those published up to that long before: the event that raced
    ahead of the run. Returns the event's data, or None when `timeout`
    passes first. The event that matched is recorded in the run's journal,
    so a replay returns the same data.
    """
    ctx = _in_body("stepline.wait_for_event()")
    check_wait_pattern(name, match)
    back = lookback_ms(lookback)
    pos, rec = ctx.next_position(EVENT)
    if rec is not None and rec.status in DONE_STEPS:
        return _answer(rec, f"event that resumed wait {pos} of run {ctx.run_id}")
    deadline = _deadline(ctx, rec, timeout)
    await ctx.quiesce()
    await register_event_wait(ctx, pos, rec, name, match, deadline, back)
    raise Suspend(Wait(pos, EVENT, deadline, json.dumps({"event": name, "match": match})))


def lookback_ms(lookback: timedelta | float | None) -> int:
    if lookback is None:
        return 0
    seconds = lookback.total_seconds() if isinstance(lookback, timedelta) else float(lookback)
    if not 0 <= seconds <= MAX_LOOKBACK.total_seconds():
        raise ValueError(
            f"lookback must be from 0 to {MAX_LOOKBACK} (the worker reads every event of that "
            f"window once), got {lookback!r}; for older events, backfill a subscription"
        )
    return int(seconds * 1000)


async def register_event_wait(
    ctx: RunContext, pos: int, rec: StepState | None, name: str, match: Mapping[str, Any] | None,
    deadline: int | None, back: int,
) -> None:
    """Tell the router about the wait, before the suspension is recorded: once
    RunSuspended is on the log, the router already knows what to look for."""
    if ctx.register_wait is None:
        raise NotInRunContext("stepline.wait_for_event() needs a worker with a client to route events")
    reached = rec.started_at if rec is not None and rec.started_at is not None else ctx.clock()
    await ctx.register_wait(WaitEntry(ctx.run_id, ctx.task_id, pos, name, match, reached - back, deadline,
                                      lookback=back))


@dataclass(frozen=True, slots=True)
class WaitToken:
    """A handle a human or another system uses to resume a waiting run:
    `stepline complete-token ID --data JSON`, `POST /v1/tokens/ID/complete`,
    or `Client.complete_token(ID, data)`."""

    id: str
    run_id: str
    step: int

    def __str__(self) -> str:
        return self.id


def create_token() -> WaitToken:
    """A token for a later `wait_for_token`, e.g. to put in an approval email
    first. The same on every replay of the run."""
    ctx = _in_body("stepline.create_token()")
    pos, _ = ctx.next_position(TOKEN)
    return WaitToken(wait_token(ctx.run_id, pos), ctx.run_id, pos)


async def wait_for_token(
    token: WaitToken | None = None, *, timeout: timedelta | float | None = None
) -> Any:
    """Suspend until the token is completed; returns its data (None on timeout).

    Without a token one is created here; it shows in `stepline runs show`.
    """
    ctx = _in_body("stepline.wait_for_token()")
    if token is None:
        token = create_token()
    elif token.run_id != ctx.run_id:
        raise NotInRunContext(f"token {token.id} belongs to run {token.run_id}, not to {ctx.run_id}")
    rec = ctx.journal.get(token.step)
    if rec is not None and rec.status in DONE_STEPS:
        return _answer(rec, f"data of token {token.id}")
    deadline = _deadline(ctx, rec, timeout)
    await ctx.quiesce()
    raise Suspend(Wait(token.step, TOKEN, deadline, json.dumps({"token": token.id})))


async def trigger_children(task: TaskRef[R], payloads: Sequence[Any], **options: Any) -> list[R]:
    """Start one child run per payload and suspend until all have ended.

    Child ids derive from the parent and the journal position, so a parent
    replayed after a crash finds its children instead of starting more.
    Returns the outputs in order; raises ChildRunFailed for the first child
    that failed or was cancelled.
    """
    ctx = _in_body(f"{task.id}.trigger_and_wait()")
    slots = [ctx.next_position(CHILD) for _ in payloads]
    open_ = [(pos, payload) for (pos, rec), payload in zip(slots, payloads)
             if rec is None or rec.status not in DONE_STEPS]
    if not open_:
        return [_child_result(task, ctx.run_id, pos, rec) for pos, rec in slots if rec is not None]
    client = current_client()
    handles = await asyncio.gather(*(
        client.trigger(task, payload, idempotency_key=child_idempotency_key(ctx.run_id, pos),
                       parent_run_id=ctx.run_id, parent_step=pos, **options)
        for pos, payload in open_
    ))
    await ctx.quiesce()
    raise Suspend(*(
        Wait(pos, CHILD, None, json.dumps({"child": h.run_id, "task": task.id}))
        for (pos, _), h in zip(open_, handles)
    ))


def _child_result(task: TaskRef[R], parent: str, pos: int, rec: StepState) -> R:
    child = idempotent_run_id(task.id, child_idempotency_key(parent, pos))
    if rec.error is not None:
        raise ChildRunFailed(child, task.id, rec.error.type, rec.error.message)
    if rec.output is None:
        raise ChildRunFailed(child, task.id, "Missing", "the child ended without an output")
    value: R = task.output_codec.load(rec.output, f"output of child run {child}")
    return value
