"""`wait_for_any`: the first of several waits wins, the others are withdrawn.

    won = await sl.wait_for_any([
        sl.EventWait("order.approved", match={"order_id": oid}),
        sl.EventWait("order.rejected", match={"order_id": oid}),
        sl.Timer(timedelta(days=2)),
        sl.ChildRun(manual_review, {"order_id": oid}),
    ])
    if won.index == 2: ...            # or won.kind == "timer"

Each branch holds one journal position, as the same wait alone would, and
is recorded with `RunSuspended(group=<first branch's position>)`. The fold
(projections/runs.py) lets the first branch of a group to resolve, in log
order, win: its siblings become `lost`, so a late event, a timer firing or
a child ending afterwards resolves nothing. The run is runnable again as
soon as one branch wins.

The attempt that first sees the winner then runs one more journal position,
a checkpoint named `wait_for_any` whose output is the winner's index: it
withdraws the losers (event waits leave the router's table; child runs are
cancelled unless `cancel_if_lost=False`) and records the decision, so a
replay returns the same branch without repeating the clean-up.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

from stepline.consumers.waits import check_wait_pattern
from stepline.core.events import RunCancelled
from stepline.core.ids import child_idempotency_key, idempotent_run_id
from stepline.projections.runs import DONE_STEPS, StepState
from stepline.sdk.context import SLEEP, RunContext, Suspend, Wait, _step_wrapper
from stepline.sdk.port import TaskRef, current_client
from stepline.sdk.waits import (
    CHILD,
    EVENT,
    _answer,
    _child_result,
    _in_body,
    lookback_ms,
    register_event_wait,
)

R = TypeVar("R")

TIMER = "timer"
CHECKPOINT = "wait_for_any"


@dataclass(frozen=True)
class EventWait:
    """A branch resolved by a domain event, as `wait_for_event(name, match, lookback=)`."""

    name: str
    match: Mapping[str, Any] | None = None
    lookback: timedelta | float | None = None

    kind = EVENT


@dataclass(frozen=True)
class Timer:
    """A branch that wins when a duration has passed (`after`) or at a time (`at`)."""

    after: timedelta | float | None = None
    at: datetime | None = None

    kind = TIMER

    def __post_init__(self) -> None:
        if (self.after is None) == (self.at is None):
            raise ValueError("Timer needs exactly one of after= (a duration) or at= (a datetime)")
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError(f"Timer(at={self.at!r}) needs a timezone-aware datetime")

    def wake_at(self, now_ms: int) -> int:
        if self.at is not None:
            return int(self.at.astimezone(UTC).timestamp() * 1000)
        assert self.after is not None
        seconds = self.after.total_seconds() if isinstance(self.after, timedelta) else float(self.after)
        return now_ms + int(seconds * 1000)


@dataclass(frozen=True)
class ChildRun(Generic[R]):
    """A branch that wins when a child run of `task` ends, as `trigger_and_wait`.

    A child that fails wins too: `wait_for_any` then raises ChildRunFailed.
    A child that loses is cancelled, unless `cancel_if_lost=False` leaves
    it running (its result then goes nowhere). `options` are trigger
    options (priority, tags, concurrency_key...).
    """

    task: TaskRef[R]
    payload: Any = None
    cancel_if_lost: bool = True
    options: Mapping[str, Any] = field(default_factory=dict)

    kind = CHILD


Branch = EventWait | Timer | ChildRun[Any]


@dataclass(frozen=True, slots=True)
class AnyResult:
    """Which branch won (`index` into the list, `kind`: event, timer or
    child) and its value: the event's data, None for a timer, the child's
    output."""

    index: int
    kind: str
    value: Any


def _reason(b: Branch) -> str:
    return SLEEP if isinstance(b, Timer) else b.kind


def _check(branches: Sequence[Branch]) -> None:
    if not branches:
        raise ValueError("wait_for_any needs at least one wait")
    for i, b in enumerate(branches):
        if isinstance(b, EventWait):
            check_wait_pattern(b.name, b.match)
            lookback_ms(b.lookback)
        elif not isinstance(b, Timer | ChildRun):
            raise TypeError(f"wait {i} of wait_for_any is {b!r}; use EventWait, Timer or ChildRun")


def _winner(slots: Sequence[tuple[int, StepState | None]]) -> int | None:
    """The branch that resolved first. The fold settles a group in log order
    (one `completed`, the rest `lost`); branches resolved before any of them
    was recorded (`resolved`) are ordered by when, then by position."""
    done = [(rec.status != "completed", rec.ended_at or 0, i) for i, (_, rec) in enumerate(slots)
            if rec is not None and rec.status in DONE_STEPS]
    return min(done)[2] if done else None


async def wait_for_any(branches: Sequence[Branch]) -> AnyResult:
    """Suspend until the first of `branches` resolves; return which and its value.

    The losers are withdrawn: a late event or child result for one of them
    changes nothing. Deterministic on replay, and durable across worker
    restarts like every wait.
    """
    ctx = _in_body("stepline.wait_for_any()")
    _check(branches)
    slots = [ctx.next_position(_reason(b)) for b in branches]
    group = slots[0][0]
    first = _winner(slots)
    if first is None:
        await ctx.quiesce()
        waits = [await _open(ctx, b, pos, rec, group) for b, (pos, rec) in zip(branches, slots)]
        raise Suspend(*waits)
    positions = [pos for pos, _ in slots]

    async def settle(winner: int) -> int:
        await _withdraw_losers(ctx, branches, positions, winner)
        return winner

    index = await _step_wrapper(settle, CHECKPOINT)(first)
    won, (pos, rec) = branches[index], slots[index]
    assert rec is not None
    if isinstance(won, ChildRun):
        return AnyResult(index, CHILD, _child_result(won.task, ctx.run_id, pos, rec))
    if isinstance(won, Timer):
        return AnyResult(index, TIMER, None)
    return AnyResult(index, EVENT, _answer(rec, f"event that won wait {pos} of run {ctx.run_id}"))


async def _open(ctx: RunContext, b: Branch, pos: int, rec: StepState | None, group: int) -> Wait:
    """Make one branch resolvable (idempotently: a replay may get here again)."""
    if isinstance(b, EventWait):
        await register_event_wait(ctx, pos, rec, b.name, b.match, None, lookback_ms(b.lookback))
        return Wait(pos, EVENT, None, json.dumps({"event": b.name, "match": b.match, "any": group}), group)
    if isinstance(b, Timer):
        # Fixed when first reached, so a replay does not restart the clock.
        wake_at = rec.wake_at if rec is not None and rec.wake_at is not None else b.wake_at(ctx.clock())
        return Wait(pos, SLEEP, wake_at, json.dumps({"timer": wake_at, "any": group}), group)
    handle = await current_client().trigger(
        b.task, b.payload, idempotency_key=child_idempotency_key(ctx.run_id, pos),
        parent_run_id=ctx.run_id, parent_step=pos, **b.options)
    return Wait(pos, CHILD, None, json.dumps({"child": handle.run_id, "task": b.task.id, "any": group}), group)


async def _withdraw_losers(ctx: RunContext, branches: Sequence[Branch], positions: list[int], winner: int) -> None:
    """Inside the checkpoint, so at least once: each withdrawal is harmless to repeat."""
    for i, (b, pos) in enumerate(zip(branches, positions)):
        if i == winner:
            continue
        if isinstance(b, EventWait) and ctx.unregister_wait is not None:
            await ctx.unregister_wait(ctx.run_id, pos)
        elif isinstance(b, ChildRun) and b.cancel_if_lost and ctx.request is not None:
            child = idempotent_run_id(b.task.id, child_idempotency_key(ctx.run_id, pos))
            # A request straight to the child's partition: the fold ignores
            # it if the child has ended, so no read is needed first.
            await ctx.request(child, b.task.id, RunCancelled(f"lost wait_for_any of run {ctx.run_id}", "parent"))
